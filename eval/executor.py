"""Where the models run: in this process (the local executor), or on a Ray cluster.

    make select EXECUTOR=ray RAY_ADDRESS=10.0.0.5:6379
    python -m selectune select --executor ray --ray-address 10.0.0.5:6379

The local executor is selectune as it always ran: one candidate's backend at a time, in this
process. The Ray executor gives each candidate an actor that provisions and loads its model once,
on a node that has the CPUs, memory and GPU it asks for, and the candidates are scored at the same
time, each by a thread of the driver that sends its actor one chunk of requests at a time. Only
requests (rendered messages) go to the actors and only outputs come back: the items, parsing,
scoring, the judge and the results store stay with the driver, which alone writes
`results.sqlite`, chunk by chunk and idempotently, so a chunk retried after a lost node is stored
once and a rerun asks nothing already stored. An endpoint candidate stays on the driver.

An actor lost with its node is restarted by Ray on another node and the call in flight is retried;
every reply carries the actor's identity hash, and one that differs from the identity the run was
started under (another dtype on another kind of node) stops the command with one line.
docs/scale.md says how to start a cluster and what runs where.
"""

from __future__ import annotations

import gc
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from core.errors import UserError
from core.files import sha256_text
from eval.actors import GIB, RESTARTS, HTTPWorker, Placement, RemoteBackend, ServerPool

EXECUTORS = ("local", "ray")
CONNECT_TIMEOUT_S = 5.0


class LocalExecutor:
    """Each candidate in turn, in this process, through the connection the command opened."""

    name = "local"

    def __init__(self, conn):
        self.conn = conn
        self.make = None

    def open(self, cards, store: Path, *, make, **options) -> None:
        """`make(card)`: a backend in this process, built when a candidate's turn comes."""
        self.make = make

    def backend(self, card):
        return self.make(card)

    def done_with(self, backend) -> None:
        del backend
        gc.collect()

    def between_rounds(self, backend) -> None:
        pass  # the sequential rounds keep every candidate's model loaded

    def connection(self):
        return self.conn

    def map(self, fn, args: list) -> list:
        return [fn(a) for a in args]

    def servers(self, urls: list[str], model: str, concurrency: int):
        """The HTTP backend for one server; several are the Ray executor's."""
        from eval.backends import make_backend

        if len(urls) > 1:
            raise UserError(
                f"{len(urls)} --base-url: spreading one model over several servers runs on the Ray "
                "executor (--executor ray: one actor per server)"
            )
        return make_backend("openai", urls[0], model, concurrency=concurrency)

    def describe(self) -> dict:
        return {"name": self.name}

    def close(self) -> None:
        pass


class RayExecutor:
    """Candidates as Ray actors, scored in parallel; results written by the driver alone."""

    name = "ray"

    def __init__(self, runs_dir: Path, address: str | None = None, *, cpus: int = 1):
        self.runs_dir, self.cpus = runs_dir, cpus
        self.address = connect(address)
        self._local = threading.local()
        self._actors: list = []
        self.backends: dict = {}
        self.slots, self.keep = 1, True

    def connection(self):
        """This thread's own connection to the results store (SQLite connections are per thread)."""
        if getattr(self._local, "conn", None) is None:
            from eval.results import open_results

            self._local.conn = open_results(self.runs_dir)
        return self._local.conn

    def placement(self, card, device: str, dtype: str) -> Placement:
        gpus = 1 if device.startswith("cuda") or (device == "auto" and _cluster_gpus() > 0) else 0
        memory = card.memory_gib.bf16 if gpus or dtype in ("bfloat16", "float16") else card.memory_gib.fp32
        return Placement(self.cpus, memory, gpus)

    def check_fits(self, needs: dict[str, Placement]) -> None:
        """One line naming every model no alive node can hold, before anything is scored."""
        import ray

        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        problems = [
            f"{name} needs {p.text()}"
            for name, p in needs.items()
            if not any(fits(p, node) for node in nodes)
        ]
        if problems:
            largest = max(
                nodes, key=lambda r: (r.get("GPU", 0), r.get("memory", 0), r.get("CPU", 0)), default={}
            )
            raise UserError(
                f"the Ray cluster at {self.address} cannot hold {'; '.join(problems)}: its largest node "
                f"has {largest.get('CPU', 0):g} CPU, {largest.get('memory', 0) / GIB:.1f} GiB memory, "
                f"{largest.get('GPU', 0):g} GPU"
            )

    def open(
        self,
        cards,
        store: Path,
        *,
        make,
        checkpoints: dict | None = None,
        batch_size: int,
        device: str,
        dtype: str,
        scoring: bool = True,
    ) -> None:
        """Check that the cluster can hold every card's model (one line if not), then how many at
        once: that many candidates are scored at a time. Where all fit, each actor starts once
        and lives until close(); where not, an actor is ended when its candidate's turn (or a
        sequential round) ends, to make room. An endpoint's backend is made here with `make`.
        `scoring`: "auto" dtype means what select and eval score in on the actor's node
        (models.loading.scoring_dtype), else the HF backend's own "auto" (float32 on a CPU)."""
        checkpoints = checkpoints or {}
        remote = [c for c in cards if not c.is_endpoint]
        placements = {c.name: self.placement(c, device, dtype) for c in remote}
        self.check_fits(placements)
        self.slots = max(1, self.room(list(placements.values())))
        self.keep = self.slots >= len(remote)
        self.backends = {c.name: make(c) for c in cards if c.is_endpoint}
        options = {"batch_size": batch_size, "device": device, "dtype": dtype, "scoring": scoring}
        for card in remote:
            checkpoint = checkpoints.get(card.name)
            self.backends[card.name] = RemoteBackend(
                card,
                store,
                checkpoint,
                options,
                placements[card.name],
                expected_weights(card, store, checkpoint),
            )
        if self.keep:  # start every actor at once: models load in parallel
            self.map(
                lambda b: b.ensure(), [b for b in self.backends.values() if isinstance(b, RemoteBackend)]
            )

    def room(self, placements: list[Placement]) -> int:
        """How many of these models the alive nodes hold at once (first fit, largest first)."""
        import ray

        free = [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
        placed = 0
        for p in sorted(placements, key=lambda p: (-p.gpus, -p.memory_gib)):
            for node in free:
                if fits(p, node):
                    node["CPU"] = node.get("CPU", 0) - p.cpus
                    node["memory"] = node.get("memory", 0) - p.memory_gib * GIB
                    node["GPU"] = node.get("GPU", 0) - p.gpus
                    placed += 1
                    break
        return placed

    def backend(self, card):
        return self.backends[card.name]

    def map(self, fn, args: list) -> list:
        """fn over args, as many at once as the cluster holds models (threads of the driver)."""
        workers = min(len(args), getattr(self, "slots", len(args)))
        if workers <= 1:
            return [fn(a) for a in args]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(fn, args))

    def done_with(self, backend) -> None:
        """A candidate's turn (or round) is over: end its actor unless every model fits at once."""
        if isinstance(backend, RemoteBackend) and not self.keep:
            backend.stop()

    between_rounds = done_with

    def describe(self) -> dict:
        return {
            "name": self.name,
            "address": self.address,
            "nodes": {name: b.node for name, b in self.backends.items() if isinstance(b, RemoteBackend)},
        }

    def close(self) -> None:
        for backend in self.backends.values():
            if isinstance(backend, RemoteBackend):
                backend.stop()
        for actor in self._actors:
            import ray

            ray.kill(actor)
        self._actors.clear()

    def servers(self, urls: list[str], model: str, concurrency: int):
        """One model served at several URLs: an actor per server, each chunk's requests dealt
        out among them (request k to server k mod n), one run in the store."""
        import ray

        actors = [
            ray.remote(HTTPWorker)
            .options(num_cpus=0, max_restarts=RESTARTS, max_task_retries=RESTARTS)
            .remote(url, model, concurrency)
            for url in urls
        ]
        self._actors += actors
        return ServerPool(actors, urls, model)


def expected_weights(card, store: Path, checkpoint: Path | None) -> str | None:
    """The weights hash the driver knows for this model: its own store's manifest, or the
    checkpoint's files hashed as the HF backend hashes them; None where the driver has neither."""
    from core.files import sha256_file
    from models.store import read_manifest

    if checkpoint is not None:
        files = sorted(Path(checkpoint).glob("*.safetensors"))
        return sha256_text(" ".join(sha256_file(f) for f in files)) if files else None
    return (read_manifest(card, store) or {}).get("weights_sha256")


def fits(p: Placement, resources: dict) -> bool:
    return (
        resources.get("CPU", 0) >= p.cpus
        and resources.get("memory", 0) >= p.memory_gib * GIB
        and resources.get("GPU", 0) >= p.gpus
    )


def _cluster_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0)


def connect(address: str | None) -> str:
    """Join the cluster at `address` (host:port of its head), or start a one-node Ray on this
    machine with 127.0.0.1 as its node address when there is none; an unreachable address, or a
    cluster that refuses this driver, is one line."""
    import os

    import ray

    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    address = address or os.environ.get("RAY_ADDRESS") or None
    quiet = {"log_to_driver": False, "logging_level": "ERROR", "configure_logging": True}
    if address is None:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", **quiet)
        return ray.get_runtime_context().gcs_address
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise UserError(
            f"--ray-address {address}: expected HOST:PORT of the cluster's head (ray start --head prints it)"
        )
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None
    try:
        ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ray.exceptions.RayError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(
            f"cannot join the Ray cluster at {address}: {first} (a cluster with token authentication "
            "needs RAY_AUTH_MODE=token and its token here: docs/scale.md)"
        ) from None
    return address


def make_executor(settings, conn):
    """The executor the settings name (`executor`, `ray_address`, `cpus_per_model`); `conn`: the
    command's connection to the results store, which the local executor scores through."""
    if settings.executor == "ray":
        return RayExecutor(settings.runs_dir, settings.ray_address, cpus=settings.cpus_per_model)
    return LocalExecutor(conn)
