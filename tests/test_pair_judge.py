"""The LLM judge on review pairs (reports/pair_judge.py): verdicts read, kappa and the
position-swap audit against hand-worked values, and `review --judge` over loopback HTTP."""

from __future__ import annotations

import shutil

import pytest

from reports import invites, pair_judge, review
from tests import report_fixture

ORDERS = {
    "a": {"x": "first", "y": "second"},
    "b": {"x": "second", "y": "first"},
    "tie": {"x": "tie", "y": "tie"},
}


@pytest.mark.parametrize(
    "output, verdict",
    [
        ("[[A]]", "first"),
        ("I prefer B. [[B]]", "second"),
        ("[[C]]", "tie"),
        ("[[B]] then [[A]]", "second"),
        ("A", None),
        ("[A]", None),
        ("", None),
    ],
)
def test_read_verdict(output, verdict):
    assert pair_judge.read_verdict(output) == verdict


def test_kappa_confusion_and_position_audit_against_hand_worked_values():
    human = ["a", "a", "a", "a", "b", "b", "b", "tie", "tie", "a"]
    judge = ["a", "a", "a", "b", "b", "b", "a", "tie", "a", "a"]
    votes = [
        {
            "pair_id": f"p{k}",
            "system_a": "x",
            "system_b": "y",
            "left_system": "x",
            "vote": {"a": "left", "b": "right", "tie": "tie"}[h],
        }
        for k, h in enumerate(human)
    ]
    verdicts = {f"p{k}": dict(ORDERS[j]) for k, j in enumerate(judge)}
    verdicts["p7"] = {"x": "first", "y": "first"}  # picks whatever is shown first: inconsistent, a tie
    votes.append({"pair_id": "p10", "system_a": "x", "system_b": "y", "left_system": "y", "vote": "left"})
    verdicts["p10"] = {"x": None, "y": "first"}  # one answer named no verdict: the pair is left out
    votes.append({"pair_id": "p0", "system_a": "x", "system_b": "y", "left_system": "x", "vote": "both_bad"})
    pairs = {pid: ("x", "y") for pid in verdicts}
    out = pair_judge.agreement(votes, verdicts, pairs)
    # agreement 7/10; marginals human a5 b3 tie2, judge a6 b3 tie1: p_e = (30 + 9 + 2) / 100 = 0.41,
    # kappa = (0.7 - 0.41) / (1 - 0.41) = 0.4915
    assert out["n"] == 10 and out["agreement"] == pytest.approx(0.7)
    assert out["kappa"] == pytest.approx(0.29 / 0.59)
    assert out["confusion"] == [[4, 1, 0], [1, 2, 0], [1, 0, 1]]
    # 10 pairs read in both orders, 9 with the same verdict; 20 decisive verdicts, the first shown
    # winning once per consistent pair and twice in p7: 11
    assert out["position"] == {
        "pairs": 10,
        "consistent": 9,
        "unread": 1,
        "decisive": 20,
        "first_wins": 11,
        "first_rate": 0.55,
        "p_value": pytest.approx(0.8238, abs=1e-4),
    }


def test_kappa_is_undefined_when_both_always_say_the_same():
    votes = [{"pair_id": "p", "system_a": "x", "system_b": "y", "left_system": "x", "vote": "left"}]
    out = pair_judge.agreement(votes, {"p": dict(ORDERS["a"])}, {"p": ("x", "y")})
    assert out["agreement"] == 1.0 and out["kappa"] is None


def longer_first(request) -> str:
    """A judge that prefers the longer answer and, on equal lengths, the one shown first."""
    text = request.messages[-1]["content"]
    first = text.split("[Answer A]\n", 1)[1].split("\n\n[Answer B]", 1)[0]
    second = text.split("[Answer B]\n", 1)[1].split("\n\nReply with", 1)[0]
    return "[[B]]" if len(second) > len(first) else "[[A]]"


def test_review_judge_asks_each_pair_in_both_orders_once_and_the_report_shows_it(tmp_path, capsys):
    from eval.backends.fake import FakeBackend
    from selectune.cli import main
    from bench.openai_stub import StubState, serve

    runs = tmp_path / "runs"
    shutil.copytree(report_fixture.build_in(tmp_path / "built", evil=True), runs)
    state = StubState(FakeBackend(respond=longer_first))
    server, url = serve(state)
    try:
        args = f"--runs-dir {runs} --judge-url {url} --judge-model judge-x review --no-serve".split()
        assert main([*args, "--judge-pairs"]) == 0
        conn = review.open_review(runs / "results.sqlite")
        total = review.pair_count(conn)
        assert total > 0 and len(state.bodies) == 2 * total
        assert main([*args, "--judge-pairs"]) == 0  # a rerun asks nothing again
        assert len(state.bodies) == 2 * total
        pid, a, b = conn.execute("SELECT pair_id, system_a, system_b FROM review_pairs LIMIT 1").fetchone()
        invites.invite(conn, ["ana"])
        review.record_vote(conn, vote_id="v-000000001", pair=pid, vote="left", reviewer="ana")
        conn.close()
    finally:
        server.shutdown()
    assert main(["--runs-dir", str(runs), "report"]) == 0
    page = (runs / "report" / "review.html").read_text(encoding="utf-8")
    assert "LLM judge judge-x against the human votes" in page and "Position swap:" in page
    assert main(["--runs-dir", str(runs), "review", "--no-serve", "--judge-pairs"]) == 2
    assert "review --judge-pairs: no judge configured" in capsys.readouterr().err
