"""Training data: read what users bring, clean it with a printed report and split it
(train/prepare.py turns each conversation into token ids).

Formats (auto-detected from a row's keys, or declared):
- `alpaca`: instruction, input, output, optional system and history ([[instruction, answer], ...])
- `messages`: OpenAI `messages` [{role, content}], or ShareGPT `conversations` [{from, value}]
- `xtuner`: `conversation` [{input, output, system?}, ...]
- `style`: user, assistant, style (the prompt of the task `prompt_task` names is put around it)
- `prompt_completion`: prompt, completion
Files: .jsonl, .json (an array), .csv or .parquet, columns renamed by the source's `columns`. A bad
row stops with one line naming file, row and problem; under `skip_bad_rows` it is counted instead.
"""

from __future__ import annotations

import hashlib
import html
import json
import random
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from core.errors import UserError
from core.rows import BadLine, read_rows
from eval.sources import read_parquet, rename_columns
from eval.task import find_task

FORMATS: tuple[str, ...] = ("alpaca", "messages", "xtuner", "style", "prompt_completion")

# Keys that identify a format, in the order they are tried.
_SIGNATURES: list[tuple[str, set[str]]] = [
    ("messages", {"messages"}),
    ("messages", {"conversations"}),
    ("xtuner", {"conversation"}),
    ("alpaca", {"instruction", "output"}),
    ("style", {"user", "assistant", "style"}),
    ("prompt_completion", {"prompt", "completion"}),
]
_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


@dataclass(frozen=True)
class Conversation:
    messages: list[dict]
    """[{role, content}], roles system?/user/assistant alternating, ending with assistant."""
    source: str
    """`file:row`, for messages about this example."""


@dataclass
class CleaningReport:
    read: int = 0
    bad_rows_skipped: int = 0
    html_stripped: int = 0
    empty_dropped: int = 0
    duplicates_dropped: int = 0
    overlong_truncated: int = 0
    overlong_dropped: int = 0
    kept: int = 0
    problems: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [
            f"read {self.read} rows",
            f"  bad rows skipped: {self.bad_rows_skipped}",
            f"  rows with HTML tags stripped: {self.html_stripped}",
            f"  empty rows dropped: {self.empty_dropped}",
            f"  duplicate rows dropped: {self.duplicates_dropped}",
            f"  over-long rows truncated: {self.overlong_truncated}",
            f"  over-long rows dropped: {self.overlong_dropped}",
            f"kept {self.kept}",
        ]


class _BadRow(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Reading


_SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def _read(path: Path, columns: dict[str, str]) -> list[tuple[int, object]]:
    if (fmt := _SUFFIX_FORMATS.get(path.suffix.lower())) is None:
        raise UserError(
            f"{path}: unknown data file type '{path.suffix}' (expected .jsonl, .json, .csv or .parquet)"
        )
    return rename_columns(
        read_parquet(path) if fmt == "parquet" else read_rows(path, fmt), columns, str(path)
    )


def detect_format(row: object) -> str | None:
    if not isinstance(row, dict):
        return None
    for name, keys in _SIGNATURES:
        if keys <= row.keys():
            return name
    return None


def _text(row: dict, key: str, *, required: bool = True) -> str:
    value = row.get(key)
    if value is None or value == "":
        if required:
            raise _BadRow(f"missing field '{key}'")
        return ""
    if not isinstance(value, str):
        raise _BadRow(f"field '{key}' must be text, got {type(value).__name__}")
    return value


def _alpaca(row: dict) -> list[dict]:
    messages = [{"role": "system", "content": _text(row, "system")}] if row.get("system") else []
    history = row.get("history") or []
    if not isinstance(history, list):
        raise _BadRow("field 'history' must be a list of [instruction, answer] pairs")
    for n, pair in enumerate(history):
        if not (isinstance(pair, list | tuple) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise _BadRow(f"history[{n}] must be an [instruction, answer] pair of texts")
        messages += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    instruction, extra = _text(row, "instruction"), _text(row, "input", required=False)
    # As LLaMA-Factory does: the input follows the instruction in the same user turn.
    user = f"{instruction}\n{extra}" if extra else instruction
    return messages + [
        {"role": "user", "content": user},
        {"role": "assistant", "content": _text(row, "output")},
    ]


def _messages(row: dict) -> list[dict]:
    key = "messages" if "messages" in row else "conversations"
    turns = row[key]
    if not isinstance(turns, list) or not turns:
        raise _BadRow(f"field '{key}' must be a non-empty list of turns")
    out = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _BadRow(f"{key}[{n}] must be an object")
        if "role" in turn:
            role, content = turn.get("role"), turn.get("content")
        else:
            role, content = _SHAREGPT_ROLES.get(turn.get("from")), turn.get("value")
        if role not in ("system", "user", "assistant"):
            raise _BadRow(f"{key}[{n}]: unknown role {turn.get('role', turn.get('from'))!r}")
        if not isinstance(content, str):
            raise _BadRow(f"{key}[{n}]: content must be text")
        out.append({"role": role, "content": content})
    return out


def _xtuner(row: dict) -> list[dict]:
    turns = row["conversation"]
    if not isinstance(turns, list) or not turns:
        raise _BadRow("field 'conversation' must be a non-empty list of {input, output}")
    out = []
    for n, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _BadRow(f"conversation[{n}] must be an object")
        try:
            if turn.get("system"):
                out.append({"role": "system", "content": _text(turn, "system")})
            out += [
                {"role": "user", "content": _text(turn, "input")},
                {"role": "assistant", "content": _text(turn, "output")},
            ]
        except _BadRow as exc:
            raise _BadRow(f"conversation[{n}]: {exc}") from None
    return out


def style_prompt(user: str, style: str, template: str) -> str:
    """A task's own user prompt (`prompt_task`'s, e.g. tasks/style.yaml) around a message, so
    training teaches what is scored."""
    import jinja2

    return (
        jinja2.Environment(undefined=jinja2.StrictUndefined)
        .from_string(template)
        .render(user=user, style=style)
    )


def _style(row: dict, template: str) -> list[dict]:
    return [
        {"role": "user", "content": style_prompt(_text(row, "user"), _text(row, "style"), template)},
        {"role": "assistant", "content": _text(row, "assistant")},
    ]


def _prompt_completion(row: dict) -> list[dict]:
    return [
        {"role": "user", "content": _text(row, "prompt")},
        {"role": "assistant", "content": _text(row, "completion")},
    ]


_CONVERT = {
    "alpaca": _alpaca,
    "messages": _messages,
    "xtuner": _xtuner,
    "prompt_completion": _prompt_completion,
}


def _check_turns(messages: list[dict]) -> None:
    roles = [m["role"] for m in messages]
    body = roles[1:] if roles and roles[0] == "system" else roles
    if "system" in body:
        raise _BadRow("a system turn may only come first")
    if not body or body[-1] != "assistant":
        raise _BadRow("the conversation must end with an assistant turn")
    if any(r == body[i - 1] for i, r in enumerate(body) if i) or body[0] != "user":
        raise _BadRow("turns must alternate user, assistant, starting with user")


def load_conversations(
    path: Path,
    fmt: str | None = None,
    *,
    skip_bad_rows: bool = False,
    report: CleaningReport | None = None,
    prompt_task: str | None = None,
    columns: dict[str, str] | None = None,
) -> list[Conversation]:
    """Every row of `path` as a Conversation; `fmt` None detects the format from the first row.
    `prompt_task`: for the style-dialogue shape, the task whose user prompt wraps each message;
    `columns`: the file's column names -> the format's (e.g. {问题: prompt, 答案: completion})."""
    if fmt is not None and fmt not in FORMATS:
        raise UserError(f"{path}: unknown format '{fmt}' (expected one of {', '.join(FORMATS)})")
    report = report if report is not None else CleaningReport()
    rows = _read(path, columns or {})
    if not rows:
        raise UserError(f"{path}: no rows")
    if fmt is None:
        first = next((r for _, r in rows if not isinstance(r, BadLine)), None)
        fmt = detect_format(first)
        if fmt is None:
            keys = sorted(first) if isinstance(first, dict) else type(first).__name__
            raise UserError(
                f"{path}: cannot tell the format from the first row's keys {keys} "
                f"(declare one of {', '.join(FORMATS)})"
            )
    if fmt == "style" and prompt_task is None:
        raise UserError(
            f"{path}: the style-dialogue shape (user, assistant, style) needs the task whose "
            "prompt wraps each message: set prompt_task in the recipe's data source (e.g. style)"
        )
    template = find_task(prompt_task).prompt.user if fmt == "style" else None
    out = []
    for n, row in rows:
        report.read += 1
        try:
            if isinstance(row, BadLine):
                raise _BadRow(row.problem)
            if not isinstance(row, dict):
                raise _BadRow(f"expected an object, got {type(row).__name__}")
            messages = _style(row, template) if fmt == "style" else _CONVERT[fmt](row)
            _check_turns(messages)
        except _BadRow as exc:
            problem = f"{path}:{n}: {exc} ({fmt} format)"
            if not skip_bad_rows:
                raise UserError(problem) from None
            report.bad_rows_skipped += 1
            report.problems.append(problem)
            continue
        out.append(Conversation(messages, f"{path.name}:{n}"))
    return out


# ---------------------------------------------------------------------------------------------
# Cleaning


class _TextOnly(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(\s[^<>]*)?/?>")
_SPACES = re.compile(r"[ \t\u00a0\u3000]+")


def strip_html(text: str) -> str:
    """Text without HTML tags (and with entities decoded) when it holds a tag; unchanged otherwise."""
    if not _TAG.search(text):
        return text
    parser = _TextOnly()
    parser.feed(text), parser.close()
    return html.unescape("".join(parser.parts))


def normalise_whitespace(text: str) -> str:
    """Runs of spaces and tabs (ASCII, no-break, ideographic) to one space, line ends to \\n,
    at most one blank line, no spaces around lines, none at either end."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [_SPACES.sub(" ", line).strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def clean(conversations: list[Conversation], report: CleaningReport) -> list[Conversation]:
    """HTML stripped, whitespace normalised, empty and duplicate conversations dropped."""
    out, seen = [], set()
    for conv in conversations:
        messages, stripped = [], False
        for m in conv.messages:
            content = strip_html(m["content"])
            stripped |= content != m["content"]
            messages.append({"role": m["role"], "content": normalise_whitespace(content)})
        report.html_stripped += stripped
        if any(not m["content"] for m in messages if m["role"] != "system"):
            report.empty_dropped += 1
            continue
        key = json.dumps(messages, ensure_ascii=False, sort_keys=True)
        if key in seen:
            report.duplicates_dropped += 1
            continue
        seen.add(key)
        out.append(Conversation(messages, conv.source))
    return out


def split(
    conversations: list[Conversation], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, list[Conversation]]:
    """A seeded shuffle cut into train/val/test; the same input and seed give the same split."""
    if abs(sum(fractions) - 1.0) > 1e-9 or any(f < 0 for f in fractions):
        raise UserError(f"split fractions must be non-negative and sum to 1, got {list(fractions)}")
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_train = round(fractions[0] * len(order))
    n_val = round(fractions[1] * len(order))
    cut = {
        "train": order[:n_train],
        "val": order[n_train : n_train + n_val],
        "test": order[n_train + n_val :],
    }
    return {name: [conversations[i] for i in idx] for name, idx in cut.items()}


def data_sha256(conversations: list[Conversation]) -> str:
    digest = hashlib.sha256()
    for conv in conversations:
        digest.update(json.dumps(conv.messages, ensure_ascii=False, sort_keys=True).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def save_split(parts: dict[str, list[Conversation]], out_dir: Path) -> None:
    """`<out_dir>/{train,val,test}.jsonl` in the `messages` format, written atomically."""
    from core.files import write_text_atomic

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, convs in parts.items():
        write_text_atomic(
            out_dir / f"{name}.jsonl",
            "".join(
                json.dumps({"messages": c.messages, "source": c.source}, ensure_ascii=False) + "\n"
                for c in convs
            ),
        )
