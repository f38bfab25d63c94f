"""Aggregate stored runs into estimates and print them in the table shape OpenCompass users know:
`dataset | version | metric | mode | model ...`, here with 95% bootstrap CIs."""

from __future__ import annotations

from dataclasses import dataclass

from eval import metrics as M
from eval.stats import Estimate, bootstrap_mean
from eval.task import Mode, TaskSpec

PERCENT = M.BINARY | {M.FACT_RECALL, M.TOKEN_F1, M.CHAR_F1, M.ROUGE_L}


@dataclass
class RunSummary:
    run_id: str
    task: TaskSpec
    split: str
    mode: Mode
    model: str
    items: list[dict]
    """Stored items in item-id order, each with its current `scores`."""
    seconds: float
    computed: int
    """Items computed by this call (0 when everything was already stored)."""
    sequential: bool = False
    """Scored by the sequential design (eval/sequential.py): `items` may be a prefix of the split,
    and its intervals and tests must be the anytime-valid ones."""


@dataclass(frozen=True)
class Cell:
    task: str
    version: str
    split: str
    mode: str
    metric: str
    model: str
    estimate: Estimate
    values: list[float]
    """Per-item values in item-id order (the pairing used by significance tests)."""
    sequential: bool = False
    """From a sequentially scored run: its interval is a confidence sequence, its n is shown."""


def metrics_of(run: RunSummary) -> list[str]:
    """The run's metrics; the judge's only when every item has a verdict (a judge was configured)."""
    if M.CIRCULAR_ACCURACY in run.task.metrics:  # a circular entry's summary (eval/circular.py)
        return list(run.task.metrics)
    if run.mode == "ppl":
        return [M.ACCURACY]
    judged = [run.task.judge.metric] if run.task.judge else []
    return list(run.task.metrics) + [m for m in judged if all(m in i["scores"] for i in run.items)]


def primary_metric(run: RunSummary) -> str:
    """The run's first metric, the one it is ranked by unless its suite entry names another."""
    return M.ranked_metric(run.task, run.mode)


def cell_of(
    run: RunSummary, metric: str, model: str, values: list[float], seed: int = 0, *, marked: bool = True
):
    """A cell of `values` on `run`'s items; a sequential run's interval is a confidence sequence
    (`marked`: the cell says so, and shows its n)."""
    from eval.anytime import mean_sequence

    estimate = mean_sequence(values, metric) if run.sequential else bootstrap_mean(values, seed=seed)
    version = run.task.sha256[:6]
    return Cell(
        run.task.name,
        version,
        run.split,
        run.mode,
        metric,
        model,
        estimate,
        values,
        marked and run.sequential,
    )


def cells_of(run: RunSummary, seed: int = 0) -> list[Cell]:
    """The run's cells; a sequential run's intervals are confidence sequences, and its metrics
    without known bounds are left out (no interval of theirs would survive optional stopping)."""
    from eval.anytime import can_be_sequential

    out = []
    for metric in metrics_of(run):
        if run.sequential and not can_be_sequential(metric):
            continue
        out.append(cell_of(run, metric, run.model, [item["scores"][metric] for item in run.items], seed))
    return out


def per_fact_recall(run: RunSummary) -> dict[str, float]:
    """Recall of each required fact over the items that ask for it."""
    hits: dict[str, list[float]] = {}
    for item in run.items:
        for key, value in item["scores"].items():
            if key.startswith("fact:"):
                hits.setdefault(key[5:], []).append(value)
    return {fact: sum(v) / len(v) for fact, v in sorted(hits.items())}


def fmt_value(metric: str, value: float, decimals: int = 2) -> str:
    """The one number format: percentage metrics as points with one decimal, others as they are
    with `decimals`."""
    return f"{value * 100:.1f}" if metric in PERCENT else f"{value:.{decimals}f}"


def fmt_diff(metric: str, value: float) -> str:
    """A difference, signed."""
    return ("+" if value >= 0 else "") + fmt_value(metric, value)


def fmt_ci(metric: str, low: float, high: float) -> str:
    return f"[{fmt_value(metric, low)}, {fmt_value(metric, high)}]"


def fmt_p(p: float | None) -> str:
    return "-" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def comparison_text(record: dict) -> dict:
    """A stored comparison (`Comparison.record`) in the one number format, for the terminal and the
    pages alike."""
    metric = record["metric"]
    return {
        "diff_text": fmt_diff(metric, record["diff"]),
        "ci": fmt_ci(metric, *record["ci95"]),
        "p_text": fmt_p(record["p_value"]),
        "mde_text": fmt_value(metric, record["mde"]),
    }


def fmt(metric: str, e: Estimate) -> str:
    """A table cell: the mean and its 95% CI."""
    return f"{fmt_value(metric, e.mean, 1)} [{fmt_value(metric, e.low, 1)}, {fmt_value(metric, e.high, 1)}]"


def render_table(cells: list[Cell], models: list[str]) -> str:
    keys = sorted(
        {(c.task, c.version, c.metric, c.mode, c.split) for c in cells}, key=lambda k: (k[0], k[3], k[2])
    )
    lookup = {(c.task, c.version, c.metric, c.mode, c.split, c.model): c for c in cells}
    header = ["dataset", "version", "metric", "mode", *models]
    rows = [header]
    for task, version, metric, mode, split in keys:
        row = [f"{task}-{split}", version, metric, mode]
        for m in models:
            c = lookup.get((task, version, metric, mode, split, m))
            row.append(
                (fmt(metric, c.estimate) + (f" n={c.estimate.n}" if c.sequential else "")) if c else "n/a"
            )
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = [" | ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
