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
(`make bench-ray` does): Ray listens on every interface.
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
    args = parser.parse_args()
    settings = [*(["--cache-dir", args.cache_dir] if args.cache_dir else []), "--data-dir", args.data_dir]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    rows = []
    for layout in args.layouts.split(","):
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
        if local and row is not local:
            row["vs_local"] = differences(args.out / row["layout"].replace(":", "-"), args.out / "local")
            print(f"  against local: {json.dumps(row['vs_local'])}")
    (args.out / "bench.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
