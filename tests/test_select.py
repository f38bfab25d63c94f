"""The selection rule on stored runs from a queued fake backend: budget, ranking, ties, memory."""

from __future__ import annotations

from eval.backends.fake import FakeBackend
from eval.results import open_results
from eval.runner import run_task
from eval.decision import Budget, Candidate, decide, selection_report
from models.card import find_card
from tests.test_runner import make_task


def _candidate(card_name, wrong_ids, task, items, conn):
    def respond(request):
        item_id = int(request.messages[-1]["content"].split("：")[0][2:])
        right = "B" if item_id % 2 else "A"
        return ("A" if right == "B" else "B") if item_id in wrong_ids else right

    run = run_task(FakeBackend(respond=respond, name=card_name), task, "dev", "gen", items, conn)
    return Candidate(find_card(card_name), [run])


def test_tied_candidates_go_to_the_smaller_model_and_budget_excludes(tmp_path):
    task, items = make_task(tmp_path, n=40)
    conn = open_results(tmp_path / "runs")
    candidates = [
        _candidate("qwen2.5-coder-0.5b-instruct", set(), task, items, conn),  # 40/40, 2.03 GiB QLoRA
        _candidate("smollm2-135m-instruct", {1, 2, 3, 4}, task, items, conn),  # 36/40, 0.77 GiB
        _candidate("gemma3-270m", set(), task, items, conn),  # 40/40 but 2.24 GiB: over budget
        _candidate("qwen2.5-coder-1.5b-instruct", set(range(20)), task, items, conn),  # 20/40, over
    ]
    decision = decide(candidates, Budget(train_gib=2.1, infer_gib=16))
    assert decision["best_mean_rank"] == "qwen2.5-coder-0.5b-instruct"
    # 4 discordant items, all one way: exact McNemar p = 2 / 2**4 = 0.125, not significant.
    assert decision["tied_with_best"] == ["smollm2-135m-instruct"]
    assert decision["winner"] == "smollm2-135m-instruct"
    rows = {r["model"]: r for r in decision["candidates"]}
    assert rows["gemma3-270m"]["mean_rank"] is None and rows["gemma3-270m"]["budget_problems"]
    assert rows["qwen2.5-coder-0.5b-instruct"]["mean_rank"] == 1.0
    assert rows["smollm2-135m-instruct"]["mean_rank"] == 2.0


def test_significantly_worse_is_not_tied(tmp_path):
    task, items = make_task(tmp_path, n=40)
    conn = open_results(tmp_path / "runs")
    candidates = [
        _candidate("qwen2.5-coder-0.5b-instruct", set(), task, items, conn),
        _candidate("smollm2-135m-instruct", set(range(12)), task, items, conn),
    ]
    table, record = selection_report(candidates, Budget())
    assert record["winner"] == "qwen2.5-coder-0.5b-instruct" and record["tied_with_best"] == []
    (comparison,) = record["comparisons_vs_best"]["smollm2-135m-instruct"]
    assert comparison["p_value"] < 0.001 and comparison["diff"] == 0.3
    assert comparison["verdict"] == "significantly better"
    assert "mini-dev" in table and "100.0 [100.0, 100.0]" in table


def test_an_entry_can_rank_by_another_metric_and_weigh_more(tmp_path):
    task, items = make_task(tmp_path, n=40)
    conn = open_results(tmp_path / "runs")
    a = _candidate("qwen2.5-coder-0.5b-instruct", set(range(10)), task, items, conn)
    b = _candidate("smollm2-135m-instruct", set(range(5)), task, items, conn)
    both = [Candidate(a.card, a.runs * 2), Candidate(b.card, b.runs * 2)]  # two entries of the same runs
    ranks = {r["model"]: r["mean_rank"] for r in decide(both, Budget())["candidates"]}
    assert ranks == {"qwen2.5-coder-0.5b-instruct": 2.0, "smollm2-135m-instruct": 1.0}
    # ranked by the unparsable rate (lower is better: both 0, a tie) on the heavier entry
    weighted = decide(both, Budget(), [(None, 1.0), ("unparsable", 3.0)])
    ranks = {r["model"]: r["mean_rank"] for r in weighted["candidates"]}
    assert ranks == {
        "qwen2.5-coder-0.5b-instruct": (2.0 + 3 * 1.5) / 4,
        "smollm2-135m-instruct": (1.0 + 3 * 1.5) / 4,
    }


def test_choice_entries_get_majority_and_chance_rows_and_the_decision_says_when_none_beats_them(tmp_path):
    from eval.baselines import baselines_of

    task, items = make_task(tmp_path, n=40)  # gold alternates A (even ids) and B (odd ids)
    conn = open_results(tmp_path / "runs")
    good = _candidate("qwen2.5-coder-0.5b-instruct", set(), task, items, conn)  # 40/40
    always_a = _candidate("smollm2-135m-instruct", set(range(1, 40, 2)), task, items, conn)  # says A: 20/40
    found = baselines_of(good.runs[0])
    assert found.letter == "A" and sum(found.majority) == 20 and found.chance == [0.5] * 40
    table, record = selection_report([good, always_a], Budget())
    assert "| majority" in table.splitlines()[0] and "| chance" in table.splitlines()[0]
    assert "| 50.0 [50.0, 50.0]" in table  # chance: the same for every item
    (entry,) = record["baselines"]
    assert entry["majority_label"] == "A" and entry["majority"] == 0.5 and entry["chance"] == 0.5
    assert entry["beaten_by"] == ["qwen2.5-coder-0.5b-instruct"]
    assert entry["vs_majority"]["smollm2-135m-instruct"]["diff"] == 0.0
    assert not any("majority label" in r for r in record["reasons"])
    _, worse = selection_report([always_a], Budget())
    assert worse["baselines"][0]["beaten_by"] == []
    assert worse["reasons"][-1].startswith(
        "No candidate is significantly better than answering the majority "
        "label on mini-dev gen (always A: 50.0%)"
    )
