"""What runs on a Ray node for the Ray executor (eval/executor.py), and its proxies on the driver.

A ScoringWorker actor holds one model and answers batches of requests; a RemoteBackend is the
backend protocol over it on the driver, started on first use. An HTTPWorker holds one server's
client; a ServerPool deals a chunk's requests out among several. Requests and outputs are all that
travel: everything else stays with the driver.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from core.files import sha256_text

GIB = 1 << 30
RESTARTS = 3
"""How often Ray restarts a lost actor (and retries its call) before the command gives up."""
UNAVAILABLE_S = 120.0
"""How long a call waits for an actor that Ray is restarting (on another node) before giving up."""


@dataclass(frozen=True)
class Placement:
    """What one model asks of a node."""

    cpus: int
    memory_gib: float
    gpus: int = 0

    def text(self) -> str:
        return f"{self.cpus} CPU, {self.memory_gib:g} GiB memory" + (
            f", {self.gpus} GPU" if self.gpus else ""
        )


def identity_hash(identity: dict) -> str:
    import json

    return sha256_text(json.dumps(identity, sort_keys=True))[:16]


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
            self.backend = _worker_backend(
                card, Path(store), Path(checkpoint) if checkpoint else None, options
            )
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
    from eval.backends import make_backend
    from models.loading import scoring_dtype
    from models.store import provision

    if checkpoint is not None:
        if not (checkpoint / "config.json").is_file():
            raise UserError(
                f"checkpoint {checkpoint} is not on this node (a checkpoint candidate must be at the "
                "same path on every node: a shared filesystem)"
            )
    else:
        provision(card, store)  # verifies the card's sha256 pins
    dtype = scoring_dtype(options["dtype"], options["device"]) if options["scoring"] else options["dtype"]
    return make_backend(
        "hf",
        card,
        store,
        batch_size=options["batch_size"],
        device=options["device"],
        dtype=dtype,
        checkpoint=checkpoint,
        lazy=True,
    )


class RemoteBackend:
    """The backend protocol on the driver, over a ScoringWorker actor started on first use."""

    def __init__(
        self,
        card,
        store: Path,
        checkpoint: Path | None,
        options: dict,
        placement: Placement,
        weights: str | None,
    ):
        self.card, self.name = card, card.name
        self.store, self.checkpoint, self.options, self.placement, self.weights = (
            store,
            checkpoint,
            options,
            placement,
            weights,
        )
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
            self.actor = (
                ray.remote(ScoringWorker)
                .options(
                    num_cpus=p.cpus,
                    num_gpus=p.gpus,
                    memory=int(p.memory_gib * GIB),
                    max_restarts=RESTARTS,
                    max_task_retries=RESTARTS,
                )
                .remote(
                    self.card,
                    str(self.store),
                    str(self.checkpoint) if self.checkpoint else None,
                    self.options,
                    p.cpus,
                )
            )
            identity, problem, self.node = ray.get(self.actor.setup.remote())
            if problem:
                raise UserError(problem)
            if self.weights and identity.get("weights_sha256") != self.weights:
                raise UserError(
                    f"node {self.node}: {self.name}'s weights (sha256 {identity.get('weights_sha256')}) "
                    f"differ from the pin here ({self.weights}); provision it again there"
                )
            if self._hash is not None and identity_hash(identity) != self._hash:
                raise UserError(
                    f"node {self.node}: {self.name} scores differently there (another dtype or device) "
                    "from where its run started; rerun with --dtype and --device set"
                )
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
                    raise UserError(
                        f"{self.name}: its Ray actor has been unavailable for {waited:.0f} s; rerun to "
                        "resume from the stored results"
                    ) from None
                time.sleep(1.0)
                waited += 1.0
            except RayActorError as exc:
                raise UserError(
                    f"{self.name}: its Ray actor was lost more than {RESTARTS} times "
                    f"({type(exc).__name__}); rerun to resume from the stored results"
                ) from None
        if got != self._hash:
            raise UserError(
                f"{self.name}: restarted on a node that scores it differently (identity {got}, "
                f"the run's {self._hash}); rerun to score it again there"
            )
        return outputs

    def generate(self, requests) -> list[str]:
        return self._call("generate", requests)

    def loglikelihood(self, requests) -> list[float]:
        return self._call("loglikelihood", requests)


class HTTPWorker:
    """The actor for one OpenAI-compatible server: it sends a share of each chunk's requests."""

    def __init__(self, url: str, model: str, concurrency: int):
        from eval.backends import make_backend

        self.backend = make_backend("openai", url, model, concurrency=concurrency)

    def generate(self, requests) -> list[str]:
        return self.backend.generate(requests)


class ServerPool:
    """The backend protocol over HTTPWorker actors, one per server of the same model (`gen` only:
    scoring `ppl` needs the model's prompt renderer)."""

    def __init__(self, actors: list, urls: list[str], model: str):
        self.actors = actors
        from eval.backends.openai_http import greedy_sampling, sampling_sha256

        self.identity = {
            "backend": "openai",
            "model": model,
            "base_url": sorted(u.rstrip("/") for u in urls) if len(urls) > 1 else urls[0].rstrip("/"),
            "sampling_sha256": sampling_sha256(greedy_sampling(0)),
        }  # what HTTPWorker sends

    def generate(self, requests) -> list[str]:
        import ray

        n = len(self.actors)
        parts = ray.get([actor.generate.remote(requests[k::n]) for k, actor in enumerate(self.actors)])
        out: list[str] = [""] * len(requests)
        for k, part in enumerate(parts):
            out[k::n] = part
        return out

    def loglikelihood(self, requests):
        raise UserError(
            "several servers score `gen` mode only (the log-likelihood needs the model's prompt "
            "renderer); use --mode gen"
        )
