"""What `make train` will cost on this machine, before it starts: the recipe's own counts (its
training tokens from the tokenizer, steps, evaluation rounds, probe and check items, parity
prompts) timed with the machine's calibration (models/machine.py). The cost model and how it was
checked: docs/machine.md.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

TRAIN_EFFICIENCY = {"bfloat16": 0.24, "float32": 0.45}
"""Fraction of the calibrated rate in the compute dtype that a QLoRA step reaches on its model work
(4 x body parameters per real token: the forward pass and the activations' gradients; the frozen
weights get none), per compute dtype: what `make bench-train` measures as its share of the rate
(docs/benchmarks.md; fp32 between the AVX512 and the AVX2 kernels' shares)."""
WRITE_FACTOR = 1.0
"""Writing the merged weights, against the calibrated load rate."""


def train_efficiency(dtype: str) -> float:
    return TRAIN_EFFICIENCY.get(dtype, TRAIN_EFFICIENCY["float32"])


def train_steps(recipe, n_train: int) -> tuple[int, float]:
    """(optimizer steps, epochs run) as transformers' Trainer counts them: a step is `grad_accum`
    batches of `batch_size`; `max_steps`, when set, overrides `epochs`."""
    t = recipe.training
    per_epoch = max(1, math.ceil(math.ceil(n_train / t.batch_size) / t.grad_accum))
    if t.max_steps is not None:
        return t.max_steps, t.max_steps / per_epoch
    return math.ceil(t.epochs * per_epoch), t.epochs


def evaluation_rounds(recipe, steps: int, epochs: float) -> int:
    """Val loss, samples and checkpoint evaluations: at each `eval_steps` (or epoch), always at the end."""
    every = recipe.training.eval_steps
    if every == "epoch":
        return math.ceil(epochs)  # a part epoch's end is the run's end
    return steps // every + (steps % every != 0)


def train_estimate(settings, recipe, model_name: str | None):
    """The cost of `make train` with `recipe` here, stage by stage (a resumed run is counted whole)."""
    from eval.backends import make_backend
    from core.store import open_read_only
    from eval.estimate import (
        DTYPE_BYTES,
        Estimate,
        StageCost,
        checkpoint_shape,
        decode_seconds,
        load_seconds,
        machine_line,
        prompt_tokens,
        scoring_factor,
    )
    from models.card import find_card
    from models.machine import calibration as machine_calibration
    from models.store import read_manifest
    from train.callbacks import sample_prompts
    from train.checkpoints import probe_entries
    from train.data import CleaningReport, clean, split
    from train.prepare import ensure_chat_template, source_conversations, tokenize
    from train.checks import with_suite_samples
    from train.pipeline import resolve_model
    from train.trainer import compute_dtype

    recipe = with_suite_samples(recipe, settings)
    card = find_card(resolve_model(recipe, model_name, settings.workspace))
    calibration = machine_calibration(settings.cache_dir)
    dtype = str(compute_dtype(recipe)).removeprefix("torch.")
    what = f"`make train` ({recipe.path.name}, {card.name})"
    manifest = read_manifest(card, settings.model_store)
    if manifest is None:
        return Estimate(
            what,
            machine_line(calibration, dtype),
            [],
            {},
            [f"{card.name}: not provisioned yet (`make models` converts it first); not estimated"],
            [],
        )
    checkpoint = Path(manifest["checkpoint"])
    shape = checkpoint_shape(card, checkpoint)
    backend = make_backend("hf", card, settings.model_store, lazy=True)  # fp32 on a CPU, as the checks score
    tokenizer = backend.tokenizer
    ensure_chat_template(tokenizer)
    data_dir = settings.resolved_data_dir
    report = CleaningReport()
    parts = split(
        clean(source_conversations(recipe, data_dir, report, settings.workspace.synth_root), report),
        recipe.split,
        recipe.seed,
    )
    tokens = {
        name: [
            len(e.input_ids)
            for c in parts[name]
            if (e := tokenize(tokenizer, c, recipe.max_length, recipe.overlong, report)) is not None
        ]
        for name in ("train", "val")
    }
    steps, epochs = train_steps(recipe, len(tokens["train"]))
    t = recipe.training
    seen = steps * t.batch_size * t.grad_accum  # conversations the steps run through
    per_conversation = sum(tokens["train"]) / max(1, len(tokens["train"]))
    rate = calibration["matmul_gflops"].get(dtype, calibration["matmul_gflops"]["float32"])
    rates = (
        rate,
        calibration["decode_gflops"].get(dtype, calibration["decode_gflops"]["float32"]),
        calibration["bandwidth_gbs"],
    )
    train_tokens = round(min(seen, epochs * len(tokens["train"])) * per_conversation)
    costs = [
        StageCost(
            card.name,
            "training",
            f"{len(tokens['train'])} conversations, {steps} steps "
            f"({epochs:g} epochs), {train_tokens} tokens in {dtype}",
            4
            * shape.body
            * train_tokens
            / (rate * 1e9 * train_efficiency(dtype))
            * scoring_factor(calibration, "train", dtype),
        )
    ]

    rounds = evaluation_rounds(recipe, steps, epochs)
    val = 2 * (shape.body + shape.head) * sum(tokens["val"]) / (rate * 1e9 * 0.75)
    samples = sum(
        decode_seconds(
            prompt_tokens(tokenizer, m),
            recipe.samples.max_new_tokens,
            shape,
            rates,
            DTYPE_BYTES[dtype],
        )
        for m, _ in sample_prompts(recipe, data_dir)
    )
    costs.append(
        StageCost(
            card.name,
            "evaluations",
            f"{rounds} rounds of the val loss "
            f"({sum(tokens['val'])} tokens) and {len(sample_prompts(recipe, data_dir))} sample "
            f"replies",
            rounds * (val + samples),
            upper_bound=True,
        )
    )
    # Checkpoint evaluations and checks score in fp32 (the merge base); the base model's replies
    # in the results store, where it was scored, stand for the lengths of the trained model's.
    load = load_seconds(shape, calibration["load_gbs"], 4)
    db = settings.workspace.results_db
    conn = open_read_only(db) if db.is_file() else None
    probe = (
        probe_entries(recipe, settings.workspace.read_selection(), data_dir)
        if recipe.checkpoint_selection.enabled
        else []
    )
    try:
        score = partial(_scoring, backend, shape, calibration, conn, load=load)
        for e in probe:
            detail = f"{rounds} x {len(e.items)} items"
            costs.append(
                score(e.task, e.split, e.mode, e.items, rounds, f"checkpoint evaluations: {e.key}", detail)
            )
        costs += _merge_and_checks(
            recipe, settings, card, backend, shape, calibration, conn, parts, probe, load
        )
    finally:
        if conn is not None:
            conn.close()
    faster = [] if recipe.name == "quick" else ["RECIPE=train/quick.yaml trains fewer steps for a first look"]
    from eval.learned import learned_note

    return Estimate(
        what,
        machine_line(calibration, dtype),
        costs,
        {card.name: load_seconds(shape, calibration["load_gbs"], DTYPE_BYTES[dtype])},
        learned_note(calibration, {"gen float32", "ppl float32", f"train {dtype}"}),
        faster,
        {"steps": steps, "rounds": rounds},
    )


def _scoring(backend, shape, calibration, conn, task, split, mode, items, times, name, detail, load):
    from eval.estimate import StageCost, entry_cost

    if not items:
        return StageCost(backend.card.name, name, detail, 0.0)
    cost = entry_cost(
        backend,
        shape,
        task,
        split,
        mode,
        items,
        calibration,
        "float32",
        chunk_size=backend.batch_size,
        conn=conn,
    )
    return StageCost(backend.card.name, name, detail, times * (cost.seconds + load), cost.upper_bound)


def _merge_and_checks(recipe, settings, card, backend, shape, calibration, conn, parts, probe, load) -> list:
    from eval.backends.base import DEFAULT_BATCH_SIZE
    from eval.estimate import StageCost, decode_seconds, pending, prompt_tokens
    from eval.task import load_items, resolve_task
    from train.checks import all_checks

    tokenizer = backend.tokenizer
    fp32 = (
        calibration["matmul_gflops"]["float32"],
        calibration["decode_gflops"]["float32"],
        calibration["bandwidth_gbs"],
    )
    parity = sum(
        decode_seconds(
            prompt_tokens(tokenizer, c.messages[:-1]),
            recipe.parity.max_new_tokens,
            shape,
            fp32,
            4,
        )
        for c in (parts["val"] or parts["train"])[: recipe.parity.items]
    )
    models = 3 if recipe.quantization != "none" else 2  # three-way parity: the quantised base + adapter too
    out = [
        StageCost(
            card.name,
            "merge and parity",
            f"the fp32 weights loaded and written, {models} models x "
            f"{recipe.parity.items} prompts x {recipe.parity.max_new_tokens} tokens",
            models * (load + parity) + load * WRITE_FACTOR,
            upper_bound=True,
        )
    ]
    score = partial(_scoring, backend, shape, calibration, conn, load=load)
    for check, role in all_checks(recipe, settings):
        task = resolve_task(check.task, recipe.path.parent)
        items = load_items(task, check.split, settings.resolved_data_dir)
        reused = any(e.complete and e.key == f"{task.name}-{check.split}-{check.mode}" for e in probe)
        # the base side as check_comparison scores it (fp32, the runner's chunks): stored items are not
        base = pending(conn, backend, task, check.split, check.mode, items, DEFAULT_BATCH_SIZE)
        name = f"{role}: {task.name}-{check.split} {check.mode}"
        where = (task, check.split, check.mode)
        detail = f"{len(base)} of {len(items)} items not in the results store"
        out.append(score(*where, base, 1, f"{name}, base", detail))
        if not reused:
            out.append(score(*where, items, 1, f"{name}, merged", f"{len(items)} items"))
    return out
