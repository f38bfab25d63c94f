"""The contamination gate (train/contamination.py): units and n-grams, planted duplicates and
overlaps found, paraphrases not, and `make train` stopped by a planted duplicate or, when the
recipe allows it, reporting it."""

from __future__ import annotations

import json

import pytest

from train import contamination as C
from train.data import Conversation
from train.recipe import ContaminationSpec


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello, World!", ["hello", "world"]),
        ("免费版有15GB空间", ["免", "费", "版", "有", "15gb", "空", "间"]),
        ("ＡＢＣ　１２３", ["abc", "123"]),  # NFKC: full-width letters and digits
        ("snake_case-word", ["snake", "case", "word"]),
        ("。！？", []),
    ],
)
def test_units(text, expected):
    assert C.units(text) == expected


def conv(source, user, reply="好的。"):
    return Conversation([{"role": "user", "content": user}, {"role": "assistant", "content": reply}], source)


EVAL = [
    C.EvalText("faq", "test", "7", "question", "我刚注册了账号还没花钱，能往里存多少东西？"),
    C.EvalText(
        "faq", "test", "8", "question", "The quick brown fox jumps over the lazy dog near the river bank"
    ),
    C.EvalText("faq", "test", "9", "question", "年假有几天"),  # short: whole turns only
    C.EvalText("faq", "test", "10", "question", "专业"),
]  # under 4 units: not compared


@pytest.mark.parametrize(
    "train, where",
    [
        # verbatim inside a templated prompt: the template does not hide it
        (conv("a:1", "请用一句话回答：我刚注册了账号还没花钱，能往里存多少东西？"), ("duplicates", "7")),
        # a reply that repeats the English question word for word
        (
            conv(
                "a:2", "Tell me a story.", "the quick brown fox jumps over the lazy dog near the river bank!"
            ),
            ("duplicates", "8"),
        ),
        # half of it: an overlap, reported, not a stop
        (conv("a:3", "我刚注册了账号还没花钱，能往里存吗"), ("overlaps", "7")),
        # a short question as a whole turn, and inside a longer one (not counted)
        (conv("a:4", "年假有几天？"), ("duplicates", "9")),
        (conv("a:5", "请问年假有几天以及如何申请"), None),
        # a paraphrase of the same question
        (conv("a:6", "免费用户能用多大的云盘容量？"), None),
        (conv("a:7", "专业"), None),
    ],
)
def test_planted_duplicates_and_overlaps_are_found_and_paraphrases_are_not(train, where):
    result = C.check([train], EVAL, ContaminationSpec())
    found = [(kind, h.eval.item_id) for kind in ("duplicates", "overlaps") for h in getattr(result, kind)]
    assert found == ([where] if where else [])
    assert result.eval_texts == 3


def test_the_record_shows_the_worst_pairs_side_by_side_and_the_flagged_items():
    result = C.check(
        [conv("mine.jsonl:3", "请用一句话回答：我刚注册了账号还没花钱，能往里存多少东西？")],
        EVAL,
        ContaminationSpec(),
    )
    record = C.record(result, ContaminationSpec(allow=True))
    assert (record["duplicates"], record["overlaps"], record["allowed"]) == (1, 0, True)
    assert record["flagged_items"] == {"faq/test": ["7"]}
    (worst,) = record["worst"]
    assert worst["train"] == "mine.jsonl:3" and worst["containment"] == 1.0
    assert worst["eval_text"] == EVAL[0].text and EVAL[0].text in worst["train_text"]


def test_compared_fields_default_to_what_the_prompt_reads_and_the_reference():
    from eval.task import find_task

    assert C.compared_fields(find_task("style")) == ["reference", "style", "user"]
    assert C.compared_fields(find_task("fewclue_bustm")) == ["sentence1", "sentence2"]
    assert C.compared_fields(find_task("fact")) == ["question"]  # its answers overlap by design


def test_a_planted_duplicate_stops_training_with_one_line_and_an_allowing_recipe_reports_it(tmp_path, capsys):
    from models.card import find_card
    from models.store import provision
    from selectune.cli import main
    from bench.fixtures import build_tiny_qwen2
    from bench.fixtures import page_files
    from tests.test_byo import CARD

    for name, text in page_files().items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    my = tmp_path / "my"
    (my / "mine.jsonl").write_text(
        json.dumps({"instruction": "买了以后能退吗？", "output": "可以。"}, ensure_ascii=False) + "\n",
        encoding="utf-8",
    )
    recipe = (
        (my / "train.yaml")
        .read_text(encoding="utf-8")
        .replace(
            "  - {task: faq.yaml, split: train}", "  - {task: faq.yaml, split: train}\n  - {path: mine.jsonl}"
        )
    )
    (my / "train.yaml").write_text(recipe, encoding="utf-8")
    provision(
        find_card(CARD),
        tmp_path / "cache" / "models",
        weights=build_tiny_qwen2(tmp_path / "tiny", initializer_range=0.2),
    )
    args = ["--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "select", "--suite", str(my / "suite.yaml"), "--models", CARD]) == 0
    capsys.readouterr()

    assert main([*args, "train", "--recipe", str(my / "train.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "training conversation " in err[0] and "mine.jsonl:1" in err[0]
    assert "duplicates evaluation item faq/test:9 (question: n-gram containment 100%" in err[0]
    assert "contamination.allow: true" in err[0]
    assert not (tmp_path / "runs" / "train" / f"train-{CARD}").exists()  # a refused run leaves nothing

    (my / "train.yaml").write_text(recipe + "contamination: {allow: true}\n", encoding="utf-8")
    assert main([*args, "train", "--recipe", str(my / "train.yaml")]) == 0
    assert "1 duplicates allowed by" in capsys.readouterr().out
    summary = json.loads((tmp_path / "runs" / "train" / f"train-{CARD}" / "summary.json").read_text())
    gate = summary["contamination"]
    assert (gate["duplicates"], gate["allowed"], gate["flagged_items"]) == (1, True, {"faq/test": ["9"]})


def test_without_a_selection_the_gate_compares_against_the_default_suite(tmp_path, capsys):
    """No selection, no checks: `make rescore` and `make report` will score the default suite, so
    the gate compares against it; FewCLUE's data is not in this data directory: named, passed over."""
    from types import SimpleNamespace

    from eval.task import find_task, load_items

    recipe = SimpleNamespace(checks=[], path=tmp_path / "train.yaml")
    texts = C.evaluation_texts(recipe, None, tmp_path / "no-data")
    assert {(t.task, t.split) for t in texts} == {("style", "test"), ("fact", "test")}
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[1].strip() for line in out] == [
        "fewclue_bustm-dev of the default suite not compared",
        "fewclue_ocnli_fc-dev of the default suite not compared",
    ]
    fact = load_items(find_task("fact"), "test", tmp_path)
    conversations = [
        Conversation(
            [
                {"role": "user", "content": fact[0].messages()[-1]["content"]},
                {"role": "assistant", "content": fact[0].gold},
            ],
            "mine.jsonl:1",
        )
    ]
    result = C.check(conversations, texts, ContaminationSpec())
    assert {(d.eval.task, d.eval.item_id) for d in result.duplicates} == {("fact", fact[0].id)}
