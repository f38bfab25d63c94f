"""The before/after page's data: the base model, the merged model scored locally and served, side
by side on the same items (paired comparisons, the clean subset, item flips)."""

from __future__ import annotations

from dataclasses import dataclass, field

from eval import metrics as M
from eval.stats import Estimate, bootstrap_mean
from eval.summary import fmt_ci, fmt_diff, metrics_of, primary_metric
from core.artifacts import Selection
from reports.collect import Run, aligned, comparison_cell, correct, estimate_cell, load_run
from reports.records import Rescored, TrainingRun


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
    for run_id in selection.runs.get(base_card, []) if selection else []:
        run = load_run(conn, run_id, "selection.json")
        if run.summary.mode == "gen" and run.summary.task.name in local.runs:
            base.runs[run.summary.task.name] = run
    if not base.runs:
        base.runs = _newest_base_runs(conn, base_card, {t: r.summary.split for t, r in local.runs.items()})
    return base, local, served


def before_after(
    conn, selection: Selection | None, train: TrainingRun | None, rescore: Rescored | None
) -> BeforeAfter | None:
    """Base model against the merged model scored locally and through the server, per task; before
    a re-score, the training run's checks (base against the merged model, local)."""
    if rescore is None:
        return _training_checks(train)
    base, local, served = paired_runs(conn, selection, rescore)
    gate = train.summary.contamination if train else None
    tasks, notes = [], []
    for task_name in list(base.runs):
        systems, note = aligned(
            [base.runs[task_name], local.runs[task_name], served.runs[task_name]],
            f"{task_name}: the base and fine-tuned runs",
        )
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
            cols = [
                {
                    **estimate_cell(metric, bootstrap_mean(after.values(metric))),
                    "vs_base": comparison_cell(metric, after.values(metric), b),
                }
                for after in systems[1:]
            ]
            rows.append(
                {
                    "metric": metric,
                    "base": estimate_cell(metric, bootstrap_mean(b)),
                    "after": cols,
                    "higher_is_better": M.HIGHER_IS_BETTER[metric],
                }
            )
        tasks.append(
            {
                "task": task_name,
                "split": base_run.summary.split,
                "n": len(base_run.summary.items),
                "rows": rows,
                "probe": base_run.summary.task.parser == "choice",
                "flips": _flips(base_run, systems[1]),
                "runs": dict(zip(("base", "merged", "served"), systems)),
                "clean": _clean_subset(systems, rows, gate),
            }
        )
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
        after = {
            **estimate_cell(metric, Estimate(**c["merged"])),
            "vs_base": {**c, "diff_text": fmt_diff(metric, c["diff"]), "ci": fmt_ci(metric, *c["ci95"])},
        }
        tasks.append(
            {
                "task": c["task"],
                "split": c["split"],
                "n": c["items"],
                "mode": c.get("mode", "gen"),
                "probe": c.get("role") == "forgetting",
                "flips": {"defined": False},
                "runs": {},
                "clean": None,
                "rows": [
                    {
                        "metric": metric,
                        "base": estimate_cell(metric, Estimate(**c["base"])),
                        "after": [after],
                        "higher_is_better": M.HIGHER_IS_BETTER[metric],
                    }
                ],
            }
        )
    return BeforeAfter(
        System("base", f"{summary.model} (base)"),
        [merged],
        tasks,
        [
            "No re-score yet: these are "
            "the training run's checks; `make rescore` adds the served model and the item flips."
        ],
    )


def _clean_subset(systems: list[Run], rows: list[dict], gate: dict | None) -> dict | None:
    """The same comparisons on the items no training conversation overlaps (the contamination
    gate's `flagged_items`); None when the training run had no gate."""
    if gate is None:
        return None
    base_run = systems[0]
    flagged = set(
        gate.get("flagged_items", {}).get(f"{base_run.summary.task.name}/{base_run.summary.split}", [])
    )
    keep = [k for k, item in enumerate(base_run.summary.items) if item["item_id"] not in flagged]
    out = {"flagged": len(base_run.summary.items) - len(keep), "n": len(keep), "rows": []}
    if not out["flagged"] or not keep:
        return out
    for row in rows:
        metric = row["metric"]
        b = [base_run.values(metric)[k] for k in keep]
        cols = [
            {
                **estimate_cell(metric, bootstrap_mean([after.values(metric)[k] for k in keep])),
                "vs_base": comparison_cell(metric, [after.values(metric)[k] for k in keep], b),
            }
            for after in systems[1:]
        ]
        out["rows"].append({**row, "base": estimate_cell(metric, bootstrap_mean(b)), "after": cols})
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
    return {
        "defined": True,
        "up": [{k: r[k] for k in keep} for r in rows if r["flip"] == "up"],
        "down": [{k: r[k] for k in keep} for r in rows if r["flip"] == "down"],
        "metric": primary_metric(base.summary),
    }


def item_flips(base: Run, after: Run) -> list[dict]:
    """Every item of `base` beside the same item of `after`, and its flip: "up" (wrong, then
    right), "down" (right, then wrong), "none", or "na" where the task has no notion of right."""
    by_id = {i["item_id"]: i for i in after.summary.items}
    rows = []
    for item in base.summary.items:
        other = by_id[item["item_id"]]
        was, now = correct(base, item), correct(after, other)
        flip = "na" if was is None else "up" if not was and now else "down" if was and not now else "none"
        rows.append(
            {
                "item_id": item["item_id"],
                "prompt": item["prompt"],
                "request": item.get("request"),
                "gold": item["gold"],
                "before": item["output"],
                "after": other["output"],
                "before_parsed": item["parsed"],
                "after_parsed": other["parsed"],
                "before_item": item,
                "after_item": other,
                "now": now,
                "flip": flip,
            }
        )
    return rows
