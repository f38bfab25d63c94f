"""The cost model corrected by what it measured here. When `make select` has scored whole runs on
this machine, the time they took over the cost model's estimate of the same work (with the
replies they generated, as bench/estimate_check.py counts it) is kept per mode and dtype beside
the calibration (`models.machine.measured_here`), and the next estimates of scoring in that mode
and dtype are multiplied by it; `make train` keeps its steps' time over its estimate's the same
way (mode `train`). Why: docs/machine.md ("Corrected by what was measured here").
"""

from __future__ import annotations

import datetime
from pathlib import Path

from eval.estimate import scoring_factor

MIN_RUNS = 2
"""Whole runs of one mode and dtype a command must have measured for its factor to be kept."""


def learned_note(calibration: dict, keys: set[str]) -> list[str]:
    """One line naming the factors an estimate used, for its notes."""
    used = [
        f"{key} x{scoring_factor(calibration, *key.split()):.2f} "
        + next((f"({e[k]} {k}" for k in ("steps", "requests") if k in e), f"({e.get('runs', '?')} runs")
        + f", {e.get('date', '?')})"
        for key in sorted(keys)
        if isinstance(e := calibration.get("learned", {}).get(key), dict)
        and scoring_factor(calibration, *key.split()) != 1.0
    ]
    if not used:
        return []
    return ["corrected by what whole runs measured here against the cost model: " + ", ".join(used)]


def learnable(candidates) -> list[tuple[int, object, object]]:
    """(entry index, run, card) of the runs a `make select` scored whole in this call, but each
    model's first (its time includes the model's load) and the sequential design's (partial by
    design)."""
    out = []
    for c in candidates:
        runs = [(k, r) for k, r in enumerate(c.runs) if r is not None and r.computed]
        out += [(k, r, c.card) for k, r in runs[1:] if r.computed == len(r.items) and not r.sequential]
    return out


def learn(settings, calibration: dict, runs, entry_items, checkpoints, *, chunk_size: int, dtype: str):
    """Keep measured / estimated per mode over `runs` (`learnable`'s); returns the factors kept
    ({"mode dtype": factor})."""
    from eval.estimate import checkpoint_shape, entry_cost, planning_backend
    from models.machine import record_measured
    from models.store import read_manifest

    raw, sums = {**calibration, "learned": {}}, {}
    for k, run, card in runs:
        checkpoint = checkpoints.get(card.name)
        if (
            checkpoint is None
            and not card.is_endpoint
            and (manifest := read_manifest(card, settings.model_store))
        ):
            checkpoint = manifest["checkpoint"]
        if checkpoint is None:
            continue
        backend = planning_backend(settings, card, Path(checkpoint), chunk_size, dtype)
        cost = entry_cost(
            backend,
            checkpoint_shape(card, Path(checkpoint)),
            run.task,
            run.split,
            run.mode,
            entry_items[k],
            raw,
            dtype,
            chunk_size=chunk_size,
            replies={i["item_id"]: i["output"] for i in run.items},
        )
        total = sums.setdefault(f"{run.mode} {dtype}", [0.0, 0.0, 0])
        total[0], total[1], total[2] = total[0] + run.seconds, total[1] + cost.seconds, total[2] + 1
    kept = {}
    for key, (measured, estimated, n) in sums.items():
        if n >= MIN_RUNS and estimated > 0:
            kept[key] = round(measured / estimated, 3)
            entry = {"factor": kept[key], "runs": n, "date": datetime.date.today().isoformat()}
            record_measured(settings.cache_dir, "factors", key, entry)
    return kept


MIN_TRAIN_STEPS = 10
"""Steps between loss logs a training run must have measured for its factor to be kept."""


def steady_steps(log: list[dict]) -> tuple[float, int]:
    """(seconds, steps) between consecutive loss logs of a training log with nothing else logged
    between them: the training steps alone, without the evaluation rounds and samples."""
    seconds, steps, last = 0.0, 0, None
    for entry in log:
        if "loss" in entry and "time" in entry and "step" in entry:
            if last is not None and entry["step"] > last["step"]:
                seconds, steps = seconds + entry["time"] - last["time"], steps + entry["step"] - last["step"]
            last = entry
        else:
            last = None
    return seconds, steps


def learn_training(settings, calibration: dict, log: list[dict], estimated: float, steps: int, dtype: str):
    """Keep a training run's measured seconds a step over the estimate's (`estimated` seconds for
    `steps` steps, as printed: the factor it used is taken out); returns the factor kept, or None."""
    from models.machine import record_measured

    seconds, measured_steps = steady_steps(log)
    if measured_steps < MIN_TRAIN_STEPS or estimated <= 0 or steps <= 0:
        return None
    raw = estimated / scoring_factor(calibration, "train", dtype) / steps
    factor = round(seconds / measured_steps / raw, 3)
    entry = {"factor": factor, "steps": measured_steps, "date": datetime.date.today().isoformat()}
    record_measured(settings.cache_dir, "factors", f"train {dtype}", entry)
    return factor
