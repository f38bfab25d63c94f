"""`make report`: static HTML pages under runs/report/, rendered with Jinja2 (autoescaping on).

    python -m selectune report [--out runs/report]

Every page is self-contained (inline CSS and SVG, no network) and opens from file://. Dataset
and model text is untrusted: it only ever reaches a page through an autoescaped expression.
"""

from __future__ import annotations

from pathlib import Path

from core.errors import UserError
from eval.summary import PERCENT, fmt_p, fmt_value
from core.store import open_read_only
from core.workspace import Workspace, slug
from core.files import write_text_atomic

TEMPLATES = Path(__file__).resolve().parent / "templates"
PAGES = ("index", "leaderboard", "before_after", "training", "serving", "review")


def environment():
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pct"] = lambda x: "-" if x is None else f"{x * 100:.1f}%"
    env.filters["metric"] = lambda x, metric: (
        "-" if x is None else fmt_value(metric, x) + ("%" if metric in PERCENT else "")
    )
    env.filters["num"] = lambda x, d=2: "-" if x is None else f"{x:.{d}f}"
    env.filters["p"] = fmt_p
    env.filters["slug"] = slug
    env.globals["m"] = env.get_template("macros.html").module  # the pages' shared macros, as `m`
    return env


# ---------------------------------------------------------------------------------------------
# SVG geometry: numbers only; every label goes through the template's escaping


def errorbar_chart(chart: dict, width: int = 560, row: int = 28, label_w: int = 230) -> dict:
    scale = chart["scale"]
    top = max([b["high"] for b in chart["bars"]] + [1e-9]) * scale
    limit = 100.0 if scale == 100.0 else top * 1.15
    plot_w = width - label_w - 20

    def x(v: float) -> float:
        return round(label_w + plot_w * min(v * scale, limit) / limit, 1)

    bars = [
        {
            "label": b["model"],
            "y": 18 + k * row,
            "mean": x(b["mean"]),
            "low": x(b["low"]),
            "high": x(b["high"]),
            "text": f"{b['text']} {b['ci']}",
        }
        for k, b in enumerate(chart["bars"])
    ]
    ticks = [
        {
            "x": round(label_w + plot_w * f, 1),
            "text": f"{limit * f:.0f}" if limit >= 10 else f"{limit * f:.2f}",
        }
        for f in (0, 0.25, 0.5, 0.75, 1.0)
    ]
    return {
        "title": chart["title"],
        "width": width,
        "height": 30 + len(bars) * row,
        "x0": label_w,
        "bars": bars,
        "ticks": ticks,
        "axis_y": 24 + len(bars) * row - row // 2,
    }


def line_chart(series: list[dict], width: int = 640, height: int = 240, log_y: bool = False) -> dict | None:
    """series: [{"name", "points": [(x, y), ...]}] drawn on shared axes."""
    import math

    pts = [p for s in series for p in s["points"]]
    if not pts:
        return None
    left, right, top, bottom = 56, 16, 12, 28
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x_lo, x_hi = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_lo, y_hi = min(0.0, min(ys)), max(ys) if max(ys) > 0 else 1.0
    if log_y:
        y_lo, y_hi = math.log10(max(min(ys), 1e-12)), math.log10(max(ys))
        y_hi = y_hi if y_hi > y_lo else y_lo + 1

    def fx(v):
        return round(left + (width - left - right) * (v - x_lo) / (x_hi - x_lo), 1)

    def fy(v):
        v = math.log10(max(v, 1e-12)) if log_y else v
        return round(height - bottom - (height - top - bottom) * (v - y_lo) / (y_hi - y_lo), 1)

    drawn = [
        {
            "name": s["name"],
            "cls": f"s{k}",
            "polyline": " ".join(f"{fx(a)},{fy(b)}" for a, b in s["points"]),
            "dots": [{"x": fx(a), "y": fy(b)} for a, b in s["points"]] if len(s["points"]) < 40 else [],
        }
        for k, s in enumerate(series)
    ]
    y_ticks = []
    for f in (0, 0.5, 1.0):
        v = y_lo + (y_hi - y_lo) * f
        shown = 10**v if log_y else v
        y_ticks.append(
            {
                "y": round(height - bottom - (height - top - bottom) * f, 1),
                "text": f"{shown:.2g}" if log_y or 0 < abs(y_hi) < 0.1 else f"{shown:.2f}",
            }
        )
    x_ticks = [
        {"x": fx(x_lo + (x_hi - x_lo) * f), "text": f"{x_lo + (x_hi - x_lo) * f:.0f}"} for f in (0, 0.5, 1.0)
    ]
    return {
        "width": width,
        "height": height,
        "series": drawn,
        "x_ticks": x_ticks,
        "y_ticks": y_ticks,
        "left": left,
        "bottom": height - bottom,
        "right": width - right,
    }


# ---------------------------------------------------------------------------------------------


def build_report(runs_dir: Path, out_dir: Path | None = None) -> list[Path]:
    """Render every page; nothing is written unless everything could be gathered."""
    from reports import before_after, collect, pair_judge, review, review_stats, runs

    workspace = Workspace(runs_dir)
    out_dir = out_dir or workspace.report_dir
    db = workspace.results_db
    if not db.is_file():
        raise UserError(f"{db}: no results store; run `make select` first")
    selection = workspace.read_selection()
    conn = open_read_only(db)
    try:
        board = collect.leaderboard(conn, selection, str(workspace.selection)) if selection else None
        rescore = runs.newest_rescore(runs_dir)
        train = runs.training_run(runs_dir, rescore)
        ba = before_after.before_after(conn, selection, train, rescore)
    finally:
        conn.close()
    rconn = review.open_review(db)
    try:
        all_votes = review.votes(rconn, outputs=True)
        pairs = review.pair_count(rconn)
        judged = pair_judge.judgements(rconn)
        systems = review.pair_systems(rconn)
    finally:
        rconn.close()
    agg = review_stats.aggregate(all_votes) if all_votes else None
    if agg:
        agg["judges"] = [
            {"model": m, **pair_judge.agreement(all_votes, v, systems)} for m, v in judged.items()
        ]

    shown_runs = [r for t in (ba.tasks if ba else []) for r in t["runs"].values()] + (
        board.runs if board else []
    )
    unique = {r.run_id: r for r in shown_runs}
    context = {
        "board": board,
        "ba": ba,
        "train": train,
        "rescore": rescore,
        "review": agg,
        "review_pairs": pairs,
        "manifest": runs.manifest(list(unique.values())),
        "charts": [errorbar_chart(c) for c in board.charts] if board else [],
        "training_charts": _training_charts(train) if train else {},
        "sample_tasks": [t["task"] for t in ba.tasks if t["runs"]] if ba else [],
        "flip_tasks": [t["task"] for t in ba.tasks if t["flips"]["defined"]] if ba else [],
    }
    env = environment()
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name in PAGES:
        path = out_dir / f"{name}.html"
        write_text_atomic(path, env.get_template(f"{name}.html").render(page=name, **context))
        written.append(path)
    for task in (
        [t for t in ba.tasks if t["runs"]] if ba else []
    ):  # item pages need the items: after a re-score
        samples = _sample_rows(task)
        for template, stem, extra in (
            ("flips.html", "flips", {}),
            ("samples.html", "samples", {"rows": samples}),
        ):
            if template == "flips.html" and not task["flips"]["defined"]:
                continue
            path = out_dir / f"{stem}-{slug(task['task'])}.html"
            write_text_atomic(
                path, env.get_template(template).render(page=stem, task=task, **extra, **context)
            )
            written.append(path)
    return written


def _sample_rows(task: dict) -> list[dict]:
    from reports.before_after import item_flips

    metric = task["rows"][0]["metric"] if task["rows"] else None
    return [
        {
            "item_id": r["item_id"],
            "prompt": r["prompt"],
            "request": r["request"],
            "gold": r["gold"],
            "before": r["before"],
            "after": r["after"],
            "before_score": r["before_item"]["scores"].get(metric),
            "after_score": r["after_item"]["scores"].get(metric),
            "correct": "na" if r["now"] is None else ("yes" if r["now"] else "no"),
            "flip": "none" if r["flip"] == "na" else r["flip"],
        }
        for r in item_flips(task["runs"]["base"], task["runs"]["merged"])
    ]


def _training_charts(train) -> dict:
    losses = [(e["step"], e["loss"]) for e in train.losses if isinstance(e.get("loss"), (int, float))]
    evals = [(e["step"], e["eval_loss"]) for e in train.evals]
    lrs = [(e["step"], e["learning_rate"]) for e in train.losses if "learning_rate" in e]
    curves = (train.summary.checkpoint or {}).get("curves") or {}
    return {
        "loss": line_chart([{"name": "train loss", "points": losses}, {"name": "val loss", "points": evals}]),
        "lr": line_chart([{"name": "learning rate", "points": lrs}], height=160),
        "probe": line_chart(
            [
                {"name": key, "points": [(p["step"], p["mean"]) for p in points]}
                for key, points in sorted(curves.items())
            ]
        ),
    }


def report_command(settings, *, out: Path | None = None) -> int:
    """`selectune report` (`make report`): every page under runs/report/ (or --out)."""
    written = build_report(settings.runs_dir, out)
    print(f"report: {len(written)} pages in {written[0].parent}; open {written[0]}")
    return 0
