"""Serving: a real `transformers serve` process on a tiny model (start, health, stop, fast
failures), re-scoring through it with the parity gate against the local model, a server that
dies mid-run, the terminal chat, and the lmdeploy command (started only where CUDA exists)."""

from __future__ import annotations

import io
import json
import sqlite3
import sys
import threading
import time

import pytest

from core.errors import UserError
from bench.fixtures import build_tiny_qwen2
from tests.conftest import Recorder


def printable_tiny_qwen2(out, initializer_range, hidden_size=32):
    """A tiny random model that generates only tokens which decode to whole characters on their
    own. A random model otherwise emits loose UTF-8 bytes, which a streaming detokenizer (the
    server's) and a whole-sequence decode (ours) render differently: noise, not a parity finding."""
    from transformers import AutoTokenizer, GenerationConfig

    build_tiny_qwen2(out, initializer_range=initializer_range, hidden_size=hidden_size)
    tok = AutoTokenizer.from_pretrained(out)
    bad = [
        [i]
        for i in range(len(tok))
        if "\ufffd" in tok.decode([i]) or i in tok.all_special_ids and i != tok.eos_token_id
    ]
    config = GenerationConfig.from_pretrained(out)
    config.bad_words_ids = bad
    config.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    return printable_tiny_qwen2(root / "a", 1.0), printable_tiny_qwen2(root / "b", 0.5)


def test_lmdeploy_command_follows_its_documentation(tmp_path, monkeypatch):
    from serve.engines import engine_for, lmdeploy_engine

    e = lmdeploy_engine(tmp_path, backend="pytorch", tp=2, port=23333, python="/opt/lmd/bin/python")
    assert (
        e.argv
        == (
            f"/opt/lmd/bin/python -m lmdeploy serve api_server {tmp_path} --server-name "
            "127.0.0.1 --server-port 23333 --backend pytorch --tp 2 --model-name selectune "
            "--log-level INFO"
        ).split()
    )
    assert e.base_url == "http://127.0.0.1:23333" and e.model_name == "selectune"
    with pytest.raises(UserError, match="power of two"):
        lmdeploy_engine(tmp_path, tp=3)
    with pytest.raises(UserError, match="pytorch or turbomind"):
        lmdeploy_engine(tmp_path, backend="vllm")
    import torch

    if not torch.cuda.is_available():  # no CUDA: vLLM where its venv exists, else transformers serve
        monkeypatch.setenv("VLLM_PYTHON", str(tmp_path / "no-vllm" / "python"))
        assert engine_for(tmp_path).name == "transformers"
        monkeypatch.setenv("VLLM_PYTHON", sys.executable)
        vllm = engine_for(tmp_path)
        assert vllm.name == "vllm" and vllm.argv[:4] == [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
        ]
        assert "--dtype" in vllm.argv and vllm.argv[vllm.argv.index("--dtype") + 1] == "float32"


def test_lmdeploy_missing_environment_fails_fast(tmp_path):
    from serve.engines import lmdeploy_engine
    from serve.launcher import start

    with pytest.raises(UserError, match="not found.*own environment"):
        start(lmdeploy_engine(tmp_path, python=str(tmp_path / "nope" / "python")), tmp_path / "log")


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="lmdeploy needs CUDA")
def test_lmdeploy_serves_on_a_gpu(tiny, tmp_path):
    from serve.engines import lmdeploy_engine
    from serve.launcher import launch

    with launch(lmdeploy_engine(tiny[0], backend="pytorch"), tmp_path / "log") as server:
        assert server.alive()


def test_server_starts_answers_and_stops_and_fails_fast(tiny, tmp_path):
    import httpx

    from serve.engines import transformers_engine
    from serve.launcher import launch, start

    engine = transformers_engine(tiny[0])
    with launch(engine, tmp_path / "serve.log") as server:
        assert server.base_url.startswith("http://127.0.0.1:") and 0 < server.start_seconds < 600
        reply = httpx.post(
            f"{server.base_url}/v1/chat/completions",
            timeout=60,
            json={
                "model": server.model_name,
                "messages": [{"role": "user", "content": "问题1"}],
                "max_tokens": 4,
                "temperature": 0.0,
            },
        ).json()
        assert reply["usage"]["completion_tokens"] == 4
        # the port is taken: refused before anything starts
        t0 = time.monotonic()
        with pytest.raises(UserError, match="already in use"):
            start(transformers_engine(tiny[0], port=engine.port), tmp_path / "other.log")
        assert time.monotonic() - t0 < 1
    assert not server.alive()
    empty = tmp_path / "empty"
    empty.mkdir()
    t0 = time.monotonic()
    with pytest.raises(UserError, match=r"exited with code \d+ while starting; the end of .*\n") as err:
        start(transformers_engine(empty), tmp_path / "bad.log", timeout_s=120)
    assert time.monotonic() - t0 < 120 and "Error" in str(err.value)


def test_bench_serves_exact_length_fields_make_transformers_serve_decode_past_its_end_tokens(tmp_path):
    """A tiny model for which nearly every token ends the reply: plain requests stop within a
    token or two; with bench-serve's `exact_length` fields every reply runs to max_tokens."""
    from transformers import AutoTokenizer, GenerationConfig

    from bench.serve_speed import exact_length
    from serve.engines import transformers_engine
    from serve.figures import serving_figures
    from serve.launcher import launch

    model = printable_tiny_qwen2(tmp_path / "ends", 1.0)
    config = GenerationConfig.from_pretrained(model)
    banned = {i for (i,) in config.bad_words_ids}
    printable = [i for i in range(len(AutoTokenizer.from_pretrained(model))) if i not in banned]
    config.eos_token_id = printable[40:]  # all but 40 printable tokens end the reply
    config.save_pretrained(model)
    conversations = [[{"role": "user", "content": f"问题{n}"}] for n in range(3)]
    with launch(transformers_engine(model), tmp_path / "serve.log") as server:
        figures = [
            serving_figures(
                server.base_url, server.model_name, conversations, max_tokens=12, concurrency=1, extra=x
            )
            for x in (None, exact_length("transformers", 12))
        ]
    plain, exact = (f["1"]["output_tokens"] for f in figures)
    assert plain <= 2 * len(conversations) and exact == 12 * len(conversations)


def _settings(tmp_path, data_dir):
    from core.settings import load_settings

    return load_settings(
        runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"), data_dir=str(data_dir)
    )


def _target(model_dir):
    from models.card import find_card
    from serve.launcher import Target

    return Target(model_dir, find_card("qwen2.5-coder-0.5b-instruct"), f"tiny-{model_dir.name}")


def test_rescore_through_the_server_passes_parity_and_survives_a_dead_server(tiny, tmp_path, task_data):
    from serve.engines import transformers_engine
    from serve.launcher import launch, start
    from serve.command import print_report
    from serve.rescore import rescore

    settings = _settings(tmp_path, task_data)
    target = _target(tiny[0])
    kw = dict(
        tasks=["fewclue_bustm", "fact"],
        limit=10,
        concurrency=2,
        figure_requests=4,
        figure_concurrency=2,
        figure_max_tokens=8,
        max_retries=1,
    )
    # The server dies after a few items: the client retries, gives up with a clear line.
    server = start(transformers_engine(tiny[0]), tmp_path / "s1.log")
    db = settings.runs_dir / "results.sqlite"

    def kill_after_some_items():
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with sqlite3.connect(db) as conn:
                    if conn.execute("SELECT COUNT(*) FROM items").fetchone()[0] >= 4:
                        break
            except sqlite3.Error:
                pass
            time.sleep(0.05)
        server.stop(grace_s=0.5)

    killer = threading.Thread(target=kill_after_some_items)
    killer.start()
    with pytest.raises(UserError, match="gave up after 2 tries"):
        rescore(
            settings,
            target,
            base_url=server.base_url,
            model_name=server.model_name,
            engine="transformers",
            **kw,
        )
    killer.join()
    with sqlite3.connect(db) as conn:
        partial = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    assert 4 <= partial < 20
    # A rerun against a new server (another port) resumes: nothing lost, nothing twice.
    with launch(transformers_engine(tiny[0]), tmp_path / "s2.log") as server:
        record = rescore(
            settings,
            target,
            base_url=server.base_url,
            model_name=server.model_name,
            engine="transformers",
            **kw,
        )
    gate = record["parity"]
    assert gate["passed"], gate["failures"]
    assert gate["items"] == 20 and gate["agreement"] >= 0.98
    with sqlite3.connect(db) as conn:
        served = list(record["served_runs"].values())
        for run_id in served:
            ids = [r[0] for r in conn.execute("SELECT item_id FROM items WHERE run_id = ?", (run_id,))]
            assert len(ids) == len(set(ids)) == 10
        served = record["served_runs"]["fact"]
        outputs = [r[0] for r in conn.execute("SELECT output FROM items WHERE run_id = ?", (served,))]
        assert len(set(outputs)) >= 3 and all(outputs)  # replies that differ, compared in full
    for level in ("1", "2"):
        f = record["serving"][level]
        assert f["requests"] == 4 and f["output_tokens"] > 0 and 0 < f["ttft_p50_s"] <= f["latency_p50_s"]
        assert f["latency_p50_s"] <= f["latency_p95_s"] and f["throughput_output_tokens_per_s"] > 0
    stored = json.loads((settings.runs_dir / "serve" / "rescore-tiny-a.json").read_text())
    assert stored["parity"]["passed"] is True
    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out):
        print_report(record)
    assert "parity gate: passed" in out.getvalue()


def test_parity_gate_fails_on_another_model_and_names_the_items(tiny, tmp_path, task_data):
    from serve.engines import transformers_engine
    from serve.launcher import launch
    from serve.command import print_report
    from serve.rescore import rescore

    settings = _settings(tmp_path, task_data)
    # the server holds model b; the local side is model a
    with launch(transformers_engine(tiny[1]), tmp_path / "s.log") as server:
        record = rescore(
            settings,
            _target(tiny[0]),
            base_url=server.base_url,
            model_name=server.model_name,
            engine="transformers",
            tasks=["fact"],
            limit=6,
            figure_requests=2,
            figure_max_tokens=4,
        )
    gate = record["parity"]
    assert not gate["passed"] and gate["disagreements"]
    assert gate["failures"][0].startswith("parsed answers agree on")
    out = io.StringIO()
    import contextlib

    with contextlib.redirect_stdout(out):
        print_report(record)
    text = out.getvalue()
    assert "parity gate: FAILED" in text and "chat template sha256: served" in text
    assert gate["disagreements"][0]["item_id"] in text


def test_make_serve_runs_in_the_background_rescore_chat_then_stop(
    tiny, tmp_path, capsys, task_data, monkeypatch
):
    from eval.estimate import Estimate
    from selectune.cli import main
    from serve.chat import chat
    from serve.launcher import running

    base = (f"--runs-dir {tmp_path / 'runs'} --cache-dir {tmp_path / 'cache'} --data-dir {task_data}").split()
    assert (
        main(
            [
                *base,
                "serve",
                "--checkpoint",
                str(tiny[0]),
                "--model",
                "qwen2.5-coder-0.5b-instruct",
                "--engine",
                "transformers",
            ]
        )
        == 0
    )  # vLLM's CPU attention cannot run a head size of 8
    state = tmp_path / "runs" / "serve" / "server.json"
    try:
        server, recorded = running(state)
        assert recorded.model_dir == str(tiny[0]) and server.alive()
        from models.machine import last_server_start

        # its start was timed, for the next estimate of a command that starts one
        assert 0 < last_server_start(tmp_path / "cache", "transformers", "qwen2.5-coder-0.5b-instruct") < 600
        assert main([*base, "serve", "--model", "smollm2-135m-instruct"]) == 0  # already serving: says so
        assert "already serving" in capsys.readouterr().out
        # make rescore finds the server make serve left running
        bars = []
        monkeypatch.setattr(
            Estimate, "overall_bar", lambda self: bars.append((self, Recorder())) or bars[-1][1]
        )
        assert main([*base, "rescore", "--tasks", "fact", "--limit", "3", "--figure-concurrency", "2"]) == 0
        printed = capsys.readouterr().out
        assert "using the server `make serve` started" in printed and "parity gate: passed" in printed
        # the whole command's bar: each item, the local model's load and the figures advance it by
        # their estimate (to a tenth of a second each), so it ends where the printed total does
        ((estimate, bar),) = bars
        assert "estimate for `make rescore` here" in printed and len(bar.updates) >= 4
        assert bar.n == pytest.approx(estimate.seconds, abs=0.1 * len(bar.updates))
        out = io.StringIO()
        assert (
            chat(
                server.base_url,
                server.model_name,
                max_tokens=6,
                stdin=io.StringIO("问题1\nreset\n问题2\nexit\n"),
                stdout=out,
            )
            == 0
        )
        text = out.getvalue()
        assert text.count(">>> ") == 4 and "(new conversation)" in text
    finally:
        assert main([*base, "serve", "--stop"]) == 0
    assert not state.exists() and not server.alive()


def test_serve_defaults_to_the_newest_merged_model(tiny, tmp_path, task_data, monkeypatch):
    from core.artifacts import TrainSummary, write_artifact
    from serve.launcher import resolve_target

    settings = _settings(tmp_path, task_data)
    with pytest.raises(UserError, match="no finished training run"):
        resolve_target(settings)
    run = settings.runs_dir / "train" / "default-x"
    run.mkdir(parents=True)
    summary = {
        "model": "qwen2.5-coder-0.5b-instruct",
        "merged_model": "qwen2.5-coder-0.5b-instruct+default-x",
        "merged": str(tmp_path / "gone"),
        "recipe": "train/default.yaml",
        "run_dir": str(run),
        "adapter": str(run / "adapter"),
        "steps": 1,
        "train_seconds": 1.0,
        "total_seconds": 2.0,
        "resumed_from": None,
        "final_train_loss": None,
        "final_val_loss": None,
        "cleaning": {},
        "parity": {"passed": True},
        "checks": [],
    }
    write_artifact(run / "summary.json", TrainSummary, summary)
    with pytest.raises(UserError, match="merged model .* not found"):
        resolve_target(settings)
    # As `make train` records it (relative to where it ran), read from another folder: the run's
    # own merged/ is found through the runs directory.
    import shutil

    shutil.copytree(tiny[0], run / "merged")
    write_artifact(run / "summary.json", TrainSummary, {**summary, "merged": "runs/train/default-x/merged"})
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    target = resolve_target(settings)
    assert (
        target.model_dir == (run / "merged").resolve()
        and target.label == "qwen2.5-coder-0.5b-instruct+default-x"
    )
