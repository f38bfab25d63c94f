"""Table-driven parser and metric cases (tests/cases/*.json), one parametrised runner each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.parsers import first_capital, option_texts, parse_choice
from eval.scorers.fact import fact_scores

CASES = Path(__file__).parent / "cases"


def _cases(name):
    return json.loads((CASES / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", _cases("parse_choice.json"), ids=lambda c: repr(c["reply"])[:40])
def test_parse_choice(case):
    assert parse_choice(case["reply"], case["choices"], case.get("options")) == case["robust"]
    assert first_capital(case["reply"]) == case["opencompass"]


@pytest.mark.parametrize("case", _cases("fact_scores.json"), ids=lambda c: c["reply"][:24])
def test_fact_scores(case):
    scores = fact_scores(case["reply"], case["facts"], case["reference"])
    assert scores["fact_recall"] == case["fact_recall"]
    assert scores["hallucinated_numbers"] == case["hallucinated_numbers"]


def test_option_texts_read_from_the_prompt():
    prompt = "阅读文章：x\n根据上文，回答如下问题：y\nA. 对\nB. 错\nC. 可能\n请从“A”，“B”，“C”中进行选择。\n答："
    assert option_texts(prompt, ["A", "B", "C"]) == {"A": "对", "B": "错", "C": "可能"}


def test_style_classifier_generalises_to_replies_it_never_saw(shared_data):
    """Trained on our 288 train references; checked on 4,000 GLM-3-turbo replies in ../shared/data."""
    from eval.scorers.style import style_classifier
    from eval.task import find_task

    clf, held_out = style_classifier(find_task("style"), shared_data)
    rows = json.loads((shared_data / "style/ismoyuai_emotion_dialogue_tuner/style_chat_data.json")
                      .read_text(encoding="utf-8"))
    assert held_out >= 0.9
    assert clf.score([r["assistant"] for r in rows], [r["style"] for r in rows]) >= 0.85


@pytest.mark.parametrize("case", _cases("text_metrics.json"), ids=lambda c: c["name"])
def test_text_metric(case):
    from eval.scorers.text import text_scores

    got = text_scores([case["metric"]], case["reply"], case["references"], steps=case["normalize"],
                      pattern=case.get("regex"))
    assert got[case["metric"]] == pytest.approx(case["expected"], abs=1e-9)
