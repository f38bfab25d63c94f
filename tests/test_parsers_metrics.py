"""Table-driven parser and metric cases (tests/cases/*.json), one parametrised runner each."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.parsers import first_capital, option_texts, parse_choice
from eval.scorers.fact import fact_scores
from tests.conftest import is_fixture

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
    prompt = (
        "阅读文章：x\n根据上文，回答如下问题：y\nA. 对\nB. 错\nC. 可能\n请从“A”，“B”，“C”中进行选择。\n答："
    )
    assert option_texts(prompt, ["A", "B", "C"]) == {"A": "对", "B": "错", "C": "可能"}


def test_style_classifier_generalises_to_replies_it_never_saw(shared_data):
    """Trained on our 288 train references and plain replies; checked on held-out references and
    plain replies, and on other writers' styled replies: 4,000 GLM-3-turbo ones in ../shared/data,
    else the 24 of tests/fixtures/data written for the project."""
    from eval.scorers.style import NEITHER, predict, style_classes, style_classifier
    from eval.task import find_task

    task = find_task("style")
    clf, held_out = style_classifier(task, shared_data)
    assert held_out >= 0.95 and min(style_classes(task, shared_data).values()) >= 0.9
    rows = json.loads(
        (shared_data / "style/ismoyuai_emotion_dialogue_tuner/style_chat_data.json").read_text(
            encoding="utf-8"
        )
    )
    replies, styles = [r["assistant"] for r in rows], [r["style"] for r in rows]
    predicted = predict(clf, replies)
    assert sum(p == s for p, s in zip(predicted, styles)) / len(rows) >= 0.8
    # Abstention costs at most this on other styled text (looser on the fixture's 24 replies, where
    # one reply moves the rate by 4 points), and the opposite style is almost never given.
    assert predicted.count(NEITHER) / len(rows) <= (0.2 if is_fixture(shared_data) else 0.15)
    assert sum(p not in (s, NEITHER) for p, s in zip(predicted, styles)) / len(rows) <= 0.03
    assert clf.score(replies, styles) >= 0.9  # the classes alone, before abstaining


@pytest.mark.parametrize(
    "reply, expected",
    [
        # plain replies: no requested style (the two, which the two-class scorer called 毒舌)
        ("今天天气不错。", "neither"),
        ("根据公司政策，远程办公每周最多两天。", "neither"),
        ("作为一个AI助手，我无法回答这个问题。", "neither"),
        ("我不知道。", "neither"),
        ("The meeting has been moved to Thursday at 3 p.m.", "neither"),
        ("1. 打开设置 2. 点击账号", "neither"),
        ("A", "neither"),
        ("Ω∑", "neither"),  # no character the classifier has seen
        # replies in a style
        ("辛苦啦，抱抱你，慢慢来就好，你已经做得很好了。", "温柔"),
        ("你这脑子是装饰品吗？这么简单都不会，还好意思问？", "毒舌"),
    ],
)
def test_style_classifier_calls_plain_replies_neither(task_data, reply, expected):
    from eval.scorers.style import predict, style_classifier
    from eval.task import find_task

    clf, _ = style_classifier(find_task("style"), task_data)
    assert predict(clf, [reply]) == [expected]


@pytest.mark.parametrize("case", _cases("text_metrics.json"), ids=lambda c: c["name"])
def test_text_metric(case):
    from eval.scorers.text import text_scores

    got = text_scores(
        [case["metric"]],
        case["reply"],
        case["references"],
        steps=case["normalize"],
        pattern=case.get("regex"),
    )
    assert got[case["metric"]] == pytest.approx(case["expected"], abs=1e-9)


SQUAD = ["case", "punctuation", "articles", "whitespace"]


@pytest.mark.parametrize(
    "reply, reference",
    [
        ("The Eiffel Tower", "eiffel tower"),  # articles and case
        ("a cat and an owl", "the cat and owl"),  # a/an/the only as whole words
        ("Theatre and Anne", "theatre anne"),  # ...never inside a word
        ("$1,000", "1000"),  # ASCII punctuation that is a symbol ($)
        ("price: $5 + tax", "5 tax"),  # + and $ are ASCII punctuation too
        ("Beyoncé's  album", "beyonces album"),
        ("«Le Monde»", "le monde"),  # Unicode punctuation
        ("1990s", "the 1990s decade"),
    ],
)
def test_exact_match_and_token_f1_equal_the_official_squad_scorer(reply, reference):
    """MLQA's official scorer in English (shipped by lm-eval) is SQuAD's normalisation with Unicode
    punctuation removed as well: our metrics under SQUAD must equal it item by item."""
    from lm_eval.tasks.mlqa.utils import exact_match_score, f1_score

    from eval.scorers.text import text_scores

    got = text_scores(["exact_match", "token_f1"], reply, [reference], steps=SQUAD)
    assert got["exact_match"] == float(exact_match_score(reply, reference, "en"))
    assert got["token_f1"] == pytest.approx(f1_score(reply, reference, "en"), abs=1e-12)


def test_when_both_sides_normalise_to_nothing_token_f1_follows_squad_v2():
    """SQuAD v2's scorer gives 1 when the answer and the reference are both empty after
    normalisation (v1.1's and MLQA's give 0, having no such case): ours gives 1."""
    from eval.scorers.text import text_scores

    for reply, reference in [("an", "the"), ("the the the", "The."), ("", "a")]:
        got = text_scores(["exact_match", "token_f1"], reply, [reference], steps=SQUAD)
        assert got == {"exact_match": 1.0, "token_f1": 1.0}, (reply, reference)


def test_without_articles_token_f1_differs_from_the_official_scorer():
    from lm_eval.tasks.mlqa.utils import f1_score

    from eval.scorers.text import text_scores

    got = text_scores(["token_f1"], "the cat", ["a cat"], steps=["case", "punctuation", "whitespace"])
    assert got["token_f1"] == 0.5 and f1_score("the cat", "a cat", "en") == 1.0


@pytest.mark.parametrize(
    "metrics, mode, chosen, expected",
    [
        (["accuracy", "unparsable"], "gen", None, "accuracy"),
        (["style_accuracy", "chrf"], "gen", None, "style_accuracy"),
        (["style_accuracy", "chrf"], "gen", "chrf", "chrf"),
        (["exact_match"], "ppl", None, "accuracy"),  # ppl ranks by the likeliest choice
        (["circular_accuracy", "letter_following"], "ppl", None, "circular_accuracy"),  # a circular summary
        (["circular_accuracy", "letter_following"], "gen", None, "circular_accuracy"),
    ],
)
def test_the_one_rule_for_the_ranked_metric(metrics, mode, chosen, expected):
    from types import SimpleNamespace

    from eval.metrics import ranked_metric

    assert ranked_metric(SimpleNamespace(metrics=metrics), mode, chosen) == expected
