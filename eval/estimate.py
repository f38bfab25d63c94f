"""What scoring will cost on this machine, before it starts: the work counted from the job itself
(the batches the backend will run, from the tokenizer alone) and timed with the machine's
calibration (models/machine.py). docs/machine.md has the cost model and how it was checked.

A reply's length is not known before it is generated: a model scored on the task before (any
run in the store) gives its replies' lengths; otherwise every batch is counted as decoding to the
task's `max_new_tokens`, and the estimate is an upper bound, said as "at most".
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

FORWARD_EFFICIENCY = 0.75
"""Fraction of the calibrated matmul rate a batched forward pass over prompts reaches (attention,
norms and activations are not matrix products the calibration measured)."""
DECODE_EFFICIENCY = 0.5
"""Fraction of the calibrated rate at a decoding step's rows (`decode_gflops`) one decoding step
of a batch reaches."""
LAYER_STEP_SECONDS = 0.001
"""Fixed cost of a decoding step per layer (transformers' generate loop, the cache's bookkeeping,
kernels too small to be matrix-product bound)."""
LOAD_SECONDS = 2.0
"""Fixed cost of loading a model besides reading its weights (the tokenizer, building the modules)."""
REPLY_QUANTILE = 0.95
"""A batch decodes until its longest reply ends: the history's replies at this quantile stand for it."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Shape:
    """What a model's cost depends on."""

    body: int
    """Parameters a token passes through as matrix products (the embedding table is a lookup)."""
    head: int
    """The output projection: hidden size x vocabulary."""
    weights: int
    """Parameters held in memory."""
    layers: int

    @classmethod
    def of(cls, parameters: int, config: dict) -> Shape:
        text = config.get("text_config", config)
        head = text["hidden_size"] * text["vocab_size"]
        tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
        return cls(
            body=parameters - head * (1 if tied else 2),
            head=head,
            weights=parameters,
            layers=text["num_hidden_layers"],
        )


@dataclass(frozen=True)
class EntryCost:
    model: str
    entry: str
    items: int
    tokens: int
    steps: int
    seconds: float
    upper_bound: bool
    """The replies' lengths were not known: every batch decodes to max_new_tokens."""
    key: tuple[str, int] | None = None
    """(model, suite entry index), where the job is a selection."""

    def line(self) -> str:
        bound = " at most" if self.upper_bound else ""
        return (
            f"{self.entry}: {self.items} items, {self.tokens} prompt tokens, {self.steps} decoding steps{bound}: "
            f"{bound[1:] + ' ' if bound else ''}{fmt_duration(self.seconds)}"
        )


@dataclass(frozen=True)
class StageCost:
    """A stage that is not scoring a task split (training, a merge): what it counts and its time."""

    model: str
    entry: str
    detail: str
    seconds: float
    upper_bound: bool = False
    key: tuple[str, int] | None = None
    """As `EntryCost.key`, where a stage advances the whole command by the item."""
    items: int = 0

    def line(self) -> str:
        return f"{self.entry}: {self.detail}: {'at most ' if self.upper_bound else ''}{fmt_duration(self.seconds)}"


def batch_seconds(
    batch,
    steps: int,
    shape: Shape,
    gflops: float,
    decode_gflops: float,
    bandwidth_gbs: float,
    dtype_bytes: int,
) -> float:
    """One batch: the forward pass over its tokens at `gflops`, then `steps` decoding steps (each
    as slow as its matrix products at `decode_gflops` or its weight reads, whichever is slower)."""
    flops = 2 * (shape.body * batch.tokens + shape.head * batch.rows * batch.kept)
    forward = flops / (gflops * 1e9 * FORWARD_EFFICIENCY)
    if steps == 0:
        return forward
    compute = 2 * (shape.body + shape.head) * batch.rows / (decode_gflops * 1e9 * DECODE_EFFICIENCY)
    memory = shape.weights * dtype_bytes / (bandwidth_gbs * 1e9)
    return forward + steps * (max(compute, memory) + shape.layers * LAYER_STEP_SECONDS)


def decode_seconds(
    prompt_tokens: int, new_tokens: int, shape: Shape, rates: tuple[float, float, float], dtype_bytes: int
) -> float:
    """One prompt generated greedily on its own (a batch of one); `rates`: (matmul GFLOP/s, at a
    decoding step's rows, bandwidth GB/s)."""
    from eval.backends.hf import Batch

    return batch_seconds(Batch(1, prompt_tokens, 1, new_tokens, ()), new_tokens, shape, *rates, dtype_bytes)


def load_seconds(shape: Shape, load_gbs: float, dtype_bytes: int) -> float:
    return LOAD_SECONDS + shape.weights * dtype_bytes / (load_gbs * 1e9)


def reply_tokens(conn, tokenizer, model: str, task: str, mode: str) -> int | None:
    """The REPLY_QUANTILE reply length in tokens (plus the end token) of the newest finished run
    of `model` on `task` in `mode` (any split), None when there is none."""
    from eval.results import newest_model_run, run_items

    if conn is None or mode != "gen" or (run_id := newest_model_run(conn, model, task, mode)) is None:
        return None
    lengths = sorted(
        len(tokenizer(i["output"], add_special_tokens=False).input_ids) + 1 for i in run_items(conn, run_id)
    )
    return lengths[min(len(lengths) - 1, int(REPLY_QUANTILE * len(lengths)))] if lengths else None


LEARNED_BOUNDS = (1 / 3, 3.0)
"""A factor measured here (eval/learned.py) is clipped to these: beyond them its runs measured
something else (a busy machine, swapping)."""


def scoring_factor(calibration: dict, mode: str, dtype: str) -> float:
    """Measured over estimated for whole runs in `mode` and `dtype` here (eval/learned.py), else 1."""
    try:
        factor = float(calibration.get("learned", {})[f"{mode} {dtype}"]["factor"])
    except (KeyError, TypeError, ValueError):
        return 1.0
    return min(max(factor, LEARNED_BOUNDS[0]), LEARNED_BOUNDS[1])


def entry_cost(
    backend,
    shape: Shape,
    task,
    split: str,
    mode: str,
    items: list,
    calibration: dict,
    dtype: str,
    *,
    chunk_size: int,
    conn=None,
    replies: dict[str, str] | None = None,
) -> EntryCost:
    """The cost of scoring `items` of `task` in `mode` with `backend` (its tokenizer only).
    `replies` (item id -> reply), where known, give each batch's decoding steps exactly: the
    check of the cost model against finished runs (bench/estimate_check.py)."""
    from eval.runner import backend_requests, fixed_chunks

    known = reply_tokens(conn, backend.tokenizer, backend.card.name, task.name, mode)
    rated = dtype if dtype in calibration["matmul_gflops"] else "float32"
    gflops, decode_gflops = calibration["matmul_gflops"][rated], calibration["decode_gflops"][rated]
    seconds, steps, tokens, last_prefix = 0.0, 0, 0, ()
    for chunk in fixed_chunks(items, chunk_size):
        longest = known
        if replies is not None and mode == "gen":
            longest = max(
                len(backend.tokenizer(replies[i.id], add_special_tokens=False).input_ids) + 1 for i in chunk
            )
        for b in backend.planned_batches(backend_requests(task, mode, chunk)):
            n = min(b.max_new_tokens, longest) if longest is not None else b.max_new_tokens
            if b.prefix != last_prefix:  # the backend keeps the last prefix's cache
                b = dataclasses.replace(b, tokens=b.tokens + len(b.prefix))
                last_prefix = b.prefix
            steps, tokens = steps + n, tokens + b.tokens
            seconds += batch_seconds(
                b, n, shape, gflops, decode_gflops, calibration["bandwidth_gbs"], DTYPE_BYTES[dtype]
            )
    return EntryCost(
        backend.card.name,
        f"{task.name}-{split} {mode}",
        len(items),
        tokens,
        steps,
        seconds * scoring_factor(calibration, mode, dtype),
        mode == "gen" and known is None and replies is None,
    )


def pending(conn, backend, task, split: str, mode: str, items: list, chunk_size: int) -> list:
    """The items a run of `backend` still has to score: the chunks with an item the results store
    does not hold for the run's identity (the runner scores a chunk whole)."""
    from eval.results import done_item_ids
    from eval.runner import fixed_chunks, run_identity

    if conn is None:
        return items
    done = done_item_ids(conn, run_identity(backend, task, split, mode, items, chunk_size=chunk_size)[0])
    return [
        i for chunk in fixed_chunks(items, chunk_size) if any(i.id not in done for i in chunk) for i in chunk
    ]


def planning_backend(settings, card, checkpoint, batch_size: int, dtype: str):
    """The backend a run of `card` would use, lazy: its tokenizer plans the batches, nothing loads."""
    from eval.backends import make_backend

    kw = dict(lazy=True, checkpoint=checkpoint, batch_size=batch_size, device="cpu", dtype=dtype)
    return make_backend("hf", card, settings.model_store, **kw)


def checkpoint_shape(card, checkpoint: Path) -> Shape:
    return Shape.of(card.parameters, json.loads((checkpoint / "config.json").read_text(encoding="utf-8")))


def prompt_tokens(tokenizer, messages: list[dict]) -> int:
    """The tokens of `messages` rendered by the chat template with the assistant's turn opened, as
    a backend or server sends them (the template's text, tokenised without added specials)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer(text, add_special_tokens=False).input_ids)


def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@dataclass
class Estimate:
    """A job's estimate: each model's entries, its load, and what could not be counted."""

    what: str
    machine: str
    """The CPU, its flags, the dtype and the calibrated rate the estimate used."""
    costs: list[EntryCost | StageCost]
    loads: dict[str, float]
    notes: list[str]
    faster: list[str]
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    """What the progress of the whole command is counted in besides items (training: steps, rounds)."""

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.costs) + sum(self.loads.values())

    def overall_bar(self):
        """A progress bar for the whole command, in seconds of estimated work: each scored item
        advances it by its share of its entry's estimate, so the time left it shows is the work
        left at the speed measured so far."""
        from tqdm import tqdm

        return tqdm(
            total=round(self.seconds, 1),
            desc=f"{self.what} in all",
            unit="s",
            position=1,
            leave=False,
            bar_format="{desc}: {percentage:3.0f}% of the estimated work, {elapsed} so far, about "
            "{remaining} left",
        )

    def stage_seconds(self, prefix: str) -> float:
        """The estimate of the stages whose names start with `prefix`."""
        return sum(c.seconds for c in self.costs if c.entry.startswith(prefix))

    def per_item(self) -> dict[tuple[str, int], float]:
        """(model, entry index) -> estimated seconds per item."""
        return {c.key: c.seconds / c.items for c in self.costs if c.key is not None and c.items}

    @property
    def upper_bound(self) -> bool:
        return any(c.upper_bound for c in self.costs)

    def lines(self) -> list[str]:
        out = [f"estimate for {self.what} here ({self.machine}):"]
        if not self.costs:
            return out + (
                [f"  note: {n}" for n in self.notes]
                if self.notes
                else ["  nothing to score: every item is in the results store"]
            )
        for model in dict.fromkeys([c.model for c in self.costs] + list(self.loads)):
            out.append(
                f"  {model}:" + (f" load {fmt_duration(self.loads[model])}" if model in self.loads else "")
            )
            out += [f"    {c.line()}" for c in self.costs if c.model == model]
        total = fmt_duration(self.seconds)
        out.append(
            f"  total: at most {total} (replies not seen yet counted to max_new_tokens)"
            if self.upper_bound
            else f"  total: about {total}"
        )
        out += [f"  note: {n}" for n in self.notes] + [f"  faster: {f}" for f in self.faster]
        return out


def select_estimate(
    settings, cards, checkpoints, entries, entry_items, *, batch_size: int, dtype: str, sequential: set[int]
) -> Estimate:
    """The cost of `make select` scoring what is not stored yet."""
    from models.machine import calibration as machine_calibration
    from models.store import read_manifest

    calibration = machine_calibration(settings.cache_dir)
    db = settings.workspace.results_db
    conn = None
    if db.is_file():
        from core.store import open_read_only

        conn = open_read_only(db)
    costs, loads, notes = [], {}, []
    try:
        for card in cards:
            if card.is_endpoint:
                notes.append(f"{card.name}: an endpoint, its time is the server's (not estimated)")
                continue
            checkpoint = checkpoints.get(card.name)
            manifest = None if checkpoint else read_manifest(card, settings.model_store)
            if checkpoint is None and manifest is None:
                notes.append(
                    f"{card.name}: not provisioned yet (`make models` converts it first); not estimated"
                )
                continue
            backend = planning_backend(settings, card, checkpoint, batch_size, dtype)
            shape = checkpoint_shape(card, checkpoint or Path(manifest["checkpoint"]))
            for k, ((task, entry), items) in enumerate(zip(entries, entry_items)):
                split = entry.split
                if entry.circular:  # scored as every rotation of the options
                    from eval.circular import SPLIT_SUFFIX, rotations

                    items, split = rotations(task, items), entry.split + SPLIT_SUFFIX
                if k not in sequential:
                    items = pending(conn, backend, task, split, entry.mode, items, batch_size)
                if items:
                    cost = entry_cost(
                        backend,
                        shape,
                        task,
                        split,
                        entry.mode,
                        items,
                        calibration,
                        dtype,
                        chunk_size=batch_size,
                        conn=conn,
                    )
                    costs.append(dataclasses.replace(cost, key=(card.name, k)))
            if any(c.model == card.name for c in costs):
                loads[card.name] = load_seconds(shape, calibration["load_gbs"], DTYPE_BYTES[dtype])
    finally:
        if conn is not None:
            conn.close()
    if sequential:
        notes.append(
            "entries scored sequentially stop once the evidence settles: their items are counted whole"
        )
    faster = (
        []
        if sequential or max(map(len, entry_items), default=0) < 500
        else ["SELECT_ARGS=--design sequential stops large splits once the answer is settled"]
    )
    if len(cards) > 2:
        faster.append("SELECT_ARGS=--models A,B scores fewer candidates")
    return Estimate("`make select`", machine_line(calibration, dtype), costs, loads, notes, faster)


def machine_line(calibration: dict, dtype: str) -> str:
    ident, rates = calibration["identity"], calibration["matmul_gflops"]
    rated = dtype if dtype in rates else "float32"
    return (
        f"{ident['cpu']}, {' '.join(ident['flags'])}; {dtype} at {rates[rated]:.0f} GFLOP/s"
        f"{'' if rated == dtype else ' (the float32 rate: none measured for ' + dtype + ')'}, measured by "
        "`make machine`"
    )
