"""Training data: every input format, bad rows, cleaning, the split, and assistant-only labels."""

from __future__ import annotations

import csv
import json
import re

import pytest

from core.errors import UserError
from eval.task import find_task
from bench.fixtures import CHATML, tiny_tokenizer
from train.data import (
    CleaningReport,
    Conversation,
    clean,
    load_conversations,
    normalise_whitespace,
    split,
    strip_html,
    style_prompt,
)
from train.prepare import IGNORE_INDEX, ensure_chat_template, tokenize

U, A = "user", "assistant"


def write(path, rows):
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    else:
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


STYLE = find_task("style").prompt.user

FORMAT_CASES = [
    (
        "alpaca",
        {"instruction": "介绍一下", "input": "云栈盘", "output": "好的"},
        [{"role": U, "content": "介绍一下\n云栈盘"}, {"role": A, "content": "好的"}],
    ),
    (
        "alpaca",
        {
            "instruction": "再说一遍",
            "input": "",
            "output": "15GB",
            "system": "你是客服",
            "history": [["免费版多大？", "15GB"]],
        },
        [
            {"role": "system", "content": "你是客服"},
            {"role": U, "content": "免费版多大？"},
            {"role": A, "content": "15GB"},
            {"role": U, "content": "再说一遍"},
            {"role": A, "content": "15GB"},
        ],
    ),
    (
        "messages",
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        [{"role": U, "content": "hi"}, {"role": A, "content": "yo"}],
    ),
    (
        "messages",
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
        [{"role": U, "content": "hi"}, {"role": A, "content": "yo"}],
    ),
    (
        "xtuner",
        {"conversation": [{"system": "s", "input": "a", "output": "b"}, {"input": "c", "output": "d"}]},
        [
            {"role": "system", "content": "s"},
            {"role": U, "content": "a"},
            {"role": A, "content": "b"},
            {"role": U, "content": "c"},
            {"role": A, "content": "d"},
        ],
    ),
    (
        "style",
        {"user": "好累", "assistant": "辛苦啦", "style": "温柔"},
        [{"role": U, "content": style_prompt("好累", "温柔", STYLE)}, {"role": A, "content": "辛苦啦"}],
    ),
    (
        "prompt_completion",
        {"prompt": "1+1=", "completion": "2"},
        [{"role": U, "content": "1+1="}, {"role": A, "content": "2"}],
    ),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
@pytest.mark.parametrize(("fmt", "row", "expected"), FORMAT_CASES)
def test_formats_are_detected_and_read(tmp_path, suffix, fmt, row, expected):
    path = write(tmp_path / f"d{suffix}", [row])
    for declared in (None, fmt):
        convs = load_conversations(path, declared, prompt_task="style" if fmt == "style" else None)
        assert [c.messages for c in convs] == [expected]
        assert convs[0].source.startswith(path.name + ":")


@pytest.mark.parametrize(
    ("fmt", "row"), [(f, r) for f, r, _ in FORMAT_CASES if all(isinstance(v, str) for v in r.values())]
)
def test_flat_formats_read_from_csv(tmp_path, fmt, row):
    expected = next(e for f, r, e in FORMAT_CASES if r is row)
    task = "style" if fmt == "style" else None
    assert [c.messages for c in load_conversations(write(tmp_path / "d.csv", [row]), prompt_task=task)] == [
        expected
    ]


def test_style_rows_use_the_named_task_prompt(tmp_path):
    assert style_prompt("好累", "毒舌", STYLE).startswith("请用「毒舌」的语气回复")
    path = write(tmp_path / "d.jsonl", [{"user": "好累", "assistant": "辛苦啦", "style": "温柔"}])
    with pytest.raises(UserError, match=r"d.jsonl: the style-dialogue shape .* set prompt_task"):
        load_conversations(path)


BAD_ROWS = [
    ({"instruction": "x"}, "d.jsonl:2: missing field 'output' (alpaca format)"),
    ({"instruction": "x", "output": 3}, "d.jsonl:2: field 'output' must be text, got int (alpaca format)"),
    (
        {"instruction": "x", "output": "y", "history": [["only one"]]},
        "d.jsonl:2: history[0] must be an [instruction, answer] pair of texts (alpaca format)",
    ),
    ("not an object", "d.jsonl:2: expected an object, got str (alpaca format)"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_ROWS)
def test_bad_row_is_one_line_naming_file_and_row(tmp_path, bad, message):
    path = write(tmp_path / "d.jsonl", [{"instruction": "a", "output": "b"}, bad])
    with pytest.raises(UserError) as err:
        load_conversations(path)
    assert str(err.value) == f"{path.parent}/{message}"
    report = CleaningReport()
    assert len(load_conversations(path, skip_bad_rows=True, report=report)) == 1
    assert report.bad_rows_skipped == 1 and report.problems == [str(err.value)]


@pytest.mark.parametrize(
    ("rows", "fmt", "problem"),
    [
        (
            [{"messages": [{"role": "assistant", "content": "x"}]}],
            "messages",
            "turns must alternate user, assistant, starting with user",
        ),
        (
            [{"messages": [{"role": "user", "content": "x"}]}],
            "messages",
            "the conversation must end with an assistant turn",
        ),
        (
            [{"messages": [{"role": "robot", "content": "x"}]}],
            "messages",
            "messages[0]: unknown role 'robot'",
        ),
        ([{"conversation": [{"input": "a"}]}], "xtuner", "conversation[0]: missing field 'output'"),
    ],
)
def test_malformed_conversations(tmp_path, rows, fmt, problem):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=re.escape(f"d.jsonl:1: {problem}")):
        load_conversations(path, fmt)


def test_bad_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_conversations(tmp_path / "missing.jsonl")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(UserError, match="unknown data file type '.txt'"):
        load_conversations(tmp_path / "x.txt")
    (tmp_path / "b.jsonl").write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        load_conversations(tmp_path / "b.jsonl")
    write(tmp_path / "u.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        UserError, match=r"cannot tell the format from the first row's keys \['answer', 'question'\]"
    ):
        load_conversations(tmp_path / "u.jsonl")
    with pytest.raises(UserError, match="unknown format 'sharegpt'"):
        load_conversations(tmp_path / "u.jsonl", "sharegpt")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  hello \t world  ", "hello world"),
        ("a\r\nb\r\n\r\n\r\n\r\nc", "a\nb\n\nc"),
        ("中文\u3000\u3000空格", "中文 空格"),
        ("第一行  \n  第二行", "第一行\n第二行"),
    ],
)
def test_normalise_whitespace(raw, expected):
    assert normalise_whitespace(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("<p>免费版 <b>15GB</b></p>", "免费版 15GB"),
        ("a &lt; b", "a &lt; b"),  # no tag: left alone
        ("<br/>x &amp; y", "x & y"),
        ("3 < 5 and 7 > 2", "3 < 5 and 7 > 2"),
    ],
)
def test_strip_html(raw, expected):
    assert strip_html(raw) == expected


def test_cleaning_report_counts_each_step():
    def conv(u, a):
        return Conversation([{"role": U, "content": u}, {"role": A, "content": a}], "t:1")

    convs = [conv("hi", "yo"), conv(" hi ", "yo"), conv("<i>x</i>", "y"), conv("q", "   "), conv("q2", "a2")]
    report = CleaningReport()
    kept = clean(convs, report)
    assert [c.messages[0]["content"] for c in kept] == ["hi", "x", "q2"]
    assert (report.html_stripped, report.empty_dropped, report.duplicates_dropped) == (1, 1, 1)


def test_split_is_deterministic_and_complete():
    convs = [
        Conversation([{"role": U, "content": str(i)}, {"role": A, "content": "a"}], f"t:{i}")
        for i in range(50)
    ]
    parts = split(convs, seed=3)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [40, 5, 5]
    assert parts == split(convs, seed=3) and parts != split(convs, seed=4)
    assert sorted(c.source for p in parts.values() for c in p) == sorted(c.source for c in convs)
    with pytest.raises(UserError, match="sum to 1"):
        split(convs, (0.5, 0.1, 0.1))


MULTI = Conversation(
    [
        {"role": "system", "content": "你是客服"},
        {"role": U, "content": "免费版多大？"},
        {"role": A, "content": "15GB。"},
        {"role": U, "content": "月费呢？"},
        {"role": A, "content": "1TB 每月29元。"},
    ],
    "t:1",
)


@pytest.mark.parametrize("template", ["chatml", "alpaca-fallback"])
def test_labels_cover_exactly_the_assistant_turns(template):
    tok = tiny_tokenizer(eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<s>")
    if template == "chatml":
        tok.chat_template = CHATML
        end = "<|im_end|>\n"
    else:
        assert ensure_chat_template(tok)
        end = "<|im_end|>\n\n"  # the fallback ends a reply with eos and a blank line
    example = tokenize(tok, MULTI, 512, "drop", CleaningReport())
    assert len(example.labels) == len(example.input_ids)
    learned = [t for t in example.labels if t != IGNORE_INDEX]
    # Decoding exactly the unmasked tokens gives the replies with their end-of-turn marks.
    assert tok.decode(learned) == "15GB。" + end + "1TB 每月29元。" + end
    masked = [t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX]
    assert "免费版多大" in tok.decode(masked) and "15GB" not in tok.decode(masked)


def test_overlong_rows_truncated_or_dropped():
    tok = tiny_tokenizer(eos_token="<|im_end|>")
    tok.chat_template = CHATML
    full = tokenize(tok, MULTI, 10_000, "drop", CleaningReport())
    report = CleaningReport()
    cut = tokenize(tok, MULTI, len(full.input_ids) - 3, "truncate", report)
    assert cut.input_ids == full.input_ids[:-3] and report.overlong_truncated == 1
    assert tokenize(tok, MULTI, len(full.input_ids) - 3, "drop", report) is None
    assert report.overlong_dropped == 1
    # Truncated before the first reply: nothing to learn, dropped.
    assert tokenize(tok, MULTI, 5, "truncate", report) is None


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_users_file_with_its_own_column_names(tmp_path, suffix):
    import pandas as pd

    rows = [
        {"问题": "免费版有多大？", "答案": "15GB", "备注": "x"},
        {"问题": "能退款吗？", "答案": "7天内可以", "备注": "y"},
    ]
    path = tmp_path / f"qa{suffix}"
    (
        pd.DataFrame(rows).to_csv(path, index=False)
        if suffix == ".csv"
        else pd.DataFrame(rows).to_parquet(path)
    )
    convs = load_conversations(path, columns={"问题": "prompt", "答案": "completion"})
    assert [c.messages for c in convs] == [
        [{"role": "user", "content": "免费版有多大？"}, {"role": "assistant", "content": "15GB"}],
        [{"role": "user", "content": "能退款吗？"}, {"role": "assistant", "content": "7天内可以"}],
    ]
    with pytest.raises(UserError, match=r"qa\.\w+: column 'question' named in `columns` is not in the data"):
        load_conversations(path, columns={"question": "prompt"})


def test_a_synth_source_is_read_from_the_runs_directory_given_wherever_the_command_starts(
    tmp_path, monkeypatch
):
    """`{synth: NAME}` reads RUNS_DIR/synth/NAME (a `--runs-dir` elsewhere), not ./runs/synth."""
    from core.artifacts import SynthProvenance, write_artifact
    from core.workspace import Workspace
    from train.recipe import Recipe
    from train.prepare import source_conversations

    runs = tmp_path / "elsewhere" / "runs"
    folder = Workspace(runs).synth_root / "fact"
    folder.mkdir(parents=True)
    rows = [
        {"messages": [{"role": "user", "content": f"问{k}"}, {"role": "assistant", "content": f"答{k}"}]}
        for k in range(3)
    ]
    write(folder / "data.jsonl", rows)
    write_artifact(
        folder / "provenance.json",
        SynthProvenance,
        {
            "recipe": "synth/fact.yaml",
            "recipe_sha256": None,
            "teacher": {},
            "templates_sha256": {},
            "context_sha256": None,
            "sampling": {},
            "seed": 0,
            "seeds_sha256": "0" * 64,
            "counts": {},
            "removed": {},
            "budget": {},
            "stopped": None,
            "complete": True,
            "format": "messages",
            "data": "data.jsonl",
            "data_sha256": "0" * 64,
            "git_revision": None,
        },
    )
    recipe = Recipe.model_validate({"name": "s", "data": [{"synth": "fact"}]})
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    got = source_conversations(recipe, tmp_path, CleaningReport(), Workspace(runs).synth_root)
    assert [c.messages[-1]["content"] for c in got] == ["答0", "答1", "答2"]
    with pytest.raises(UserError, match="data source synth 'fact' is read from the runs directory"):
        source_conversations(recipe, tmp_path, CleaningReport())
