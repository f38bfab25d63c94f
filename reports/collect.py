"""Gather what the report shows from the results store and the run artifacts.

Sources, all written by earlier steps and only read here:
- `runs/results.sqlite`: every run's identity and every item's prompt, output and scores;
- `runs/selection.json`: the candidates' run ids, the rule, the budget check and the decision;
- `runs/train/<run>/{summary.json,train_log.jsonl,merged/provenance.json}`;
- `runs/serve/rescore-*.json`: the served run ids, the parity gate and the serving figures.

Statistics are the selection's own (eval.stats on the stored per-item values); runs are put side
by side only when their task hashes and item ids match, otherwise the report stops with one line.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from eval import metrics as M
from eval.baselines import BASELINE_COLUMNS, baseline_cells
from eval.anytime import anytime_compare, can_be_sequential, mean_sequence
from eval.stats import Estimate, bootstrap_mean, compare
from eval.suite import ranked_metrics
from eval.summary import (
    PERCENT,
    RunSummary,
    comparison_text,
    fmt_ci,
    fmt_diff,
    fmt_value,
    metrics_of,
    primary_metric,
)
from eval.task import find_task, load_task
from core.errors import UserError
from core.artifacts import Selection


@dataclass
class Run:
    """One stored run with the task spec its metrics come from."""

    summary: RunSummary
    meta: dict
    finished: bool

    @property
    def run_id(self) -> str:
        return self.summary.run_id

    @property
    def model(self) -> str:
        return self.summary.model

    @property
    def task_sha256(self) -> str:
        return self.meta["task_sha256"]

    @property
    def entry(self) -> tuple[str, str, str]:
        return self.summary.task.name, self.summary.split, self.summary.mode

    def values(self, metric: str) -> list[float]:
        return [item["scores"][metric] for item in self.summary.items]


def load_run(conn: sqlite3.Connection, run_id: str, named_in: str) -> Run:
    from eval.results import run_items, run_row

    row = run_row(conn, run_id)
    if row is None:
        raise UserError(
            f"{named_in}: run {run_id} is not in the results store (was runs/results.sqlite replaced?)"
        )
    task_name, split, mode, model, meta_json, finished, task_file = row
    try:  # the file the run read, where it still is; else the task of that name under tasks/
        task = load_task(Path(task_file)) if task_file and Path(task_file).is_file() else find_task(task_name)
    except UserError as exc:
        raise UserError(
            f"{named_in}: run {run_id} is of task '{task_name}', which has no task file now"
        ) from exc
    items = run_items(conn, run_id)
    meta = json.loads(meta_json)
    return Run(
        RunSummary(run_id, task, split, mode, model, items, 0.0, 0, sequential=bool(meta.get("order"))),
        meta,
        finished is not None,
    )


def check_side_by_side(runs: list[Run], what: str) -> None:
    """Refuse to compare runs of different task files or different items."""
    shas = {r.task_sha256 for r in runs}
    if len(shas) > 1:
        detail = "; ".join(f"{r.model} (run {r.run_id}) task hash {r.task_sha256[:12]}" for r in runs)
        raise UserError(
            f"report: refusing to put {what} side by side: their task files differ ({detail}); "
            "score them again with the same task file"
        )
    ids = [[i["item_id"] for i in r.summary.items] for r in runs]
    for r, got in zip(runs[1:], ids[1:]):
        if got != ids[0]:
            raise UserError(
                f"report: refusing to put {what} side by side: {r.model} (run {r.run_id}) has "
                f"{len(got)} items, {runs[0].model} (run {runs[0].run_id}) {len(ids[0])}, "
                "and not the same ones"
            )


def estimate_cell(metric: str, e: Estimate) -> dict:
    return {
        "mean": e.mean,
        "low": e.low,
        "high": e.high,
        "n": e.n,
        "text": fmt_value(metric, e.mean),
        "ci": fmt_ci(metric, e.low, e.high),
    }


def comparison_cell(metric: str, a: list[float], b: list[float], sequential: bool = False) -> dict:
    """a - b with its paired CI and p-value, as the selection computes it (anytime-valid ones for
    a sequentially scored entry)."""
    c = anytime_compare(a, b, metric) if sequential else compare(a, b, binary=metric in M.BINARY)
    return {
        **c.record(metric),
        "low": c.low,
        "high": c.high,
        "diff_text": fmt_diff(metric, c.diff),
        "ci": fmt_ci(metric, c.low, c.high),
        "mde_text": fmt_value(metric, c.mde),
    }


def correct(run: Run, item: dict) -> bool | None:
    """An item is right when the primary metric is at its best (all facts recalled, the right
    choice or style); None for tasks whose primary metric has no notion of right."""
    metric = primary_metric(run.summary)
    if metric not in PERCENT:
        return None
    value = item["scores"][metric]
    return value >= 1.0 if M.HIGHER_IS_BETTER[metric] else value <= 0.0


# ---------------------------------------------------------------------------------------------


@dataclass
class Leaderboard:
    models: list[str]
    winner: str | None
    rows: list[dict]
    """One per (task, split, mode, metric): cells per model."""
    significance: list[dict]
    """The decision's comparisons (selection.json's `comparisons_vs_best`): the best mean rank
    against each other candidate on each entry's ranked metric."""
    charts: list[dict]
    """One per entry's primary metric: per-model mean and CI, for the error-bar plot."""
    selection: dict
    runs: list[Run]
    mde: list[str] = field(default_factory=list)
    """In words: the smallest gap each entry's sample size can detect."""
    baselines: list[str] = field(default_factory=list)
    """The baseline columns some row has (majority label, uniform chance: choice tasks only)."""
    notes: list[str] = field(default_factory=list)
    """Entries compared on fewer items than some candidate scored, or left out, and why."""


def leaderboard(conn, selection: Selection, named_in: str) -> Leaderboard:
    runs = {model: [load_run(conn, rid, named_in) for rid in ids] for model, ids in selection.runs.items()}
    models = list(runs)
    winner = selection.winner
    ranked = ranked_metrics(selection)
    by_entry: dict[tuple, dict[str, Run]] = {}
    for model, model_runs in runs.items():
        for run in model_runs:
            by_entry.setdefault(run.entry, {})[model] = run
    rows, significance, charts, notes = [], [], [], []
    for entry, per_model in by_entry.items():
        sequential = any(r.summary.sequential for r in per_model.values())
        if not sequential:  # a sequential entry's candidates stop at different items by design
            runs_of, note = aligned(list(per_model.values()), f"{'-'.join(entry[:2])} {entry[2]}")
            notes += [note] if note else []
            if runs_of is None:
                continue
            per_model = dict(zip(per_model, runs_of))
        some = max(per_model.values(), key=lambda r: len(r.summary.items))
        metrics = [m for m in metrics_of(some.summary) if not sequential or can_be_sequential(m)]
        metrics.sort(key=lambda m: m != ranked.get(entry))  # the metric the entry is ranked by first
        floor = {
            (c.metric, c.model): estimate_cell(c.metric, c.estimate) for c in baseline_cells(some.summary)
        }
        for metric in metrics:
            cells = {
                m: estimate_cell(
                    metric,
                    mean_sequence(r.values(metric), metric)
                    if sequential
                    else bootstrap_mean(r.values(metric)),
                )
                for m, r in per_model.items()
            }
            cells.update({name: e for (m, name), e in floor.items() if m == metric})
            rows.append(
                {
                    "task": entry[0],
                    "split": entry[1],
                    "mode": entry[2],
                    "metric": metric,
                    "version": some.task_sha256[:6],
                    "cells": cells,
                    "primary": metric == metrics[0],
                }
            )
        primary = next(r for r in rows if r["primary"] and (r["task"], r["split"], r["mode"]) == entry)
        charts.append(
            {
                "title": f"{entry[0]}-{entry[1]} {entry[2]} {primary['metric']}",
                "metric": primary["metric"],
                "scale": 100.0 if primary["metric"] in PERCENT else 1.0,
                "bars": [{"model": m, **cell} for m, cell in primary["cells"].items()],
            }
        )
    best = selection.best_mean_rank
    for model, comps in selection.comparisons_vs_best.items():
        significance += [
            {"model": model, **c, **comparison_text(c), "candidate": _verdict_for_candidate(c)} for c in comps
        ]
    mde = [
        f"{s['task']}-{s['split']} {s['mode']} {s['metric']}: with {s['n']} paired items, differences "
        f"smaller than about {s['mde_text']}{' points' if s['metric'] in PERCENT else ''} cannot be told "
        f"apart from chance (80% power, alpha 0.05); a candidate within that of {best} is not shown to be worse."
        for s in {(s["task"], s["split"], s["mode"]): s for s in reversed(significance)}.values()
    ]
    shown = [b for b in BASELINE_COLUMNS if any(b in r["cells"] for r in rows)]
    return Leaderboard(
        models,
        winner,
        rows,
        significance,
        charts,
        selection,
        [r for model_runs in runs.values() for r in model_runs],
        mde,
        shown,
        notes,
    )


def _verdict_for_candidate(record: dict) -> str:
    """A comparison's verdict read from the other candidate's side (the record's is the best's)."""
    if not record["significant"]:
        return "not shown to differ"
    return "significantly worse" if record["better"] else "significantly better"


# ---------------------------------------------------------------------------------------------


def aligned(runs: list[Run], what: str) -> tuple[list[Run] | None, str | None]:
    """The runs cut to the items all of them scored (in the first run's order), with a note when
    that is fewer than any of them has; None and the reason when they cannot be compared."""
    from dataclasses import replace

    if len({r.task_sha256 for r in runs}) > 1:
        detail = "; ".join(f"{r.model} (run {r.run_id}) task hash {r.task_sha256[:12]}" for r in runs)
        return (
            None,
            f"{what}: left out, their task files differ ({detail}); score them again with the same task file",
        )
    shared = set.intersection(*({i["item_id"] for i in r.summary.items} for r in runs))
    if not shared:
        return None, f"{what}: left out, no item was scored by all of them"
    counts = [len(r.summary.items) for r in runs]
    if all(n == len(shared) for n in counts):
        return runs, None
    cut = [
        replace(r, summary=replace(r.summary, items=[i for i in r.summary.items if i["item_id"] in shared]))
        for r in runs
    ]
    sizes = ", ".join(f"{r.model} {n}" for r, n in zip(runs, counts))
    return cut, f"{what}: compared on the {len(shared)} items all of them scored ({sizes})"
