"""`make select` on the local executor against Ray clusters on this machine, in one run.

    make bench-ray                                     # the default suite, every layout below
    .venv/bin/python bench/ray_select.py --layouts local,1x2:2,2x1:1 --suite suites/default.yaml

A layout is `local`, or `NxC:P`: a Ray cluster of N nodes of C CPUs each (ray.cluster_utils, one
process per node, all on this machine) with P CPUs per model's actor. Each layout runs the same
`python -m selectune select` from an empty runs directory (the model store is shared and already
provisioned), timed from start to exit; a cluster's start is timed apart, since a user's cluster
is already running. Prints each wall time, its ratio to the local executor's, and what differs
between its selection.json and the local one (timings and the executor's fields aside; for the
items, how many stored outputs differ). Run it in a network namespace that holds only loopback
(`make bench-ray` does): Ray listens on every interface. Its estimate is printed first
(`--estimate`: only that): `select`'s own, and each layout's from it by the cost model of
docs/scale.md; each layout's measured time against it at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CLOCK = {"created", "executor"}
PER_CANDIDATE_CLOCK = {"seconds", "items_per_s"}
CLUSTER_START_SECONDS = 4.0
"""Starting a cluster with `ray.cluster_utils` (2.3-4.4 s measured here, docs/benchmarks.md)."""
FEWER_THREADS = 0.92
"""A candidate on p threads, fewer than the calibration's t, takes t / p x this longer (one thread
against two: 1.84x, measured here, docs/benchmarks.md)."""


def layout_seconds(layout: str, per_candidate: list[float], threads: int) -> float:
    """A layout's estimate from each candidate's local estimate (its load included), as
    docs/scale.md models it: the candidates in card order, each to the first of the cluster's
    slots (N nodes x C // P models at once) that frees, at P threads; the cluster's start apart."""
    if layout == "local":
        return sum(per_candidate)
    shape, _, per_model = layout.partition(":")
    nodes, cpus = (int(x) for x in shape.split("x"))
    p = int(per_model or "1")
    slow = threads / p * FEWER_THREADS if p < threads else 1.0
    free = [0.0] * (nodes * max(1, cpus // p))
    for seconds in per_candidate:
        k = free.index(min(free))
        free[k] += seconds * slow
    return max(free)


def bench_estimate(suite: str, extra: list[str], cache_dir: str | None, data_dir: str, layouts: list[str]):
    """(`select`'s estimate from an empty runs directory, the layouts' Estimate); `extra`: the
    select arguments the layouts run with (those the estimate depends on are read from it)."""
    import tempfile

    from core.settings import load_settings
    from eval.estimate import Estimate, StageCost, fmt_duration
    from eval.selection_plan import plan_selection
    from models.machine import calibration

    options = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    for name in ("--models", "--device", "--dtype", "--design"):
        options.add_argument(name)
    options.add_argument("--batch-size", type=int)
    given = vars(options.parse_known_args(extra)[0])
    with tempfile.TemporaryDirectory() as empty:
        config = load_settings(cache_dir=cache_dir, data_dir=data_dir, runs_dir=empty)
        cost = plan_selection(config, suite=Path(suite), provision_models=False, **given).cost
    if cost is None:
        return None, None
    models = list(dict.fromkeys([c.model for c in cost.costs] + list(cost.loads)))
    per_candidate = [
        sum(c.seconds for c in cost.costs if c.model == m) + cost.loads.get(m, 0.0) for m in models
    ]
    threads = calibration(config.cache_dir)["identity"]["threads"]
    stages = [
        StageCost(
            layout,
            "select",
            f"{len(models)} candidate{'' if len(models) == 1 else 's'}, "
            f"{fmt_duration(sum(per_candidate))} of scoring with the local executor",
            layout_seconds(layout, per_candidate, threads),
            upper_bound=cost.upper_bound,
        )
        for layout in layouts
    ]
    notes = [
        "a cluster's start is its load; a layout's candidates in card order, each to the first slot that "
        "frees (docs/scale.md); Ray's own overhead on one node (1.0-1.18x measured here) is not counted"
    ]
    starts = {layout: CLUSTER_START_SECONDS for layout in layouts if layout != "local"}
    return cost, Estimate("`make bench-ray`", cost.machine, stages, starts, notes, [])


def run_select(runs: Path, suite: str, extra: list[str], settings: list[str]) -> float:
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "selectune",
            "--runs-dir",
            str(runs),
            *settings,
            "select",
            "--suite",
            suite,
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    seconds = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"select failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    (runs / "select.log").write_text(done.stdout, encoding="utf-8")
    return seconds


def start_cluster(nodes: int, cpus: int):
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": cpus, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=cpus, node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    return cluster


def differences(runs: Path, local: Path) -> dict:
    from core.workspace import Workspace
    from eval.results import every_item

    def decision(folder: Path) -> dict:
        record = json.loads(Workspace(folder).selection.read_text(encoding="utf-8"))
        record["candidates"] = [
            {k: v for k, v in c.items() if k not in PER_CANDIDATE_CLOCK} for c in record["candidates"]
        ]
        return {k: v for k, v in record.items() if k not in CLOCK}

    def outputs(folder: Path) -> dict:
        with sqlite3.connect(Workspace(folder).results_db) as conn:
            return {
                (f"{model} {task}-{split} {mode}", item): output
                for task, split, mode, model, item, output, *_ in every_item(conn)
            }

    a, b = decision(runs), decision(local)
    mine, theirs = outputs(runs), outputs(local)
    differing = sorted({k[0] for k in theirs if mine.get(k) != theirs[k]})
    return {
        "keys_differing": sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k)),
        "winner": a["winner"],
        "local_winner": b["winner"],
        "outputs_differing": sum(mine.get(k) != v for k, v in theirs.items()),
        "outputs": len(theirs),
        "entries_with_differences": differing,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="suites/default.yaml")
    parser.add_argument("--layouts", default="local,1x2:2,2x1:1,1x2:1")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-ray")
    parser.add_argument("--cache-dir")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument("--select-args", default="", help="more arguments for select (e.g. --models A,B)")
    parser.add_argument(
        "--estimate", action="store_true", help="print what the bench will cost here, and exit"
    )
    args = parser.parse_args()
    settings = [*(["--cache-dir", args.cache_dir] if args.cache_dir else []), "--data-dir", args.data_dir]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    layouts = args.layouts.split(",")
    select_cost, estimate = bench_estimate(
        args.suite, args.select_args.split(), args.cache_dir, args.data_dir, layouts
    )
    if estimate is None:
        print("bench-ray: no estimate: the cost model is for scoring on this machine's CPU (docs/machine.md)")
    else:
        print("\n".join(select_cost.lines() + estimate.lines()), flush=True)
    if args.estimate:
        return 0
    rows = []
    for layout in layouts:
        runs = args.out / layout.replace(":", "-")
        if runs.exists():
            sys.exit(f"{runs} exists: every layout starts from an empty runs directory")
        runs.mkdir(parents=True)
        extra = args.select_args.split()
        if layout == "local":
            rows.append(
                {"layout": layout, "start_s": 0.0, "wall_s": run_select(runs, args.suite, extra, settings)}
            )
            continue
        shape, _, per_model = layout.partition(":")
        nodes, cpus = (int(x) for x in shape.split("x"))
        started = time.monotonic()
        cluster = start_cluster(nodes, cpus)
        start_s = time.monotonic() - started
        try:
            wall = run_select(
                runs,
                args.suite,
                [
                    *extra,
                    "--executor",
                    "ray",
                    "--ray-address",
                    cluster.address,
                    "--cpus-per-model",
                    per_model or "1",
                ],
                settings,
            )
        finally:
            cluster.shutdown()
        rows.append({"layout": layout, "start_s": start_s, "wall_s": wall})
    local = next((r for r in rows if r["layout"] == "local"), None)
    for row in rows:
        ratio = f", {row['wall_s'] / local['wall_s']:.3f}x the local executor's" if local else ""
        print(f"{row['layout']}: {row['wall_s']:.1f} s (cluster start {row['start_s']:.1f} s){ratio}")
        if estimate is not None:
            guess = next(c.seconds for c in estimate.costs if c.model == row["layout"])
            guess += estimate.loads.get(row["layout"], 0.0)
            took = row["wall_s"] + row["start_s"]
            print(
                f"  estimate {guess:.0f} s against {took:.0f} s measured, the start included: {took / guess:.2f}x"
            )
        if local and row is not local:
            row["vs_local"] = differences(args.out / row["layout"].replace(":", "-"), args.out / "local")
            print(f"  against local: {json.dumps(row['vs_local'])}")
    (args.out / "bench.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
