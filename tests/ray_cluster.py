"""A real multi-node Ray cluster on this machine, for the executor tests.

Ray listens on every interface and reports the machine's network address even when told
127.0.0.1, so each cluster runs in a network namespace of its own holding only loopback (`unshare
-n`, then `ip link set lo up`): nothing outside can reach it and nothing it sends leaves. The
tests run this module as a script there:

    unshare -n sh -c 'ip link set lo up && exec python -m tests.ray_cluster SCENARIO FOLDER'

SCENARIO is `command` (the selectune command line in FOLDER/args.json, with `--executor ray`
against a cluster of `nodes` nodes), `node-lost` (the same, removing a worker node that holds a
model's actor once the runs directory has stored `remove_after` items) or `servers` (the command
twice with a `--base-url` for each of `servers` stub OpenAI servers started here, counting the
requests each received), or `call` (the function `call` names, "module:function", with the
cluster's address and `kwargs`; its return value is recorded). It prints one JSON line: the
command's exit code, its stderr's last line, what was removed when, the requests per server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULT = "ray-cluster-result: "


def namespace_problem() -> str | None:
    """Why a loopback-only network namespace cannot be made here, or None."""
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    done = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True)
    if done.returncode != 0:
        return (
            f"unshare -n failed: {done.stderr.strip() or done.returncode} (it needs root or user namespaces)"
        )
    return None


def run_scenario(
    scenario: str,
    folder: Path,
    args: list[str],
    *,
    nodes: int = 3,
    cpus: int = 1,
    remove_after: int | None = None,
    servers: int = 0,
    serve_checkpoint: Path | None = None,
    call: str | None = None,
    kwargs: dict | None = None,
    timeout: int = 300,
) -> dict:
    """Run SCENARIO in its own loopback namespace; its JSON result (pytest skips, or fails under
    CI=true, where no namespace can be made)."""
    import pytest

    problem = namespace_problem()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the Ray tests, but no loopback-only namespace: {problem}")
        pytest.skip(f"no loopback-only network namespace: {problem}")
    (folder / "args.json").write_text(
        json.dumps(
            {
                "args": args,
                "nodes": nodes,
                "cpus": cpus,
                "servers": servers,
                "serve_checkpoint": str(serve_checkpoint or ""),
                "call": call,
                "kwargs": kwargs or {},
                "remove_after": remove_after,
            }
        ),
        encoding="utf-8",
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [
            "unshare",
            "-n",
            "sh",
            "-c",
            'ip link set lo up && exec "$@"',
            "sh",
            sys.executable,
            "-m",
            "tests.ray_cluster",
            scenario,
            str(folder),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    assert done.returncode == 0 and lines, (
        f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return json.loads(lines[-1].removeprefix(RESULT))


def _stored_items(runs: Path) -> int:
    import sqlite3

    try:
        with sqlite3.connect(runs / "results.sqlite", timeout=30) as conn:
            return conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def _remove_a_busy_worker(cluster, runs: Path, after: int, record: dict) -> None:
    """Once `after` items are stored, remove a worker node whose CPU an actor holds."""
    import ray._private.state as state

    while _stored_items(runs) < after:
        time.sleep(0.05)
    available = state.state.available_resources_per_node()
    for node in cluster.worker_nodes:
        if node.node_id in available and available[node.node_id].get("CPU", 0.0) < 1.0:  # 0 left: no key
            record.update(removed=node.node_id, stored_at_removal=_stored_items(runs))
            cluster.remove_node(node, allow_graceful=False)
            return
    record["removed"] = None


def _cli(args: list[str]) -> tuple[int, str]:
    """The command line in this process: (exit code, the last line it wrote to stderr)."""
    import contextlib
    import io

    from selectune.cli import main as cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli(args)
    return code, (err.getvalue().strip().splitlines() or [""])[-1]


def stub_state(checkpoint: str):
    """A stub OpenAI server's state: a tiny checkpoint's replies, served as `served-model`, or
    always "B" without one."""
    from eval.backends.fake import FakeBackend
    from bench.openai_stub import StubState

    if not checkpoint:
        return StubState(FakeBackend(respond=lambda r: "B"))
    from eval.backends.hf import HFBackend
    from models.local import checkpoint_card

    backend = HFBackend(
        checkpoint_card(Path(checkpoint)),
        Path(checkpoint).parent / "store",
        batch_size=1,
        checkpoint=Path(checkpoint),
    )
    return StubState(backend, models=("served-model",))


def _with_servers(n: int, checkpoint: str, args: list[str], record: dict) -> None:
    from bench.openai_stub import serve

    states = [stub_state(checkpoint) for _ in range(n)]
    servers = [serve(state) for state in states]
    try:
        urls = [x for _, url in servers for x in ("--base-url", url)]
        record["code"], record["stderr_last"] = _cli([*args, *urls])
        record["requests"] = [len(s.bodies) for s in states]
        record["rerun_code"], _ = _cli([*args, *urls])
        record["requests_after_rerun"] = [len(s.bodies) for s in states]
    finally:
        for server, _ in servers:
            server.shutdown()


def main(scenario: str, folder: str) -> int:
    from ray.cluster_utils import Cluster

    folder_path = Path(folder)
    spec = json.loads((folder_path / "args.json").read_text(encoding="utf-8"))
    started = time.monotonic()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": spec["cpus"], "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    for _ in range(spec["nodes"] - 1):
        cluster.add_node(num_cpus=spec["cpus"], node_ip_address="127.0.0.1")
    cluster.wait_for_nodes()
    record: dict = {"cluster_start_s": round(time.monotonic() - started, 1)}
    args = [*spec["args"], "--executor", "ray", "--ray-address", cluster.address]
    watcher = None
    if scenario == "node-lost":
        runs = Path(spec["args"][spec["args"].index("--runs-dir") + 1])
        watcher = threading.Thread(
            target=_remove_a_busy_worker, args=(cluster, runs, spec["remove_after"], record), daemon=True
        )
        watcher.start()
    if scenario == "call":
        import importlib

        module, _, function = spec["call"].partition(":")
        record["value"] = getattr(importlib.import_module(module), function)(
            cluster.address, **spec["kwargs"]
        )
    elif scenario == "servers":
        _with_servers(spec["servers"], spec["serve_checkpoint"], args, record)
    else:
        record["code"], record["stderr_last"] = _cli(args)
    if watcher is not None:
        watcher.join(timeout=1)
    record["seconds"] = round(time.monotonic() - started, 1)
    import ray

    ray.shutdown()
    cluster.shutdown()
    print(RESULT + json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
