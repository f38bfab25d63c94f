"""Reading what a teacher model writes back: a JSON list or a numbered list of new examples, a
single answer, a follow-up question. Teachers wrap lists in prose and code fences, number them
in several ways, and break off mid-item; whatever cannot be read is reported, never guessed."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

QUESTION_KEYS = ("question", "q", "instruction", "user", "prompt", "input", "问题", "问")
ANSWER_KEYS = ("answer", "a", "output", "assistant", "reply", "response", "答案", "回答", "答")

_FENCE = re.compile(r"```[a-zA-Z]*\s*\n?(.*?)```", re.S)
# "1." "1)" "1、" "1：" "(1)" "（1）" "第1条" "- " "* " "• " at the start of a line
_MARKER = re.compile(
    r"^\s*(?:\d{1,3}\s*[.)）、．:：]|[(（]\d{1,3}[)）]|第\s*\d{1,3}\s*[条个题]\s*[:：.、]?|[-*•])\s*", re.M
)
_QA = re.compile(
    r"^\s*(?:问题?|Q|question)\s*[:：]\s*(?P<q>.+?)\s*(?:\n|\s)\s*"
    r"(?:答案?|回答|A|answer)\s*[:：]\s*(?P<a>.+)$",
    re.S | re.I,
)
_QUOTES = "\"'“”‘’「」『』"
_LABEL = re.compile(r"^\s*(?:问题?|Q|question|用户|user)\s*[:：]\s*", re.I)
_ANSWER_LABEL = re.compile(r"^\s*(?:答案?|回答|A|answer|回复|助手|assistant)\s*[:：]\s*", re.I)


@dataclass
class Parsed:
    items: list[dict]
    """Each {"question": str} or {"question": str, "answer": str}."""
    broken: int
    """Entries seen but unusable (an object without a question, an empty entry)."""
    how: str
    """"json", "numbered" or "none"."""


def _clean(text: str) -> str:
    lines = text.strip().splitlines()
    text = " ".join(text.split()) if len(lines) < 2 else "\n".join(line.strip() for line in lines)
    return text.strip().strip(_QUOTES).strip()


def _from_object(obj) -> dict | None:
    if isinstance(obj, str):
        return {"question": _clean(obj)} if _clean(obj) else None
    if not isinstance(obj, dict):
        return None
    lower = {str(k).strip().lower(): v for k, v in obj.items()}
    q = next((lower[k] for k in QUESTION_KEYS if isinstance(lower.get(k), str) and lower[k].strip()), None)
    if q is None:
        return None
    a = next((lower[k] for k in ANSWER_KEYS if isinstance(lower.get(k), str) and lower[k].strip()), None)
    return {"question": _clean(q), **({"answer": _clean(a)} if a else {})}


def _json_list(text: str) -> list | None:
    start, end = text.find("["), text.rfind("]")
    if start < 0 or end <= start:
        return None
    try:
        data = json.loads(text[start : end + 1])
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, list) else None


def _salvage(text: str) -> tuple[list, bool] | None:
    """The complete elements of a JSON array cut off mid-way (a teacher out of tokens), and
    whether something unfinished followed them."""
    start = text.find("[")
    if start < 0:
        return None
    decoder, pos, out = json.JSONDecoder(), start + 1, []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            return (out, False) if out else None
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return (out, True) if out else None
        out.append(value)


def _split_item(body: str) -> dict | None:
    body = body.strip()
    if not body:
        return None
    qa = _QA.match(body)
    if qa:
        return {"question": _clean(qa["q"]), "answer": _clean(qa["a"])}
    body = _LABEL.sub("", body)
    return {"question": _clean(body)} if _clean(body) else None


def parse_list(text: str) -> Parsed:
    """New examples from a teacher's reply: a JSON array (of strings or objects) anywhere in it,
    inside a code fence or not; otherwise a numbered or bulleted list, an item running until the
    next marker (prose before the first marker is the teacher's preamble and is dropped)."""
    fenced = _FENCE.findall(text)
    for candidate in [*fenced, text]:
        data = _json_list(candidate)
        if data is not None:
            items = [_from_object(o) for o in data]
            return Parsed([i for i in items if i], sum(i is None for i in items), "json")
    salvaged = _salvage(fenced[0] if fenced else text)
    if salvaged is not None and not _MARKER.search(text):
        data, cut = salvaged
        items = [_from_object(o) for o in data]
        return Parsed([i for i in items if i], sum(i is None for i in items) + cut, "json (cut off)")
    starts = [m for m in _MARKER.finditer(text)]
    if len(starts) < 1:
        return Parsed([], 0, "none")
    items, broken = [], 0
    for k, m in enumerate(starts):
        end = starts[k + 1].start() if k + 1 < len(starts) else len(text)
        item = _split_item(text[m.end() : end])
        if item is None:
            broken += 1
        else:
            items.append(item)
    return Parsed(items, broken, "numbered")


FINAL = "最终答案："


def parse_answer(
    text: str, *, step_by_step: bool = False, marker: str = FINAL, keep_reasoning: bool = False
) -> str:
    """A reply as an answer: labels ("答：") and wrapping quotes removed; "" when nothing is left.
    After step-by-step reasoning only what follows the last `marker` counts (with
    `keep_reasoning`, the reasoning too, up to the end of that line), and a reply without the
    marker gives ""."""
    text = _FENCE.sub(lambda m: m.group(1), text).strip()
    if step_by_step:
        bare = marker.rstrip("：:")
        text = re.sub(re.escape(bare) + r"\s*[：:]", marker, text)
        if marker not in text:
            return ""
        head, tail = text.rsplit(marker, 1)
        final = tail.strip().splitlines()[0].strip() if tail.strip() else ""
        if not _clean(_ANSWER_LABEL.sub("", final)):
            return ""
        if keep_reasoning:
            return _clean(f"{head.rstrip()}\n{marker} {final}".strip())
        text = final
    return _clean(_ANSWER_LABEL.sub("", text))


def parse_followup(text: str) -> str:
    """The follow-up question a teacher wrote in a persona: its first non-empty line, labels and
    quotes removed."""
    for line in text.strip().splitlines():
        speaker = r"^\s*[^：:\s]{1,8}[：:]"
        line = _clean(re.sub(speaker + r"\s*", "", line) if re.match(speaker, line) else line)
        if line:
            return line
    return ""
