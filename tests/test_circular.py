"""Option-order robustness (eval/circular.py): rotations of the option lines, the two circular
metrics, the suite's checks, and a circular entry scored end to end on a tiny model."""

from __future__ import annotations

import json

import pytest

from core.errors import UserError
from eval import metrics as M
from eval.circular import circular_summary, option_spans, rotations
from eval.summary import RunSummary
from eval.suite import load_suite
from eval.task import Item, find_task

PROMPT = "阅读文章：天晴了\n问题：下雨了吗\nA. 对\nB. 错\nC. 可能\n请从“A”，“B”，“C”中进行选择。\n答："


@pytest.mark.parametrize(
    ("k", "options", "gold"),
    [
        (0, ["对", "错", "可能"], "B"),
        (1, ["错", "可能", "对"], "A"),  # the right text, 错, now sits under A
        (2, ["可能", "对", "错"], "C"),
    ],
)
def test_each_rotation_moves_the_texts_and_relabels_the_gold(k, options, gold):
    task = find_task("fewclue_ocnli_fc")
    rotated = rotations(task, [Item("7", {}, PROMPT, None, "B")])
    assert [i.id for i in rotated] == ["7@0", "7@1", "7@2"]
    item = rotated[k]
    assert [item.user[a:b] for a, b in option_spans(task, item.user)] == options and item.gold == gold
    assert item.user.endswith("请从“A”，“B”，“C”中进行选择。\n答：") and item.user.startswith(
        "阅读文章：天晴了\n"
    )


def test_a_prompt_without_option_lines_cannot_be_rotated():
    task = find_task("fewclue_bustm")
    with pytest.raises(UserError, match="item 3: the prompt has no line per option"):
        rotations(task, [Item("3", {}, "two sentences, A or B?", None, "A")])


def summary_of(answers: dict[str, list[str]], golds: dict[str, str]) -> RunSummary:
    task = find_task("fewclue_bustm")
    rows = [
        {
            "item_id": f"{i}@{k}",
            "prompt": "p",
            "output": letter,
            "gold": gold_k,
            "parsed": letter,
            "scores": {M.ACCURACY: float(letter == gold_k)},
        }
        for i, letters in answers.items()
        for k, (letter, gold_k) in enumerate(zip(letters, golds[i]))
    ]
    return circular_summary(RunSummary("r", task, "dev@circular", "gen", "m", rows, 1.0, len(rows)), "dev")


@pytest.mark.parametrize(
    ("answers", "golds", "circular", "following"),
    [
        (
            {"1": ["A", "B"], "2": ["B", "A"]},
            {"1": "AB", "2": "BA"},
            [1.0, 1.0],
            [0.0, 0.0],
        ),  # follows the content
        ({"1": ["A", "A"], "2": ["A", "A"]}, {"1": "AB", "2": "BA"}, [0.0, 0.0], [1.0, 1.0]),  # always "A"
        (
            {"1": ["A", "B"], "2": [None, None]},
            {"1": "AB", "2": "BA"},
            [1.0, 0.0],
            [0.0, 0.0],
        ),  # unparsable is no letter
        ({"1": ["A", "A"]}, {"1": "AA"}, [1.0], [1.0]),  # right both times, by the letter alone
    ],
)
def test_circular_accuracy_needs_every_rotation_and_letter_following_one_letter(
    answers, golds, circular, following
):
    run = summary_of(answers, golds)
    assert [i["scores"][M.CIRCULAR_ACCURACY] for i in run.items] == circular
    assert [i["scores"][M.LETTER_FOLLOWING] for i in run.items] == following
    assert run.split == "dev" and [i["item_id"] for i in run.items] == sorted(answers)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (
            "{task: style, split: test, mode: gen, circular: true}",
            "circular needs a choice task whose prompt has a line",
        ),
        (
            "{task: fewclue_bustm, split: dev, mode: gen, circular: true, metric: accuracy}",
            "does not compute metric 'accuracy' when circular (metrics: circular_accuracy, letter_following)",
        ),
    ],
)
def test_a_circular_entry_that_cannot_be_asked_is_one_line(tmp_path, entry, message):
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nentries:\n  - {entry}\n", encoding="utf-8")
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_suite(path)


def test_a_task_cannot_name_a_circular_metric(tmp_path):
    from tests.test_endpoint import TASK

    path = tmp_path / "pairs.yaml"
    path.write_text(
        TASK.replace("metrics: [accuracy]", "metrics: [accuracy, circular_accuracy]"), encoding="utf-8"
    )
    from eval.task import load_task

    with pytest.raises(
        UserError, match="cannot compute metric 'circular_accuracy': it is computed for a suite entry"
    ):
        load_task(path)


def test_a_circular_entry_is_scored_beside_the_plain_one(tmp_path, capsys):
    from selectune.cli import main
    from tests.test_endpoint import pairs_suite

    args = pairs_suite(
        tmp_path,
        6,
        "  - {task: pairs.yaml, split: dev, mode: ppl}\n"
        "  - {task: pairs.yaml, split: dev, mode: ppl, circular: true}\n",
    )
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "circular_accuracy" in out and "letter_following" in out
    selection = json.loads((tmp_path / "runs" / "selection.json").read_text(encoding="utf-8"))
    cells = {(c["model"], c["metric"]): c for c in selection["cells"]}
    for model in ("a", "b"):
        assert cells[(model, "circular_accuracy")]["n"] == 6 and cells[(model, "accuracy")]["n"] == 6
        # an item right in every rotation is right in the plain order (rotation 0 is the plain prompt)
        assert cells[(model, "circular_accuracy")]["mean"] <= cells[(model, "accuracy")]["mean"]
    assert main([*args[:4], "report"]) == 0
