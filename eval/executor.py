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
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from core.files import sha256_text

EXECUTORS = ("local", "ray")
RESTARTS = 3
"""How often Ray restarts a lost actor (and retries its call) before the command gives up."""
UNAVAILABLE_S = 120.0
"""How long a call waits for an actor that Ray is restarting (on another node) before giving up."""
CONNECT_TIMEOUT_S = 5.0
GIB = 1 << 30


@dataclass(frozen=True)
class Placement:
    """What one model asks of a node."""

    cpus: int
    memory_gib: float
    gpus: int = 0

    def text(self) -> str:
        return f"{self.cpus} CPU, {self.memory_gib:g} GiB memory" + (f", {self.gpus} GPU" if self.gpus else "")


def identity_hash(identity: dict) -> str:
    import json

    return sha256_text(json.dumps(identity, sort_keys=True))[:16]


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
        from eval.backends.openai_http import OpenAIBackend

        if len(urls) > 1:
            raise UserError(f"{len(urls)} --base-url: spreading one model over several servers runs on the Ray "
                            "executor (--executor ray: one actor per server)")
        return OpenAIBackend(urls[0], model, concurrency=concurrency)

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
        problems = [f"{name} needs {p.text()}" for name, p in needs.items()
                    if not any(fits(p, node) for node in nodes)]
        if problems:
            largest = max(nodes, key=lambda r: (r.get("GPU", 0), r.get("memory", 0), r.get("CPU", 0)), default={})
            raise UserError(f"the Ray cluster at {self.address} cannot hold {'; '.join(problems)}: its largest node "
                            f"has {largest.get('CPU', 0):g} CPU, {largest.get('memory', 0) / GIB:.1f} GiB memory, "
                            f"{largest.get('GPU', 0):g} GPU")

    def open(self, cards, store: Path, *, make, checkpoints: dict | None = None, batch_size: int,
             device: str, dtype: str, scoring: bool = True) -> None:
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
            self.backends[card.name] = RemoteBackend(card, store, checkpoint, options, placements[card.name],
                                                     expected_weights(card, store, checkpoint))
        if self.keep:  # start every actor at once: models load in parallel
            self.map(lambda b: b.ensure(), [b for b in self.backends.values() if isinstance(b, RemoteBackend)])

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
        return {"name": self.name, "address": self.address,
                "nodes": {name: b.node for name, b in self.backends.items() if isinstance(b, RemoteBackend)}}

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

        actors = [ray.remote(HTTPWorker).options(num_cpus=0, max_restarts=RESTARTS, max_task_retries=RESTARTS)
                  .remote(url, model, concurrency) for url in urls]
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
    return (resources.get("CPU", 0) >= p.cpus and resources.get("memory", 0) >= p.memory_gib * GIB
            and resources.get("GPU", 0) >= p.gpus)


def _cluster_gpus() -> float:
    import ray

    return ray.cluster_resources().get("GPU", 0)


def connect(address: str | None) -> str:
    """Join the cluster at `address` (host:port of its head), or start a one-node Ray on this
    machine, bound to 127.0.0.1, when there is none; an unreachable address is one line."""
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
        raise UserError(f"--ray-address {address}: expected HOST:PORT of the cluster's head (ray start --head "
                        "prints it)")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None
    ray.init(address=address, **quiet)
    return address


class ScoringWorker:
    """The actor: one model, provisioned into the node's own store with the card's pins (or read
    from a checkpoint directory at the same path), loaded on the first request."""

    def __init__(self, card, store: str, checkpoint: str | None, options: dict, threads: int):
        import ray
        import torch

        torch.set_num_threads(threads)
        self.node = ray.util.get_node_ip_address() + " (" + ray.get_runtime_context().get_node_id()[:8] + ")"
        self.problem, self.backend = None, None
        try:
            self.backend = _worker_backend(card, Path(store), Path(checkpoint) if checkpoint else None, options)
        except UserError as exc:
            self.problem = f"node {self.node}: {card.name}: {exc}"
        self.identity_hash = identity_hash(self.backend.identity) if self.backend else None

    def setup(self) -> tuple[dict | None, str | None, str]:
        """(identity, the problem that stops this model here or None, the node)."""
        return (self.backend.identity if self.backend else None), self.problem, self.node

    def generate(self, requests) -> tuple[str, list[str]]:
        return self.identity_hash, self.backend.generate(requests)

    def loglikelihood(self, requests) -> tuple[str, list[float]]:
        return self.identity_hash, self.backend.loglikelihood(requests)


def _worker_backend(card, store: Path, checkpoint: Path | None, options: dict):
    from eval.backends.hf import HFBackend
    from models.loading import scoring_dtype
    from models.store import provision

    if checkpoint is not None:
        if not (checkpoint / "config.json").is_file():
            raise UserError(f"checkpoint {checkpoint} is not on this node (a checkpoint candidate must be at the "
                            "same path on every node: a shared filesystem)")
    else:
        provision(card, store)  # verifies the card's sha256 pins
    dtype = scoring_dtype(options["dtype"], options["device"]) if options["scoring"] else options["dtype"]
    return HFBackend(card, store, batch_size=options["batch_size"], device=options["device"], dtype=dtype,
                     checkpoint=checkpoint, lazy=True)


class RemoteBackend:
    """The backend protocol on the driver, over a ScoringWorker actor started on first use."""

    def __init__(self, card, store: Path, checkpoint: Path | None, options: dict, placement: Placement,
                 weights: str | None):
        self.card, self.name = card, card.name
        self.store, self.checkpoint, self.options, self.placement, self.weights = (
            store, checkpoint, options, placement, weights)
        self.actor = None
        self._identity: dict | None = None
        self._hash: str | None = None
        self.node: str | None = None
        self._lock = threading.Lock()

    @property
    def identity(self) -> dict:
        self.ensure()
        return self._identity

    def ensure(self) -> RemoteBackend:
        """Start the actor if it is not running; one line if its model cannot run on the node it
        got, its weights are not the pin, or it scores differently from the run's first actor."""
        import ray

        with self._lock:
            if self.actor is not None:
                return self
            p = self.placement
            self.actor = ray.remote(ScoringWorker).options(
                num_cpus=p.cpus, num_gpus=p.gpus, memory=int(p.memory_gib * GIB),
                max_restarts=RESTARTS, max_task_retries=RESTARTS,
            ).remote(self.card, str(self.store), str(self.checkpoint) if self.checkpoint else None, self.options, p.cpus)
            identity, problem, self.node = ray.get(self.actor.setup.remote())
            if problem:
                raise UserError(problem)
            if self.weights and identity.get("weights_sha256") != self.weights:
                raise UserError(f"node {self.node}: {self.name}'s weights (sha256 {identity.get('weights_sha256')}) "
                                f"differ from the pin here ({self.weights}); provision it again there")
            if self._hash is not None and identity_hash(identity) != self._hash:
                raise UserError(f"node {self.node}: {self.name} scores differently there (another dtype or device) "
                                "from where its run started; rerun with --dtype and --device set")
            self._identity, self._hash = identity, identity_hash(identity)
            return self

    def stop(self) -> None:
        import ray

        with self._lock:
            if self.actor is not None:
                ray.kill(self.actor)
                self.actor = None

    def _call(self, method: str, requests):
        """The actor's outputs for `requests`. A call is a pure function of its requests, so one
        that met the actor restarting (ActorUnavailableError) is sent again, for up to
        UNAVAILABLE_S; Ray itself retries calls whose actor died, up to RESTARTS times."""
        import time

        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        waited = 0.0
        while True:
            try:
                got, outputs = ray.get(getattr(self.ensure().actor, method).remote(requests))
                break
            except ActorUnavailableError:
                if waited >= UNAVAILABLE_S:
                    raise UserError(f"{self.name}: its Ray actor has been unavailable for {waited:.0f} s; rerun to "
                                    "resume from the stored results") from None
                time.sleep(1.0)
                waited += 1.0
            except RayActorError as exc:
                raise UserError(f"{self.name}: its Ray actor was lost more than {RESTARTS} times "
                                f"({type(exc).__name__}); rerun to resume from the stored results") from None
        if got != self._hash:
            raise UserError(f"{self.name}: restarted on a node that scores it differently (identity {got}, "
                            f"the run's {self._hash}); rerun to score it again there")
        return outputs

    def generate(self, requests) -> list[str]:
        return self._call("generate", requests)

    def loglikelihood(self, requests) -> list[float]:
        return self._call("loglikelihood", requests)


class HTTPWorker:
    """The actor for one OpenAI-compatible server: it sends a share of each chunk's requests."""

    def __init__(self, url: str, model: str, concurrency: int):
        from eval.backends.openai_http import OpenAIBackend

        self.backend = OpenAIBackend(url, model, concurrency=concurrency)

    def generate(self, requests) -> list[str]:
        return self.backend.generate(requests)


class ServerPool:
    """The backend protocol over HTTPWorker actors, one per server of the same model (`gen` only:
    scoring `ppl` needs the model's prompt renderer)."""

    def __init__(self, actors: list, urls: list[str], model: str):
        self.actors = actors
        self.identity = {"backend": "openai", "model": model,
                         "base_url": sorted(u.rstrip("/") for u in urls) if len(urls) > 1 else urls[0].rstrip("/")}

    def generate(self, requests) -> list[str]:
        import ray

        n = len(self.actors)
        parts = ray.get([actor.generate.remote(requests[k::n]) for k, actor in enumerate(self.actors)])
        out: list[str] = [""] * len(requests)
        for k, part in enumerate(parts):
            out[k::n] = part
        return out

    def loglikelihood(self, requests):
        raise UserError("several servers score `gen` mode only (the log-likelihood needs the model's prompt "
                        "renderer); use --mode gen")


def make_executor(settings, conn):
    """The executor the settings name (`executor`, `ray_address`, `cpus_per_model`); `conn`: the
    command's connection to the results store, which the local executor scores through."""
    if settings.executor == "ray":
        return RayExecutor(settings.runs_dir, settings.ray_address, cpus=settings.cpus_per_model)
    return LocalExecutor(conn)
