"""Statistics against values worked out by hand."""

from __future__ import annotations

import pytest
from scipy.stats import binom

from eval.stats import bootstrap_mean, compare, mcnemar_exact, minimum_detectable_effect, paired_bootstrap


def test_mcnemar_exact_matches_the_binomial_tail():
    # 2 items only a gets right, 8 only b: p = 2 * P(X <= 2), X ~ Binomial(10, 1/2) = 112/1024.
    a = [1] * 20 + [1] * 2 + [0] * 8 + [0] * 10
    b = [1] * 20 + [0] * 2 + [1] * 8 + [0] * 10
    assert mcnemar_exact(a, b) == pytest.approx(2 * binom.cdf(2, 10, 0.5)) == pytest.approx(0.109375)
    assert mcnemar_exact(a, a) == 1.0


def test_bootstrap_mean_ci():
    e = bootstrap_mean([0, 1] * 80, seed=1)
    assert e.mean == 0.5 and e.n == 160
    # Normal approximation: 0.5 +- 1.96 * sqrt(0.25 / 160) = [0.4225, 0.5775].
    assert e.low == pytest.approx(0.4225, abs=0.015) and e.high == pytest.approx(0.5775, abs=0.015)
    const = bootstrap_mean([1.0] * 10)
    assert (const.low, const.mean, const.high) == (1.0, 1.0, 1.0)
    assert bootstrap_mean([0, 1] * 80, seed=1) == e  # seeded: the same interval every run


def test_paired_bootstrap():
    assert paired_bootstrap([1, 2, 3], [1, 2, 3]) == (0.0, 0.0, 0.0, 1.0)
    diff, low, high, p = paired_bootstrap([5.0 + i % 3 for i in range(100)], [1.0] * 100)
    assert diff == pytest.approx(5.0 - 1.0 + 0.99, abs=0.01) and low > 0 and p < 0.01


def test_minimum_detectable_effect():
    # sd(a - b) = 0.5 (no pairs observed to differ: discordance 0.25 assumed), n = 160:
    # (1.95996 + 0.84162) * 0.5 / sqrt(160) = 0.11074: 160 items cannot separate 8-point gaps.
    assert minimum_detectable_effect([1] * 160, [1] * 160) == pytest.approx(0.11074, abs=1e-4)
    assert compare([1] * 160, [1] * 160, binary=True).mde > 0.08
    # Continuous metrics use the observed spread: d = +-1 alternating, sd = sqrt(40/39), n = 40.
    d = [1.0, -1.0] * 20
    assert minimum_detectable_effect(d, [0.0] * 40, binary=False) == pytest.approx(
        2.80158 * (40 / 39) ** 0.5 / 40**0.5, abs=1e-4
    )


def test_compare_picks_the_test_by_metric_kind():
    assert compare([1, 0, 1, 1], [0, 0, 1, 0], binary=True).test == "exact McNemar"
    assert compare([0.3, 0.5], [0.1, 0.2], binary=False).test == "paired bootstrap"


def test_bootstrap_p_value_is_never_zero():
    diff, _, _, p = paired_bootstrap([1.0] * 50, [0.0] * 50)
    assert diff == 1.0 and 0 < p <= 1 / 2001 + 1e-12
