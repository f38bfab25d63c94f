"""Anytime-valid statistics for bounded per-item metrics: confidence sequences for a mean and
for a paired difference, and e-values for discordant pairs, valid however often they are looked
at (eval/sequential.py gives the design that uses them; the report and the decision read them).
"""

from __future__ import annotations

import math

import numpy as np

from eval import metrics as M
from eval.stats import ALPHA, Comparison, Estimate

ROUND = 64
"""Items per candidate per round of the sequential design: four batches of 16; the mixtures
below are tuned to be tightest there."""

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
    v = sigma**2 * n
    return 0.5 * math.log(rho / (v + rho)) + total**2 / (2 * (v + rho))


def mixture_radius(n: int, sigma: float, rho: float, alpha: float = ALPHA) -> float:
    """Half-width, on the mean, of the (1 - alpha) normal-mixture confidence sequence at n."""
    v = sigma**2 * n
    return math.sqrt(2 * (v + rho) * math.log(math.sqrt((v + rho) / rho) / alpha)) / n


def rho_for(sigma: float, n_opt: int = ROUND) -> float:
    """The mixture's scale, fixed in advance so the boundary is tightest near n_opt items (one
    round: the first look, where a stop is worth most; at 2,500 items the radius is within 4% of
    one tuned for 256)."""
    return sigma**2 * n_opt


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
    return Comparison(
        float(d.mean()),
        2 * sigma * low - sigma,
        2 * sigma * high - sigma,
        p,
        test,
        minimum_detectable_effect(a, b, binary=metric in M.BINARY),
        int(d.size),
    )


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


def paired(run_a, run_b, metric: str) -> tuple[list[float], list[float]]:
    """The two runs' values on the items both scored, in item-id order."""
    b = {i["item_id"]: i["scores"][metric] for i in run_b.items}
    shared = [i for i in run_a.items if i["item_id"] in b]
    return [i["scores"][metric] for i in shared], [b[i["item_id"]] for i in shared]
