"""Sequential selection (eval/sequential.py): error rates under optional stopping on synthetic
paired data, the published bounds' formulas, and the round-by-round loop with its resume."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pytest

from eval import metrics as M
from eval.anytime import (
    ROUND,
    anytime_compare,
    bernstein_sequence,
    discordant_log_e,
    mean_sequence,
    mixture_radius,
)
from eval.sequential import EntryState, TIE_MARGIN, look, score_sequential
from eval.stats import ALPHA, mcnemar_exact

LOOKS = range(ROUND, 2001, ROUND)


def simulate(p_a: float, p_b: float, seed: int, n: int = 2000):
    rng = np.random.default_rng(seed)
    return (rng.random(n) < p_a).astype(float), (rng.random(n) < p_b).astype(float)


def rejects_anytime(a, b, metric=M.ACCURACY) -> bool:
    return any(anytime_compare(a[:t], b[:t], metric).p_value < ALPHA for t in LOOKS)


def discordant_counts(a, b):
    wins, losses = np.cumsum(a > b), np.cumsum(a < b)
    return [(int(wins[t - 1]), int(losses[t - 1])) for t in LOOKS]


def test_under_the_null_the_anytime_test_rejects_less_than_alpha_while_peeking_mcnemar_does_not():
    from scipy.stats import binom

    reps, anytime, peeking = 400, 0, 0
    for seed in range(reps):
        counts = discordant_counts(*simulate(0.6, 0.6, seed))
        anytime += any(discordant_log_e(w, lost) > math.log(1 / ALPHA) for w, lost in counts)
        # exact McNemar: the two-sided binomial test of the discordant pairs
        peeking += any(
            min(1.0, 2 * binom.cdf(min(w, lost), w + lost, 0.5)) < ALPHA for w, lost in counts if w + lost
        )
    assert anytime / reps <= ALPHA  # valid however often it is looked at
    assert peeking / reps > 1.5 * ALPHA  # the fixed-design test, looked at every round, is not


def test_the_comparison_reports_the_e_process_and_the_exact_mcnemar_agrees_with_the_binomial():
    from scipy.stats import binom

    a, b = simulate(0.7, 0.5, 3, n=300)
    w, lost = int(np.sum(a[:ROUND] > b[:ROUND])), int(np.sum(a[:ROUND] < b[:ROUND]))
    comp = anytime_compare(a[:ROUND], b[:ROUND], M.ACCURACY)
    assert comp.p_value == pytest.approx(min(1.0, math.exp(-discordant_log_e(w, lost))))
    assert mcnemar_exact(a[:ROUND], b[:ROUND]) == pytest.approx(
        min(1.0, 2 * binom.cdf(min(w, lost), w + lost, 0.5))
    )


def test_under_the_null_the_bounded_mean_test_rejects_less_than_alpha():
    reps, hits = 200, 0
    for seed in range(reps):
        rng = np.random.default_rng(seed)
        a, b = rng.random(2000), rng.random(2000)  # the same distribution on [0, 1]
        hits += rejects_anytime(a, b, M.FACT_RECALL)
    assert hits / reps <= ALPHA


def test_a_real_gap_is_found_early_and_in_the_right_direction():
    stops, wrong = [], 0
    for seed in range(200):
        a, b = simulate(0.7, 0.5, seed)
        t = next((t for t in LOOKS if anytime_compare(a[:t], b[:t], M.ACCURACY).p_value < ALPHA), None)
        stops.append(t or 2000)
        wrong += t is not None and a[:t].mean() < b[:t].mean()
    assert wrong == 0 and np.median(stops) <= 0.4 * 2000


def test_the_bounds_match_their_formulas():
    # Beta(1/2, 1/2) mixture: 10 wins, 0 losses: B(10.5, 0.5) / B(0.5, 0.5) * 2^10
    expected = math.exp(math.lgamma(10.5) + math.lgamma(0.5) - math.lgamma(11)) / math.pi * 2**10
    assert math.exp(discordant_log_e(10, 0)) == pytest.approx(expected)
    assert discordant_log_e(0, 0) == 0.0
    # normal mixture: sqrt(2 (V + rho) log(sqrt((V + rho) / rho) / alpha)) / n, V = sigma^2 n
    assert mixture_radius(100, 1.0, 256.0, 0.05) == pytest.approx(
        math.sqrt(2 * 356 * math.log(math.sqrt(356 / 256) / 0.05)) / 100
    )
    # a mean of 0/1 values at n = 64 (sigma 1/2, rho = sigma^2 * 64 = 16): 0.229
    assert mixture_radius(64, 0.5, 16.0) == pytest.approx(math.sqrt(64 * math.log(math.sqrt(2) / 0.05)) / 64)
    e = mean_sequence([1.0] * 30 + [0.0] * 70, M.ACCURACY)
    assert (e.mean, e.n) == (0.3, 100) and 0.0 <= e.low < 0.3 < e.high <= 1.0


def test_a_confidence_sequence_covers_the_truth_at_every_look():
    misses = 0
    for seed in range(300):
        a = (np.random.default_rng(seed).random(2000) < 0.3).astype(float)
        misses += any(
            not mean_sequence(a[:t], M.ACCURACY).low <= 0.3 <= mean_sequence(a[:t], M.ACCURACY).high
            for t in LOOKS
        )
    assert misses / 300 <= ALPHA


def paired_differences(p_win: float, p_loss: float, seed: int, n: int = 2000):
    """Paired 0/1 values whose difference is +1 with p_win, -1 with p_loss, else 0."""
    u = np.random.default_rng(seed).random(n)
    a = ((u < p_win) | (u >= p_win + p_loss)).astype(float)
    b = (u >= p_win).astype(float)
    return a, b


def ties_anytime(a, b) -> int | None:
    margin = TIE_MARGIN
    return next(
        (
            t
            for t in LOOKS
            if -margin < anytime_compare(a[:t], b[:t], M.ACCURACY).low
            and anytime_compare(a[:t], b[:t], M.ACCURACY).high < margin
        ),
        None,
    )


def test_a_gap_as_large_as_the_margin_is_called_a_tie_less_often_than_alpha():
    # a true difference of exactly 5 points on rarely discordant pairs: the hardest case to rule out
    reps, ties = 300, 0
    for seed in range(reps):
        ties += ties_anytime(*paired_differences(0.06, 0.01, seed)) is not None
    assert ties / reps <= ALPHA


def test_candidates_that_rarely_disagree_tie_within_a_few_rounds():
    stops = [ties_anytime(*paired_differences(0.01, 0.01, seed)) or 2000 for seed in range(100)]
    assert np.median(stops) <= 6 * ROUND


def test_the_bernstein_sequence_follows_its_formula_and_covers_the_truth():
    def by_hand(x, alpha=ALPHA):  # Waudby-Smith & Ramdas (2024), Theorem 2, term by term
        lows, highs, s, s2, mu_prev, var_prev, lam_sum, lam_x, v_psi = [], [], 0.0, 0.0, 0.5, 0.25, 0, 0, 0
        for t, xi in enumerate(x, start=1):
            lam = min(math.sqrt(2 * math.log(2 / alpha) / (var_prev * t * math.log(1 + t))), 0.5)
            v_psi += 4 * (xi - mu_prev) ** 2 * (-math.log(1 - lam) - lam) / 4
            lam_sum, lam_x = lam_sum + lam, lam_x + lam * xi
            s += xi
            mu = (0.5 + s) / (t + 1)
            s2 += (xi - mu) ** 2
            mu_prev, var_prev = mu, (0.25 + s2) / (t + 1)
            radius = (math.log(2 / alpha) + v_psi) / lam_sum
            lows.append(max(lam_x / lam_sum - radius, 0.0))
            highs.append(min(lam_x / lam_sum + radius, 1.0))
        return max(lows), min(highs)

    x = np.random.default_rng(7).random(300) ** 2
    assert bernstein_sequence(x) == pytest.approx(by_hand(x))
    misses = 0
    for seed in range(300):
        a = (np.random.default_rng(seed).random(2000) < 0.3).astype(float)
        misses += any(not bernstein_sequence(a[:t])[0] <= 0.3 <= bernstein_sequence(a[:t])[1] for t in LOOKS)
    assert misses / 300 <= ALPHA


# ---------------------------------------------------------------------------------------------
# The loop, on a user's task and scripted candidates


def answer(name: str, prompt: str) -> str:
    k = int(prompt.split("sentence ")[1].split(" ")[0])
    gold = "AB"[k % 2]
    right = {"good": 0.9, "mid": 0.85, "bad": 0.5}[name]
    draw = int(hashlib.sha256(f"{name}:{k}".encode()).hexdigest()[:8], 16) / 16**8
    return gold if draw < right else "AB"[(k + 1) % 2]


class Scripted:
    def __init__(self, name: str, fail_after: int | None = None):
        self.identity, self.name, self.calls, self.fail_after = (
            {"model": name, "backend": "fake"},
            name,
            0,
            fail_after,
        )

    def generate(self, requests):
        self.calls += len(requests)
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt  # killed mid-run
        return [answer(self.name, r.messages[-1]["content"]) for r in requests]


class _Card:
    def __init__(self, name):
        self.name, self.is_endpoint = name, False


@pytest.fixture
def pairs(tmp_path):
    from eval.suite import load_suite
    from tests.test_endpoint import TASK

    rows = [{"id": k, "a": f"sentence {k}", "b": "phrase", "label": "AB"[k % 2]} for k in range(384)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "pairs.yaml").write_text(TASK, encoding="utf-8")
    (tmp_path / "suite.yaml").write_text(
        "name: suite\nentries:\n  - {task: pairs.yaml, split: dev, mode: gen}\n", encoding="utf-8"
    )
    return load_suite(tmp_path / "suite.yaml")[1]


def run_loop(entries, conn, backends, data_dir):
    return score_sequential(
        [_Card(n) for n in backends],
        entries,
        {0},
        backends,
        conn,
        data_dir=data_dir,
        batch_size=16,
        progress=lambda line: None,
    )


def test_a_clearly_worse_candidate_stops_early_and_a_killed_run_resumes_to_the_same_stop(pairs, tmp_path):
    from eval.results import open_results

    conn = open_results(tmp_path / "runs")
    backends = {"good": Scripted("good"), "mid": Scripted("mid", fail_after=200), "bad": Scripted("bad")}
    with pytest.raises(KeyboardInterrupt):
        run_loop(pairs, conn, backends, tmp_path)
    fresh = {"good": Scripted("good"), "mid": Scripted("mid"), "bad": Scripted("bad")}
    runs, states, spent = run_loop(pairs, conn, fresh, tmp_path)
    state = states[0]
    assert "bad" in state.stopped and state.stopped["bad"].startswith("stopped after ")
    stopped_at = len(runs[("bad", 0)].items)
    assert stopped_at < 384 and stopped_at % ROUND == 0
    # what the killed run had stored was not asked again
    assert fresh["good"].calls + backends["good"].calls == len(runs[("good", 0)].items)

    again = {"good": Scripted("good"), "mid": Scripted("mid"), "bad": Scripted("bad")}
    conn2 = open_results(tmp_path / "runs2")
    clean_runs, clean_states, _ = run_loop(pairs, conn2, again, tmp_path)
    assert clean_states[0].stopped == state.stopped and clean_states[0].reason == state.reason
    assert {k: len(r.items) for k, r in clean_runs.items()} == {k: len(r.items) for k, r in runs.items()}
    assert all(r.sequential for r in runs.values())


def run(values) -> object:
    """A stored run of accuracy `values`, one an item."""
    from eval.summary import RunSummary

    items = [{"item_id": str(k), "scores": {M.ACCURACY: v}} for k, v in enumerate(values)]
    return RunSummary("r", None, "dev", "gen", "m", items, 0, 0)


def test_look_settles_an_entry_when_one_candidate_is_left():

    state = EntryState(size=1000, n=256, active=["a", "b"], stopped={})
    look(state, {"a": run([1.0] * 256), "b": run([0.0] * 256)}, M.ACCURACY)
    assert state.active == ["a"] and state.reason == "settled after 256 of 1000 items: only a left"
    state = EntryState(size=256, n=256, active=["a", "b"], stopped={})
    look(state, {"a": run([1.0, 0.0] * 128), "b": run([0.0, 1.0] * 128)}, M.ACCURACY)
    assert state.active == ["a", "b"] and state.reason == "all 256 items scored"


@pytest.mark.parametrize(
    "a, b, margin, reason",
    [
        # never disagreeing: tied once the confidence sequence is inside +-5 points
        (
            [1.0, 0.0] * 192,
            [1.0, 0.0] * 192,
            0.05,
            "settled after 384 of 1000 items: a, b tied (every difference from a within ±0.05)",
        ),
        ([1.0, 0.0] * 192, [1.0, 0.0] * 192, 0.0, None),  # margin 0: never a tie
        ([1.0, 0.0] * 32, [1.0, 0.0] * 32, 0.05, None),  # 64 items cannot show +-5 points
        ([1.0, 0.0] * 128, [0.0, 1.0] * 128, 0.05, None),  # equal means, always discordant
    ],
)
def test_look_settles_a_tie_only_inside_the_margin(a, b, margin, reason):

    state = EntryState(size=1000, n=len(a), active=["a", "b"], stopped={})
    look(state, {"a": run(a), "b": run(b)}, M.ACCURACY, margin=margin)
    assert state.reason == reason and state.active == ["a", "b"]
    assert state.tied == (["a", "b"] if reason else None)


def test_select_with_the_sequential_design_prints_items_per_cell_and_why_it_stopped(tmp_path, capsys):
    from selectune.cli import main
    from tests.test_endpoint import pairs_suite

    args = pairs_suite(tmp_path, 200)
    assert main([*args, "--design", "sequential"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("pairs-dev") and "| accuracy" in line)
    assert " n=" in row
    selection = json.loads((tmp_path / "runs" / "selection.json").read_text(encoding="utf-8"))
    (entry,) = selection["sequential"]
    assert entry["size"] == 200 and entry["reason"] and set(entry["items"]) == {"a", "b"}
    assert f"sequential pairs-dev ppl: {entry['reason']}" in out
    assert {c["test"] for comps in selection["comparisons_vs_best"].values() for c in comps} == {
        "anytime e-process (discordant pairs)"
    }
    assert main([*args[:4], "report"]) == 0


def test_which_entries_are_sequential():
    from eval.sequential import sequential_entries
    from eval.suite import SUITES_DIR, load_suite

    _, entries = load_suite(SUITES_DIR / "fewclue-test.yaml")
    sizes = [1772, 1772, 2520, 2520, 36, 60]
    assert sequential_entries(entries, sizes, "auto", 3) == {
        0,
        1,
        2,
        3,
    }  # the style and fact tests stay fixed
    assert sequential_entries(entries, sizes, "sequential", 3) == {0, 1, 2, 3, 4, 5}
    assert sequential_entries(entries, sizes, "fixed", 3) == set()
    assert sequential_entries(entries, sizes, "auto", 1) == set()  # one candidate: nothing to settle
    _, dev = load_suite(SUITES_DIR / "default.yaml")
    assert (
        sequential_entries(dev, [160, 160, 160, 160, 36, 60], "auto", 3) == set()
    )  # the dev suite is unchanged
