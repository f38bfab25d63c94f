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

import math
from dataclasses import dataclass

import numpy as np

from eval import metrics as M
from eval.stats import ALPHA, Comparison, Estimate

ROUND = 64
"""Items per candidate per round: four batches of 16."""
LARGE = 500
"""Entries with at least this many items are scored sequentially under `--design auto`."""
ORDER_SEED = 0
TIE_MARGIN = 0.05
"""Candidates whose difference is shown to be inside this share of the metric's range are tied."""

BOUNDS = {metric: (0.0, 1.0) for metric in M.BINARY | {M.FACT_RECALL, M.TOKEN_F1, M.CHAR_F1, M.ROUGE_L}}
BOUNDS.update({M.CHRF: (0.0, 100.0), M.BLEU: (0.0, 100.0)})
"""Metrics whose per-item values have known bounds; the others keep the fixed design."""


def discordant_log_e(wins: int, losses: int) -> float:
    """log e-value of `wins` against `losses` discordant pairs: the Beta(1/2, 1/2) mixture of
    Bernoulli likelihoods over the fair coin's."""
    from scipy.special import betaln

    return float(betaln(0.5 + wins, 0.5 + losses) - betaln(0.5, 0.5) + (wins + losses) * math.log(2))


def mixture_log_e(total: float, n: int, sigma: float, rho: float) -> float:
    """log of the two-sided normal-mixture martingale of a sum of n sigma-sub-Gaussian
    differences: sqrt(rho / (V + rho)) exp(S^2 / (2 (V + rho))), V = sigma^2 n."""
    v = sigma ** 2 * n
    return 0.5 * math.log(rho / (v + rho)) + total ** 2 / (2 * (v + rho))


def mixture_radius(n: int, sigma: float, rho: float, alpha: float = ALPHA) -> float:
    """Half-width, on the mean, of the (1 - alpha) normal-mixture confidence sequence at n."""
    v = sigma ** 2 * n
    return math.sqrt(2 * (v + rho) * math.log(math.sqrt((v + rho) / rho) / alpha)) / n


def rho_for(sigma: float, n_opt: int = ROUND) -> float:
    """The mixture's scale, fixed in advance so the boundary is tightest near n_opt items (one
    round: the first look, where a stop is worth most; at 2,500 items the radius is within 4% of
    one tuned for 256)."""
    return sigma ** 2 * n_opt


def mean_sequence(values, metric: str, alpha: float = ALPHA) -> Estimate:
    """The mean of bounded per-item values with its anytime-valid (1 - alpha) interval."""
    lo, hi = BOUNDS[metric]
    x = np.asarray(values, dtype=float)
    sigma = (hi - lo) / 2
    r = mixture_radius(x.size, sigma, rho_for(sigma), alpha)
    return Estimate(float(x.mean()), max(lo, float(x.mean()) - r), min(hi, float(x.mean()) + r), int(x.size))


def anytime_compare(a, b, metric: str, alpha: float = ALPHA) -> Comparison:
    """a - b on paired items, with an anytime-valid p-value and confidence sequence."""
    from eval.stats import minimum_detectable_effect

    lo, hi = BOUNDS[metric]
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    sigma = hi - lo  # d lies in [-(hi - lo), hi - lo]
    rho = rho_for(sigma)
    if metric in M.BINARY:
        wins, losses = int(np.sum(d > 0)), int(np.sum(d < 0))
        log_e, test = discordant_log_e(wins, losses), "anytime e-process (discordant pairs)"
    else:
        log_e, test = mixture_log_e(float(d.sum()), d.size, sigma, rho), "anytime normal mixture"
    p = float(min(1.0, math.exp(-log_e)))
    low, high = bernstein_sequence((d + sigma) / (2 * sigma), alpha)  # d rescaled to [0, 1]
    return Comparison(float(d.mean()), 2 * sigma * low - sigma, 2 * sigma * high - sigma, p, test,
                      minimum_detectable_effect(a, b, binary=metric in M.BINARY), int(d.size))


def bernstein_sequence(x, alpha: float = ALPHA) -> tuple[float, float]:
    """The (1 - alpha) predictable plug-in empirical-Bernstein confidence sequence for the mean of
    values in [0, 1], at the last of them, intersected over every earlier prefix (Waudby-Smith &
    Ramdas 2024, Theorem 2, with lambda capped at 1/2)."""
    x = np.asarray(x, dtype=float)
    t = np.arange(1, x.size + 1)
    mu = (0.5 + np.cumsum(x)) / (t + 1)
    var = (0.25 + np.cumsum((x - mu) ** 2)) / (t + 1)
    mu_before, var_before = np.r_[0.5, mu[:-1]], np.r_[0.25, var[:-1]]
    lam = np.minimum(np.sqrt(2 * math.log(2 / alpha) / (var_before * t * np.log1p(t))), 0.5)
    psi = (-np.log1p(-lam) - lam) / 4
    weight = np.cumsum(lam)
    center = np.cumsum(lam * x) / weight
    radius = (math.log(2 / alpha) + np.cumsum(4 * (x - mu_before) ** 2 * psi)) / weight
    return float(np.max(np.maximum(center - radius, 0.0))), float(np.min(np.minimum(center + radius, 1.0)))


def can_be_sequential(metric: str) -> bool:
    return metric in BOUNDS


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


def paired(run_a, run_b, metric: str) -> tuple[list[float], list[float]]:
    """The two runs' values on the items both scored, in item-id order."""
    b = {i["item_id"]: i["scores"][metric] for i in run_b.items}
    shared = [i for i in run_a.items if i["item_id"] in b]
    return [i["scores"][metric] for i in shared], [b[i["item_id"]] for i in shared]


def look(state: EntryState, runs: dict[str, object], metric: str, alpha: float = ALPHA,
         margin: float = TIE_MARGIN) -> None:
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
            state.stopped[name] = (f"stopped after {state.n} items: significantly worse than {leader} "
                                   f"(anytime p = {comp.p_value:.2g})")
        else:
            within[name] = max(-comp.low, comp.high) < margin * (hi - lo)
    if len(state.active) == 1:
        state.reason = f"settled after {state.n} of {state.size} items: only {leader} left"
    elif state.n < state.size and all(within.values()):
        state.tied = [leader, *within]
        state.reason = (f"settled after {state.n} of {state.size} items: {', '.join(state.tied)} tied "
                        f"(every difference from {leader} within ±{margin * (hi - lo):g})")
    elif state.n >= state.size:
        state.reason = f"all {state.size} items scored"


def sequential_entries(entries, sizes: list[int], design: str, candidates: int = 2) -> set[int]:
    """The suite entries scored sequentially under `design` (auto, sequential or fixed); none
    for a single candidate, which has no ranking to settle."""
    if design == "fixed" or candidates < 2:
        return set()
    out = set()
    for k, ((task, entry), size) in enumerate(zip(entries, sizes)):
        metric = entry.metric or (M.ACCURACY if entry.mode == "ppl" else task.metrics[0])
        if entry.circular or not can_be_sequential(metric):
            continue
        if design == "sequential" or size >= LARGE:
            out.add(k)
    return out


def score_sequential(cards, entries, chosen: set[int], backends: dict, conn, *, data_dir, batch_size: int,
                     judge=None, margin: float = TIE_MARGIN, progress=print,
                     executor=None) -> tuple[dict, dict[int, EntryState], dict[str, tuple[float, int]]]:
    """Score the chosen entries round by round: ({(card name, entry index): run}, states,
    {card name: (seconds, items computed)}). `executor` (eval/executor.py): scores a round's
    candidates at once where it can, each thread through its own store connection."""
    from eval.runner import run_task
    from eval.task import load_items

    items = {k: load_items(entries[k][0], entries[k][1].split, data_dir) for k in chosen}
    names = [c.name for c in cards]
    states = {k: EntryState(len(items[k]), 0, [c.name for c in cards
                                                if not (c.is_endpoint and entries[k][1].mode == "ppl")], {})
              for k in chosen}
    runs: dict[tuple[str, int], object] = {}
    spent = {name: (0.0, 0) for name in names}
    from tqdm import tqdm

    bar = tqdm(desc="sequential rounds", unit="round", leave=False)
    while any(s.reason is None for s in states.values()):
        bar.update(1)
        bar.set_postfix_str(", ".join(f"{entries[k][0].name}-{entries[k][1].split} {entries[k][1].mode} "
                                      f"{states[k].n}/{states[k].size}" for k in sorted(chosen)
                                      if states[k].reason is None))
        for k in sorted(chosen):
            state = states[k]
            if state.reason is not None:
                continue
            task, entry = entries[k]
            state.n = min(state.n + ROUND, state.size)

            def one(name, task=task, entry=entry, k=k, upto=state.n):
                run = run_task(backends[name], task, entry.split, entry.mode, items[k],
                               executor.connection() if executor else conn, chunk_size=batch_size,
                               data_dir=data_dir, judge=judge, sequential=(ORDER_SEED, ROUND), upto=upto)
                if executor:
                    executor.between_rounds(backends[name])
                return name, run

            for name, run in (executor.map(one, list(state.active)) if executor else map(one, state.active)):
                runs[(name, k)] = _mark(run)
                spent[name] = (spent[name][0] + run.seconds, spent[name][1] + run.computed)
            metric = entry.metric or (M.ACCURACY if entry.mode == "ppl" else task.metrics[0])
            look(state, {n: runs[(n, k)] for n in state.active}, metric, margin=margin)
            if state.reason is not None:
                progress(f"select: {task.name}-{entry.split} {entry.mode}: {state.reason}")
    bar.close()
    return runs, states, spent


def _mark(run):
    from dataclasses import replace

    return replace(run, sequential=True)
