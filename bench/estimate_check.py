"""How close the cost model (eval/estimate.py) comes to runs that finished: every finished run in a
results store, its measured wall time against the model's estimate for the same items, once with
the replies the run generated (the cost model alone) and once as `make select` estimated it
before (replies unseen: up to max_new_tokens).

    .venv/bin/python bench/estimate_check.py --runs-dir runs --data-dir ../shared/data

Run it right after `make select` on the machine that ran it (the calibration is this machine's).
A model's first run also loaded its weights: its load estimate is added to that run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import load_settings  # noqa: E402
from core.store import open_read_only  # noqa: E402
from eval import estimate as E  # noqa: E402
from eval.results import finished_runs, run_items  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--data-dir")
    parser.add_argument("--cache-dir")
    args = parser.parse_args(argv)
    from eval.backends import make_backend
    from eval.task import find_task, load_items
    from models.card import find_card
    from models.machine import calibration as machine_calibration
    from models.store import read_manifest

    settings = load_settings(None, runs_dir=args.runs_dir, data_dir=args.data_dir, cache_dir=args.cache_dir)
    # the cost model itself, without what earlier runs measured here (eval/learned.py)
    calibration = {**machine_calibration(settings.cache_dir), "learned": {}}
    conn = open_read_only(settings.workspace.results_db)
    rows = finished_runs(conn)
    conn_history = None  # "before": nothing seen yet
    loaded, totals, dtype = set(), [0.0, 0.0, 0.0], None
    print(f"{'run':58} {'measured':>9} {'estimated':>9} {'ratio':>6} {'before':>8} {'ratio':>6}")
    for run_id, model, task_name, split, mode, meta, seconds in rows:
        meta = json.loads(meta)
        manifest = read_manifest(card := find_card(model), settings.model_store) if "+" not in model else None
        if manifest is None or meta.get(
            "order"
        ):  # merged fine-tunes and sequential rounds: not estimated here
            continue
        dtype = meta["identity"]["dtype"]
        backend = make_backend(
            "hf",
            card,
            settings.model_store,
            lazy=True,
            batch_size=meta["chunk_size"],
            device="cpu",
            dtype=dtype,
        )
        shape = E.checkpoint_shape(card, Path(manifest["checkpoint"]))
        task = find_task(task_name)
        items = load_items(task, split, settings.resolved_data_dir)
        replies = {i["item_id"]: i["output"] for i in run_items(conn, run_id)}
        kw = dict(chunk_size=meta["chunk_size"])
        exact = E.entry_cost(
            backend, shape, task, split, mode, items, calibration, dtype, replies=replies, **kw
        )
        before = E.entry_cost(
            backend, shape, task, split, mode, items, calibration, dtype, conn=conn_history, **kw
        )
        load = (
            0.0 if model in loaded else E.load_seconds(shape, calibration["load_gbs"], E.DTYPE_BYTES[dtype])
        )
        loaded.add(model)
        estimated, upper = exact.seconds + load, before.seconds + load
        totals = [totals[0] + seconds, totals[1] + estimated, totals[2] + upper]
        print(
            f"{model[:28] + ' ' + exact.entry:58} {seconds:8.1f}s {estimated:8.1f}s {estimated / seconds:6.2f} "
            f"{upper:7.1f}s {upper / seconds:6.2f}"
        )
    conn.close()
    if dtype is None:
        sys.exit(f"{settings.workspace.results_db}: no finished run of a provisioned card to check")
    print(
        f"{'all runs':58} {totals[0]:8.1f}s {totals[1]:8.1f}s {totals[1] / totals[0]:6.2f} "
        f"{totals[2]:7.1f}s {totals[2] / totals[0]:6.2f}"
    )
    print(f"calibration: {E.machine_line(calibration, dtype)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
