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
from eval.summary import (PERCENT, RunSummary, comparison_text, fmt_ci, fmt_diff, fmt_value, metrics_of,
                          primary_metric)
from eval.task import find_task, load_task
from core.errors import UserError
from core.artifacts import Selection
from reports.records import Rescored, TrainingRun


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
        raise UserError(f"{named_in}: run {run_id} is not in the results store (was runs/results.sqlite replaced?)")
    task_name, split, mode, model, meta_json, finished, task_file = row
    try:  # the file the run read, where it still is; else the task of that name under tasks/
        task = load_task(Path(task_file)) if task_file and Path(task_file).is_file() else find_task(task_name)
    except UserError as exc:
        raise UserError(f"{named_in}: run {run_id} is of task '{task_name}', which has no task file now") from exc
    items = run_items(conn, run_id)
    meta = json.loads(meta_json)
    return Run(RunSummary(run_id, task, split, mode, model, items, 0.0, 0, sequential=bool(meta.get("order"))),
               meta, finished is not None)


def check_side_by_side(runs: list[Run], what: str) -> None:
    """Refuse to compare runs of different task files or different items."""
    shas = {r.task_sha256 for r in runs}
    if len(shas) > 1:
        detail = "; ".join(f"{r.model} (run {r.run_id}) task hash {r.task_sha256[:12]}" for r in runs)
        raise UserError(f"report: refusing to put {what} side by side: their task files differ ({detail}); "
                        "score them again with the same task file")
    ids = [[i["item_id"] for i in r.summary.items] for r in runs]
    for r, got in zip(runs[1:], ids[1:]):
        if got != ids[0]:
            raise UserError(f"report: refusing to put {what} side by side: {r.model} (run {r.run_id}) has "
                            f"{len(got)} items, {runs[0].model} (run {runs[0].run_id}) {len(ids[0])}, "
                            "and not the same ones")


def _estimate(metric: str, e: Estimate) -> dict:
    return {"mean": e.mean, "low": e.low, "high": e.high, "n": e.n, "text": fmt_value(metric, e.mean),
            "ci": fmt_ci(metric, e.low, e.high)}


def _comparison(metric: str, a: list[float], b: list[float], sequential: bool = False) -> dict:
    """a - b with its paired CI and p-value, as the selection computes it (anytime-valid ones for
    a sequentially scored entry)."""
    c = anytime_compare(a, b, metric) if sequential else compare(a, b, binary=metric in M.BINARY)
    return {**c.record(metric), "low": c.low, "high": c.high,
            "diff_text": fmt_diff(metric, c.diff),
            "ci": fmt_ci(metric, c.low, c.high), "mde_text": fmt_value(metric, c.mde)}


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
        floor = {(c.metric, c.model): _estimate(c.metric, c.estimate) for c in baseline_cells(some.summary)}
        for metric in metrics:
            cells = {m: _estimate(metric, mean_sequence(r.values(metric), metric) if sequential
                                  else bootstrap_mean(r.values(metric))) for m, r in per_model.items()}
            cells.update({name: e for (m, name), e in floor.items() if m == metric})
            rows.append({"task": entry[0], "split": entry[1], "mode": entry[2], "metric": metric,
                         "version": some.task_sha256[:6], "cells": cells,
                         "primary": metric == metrics[0]})
        primary = next(r for r in rows if r["primary"] and (r["task"], r["split"], r["mode"]) == entry)
        charts.append({"title": f"{entry[0]}-{entry[1]} {entry[2]} {primary['metric']}", "metric": primary["metric"],
                       "scale": 100.0 if primary["metric"] in PERCENT else 1.0,
                       "bars": [{"model": m, **cell} for m, cell in primary["cells"].items()]})
    best = selection.best_mean_rank
    for model, comps in selection.comparisons_vs_best.items():
        significance += [{"model": model, **c, **comparison_text(c),
                          "candidate": _verdict_for_candidate(c)} for c in comps]
    mde = [f"{s['task']}-{s['split']} {s['mode']} {s['metric']}: with {s['n']} paired items, differences "
           f"smaller than about {s['mde_text']}{' points' if s['metric'] in PERCENT else ''} cannot be told "
           f"apart from chance (80% power, alpha 0.05); a candidate within that of {best} is not shown to be worse."
           for s in {(s["task"], s["split"], s["mode"]): s for s in reversed(significance)}.values()]
    shown = [b for b in BASELINE_COLUMNS if any(b in r["cells"] for r in rows)]
    return Leaderboard(models, winner, rows, significance, charts, selection,
                       [r for model_runs in runs.values() for r in model_runs], mde, shown, notes)


def _verdict_for_candidate(record: dict) -> str:
    """A comparison's verdict read from the other candidate's side (the record's is the best's)."""
    if not record["significant"]:
        return "not shown to differ"
    return "significantly worse" if record["better"] else "significantly better"


# ---------------------------------------------------------------------------------------------


@dataclass
class System:
    """A model whose outputs the before/after and review pages show: base, merged, served."""

    key: str
    label: str
    runs: dict[str, Run] = field(default_factory=dict)
    """By task name (gen mode)."""


@dataclass
class BeforeAfter:
    base: System
    after: list[System]
    tasks: list[dict]
    """Per task: rows of metric, base, each after system, delta, CI, p; item flips."""
    notes: list[str] = field(default_factory=list)
    """What was left out or compared on fewer items, and why."""


def aligned(runs: list[Run], what: str) -> tuple[list[Run] | None, str | None]:
    """The runs cut to the items all of them scored (in the first run's order), with a note when
    that is fewer than any of them has; None and the reason when they cannot be compared."""
    from dataclasses import replace

    if len({r.task_sha256 for r in runs}) > 1:
        detail = "; ".join(f"{r.model} (run {r.run_id}) task hash {r.task_sha256[:12]}" for r in runs)
        return None, f"{what}: left out, their task files differ ({detail}); score them again with the same task file"
    shared = set.intersection(*({i["item_id"] for i in r.summary.items} for r in runs))
    if not shared:
        return None, f"{what}: left out, no item was scored by all of them"
    counts = [len(r.summary.items) for r in runs]
    if all(n == len(shared) for n in counts):
        return runs, None
    cut = [replace(r, summary=replace(r.summary, items=[i for i in r.summary.items if i["item_id"] in shared]))
           for r in runs]
    sizes = ", ".join(f"{r.model} {n}" for r, n in zip(runs, counts))
    return cut, f"{what}: compared on the {len(shared)} items all of them scored ({sizes})"


def paired_runs(conn, selection: Selection | None, rescore: Rescored) -> tuple[System, System, System]:
    """The base model's, the local merged model's and the served model's run of each re-scored
    task: the merged ones from the rescore record, the base ones from the selection (else the
    newest finished run of the base card on the same task and split)."""
    named, base_card, record = str(rescore.file), rescore.base_card, rescore.record
    local = System("merged", f"{record.model} (local)")
    served = System("served", f"{record.model} (served, {record.engine})")
    for task in record.parity["tasks"]:
        if task.get("mode", "gen") != "gen":  # before/after compares replies; `ppl` is in the parity table
            continue
        local.runs[task["task"]] = load_run(conn, task["local_run"], named)
        served.runs[task["task"]] = load_run(conn, task["served_run"], named)
    base = System("base", f"{base_card} (base)")
    for run_id in (selection.runs.get(base_card, []) if selection else []):
        run = load_run(conn, run_id, "selection.json")
        if run.summary.mode == "gen" and run.summary.task.name in local.runs:
            base.runs[run.summary.task.name] = run
    if not base.runs:
        base.runs = _newest_base_runs(conn, base_card, {t: r.summary.split for t, r in local.runs.items()})
    return base, local, served


def before_after(conn, selection: Selection | None, train: TrainingRun | None,
                 rescore: Rescored | None) -> BeforeAfter | None:
    """Base model against the merged model scored locally and through the server, per task; before
    a re-score, the training run's checks (base against the merged model, local)."""
    if rescore is None:
        return _training_checks(train)
    base, local, served = paired_runs(conn, selection, rescore)
    gate = train.summary.contamination if train else None
    tasks, notes = [], []
    for task_name in list(base.runs):
        systems, note = aligned([base.runs[task_name], local.runs[task_name], served.runs[task_name]],
                                f"{task_name}: the base and fine-tuned runs")
        notes += [note] if note else []
        if systems is None:
            del base.runs[task_name]
            continue
        base.runs[task_name], local.runs[task_name], served.runs[task_name] = systems
        base_run = systems[0]
        rows = []
        for metric in metrics_of(base_run.summary):
            if any(metric not in i["scores"] for r in systems[1:] for i in r.summary.items):
                continue
            b = base_run.values(metric)
            cols = [{**_estimate(metric, bootstrap_mean(after.values(metric))),
                     "vs_base": _comparison(metric, after.values(metric), b)} for after in systems[1:]]
            rows.append({"metric": metric, "base": _estimate(metric, bootstrap_mean(b)), "after": cols,
                         "higher_is_better": M.HIGHER_IS_BETTER[metric]})
        tasks.append({"task": task_name, "split": base_run.summary.split, "n": len(base_run.summary.items),
                      "rows": rows, "probe": base_run.summary.task.parser == "choice",
                      "flips": _flips(base_run, systems[1]),
                      "runs": dict(zip(("base", "merged", "served"), systems)),
                      "clean": _clean_subset(systems, rows, gate)})
    return BeforeAfter(base, [local, served], tasks, notes)


def _training_checks(train: TrainingRun | None) -> BeforeAfter | None:
    """The training run's own checks, as `make train` recorded them: no items to flip, no served
    column yet."""
    if train is None or not train.summary.checks:
        return None
    summary = train.summary
    merged = System("merged", f"{summary.merged_model} (local, scored by make train)")
    tasks = []
    for c in summary.checks:
        metric = c["metric"]
        after = {**_estimate(metric, Estimate(**c["merged"])),
                 "vs_base": {**c, "diff_text": fmt_diff(metric, c["diff"]), "ci": fmt_ci(metric, *c["ci95"])}}
        tasks.append({"task": c["task"], "split": c["split"], "n": c["items"], "mode": c.get("mode", "gen"),
                      "probe": c.get("role") == "forgetting", "flips": {"defined": False}, "runs": {},
                      "clean": None, "rows": [{"metric": metric, "base": _estimate(metric, Estimate(**c["base"])),
                                               "after": [after], "higher_is_better": M.HIGHER_IS_BETTER[metric]}]})
    return BeforeAfter(System("base", f"{summary.model} (base)"), [merged], tasks, ["No re-score yet: these are "
                       "the training run's checks; `make rescore` adds the served model and the item flips."])


def _clean_subset(systems: list[Run], rows: list[dict], gate: dict | None) -> dict | None:
    """The same comparisons on the items no training conversation overlaps (the contamination
    gate's `flagged_items`); None when the training run had no gate."""
    if gate is None:
        return None
    base_run = systems[0]
    flagged = set(gate.get("flagged_items", {}).get(f"{base_run.summary.task.name}/{base_run.summary.split}", []))
    keep = [k for k, item in enumerate(base_run.summary.items) if item["item_id"] not in flagged]
    out = {"flagged": len(base_run.summary.items) - len(keep), "n": len(keep), "rows": []}
    if not out["flagged"] or not keep:
        return out
    for row in rows:
        metric = row["metric"]
        b = [base_run.values(metric)[k] for k in keep]
        cols = [{**_estimate(metric, bootstrap_mean([after.values(metric)[k] for k in keep])),
                 "vs_base": _comparison(metric, [after.values(metric)[k] for k in keep], b)} for after in systems[1:]]
        out["rows"].append({**row, "base": _estimate(metric, bootstrap_mean(b)), "after": cols})
    return out


def _newest_base_runs(conn, model: str, splits: dict[str, str]) -> dict[str, Run]:
    from eval.results import newest_finished_run

    found = {task: newest_finished_run(conn, model, task, split) for task, split in splits.items()}
    return {task: load_run(conn, run_id, "the results store") for task, run_id in found.items() if run_id}


def _flips(base: Run, after: Run) -> dict:
    """Items right before and wrong after, and the other way round."""
    rows = item_flips(base, after)
    if rows and rows[0]["flip"] == "na":
        return {"defined": False, "up": [], "down": []}
    keep = ("item_id", "prompt", "request", "gold", "before", "after", "before_parsed", "after_parsed")
    return {"defined": True, "up": [{k: r[k] for k in keep} for r in rows if r["flip"] == "up"],
            "down": [{k: r[k] for k in keep} for r in rows if r["flip"] == "down"],
            "metric": primary_metric(base.summary)}


def item_flips(base: Run, after: Run) -> list[dict]:
    """Every item of `base` beside the same item of `after`, and its flip: "up" (wrong, then
    right), "down" (right, then wrong), "none", or "na" where the task has no notion of right."""
    by_id = {i["item_id"]: i for i in after.summary.items}
    rows = []
    for item in base.summary.items:
        other = by_id[item["item_id"]]
        was, now = correct(base, item), correct(after, other)
        flip = ("na" if was is None else "up" if not was and now else "down" if was and not now else "none")
        rows.append({"item_id": item["item_id"], "prompt": item["prompt"], "request": item.get("request"),
                     "gold": item["gold"], "before": item["output"], "after": other["output"],
                     "before_parsed": item["parsed"], "after_parsed": other["parsed"], "before_item": item,
                     "after_item": other, "now": now, "flip": flip})
    return rows
