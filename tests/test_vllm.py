"""vLLM's CPU engine (`make vllm-venv`; `make test` builds it): a real server on a tiny model,
re-scored in both modes against the local fp32 model, and a re-scoring command that is killed
always stops the server it started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serve.engines import vllm_python
from bench.fixtures import build_tiny_qwen2
from tests.conftest import REPO

needs_vllm = pytest.mark.skipif(
    not Path(vllm_python()).exists(), reason="no vLLM venv (make vllm-venv; make test builds it)"
)


def _settings(tmp_path, data_dir):
    from core.settings import load_settings

    return load_settings(
        runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"), data_dir=str(data_dir)
    )


def _target(model_dir):
    from models.card import find_card
    from serve.launcher import Target

    return Target(model_dir, find_card("qwen2.5-coder-0.5b-instruct"), f"tiny-{model_dir.name}")


@needs_vllm
def test_vllm_serves_both_modes_with_parity_against_the_local_model(tmp_path, task_data):
    from serve.engines import engine_for, vllm_engine
    from serve.launcher import launch
    from serve.rescore import rescore

    # vLLM's CPU attention wants a head size of 32 or more; a wide initialisation gives replies
    # that differ from prompt to prompt.
    model_dir = build_tiny_qwen2(tmp_path / "tiny", initializer_range=1.0, hidden_size=128)
    assert engine_for(model_dir).name == "vllm"  # the CPU default where its venv exists
    settings = _settings(tmp_path, task_data)
    with launch(vllm_engine(model_dir), tmp_path / "vllm.log") as server:
        record = rescore(
            settings,
            _target(model_dir),
            base_url=server.base_url,
            model_name=server.model_name,
            engine="vllm",
            tasks=["fewclue_bustm", "fact"],
            limit=12,
            figure_requests=4,
            figure_concurrency=4,
            figure_max_tokens=8,
        )
    assert not server.alive()
    gate = record["parity"]
    assert gate["passed"], gate["failures"]
    modes = [(t["task"], t["mode"]) for t in gate["tasks"]]
    assert modes == [("fewclue_bustm", "gen"), ("fewclue_bustm", "ppl"), ("fact", "gen")]
    ppl = gate["tasks"][1]
    # the same tokens scored by both (ids sent, not text); fp32 on both sides. The wide
    # initialisation gives log-likelihoods of -20 to -60, so this is a relative 1e-5.
    assert ppl["agreement"] == 1.0 and ppl["max_abs_loglik_diff"] < 1e-3
    assert record["concurrency"] == 4 and set(record["served_runs"]) == {
        "fewclue_bustm",
        "fewclue_bustm:ppl",
        "fact",
    }
    assert record["serving"]["4"]["requests"] == 4


def _server_pids(model_dir: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if entry.name.isdigit() and str(model_dir).encode() in cmdline and b"serve" in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_killed_rescore_stops_the_server_it_started(tmp_path, task_data, sig):
    """Ctrl-C or SIGTERM while re-scoring: the server started for it is gone afterwards."""
    model_dir = build_tiny_qwen2(tmp_path / "tiny", initializer_range=1.0)
    log = tmp_path / "runs" / "serve" / "transformers.log"
    cmd = [
        sys.executable,
        "-m",
        "selectune",
        "--runs-dir",
        str(tmp_path / "runs"),
        "--data-dir",
        str(task_data),
        "--cache-dir",
        str(tmp_path / "cache"),
        "rescore",
        "--checkpoint",
        str(model_dir),
        "--model",
        "qwen2.5-coder-0.5b-instruct",
        "--engine",
        "transformers",
        "--tasks",
        "fact",
    ]
    out_path = tmp_path / "rescore.out"
    with open(out_path, "w") as out_file:
        proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            stdout=out_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    deadline = time.monotonic() + 240
    while "rescore: started transformers" not in out_path.read_text(errors="replace"):
        assert proc.poll() is None, f"rescore exited early: {out_path.read_text()}"
        assert time.monotonic() < deadline, "the server never started"
        time.sleep(0.2)
    assert _server_pids(model_dir)
    time.sleep(1.0)  # scoring under way
    proc.send_signal(sig)
    proc.wait(timeout=60)
    out = out_path.read_text(errors="replace")
    deadline = time.monotonic() + 30
    while _server_pids(model_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _server_pids(model_dir) == [], f"server left running after {sig.name}: {out[-500:]}"
    # SIGTERM unwinds as sys.exit(128 + 15); Python ends an unhandled Ctrl-C by SIGINT itself
    assert proc.returncode == (128 + signal.SIGTERM if sig == signal.SIGTERM else -signal.SIGINT), out
    assert log.stat().st_size > 0
