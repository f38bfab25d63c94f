"""`select --plan`: how many items each suite entry needs before the full run is paid for.

    python -m selectune select --plan                     # a 20% pilot of every entry
    python -m selectune select --plan --pilot 0.1 --detect 0.05 --suite suites/fewclue-test.yaml

A seeded share of each entry's items is scored for every candidate. For each entry, the leader on
the pilot is paired with every other candidate; from the pilot's paired outcomes come the
discordance (0/1 metrics: the share of items the two decide differently) or the standard
deviation of the paired differences (other metrics), and from those the items needed to detect
the pilot's gap, and a given difference (`--detect`), with the given power at alpha 0.05:

- 0/1 metrics, McNemar's test (Connor, 1987): n = (z_{1-a/2} sqrt(p_d) + z_{power} sqrt(p_d - d^2))^2 / d^2
- other metrics, a paired z-test: n = ((z_{1-a/2} + z_{power}) sd / d)^2

and, at the split's full size, the smallest difference it can detect. An entry that needs more
items than its split has cannot separate those candidates, and the plan says so.
"""

from __future__ import annotations

import math
import random

import numpy as np

from eval import metrics as M
from eval.stats import ALPHA, ASSUMED_DISCORDANCE


def pilot_items(items: list, share: float, seed: int = 0) -> list:
    """A seeded share of the items (at least 10, or all), in their original order."""
    k = min(len(items), max(10, math.ceil(share * len(items))))
    keep = set(random.Random(seed).sample(range(len(items)), k))
    return [item for n, item in enumerate(items) if n in keep]


def items_needed(a, b, delta: float, *, binary: bool, power: float = 0.8, alpha: float = ALPHA) -> int | None:
    """Paired items needed to detect |mean(a) - mean(b)| = delta; None when the pilot shows no
    variation to plan from (or delta is 0)."""
    from scipy.stats import norm

    delta = abs(delta)
    za, zb = norm.ppf(1 - alpha / 2), norm.ppf(power)
    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    if delta == 0:
        return None
    if binary:
        p_d = float(np.mean(d != 0))
        if p_d <= delta**2 or p_d == 0:
            return None
        return math.ceil((za * math.sqrt(p_d) + zb * math.sqrt(p_d - delta**2)) ** 2 / delta**2)
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    return math.ceil(((za + zb) * sd / delta) ** 2) if sd > 0 else None


def detectable_at(a, b, n: int, *, binary: bool, power: float = 0.8, alpha: float = ALPHA) -> float:
    """The smallest difference n paired items detect, from the pilot's spread (0/1 metrics: at
    least the assumed discordance, as the selection's MDE)."""
    from scipy.stats import norm

    d = np.asarray(a, dtype=float) - np.asarray(b, dtype=float)
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    if binary:
        sd = max(sd, math.sqrt(ASSUMED_DISCORDANCE))
    return float((norm.ppf(1 - alpha / 2) + norm.ppf(power)) * sd / math.sqrt(n))


def plan(
    candidates, metrics: list[str], sizes: list[int], *, detect: float | None = None, power: float = 0.8
) -> list[dict]:
    """One row per suite entry and challenger: the leader on the pilot against it."""
    rows = []
    for k, (metric, size) in enumerate(zip(metrics, sizes)):
        scored = [c for c in candidates if c.runs[k] is not None]
        values = {c.card.name: [i["scores"][metric] for i in c.runs[k].items] for c in scored}
        sign = 1.0 if M.HIGHER_IS_BETTER[metric] else -1.0
        leader = max(values, key=lambda name: sign * float(np.mean(values[name])))
        run = scored[0].runs[k]
        binary = metric in M.BINARY
        for name, other in values.items():
            if name == leader:
                continue
            a, b = values[leader], other
            gap = float(np.mean(a) - np.mean(b))
            need = items_needed(a, b, gap, binary=binary, power=power)
            rows.append(
                {
                    "task": run.task.name,
                    "split": run.split,
                    "mode": run.mode,
                    "metric": metric,
                    "leader": leader,
                    "other": name,
                    "pilot": len(a),
                    "size": size,
                    "gap": gap,
                    "spread": float(np.mean(np.asarray(a) != np.asarray(b)))
                    if binary
                    else float(np.std(np.asarray(a, float) - np.asarray(b, float), ddof=1)),
                    "binary": binary,
                    "needed_for_gap": need,
                    "needed_for_detect": items_needed(a, b, detect, binary=binary, power=power)
                    if detect
                    else None,
                    "detectable_at_size": detectable_at(a, b, size, binary=binary, power=power),
                    "separable": need is not None and need <= size,
                }
            )
    return rows


def print_plan(rows: list[dict], *, detect: float | None, power: float) -> None:
    from eval.summary import fmt_value

    print(
        f"plan: items needed for {power:.0%} power at alpha {ALPHA} (McNemar for 0/1 metrics, paired z "
        "otherwise), from the pilot's paired outcomes"
    )
    for r in rows:
        m = r["metric"]
        spread = f"discordance {r['spread']:.2f}" if r["binary"] else f"sd of differences {r['spread']:.3g}"
        need = (
            f"{r['needed_for_gap']} items to detect this gap"
            if r["needed_for_gap"] is not None
            else "no gap or no variation in the pilot to plan from"
        )
        extra = (
            f"; {r['needed_for_detect']} to detect {fmt_value(m, detect)}"
            if detect and r["needed_for_detect"] is not None
            else ""
        )
        verdict = (
            "the split is large enough"
            if r["separable"]
            else f"the split ({r['size']} items) cannot separate them: it detects only gaps of about "
            f"{fmt_value(m, r['detectable_at_size'])}"
        )
        print(
            f"- {r['task']}-{r['split']} {r['mode']} {m}: {r['leader']} - {r['other']} = {fmt_value(m, r['gap'])} "
            f"on {r['pilot']} pilot items ({spread}): {need}{extra}; {verdict}"
        )
