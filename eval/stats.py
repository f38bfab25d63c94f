"""Statistics for comparing models on the same items.

- mean with a 95% percentile-bootstrap CI (seeded, so reruns print the same intervals);
- exact McNemar test for paired 0/1 metrics (statsmodels);
- paired bootstrap CI and two-sided p-value of a difference for continuous metrics;
- minimum detectable effect of a paired comparison at this sample size (alpha 0.05, power 0.8).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

N_BOOT = 2000
ALPHA = 0.05


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float
    n: int


@dataclass(frozen=True)
class Comparison:
    diff: float
    """mean(a) - mean(b)."""
    low: float
    high: float
    p_value: float
    test: str
    mde: float
    """Smallest |difference| this many paired items detects with 80% power."""
    n: int = 0
    """Paired items compared."""

    @property
    def significant(self) -> bool:
        return self.p_value < ALPHA and self.diff != 0

    def record(self, metric: str) -> dict:
        """The one way a comparison of a against b in `metric` is written down (selection.json,
        the training summary, the rescore record, the report), with its verdict for a."""
        from eval.metrics import is_better

        better = is_better(metric, self.diff)
        verdict = (
            "no significant difference"
            if not self.significant
            else "significantly better"
            if better
            else "significantly worse"
        )
        return {
            "metric": metric,
            "diff": self.diff,
            "ci95": [self.low, self.high],
            "p_value": self.p_value,
            "test": self.test,
            "mde": self.mde,
            "n": self.n,
            "significant": self.significant,
            "better": better,
            "verdict": verdict,
        }


def bootstrap_mean(values, *, seed: int = 0, n_boot: int = N_BOOT) -> Estimate:
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        raise ValueError("no values")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    low, high = np.quantile(means, [ALPHA / 2, 1 - ALPHA / 2])
    return Estimate(float(x.mean()), float(low), float(high), int(x.size))


def mcnemar_exact(a, b) -> float:
    """Two-sided exact McNemar p-value for paired 0/1 outcomes."""
    from statsmodels.stats.contingency_tables import mcnemar

    a, b = np.asarray(a, dtype=bool), np.asarray(b, dtype=bool)
    table = [[int(np.sum(a & b)), int(np.sum(a & ~b))], [int(np.sum(~a & b)), int(np.sum(~a & ~b))]]
    return float(mcnemar(table, exact=True).pvalue)


def paired_bootstrap(a, b, *, seed: int = 0, n_boot: int = N_BOOT) -> tuple[float, float, float, float]:
    """(diff, low, high, p) for mean(a - b), resampling items jointly."""
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(n_boot, d.size))].mean(axis=1)
    low, high = np.quantile(means, [ALPHA / 2, 1 - ALPHA / 2])
    # Two-sided p: how often the bootstrap distribution, centred at zero, is as extreme as observed.
    extreme = int(np.sum(np.abs(means - d.mean()) >= abs(d.mean())))
    p = 1.0 if d.mean() == 0 else (extreme + 1) / (n_boot + 1)  # never an impossible p = 0
    return float(d.mean()), float(low), float(high), p


ASSUMED_DISCORDANCE = 0.25
"""Share of items two comparable models decide differently, assumed for 0/1 metrics' MDE."""


def minimum_detectable_effect(a, b, *, binary: bool = True) -> float:
    """MDE of a paired test: (z_{1-alpha/2} + z_{0.8}) * sd(a - b) / sqrt(n).

    For 0/1 metrics the variance of a - b is about the share of items the two models decide
    differently. Two models that happen to agree almost everywhere (both always answering "A")
    would make the observed variance, and so the MDE, tiny; the test's power to detect a real gap
    does not depend on that accident, so at least ASSUMED_DISCORDANCE is used: with 160 items,
    gaps under about 11 points are not detectable.
    """
    from scipy.stats import norm

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    if binary:
        sd = max(sd, np.sqrt(ASSUMED_DISCORDANCE))
    return float((norm.ppf(1 - ALPHA / 2) + norm.ppf(0.8)) * sd / np.sqrt(d.size))


def compare(a, b, *, binary: bool, seed: int = 0) -> Comparison:
    diff, low, high, p = paired_bootstrap(a, b, seed=seed)
    test = "paired bootstrap"
    if binary:
        p, test = mcnemar_exact(a, b), "exact McNemar"
    return Comparison(diff, low, high, p, test, minimum_detectable_effect(a, b, binary=binary), len(a))
