"""Start an OpenAI-compatible server for a checkpoint, wait until it answers, stop it.

    with launch(engine_for(model_dir), log_path) as server:
        server.base_url, server.model_name          # what a client sends

The engines (the command, its environment, the name clients use) are built in serve/engines.py.
Servers bind 127.0.0.1 and a free port unless told otherwise. A start that fails (port taken,
no model, the process dying, out of memory) raises at once with the tail of the server's log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from core.artifacts import MergeProvenance, ServerState, read_artifact, write_artifact
from serve.engines import Engine, engine_for


@dataclass
class Target:
    """What is served: a checkpoint directory and the card that describes its base."""

    model_dir: Path
    card: object
    label: str


def resolve_target(settings, *, card_name: str | None = None, checkpoint: Path | None = None) -> Target:
    """The checkpoint to serve: --checkpoint, else a card's stored one, else the newest merged model."""
    from models.card import find_card
    from models.store import read_manifest

    if checkpoint is not None:
        from core.workspace import provenance as provenance_of

        provenance = provenance_of(checkpoint)
        base = card_name or (
            read_artifact(provenance, MergeProvenance).base_card if provenance.is_file() else None
        )
        if base is None:
            raise UserError(f"{checkpoint}: no provenance.json naming its base card; pass --model CARD too")
        return Target(checkpoint, find_card(base), f"{base}@{checkpoint.name}")
    if card_name is not None:
        card = find_card(card_name)
        manifest = read_manifest(card, settings.model_store)
        if manifest is None:
            raise UserError(f"{card.name}: not provisioned; run `make models CARD={card.name}`")
        return Target(Path(manifest["checkpoint"]), card, card.name)
    newest = settings.workspace.newest_train_summary()
    if newest is None:
        raise UserError(
            f"{settings.workspace.train_dir}: no finished training run; run `make train`, "
            "or name a model with --model / --checkpoint"
        )
    path, summary = newest
    merged = settings.workspace.merged_model(path.parent)  # not summary.merged: that is as `make train` ran
    if not (merged / "config.json").is_file():
        raise UserError(f"{path}: merged model {merged} not found (pass --checkpoint DIR)")
    return Target(merged.resolve(), find_card(summary.model), summary.merged_model)


def port_in_use(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    # progress bars write carriage returns; keep what a terminal would show last
    tail = [line.rsplit("\r", 1)[-1] for line in text.splitlines() if line.strip()][-lines:]
    return "\n".join(tail)


class Server:
    """A running server process: base_url, model_name, log_path, stop()."""

    start_seconds: float | None = None
    """How long its start took, until /health answered (None for a server found running)."""

    def __init__(self, engine: Engine, log_path: Path, pid: int):
        self.engine, self.log_path, self.pid = engine, log_path, pid

    @property
    def base_url(self) -> str:
        return self.engine.base_url

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        try:  # a zombie child of ours counts as dead
            done, _ = os.waitpid(self.pid, os.WNOHANG)
            return done == 0
        except ChildProcessError:
            return True

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the server's process group, SIGKILL after the grace period."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                if not self.alive():
                    return
                time.sleep(0.1)


def healthy(base_url: str) -> bool:
    import httpx

    try:
        return httpx.get(f"{base_url}/health", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def start(engine: Engine, log_path: Path, *, timeout_s: float = 600.0) -> Server:
    """Start the engine in its own process group; return once /health answers 200."""
    if port_in_use(engine.host, engine.port):
        raise UserError(f"{engine.host}:{engine.port} is already in use; choose another port")
    argv0 = engine.argv[0]
    if os.sep in argv0 and not Path(argv0).exists():
        how = {
            "lmdeploy": "`make lmdeploy-venv` on a CUDA machine, or set LMDEPLOY_PYTHON",
            "vllm": "`make vllm-venv`, or set VLLM_PYTHON",
        }.get(engine.name, "")
        raise UserError(
            f"{engine.name}: {argv0} not found ({engine.name} lives in its own environment: {how})"
        )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(engine.argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            engine.argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **engine.env},
            start_new_session=True,
        )
    server, started = Server(engine, log_path, proc.pid), time.monotonic()
    deadline = started + timeout_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            raise UserError(
                f"{engine.name} server exited with code {code} while starting; "
                f"the end of {log_path}:\n{log_tail(log_path)}"
            )
        if healthy(engine.base_url):
            server.start_seconds = time.monotonic() - started
            return server
        time.sleep(0.5)
    server.stop()
    raise UserError(
        f"{engine.name} server not healthy after {timeout_s:.0f} s; the end of {log_path}:\n"
        f"{log_tail(log_path)}"
    )


@contextmanager
def launch(engine: Engine, log_path: Path, *, timeout_s: float = 600.0):
    server = start(engine, log_path, timeout_s=timeout_s)
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# A server left running by `make serve`, for `make rescore` / `make chat` / `make serve-stop`


def save_state(path: Path, server: Server, **extra) -> None:
    write_artifact(
        path,
        ServerState,
        {
            "pid": server.pid,
            "engine": server.engine.name,
            "base_url": server.base_url,
            "host": server.engine.host,
            "port": server.engine.port,
            "model_name": server.model_name,
            "log": str(server.log_path),
            "argv": server.engine.argv,
            **extra,
        },
    )


def running(path: Path) -> tuple[Server, ServerState] | None:
    """The recorded server if its process is alive and healthy; a stale record is removed."""
    if not path.is_file():
        return None
    state = read_artifact(path, ServerState)
    engine = Engine(state.engine, state.argv, state.model_name, {}, state.host, state.port)
    server = Server(engine, Path(state.log), state.pid)
    if server.alive() and healthy(server.base_url):
        return server, state
    path.unlink()
    return None


def serve_command(
    settings,
    *,
    model: str | None = None,
    checkpoint: Path | None = None,
    engine: str = "auto",
    host: str = "127.0.0.1",
    port: int | None = None,
    backend: str = "turbomind",
    tp: int = 1,
    foreground: bool = False,
    stop: bool = False,
) -> int:
    """`selectune serve` (`make serve`, `make serve-stop`): one server in the background, recorded
    in the workspace, or in the foreground until Ctrl-C."""
    from models.machine import record_server_start

    workspace = settings.workspace
    current = running(workspace.server_state)
    if stop:
        if current is None:
            print("serve: no server recorded as running")
            return 0
        current[0].stop()
        workspace.server_state.unlink(missing_ok=True)
        print(f"serve: stopped {current[1].engine} server at {current[0].base_url} (pid {current[0].pid})")
        return 0
    if current is not None:
        print(
            f"serve: already serving {current[1].model} at {current[0].base_url} "
            f"(pid {current[0].pid}); `make serve-stop` first to serve another"
        )
        return 0
    target = resolve_target(settings, card_name=model, checkpoint=checkpoint)
    kw = {
        "host": host,
        "port": port,
        **({"backend": backend, "tp": tp} if engine in ("lmdeploy", "auto") else {}),
    }
    chosen = engine_for(target.model_dir, engine, **kw)
    log = workspace.server_log(chosen.name)
    if foreground:
        with launch(chosen, log) as server:
            record_server_start(settings.cache_dir, chosen.name, target.card.name, server.start_seconds)
            print(
                f'serve: {target.label} at {server.base_url}/v1 (model "{server.model_name}"), log {log}; '
                "Ctrl-C stops"
            )
            try:
                while server.alive():
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 0
    server = start(chosen, log)
    record_server_start(settings.cache_dir, chosen.name, target.card.name, server.start_seconds)
    save_state(
        workspace.server_state,
        server,
        model=target.label,
        model_dir=str(target.model_dir),
        base_card=target.card.name,
    )
    print(
        f'serve: {target.label} at {server.base_url}/v1 (model "{server.model_name}", {chosen.name}, '
        f"pid {server.pid}), log {log}; `make serve-stop` stops it"
    )
    return 0
