"""Training speed and memory: our trainer against trl's SFTTrainer, in one run.

    make bench-train
    .venv/bin/python bench/train_speed.py --model smollm2-135m-instruct --examples 64

Both train the same model (NF4 + the same LoRA adapter, built by the same code), on the same
conversations (the first N of the default recipe's training split, one epoch), with the same
batch size and accumulation (the default recipe's: 4 rows a pass, 2 passes a step), sequence
length, learning-rate schedule and seed, each in a fresh process so that its peak resident memory
is its own. Ours runs once with each `training.cpu_allocator` setting (`compact`, the recipe
default, and `glibc`, which the default job uses; `--allocators` picks), so that the trade
between speed and memory is measured in the same run. Prints each run's estimate first
(`--estimate`: only that; docs/machine.md), then real (non-padding) tokens per second, peak RSS,
the ratios, and the loss trajectories. Where the speed difference comes from: our length-grouped
batches (trl pads random batches to their longest row), the LM head applied once, only at the
labelled positions (trl's fused head scores every position on a CPU, in tiles it recomputes in
the backward pass), and less kept for the backward pass (LoRA's dropout inside lora_A, the SiLU
recomputed). Peak RSS includes what glibc's heap keeps of freed blocks: our worker sets glibc's
thresholds and trims the heap after each pass (`train.cpu_memory.CpuAllocator`, as `make train`
does); trl's runs with glibc's defaults, as a trl user's would (docs/training.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import load_settings  # noqa: E402
from core.workspace import TrainRun  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


ALLOCATORS = ("compact", "glibc")


def runs(allocators: list[str]) -> list[tuple[str, str, str | None]]:
    """(label, engine, cpu_allocator) of each run in a round: ours once per allocator, then trl."""
    return [(f"selectune ({a})", "selectune", a) for a in allocators] + [("trl", "trl", None)]


TRL_EFFICIENCY = {"bfloat16": 0.16, "float32": 0.29}
"""trl's SFTTrainer's share of the calibrated rate on the same model work per compute dtype, as
this bench measured it (docs/benchmarks.md): it pads random batches and scores the head at every
position."""
COMPACT_SLOWDOWN = 1.25
"""`compact` against `glibc` in time, as this bench measured it in bf16 (docs/training.md)."""


def bench_estimate(settings, card, checkpoint: Path, recipe, train: list, plan, repeats: int):
    """Each run's cost here: its training tokens (tokenised as the trainer does) at the share of
    the calibrated rate `make train`'s estimate uses (train/estimate.py), trl's at the share
    measured for it; each run loads the model in its own process."""
    from transformers import AutoTokenizer

    from eval import estimate as E
    from models.machine import calibration
    from train.data import CleaningReport
    from train.estimate import train_efficiency
    from train.prepare import ensure_chat_template, tokenize
    from train.trainer import compute_dtype

    rates = calibration(settings.cache_dir)
    dtype = str(compute_dtype(recipe)).removeprefix("torch.")
    rate = rates["matmul_gflops"].get(dtype, rates["matmul_gflops"]["float32"]) * 1e9
    shape = E.checkpoint_shape(card, checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ensure_chat_template(tokenizer)
    report = CleaningReport()
    tokens = sum(
        len(e.input_ids)
        for c in train
        if (e := tokenize(tokenizer, c, recipe.max_length, recipe.overlong, report)) is not None
    )
    load = E.load_seconds(shape, rates["load_gbs"], E.DTYPE_BYTES[dtype])
    costs = []
    for n in range(repeats):
        for label, engine, allocator in plan:
            share = (
                TRL_EFFICIENCY.get(dtype, TRL_EFFICIENCY["float32"])
                if engine == "trl"
                else train_efficiency(dtype)
            )
            slower = COMPACT_SLOWDOWN if allocator == "compact" else 1.0
            seconds = 4 * shape.body * tokens / (rate * share) * slower + (load if n else 0.0)
            detail = f"{tokens} tokens at {share:.0%} of the {dtype} rate" + (
                f", x{slower:g} for `compact`" if slower != 1.0 else ""
            )
            costs.append(E.StageCost(label, f"round {n + 1}", detail + (", its load" if n else ""), seconds))
    loads = {label: load for label, _, _ in plan}
    return E.Estimate("`make bench-train`", E.machine_line(rates, dtype), costs, loads, [], [])


def bench_recipe(data_file: Path, args):
    from train.recipe import Recipe, load_recipe

    base = load_recipe(REPO / "train" / "default.yaml").model_dump(mode="json")
    base.update(
        name="bench",
        data=[{"path": str(data_file)}],
        split=[1.0, 0.0, 0.0],
        samples={"prompts": [], "tasks": []},
    )
    base["training"].update(
        epochs=1, max_steps=None, logging_steps=1, eval_steps=10**6, save_steps=10**6, sample_steps=10**6
    )
    if args.batch_size:
        base["training"]["batch_size"] = args.batch_size
    if args.grad_accum:
        base["training"]["grad_accum"] = args.grad_accum
    if args.cpu_allocator:
        base["training"]["cpu_allocator"] = args.cpu_allocator
    if args.compute_dtype:
        base["compute_dtype"] = args.compute_dtype
    return Recipe.model_validate(base)


def worker(engine: str, checkpoint: str, data_file: Path, out_dir: Path, args) -> dict:
    recipe = bench_recipe(data_file, args)
    if engine == "selectune":
        from train.trainer import run_training

        result = run_training(recipe, checkpoint, out_dir, out_dir)
        tokens = sum(len(e.input_ids) for e in result.data.train)
        losses = [
            json.loads(line)["loss"]
            for line in TrainRun(out_dir).log.read_text().splitlines()
            if '"loss"' in line
        ]
        seconds = result.seconds
    else:
        from datasets import Dataset
        from transformers import AutoTokenizer
        from trl import SFTConfig, SFTTrainer

        from train.data import load_conversations
        from train.trainer import compute_dtype, load_for_training

        convs = load_conversations(data_file, "messages")
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        data = Dataset.from_list([{"prompt": c.messages[:-1], "completion": c.messages[-1:]} for c in convs])
        t = recipe.training
        config = SFTConfig(
            output_dir=str(out_dir),
            per_device_train_batch_size=t.batch_size,
            num_train_epochs=1,
            gradient_accumulation_steps=t.grad_accum,
            learning_rate=t.learning_rate,
            lr_scheduler_type=t.scheduler,
            warmup_steps=t.warmup_ratio,
            weight_decay=t.weight_decay,
            logging_steps=1,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            use_cpu=True,
            max_length=recipe.max_length,
            packing=False,
            completion_only_loss=True,
            seed=recipe.seed,
            # load_for_training set up the recipe's checkpointing on the model, as for ours
            gradient_checkpointing=False,
            # SFTConfig defaults to bf16 autocast; compute in the recipe's dtype, as ours does
            bf16=str(compute_dtype(recipe)) == "torch.bfloat16",
            data_seed=recipe.seed,
            dataloader_num_workers=0,
        )
        from transformers import set_seed

        set_seed(recipe.seed)
        model = load_for_training(recipe, checkpoint, False)
        trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer)
        tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
        started = time.monotonic()
        trainer.train()
        seconds = time.monotonic() - started
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "engine": engine,
        "seconds": seconds,
        "tokens": tokens,
        "losses": losses,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, help="rows per pass (default: the default recipe's)")
    parser.add_argument("--grad-accum", type=int, help="passes per optimizer step (default: the recipe's)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of the runs; ratios are paired within a round, then the median",
    )
    parser.add_argument(
        "--allocators",
        default=",".join(ALLOCATORS),
        help="our runs' training.cpu_allocator settings, comma-separated (default: all)",
    )
    parser.add_argument(
        "--compute-dtype",
        choices=["auto", "bf16", "fp32"],
        help="both engines' (default: the recipe's, auto)",
    )
    parser.add_argument("--cpu-allocator", choices=ALLOCATORS, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir")
    parser.add_argument("--data-dir", default=str(REPO.parent / "shared" / "data"))
    parser.add_argument(
        "--estimate", action="store_true", help="print what the bench will cost here, and exit"
    )
    parser.add_argument("--worker", choices=["selectune", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--data-file", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(args.worker, args.checkpoint, Path(args.data_file), Path(args.out), args)
        Path(args.out, "bench.json").write_text(json.dumps(result))
        return 0

    from models.card import find_card
    from models.store import read_manifest
    from train.data import CleaningReport, clean, save_split, split
    from train.recipe import load_recipe
    from train.prepare import source_conversations

    settings = load_settings(cache_dir=args.cache_dir, data_dir=args.data_dir)
    card = find_card(args.model)
    manifest = read_manifest(card, settings.model_store)
    if manifest is None:
        print(
            f"bench-train: {card.name} is not provisioned; run `make models CARD={card.name}`",
            file=sys.stderr,
        )
        return 2
    recipe = bench_recipe(Path("unused.jsonl"), args)
    plan = runs([a for a in args.allocators.split(",") if a])
    if any(a not in ALLOCATORS for _, _, a in plan[:-1]):
        print(
            f"bench-train: --allocators takes {', '.join(ALLOCATORS)}; got {args.allocators}", file=sys.stderr
        )
        return 2
    default = load_recipe(REPO / "train" / "default.yaml")
    report = CleaningReport()
    train = split(
        clean(source_conversations(default, settings.resolved_data_dir, report), report),
        default.split,
        default.seed,
    )["train"][: args.examples]
    estimate = bench_estimate(settings, card, Path(manifest["checkpoint"]), recipe, train, plan, args.repeats)
    print("\n".join(estimate.lines()), flush=True)
    if args.estimate:
        return 0
    rounds: list[dict[str, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        save_split({"bench": train}, Path(tmp))
        for n in range(args.repeats):
            results = {}
            for label, engine, allocator in plan:
                out = Path(tmp) / f"{label}-{n}"
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    engine,
                    "--checkpoint",
                    manifest["checkpoint"],
                    "--data-file",
                    str(Path(tmp) / "bench.jsonl"),
                    "--out",
                    str(out),
                    "--batch-size",
                    str(recipe.training.batch_size),
                    "--grad-accum",
                    str(recipe.training.grad_accum),
                ]
                if allocator:
                    cmd += ["--cpu-allocator", allocator]
                if args.compute_dtype:
                    cmd += ["--compute-dtype", args.compute_dtype]
                started = time.monotonic()
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                results[label] = json.loads((out / "bench.json").read_text())
                results[label]["wall"] = time.monotonic() - started
            rounds.append(results)
    from train.trainer import compute_dtype

    t = recipe.training
    dtype = str(compute_dtype(recipe)).removeprefix("torch.")
    print(
        f"{card.name}: {len(train)} conversations, 1 epoch, batch {t.batch_size} x {t.grad_accum} "
        f"accumulated ({t.batch_size * t.grad_accum} per step), "
        f"max length {recipe.max_length}, NF4 + LoRA r={recipe.lora.r}, compute {dtype} for both; "
        f"{args.repeats} round(s), "
        "each engine in a fresh process"
    )
    printed = iter(estimate.costs)
    for n, results in enumerate(rounds, 1):
        for label, r in results.items():
            guess = next(printed).seconds + (estimate.loads[label] if n == 1 else 0.0)
            print(
                f"  round {n} {label:19s}: {r['seconds']:7.1f} s  {r['tokens']} tokens  "
                f"{r['tokens'] / r['seconds']:7.1f} tokens/s  peak RSS {r['peak_rss_gib']:.2f} GiB; "
                f"{r['wall']:.0f} s with its load against {guess:.0f} s estimated ({guess / r['wall']:.2f}x)"
            )
    for label, _, _ in plan[:-1]:
        speed = [
            (r[label]["tokens"] / r[label]["seconds"]) / (r["trl"]["tokens"] / r["trl"]["seconds"])
            for r in rounds
        ]
        memory = [r[label]["peak_rss_gib"] / r["trl"]["peak_rss_gib"] for r in rounds]
        each = (
            ""
            if len(rounds) == 1
            else (" (rounds: " + ", ".join(f"{a:.2f}x/{b:.2f}" for a, b in zip(speed, memory)) + ")")
        )
        print(
            f"  {label} against trl, median of rounds: speed-up {statistics.median(speed):.2f}x "
            f"tokens/s; peak memory ratio {statistics.median(memory):.2f}{each}"
        )
    from eval.estimate import checkpoint_shape
    from models.machine import calibration

    body = checkpoint_shape(card, Path(manifest["checkpoint"])).body
    rate = calibration(settings.cache_dir)["matmul_gflops"].get(dtype)
    for label in rounds[-1]:
        achieved = statistics.median(
            4 * body * r[label]["tokens"] / r[label]["seconds"] / 1e9 for r in rounds
        )
        print(
            f"  {label}: {achieved:.0f} GFLOP/s of model work (4 x {body / 1e6:.0f}M body parameters per real "
            "token: the forward pass and the activations' gradients; the frozen NF4 weights get none) = "
            + (
                f"{achieved / rate:.0%} of this machine's calibrated {dtype} rate ({rate:.0f} GFLOP/s, `make machine`)"
                if rate
                else f"no calibrated {dtype} rate here"
            )
        )
    for label, r in rounds[-1].items():
        print(f"  {label} loss: " + " ".join(f"{x:.3f}" for x in r["losses"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
