"""Sequential selection: score a large split a round at a time and stop once the evidence settles.

    python -m selectune select --suite suites/fewclue-test.yaml                 # on by default there
    python -m selectune select --design fixed --suite suites/fewclue-test.yaml  # every item

Items are taken in one seeded random order, the same for every candidate, ROUND items a round.
After each round, on each entry, the leader (best mean so far) is compared with every candidate
still scored there by a test that stays valid however often it is looked at and whenever scoring
stops (Ville's inequality for a nonnegative martingale under the null):

- 0/1 metrics: on the discordant pairs, an e-process for "each side wins a discordant pair half
  the time" (McNemar's null): the likelihood ratio of a Beta(1/2, 1/2) mixture of win
  probabilities against 1/2.
- metrics with known bounds: the two-sided normal-mixture martingale of the paired differences,
  sub-Gaussian by Hoeffding's lemma (Robbins 1970; Howard et al. 2021, Prop. 5), whose boundary
  also gives the confidence sequence printed for the difference.

A candidate whose anytime p-value (1 / e-value) falls under alpha stops being scored on that
entry: it is significantly worse than the leader. An entry also stops, as a tie, when the
confidence sequence of every remaining candidate's difference from the leader lies inside
(-margin, +margin): the predictable plug-in empirical-Bernstein confidence sequence
(Waudby-Smith & Ramdas 2024, Theorem 2), which narrows with the differences' variance, so pairs
that rarely disagree settle in a few rounds. Otherwise an entry stops when one candidate is left
or its items run out. Cell intervals are normal-mixture confidence sequences for a bounded mean,
valid at the number of items each cell used. Entries of fewer than LARGE items, and metrics
without known bounds (reply length), keep the fixed design.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from eval import metrics as M
from eval.anytime import BOUNDS, ROUND, anytime_compare, can_be_sequential, paired
from eval.stats import ALPHA

LARGE = 500
"""Entries with at least this many items are scored sequentially under `--design auto`."""
ORDER_SEED = 0
TIE_MARGIN = 0.05
"""Candidates whose difference is shown to be inside this share of the metric's range are tied."""


@dataclass
class EntryState:
    """Where one suite entry stands: items scored so far by the candidates still scored on it."""

    size: int
    n: int = 0
    active: list[str] | None = None
    stopped: dict[str, str] | None = None
    """Candidate -> why it stopped before the others (significantly worse than the leader)."""
    reason: str | None = None
    """Why the entry stopped: one candidate left, the rest tied, or every item scored."""
    tied: list[str] | None = None
    """The candidates shown equivalent to the leader within the margin, the leader first."""


def look(
    state: EntryState, runs: dict[str, object], metric: str, alpha: float = ALPHA, margin: float = TIE_MARGIN
) -> None:
    """After a round: drop the candidates significantly worse than the leader; settle the entry
    when one is left or the rest are within `margin` (a share of the metric's range) of it."""
    sign = 1.0 if M.HIGHER_IS_BETTER[metric] else -1.0
    means = {name: float(np.mean([i["scores"][metric] for i in runs[name].items])) for name in state.active}
    leader = max(state.active, key=lambda name: sign * means[name])
    lo, hi = BOUNDS[metric]
    within = {}
    for name in list(state.active):
        if name == leader:
            continue
        comp = anytime_compare(*paired(runs[leader], runs[name], metric), metric, alpha)
        if comp.p_value < alpha and M.is_better(metric, comp.diff):
            state.active.remove(name)
            state.stopped[name] = (
                f"stopped after {state.n} items: significantly worse than {leader} "
                f"(anytime p = {comp.p_value:.2g})"
            )
        else:
            within[name] = max(-comp.low, comp.high) < margin * (hi - lo)
    if len(state.active) == 1:
        state.reason = f"settled after {state.n} of {state.size} items: only {leader} left"
    elif state.n < state.size and all(within.values()):
        state.tied = [leader, *within]
        state.reason = (
            f"settled after {state.n} of {state.size} items: {', '.join(state.tied)} tied "
            f"(every difference from {leader} within ±{margin * (hi - lo):g})"
        )
    elif state.n >= state.size:
        state.reason = f"all {state.size} items scored"


def sequential_entries(entries, sizes: list[int], design: str, candidates: int = 2) -> set[int]:
    """The suite entries scored sequentially under `design` (auto, sequential or fixed); none
    for a single candidate, which has no ranking to settle."""
    if design == "fixed" or candidates < 2:
        return set()
    out = set()
    for k, ((task, entry), size) in enumerate(zip(entries, sizes)):
        metric = M.ranked_metric(task, entry.mode, entry.metric)
        if entry.circular or not can_be_sequential(metric):
            continue
        if design == "sequential" or size >= LARGE:
            out.add(k)
    return out


def score_sequential(
    cards,
    entries,
    chosen: set[int],
    backends: dict,
    conn,
    *,
    data_dir,
    batch_size: int,
    judge=None,
    margin: float = TIE_MARGIN,
    progress=print,
    executor=None,
    items: dict | None = None,
) -> tuple[dict, dict[int, EntryState], dict[str, tuple[float, int]]]:
    """Score the chosen entries round by round: ({(card name, entry index): run}, states,
    {card name: (seconds, items computed)}). `executor` (eval/executor.py): scores a round's
    candidates at once where it can, each thread through its own store connection. `items`: each
    chosen entry's items, when the caller has loaded them already."""
    from eval.runner import run_task
    from eval.task import load_items

    items = items or {k: load_items(entries[k][0], entries[k][1].split, data_dir) for k in chosen}
    names = [c.name for c in cards]
    states = {
        k: EntryState(
            len(items[k]),
            0,
            [c.name for c in cards if not (c.is_endpoint and entries[k][1].mode == "ppl")],
            {},
        )
        for k in chosen
    }
    runs: dict[tuple[str, int], object] = {}
    spent = {name: (0.0, 0) for name in names}
    from tqdm import tqdm

    bar = tqdm(desc="sequential rounds", unit="round", leave=False)
    while any(s.reason is None for s in states.values()):
        bar.update(1)
        bar.set_postfix_str(
            ", ".join(
                f"{entries[k][0].name}-{entries[k][1].split} {entries[k][1].mode} "
                f"{states[k].n}/{states[k].size}"
                for k in sorted(chosen)
                if states[k].reason is None
            )
        )
        for k in sorted(chosen):
            state = states[k]
            if state.reason is not None:
                continue
            task, entry = entries[k]
            state.n = min(state.n + ROUND, state.size)

            def one(name, task=task, entry=entry, k=k, upto=state.n):
                run = run_task(
                    backends[name],
                    task,
                    entry.split,
                    entry.mode,
                    items[k],
                    executor.connection() if executor else conn,
                    chunk_size=batch_size,
                    data_dir=data_dir,
                    judge=judge,
                    sequential=(ORDER_SEED, ROUND),
                    upto=upto,
                )
                if executor:
                    executor.between_rounds(backends[name])
                return name, run

            for name, run in executor.map(one, list(state.active)) if executor else map(one, state.active):
                runs[(name, k)] = _mark(run)
                spent[name] = (spent[name][0] + run.seconds, spent[name][1] + run.computed)
            metric = M.ranked_metric(task, entry.mode, entry.metric)
            look(state, {n: runs[(n, k)] for n in state.active}, metric, margin=margin)
            if state.reason is not None:
                progress(f"select: {task.name}-{entry.split} {entry.mode}: {state.reason}")
    bar.close()
    return runs, states, spent


def _mark(run):
    from dataclasses import replace

    return replace(run, sequential=True)
