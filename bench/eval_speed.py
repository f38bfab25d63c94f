"""`ppl` scoring speed: our transformers backend against lm-eval's `hf` backend, in one run.

    make bench-eval
    .venv/bin/python bench/eval_speed.py --model qwen2.5-coder-0.5b-instruct --task fewclue_bustm

Both score the same items of the same task with the same converted checkpoint, each timed end
to end (model load included). Prints items/s for each and their ratio, both accuracies, the
number of items whose prediction differs (must be 0), and our achieved GFLOP/s against this
machine's calibrated fp32 rate (`make machine`, models/machine.py) (counting only the FLOPs we need: the model body on
every real token, a context prefix that a batch shares once, the LM head only where a score
is read). Its estimate of both sides is printed first, and each side's measured time against it
at the end.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.backends.base import LoglikelihoodRequest  # noqa: E402
from eval.backends import make_backend  # noqa: E402
from eval.lm_eval_export import export_task, run_lm_eval  # noqa: E402
from eval.results import open_results  # noqa: E402
from eval.runner import run_task  # noqa: E402
from eval.task import find_task, load_items  # noqa: E402
from models.card import find_card  # noqa: E402
from models.store import read_manifest  # noqa: E402
from core.settings import load_settings  # noqa: E402


def add_model_options(parser) -> None:
    """The options both reference-tool benches take: the kernel of our linears, and where the
    model store and the public data are."""
    parser.add_argument(
        "--no-prepack",
        action="store_true",
        help="run our fp32 linears through torch's default kernel (MKL's sgemm), as the "
        "reference tool does, instead of oneDNN with packed weights",
    )
    parser.add_argument("--cache-dir")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))


def body_and_head(model) -> tuple[int, int]:
    """Weights a token goes through (the embedding table is a lookup, not a matmul), and the LM
    head's. A prepacked linear (models/prepack.py) holds its weight outside `parameters()`."""
    config = model.config
    skip = {id(model.get_input_embeddings()), id(model.get_output_embeddings())}
    body = sum(p.numel() for m in model.modules() if id(m) not in skip for p in m.parameters(recurse=False))
    body += sum(
        m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
        for m in model.modules()
        if hasattr(m, "packed") and id(m) not in skip
    )
    return body, config.hidden_size * config.vocab_size


def needed_gflop(backend, chunks: list[list[LoglikelihoodRequest]]) -> float:
    """GFLOP of our work on the runner's chunks of requests: the body on every token once, except
    a context prefix shared by a batch, which runs once while it stays the same (the backend's
    prefix cache); the LM head where a score is read."""
    from eval.backends.hf import shared_prefix_length

    body, head = body_and_head(backend.model)
    tokens = scored = 0
    last = None
    for requests in chunks:
        rows = sorted(backend._rows(requests), key=lambda r: -len(r.ids))
        for start in range(0, len(rows), backend.batch_size):
            batch = rows[start : start + backend.batch_size]
            shared = shared_prefix_length([r.ids[: len(r.ids) - r.tail] for r in batch])
            shared = shared if shared >= 2 else 0
            tokens += sum(len(r.ids) - shared for r in batch)
            if shared and tuple(batch[0].ids[:shared]) != last:
                tokens += shared
                last = tuple(batch[0].ids[:shared])
            scored += sum(max(r.tail, 1) for r in batch)
    return (2 * body * tokens + 2 * head * scored) / 1e9


def lm_eval_tokens(tokenizer_only, task, items: list) -> int:
    """The tokens lm-eval's `hf` backend passes through the model for `ppl` on `items`: one pass
    over (context + continuation)[:-1] for each distinct one, as its Collator groups requests by it
    (a context shared by one-token continuations is run once, the logits cached)."""
    from eval.runner import backend_requests

    passes = set()
    for request in backend_requests(task, "ppl", items):
        context, continuation = tokenizer_only.split_ids(request)
        passes.add(tuple(context + continuation)[:-1])
    return sum(len(p) for p in passes)


def bench_estimate(settings, card, task, split: str, items: list, batch_size: int, checkpoint: Path):
    """What the bench will cost here (eval/estimate.py): our side as `make select` counts it in fp32;
    lm-eval's as the passes it must make (`lm_eval_tokens`), the head at every position, at the
    same rate."""
    from dataclasses import replace

    from eval import estimate as E
    from models.machine import calibration

    rates = calibration(settings.cache_dir)
    shape = E.checkpoint_shape(card, checkpoint)
    tokenizer_only = make_backend("hf", card, settings.model_store, batch_size=batch_size, lazy=True)
    ours = E.entry_cost(
        tokenizer_only, shape, task, split, "ppl", items, rates, "float32", chunk_size=batch_size
    )
    tokens = lm_eval_tokens(tokenizer_only, task, items)
    rate = rates["matmul_gflops"]["float32"] * 1e9 * E.FORWARD_EFFICIENCY
    seconds = 2 * (shape.body + shape.head) * tokens / rate
    theirs = E.StageCost(
        "lm-eval",
        f"{task.name}-{split} ppl",
        f"{len(items)} items, {tokens} tokens, the head at every one",
        seconds,
    )
    load = E.load_seconds(shape, rates["load_gbs"], 4)
    note = "lm-eval's side is the passes it must make at our rate: its own batching and overheads are not modelled"
    return E.Estimate(
        "`make bench-eval`",
        E.machine_line(rates, "float32"),
        [replace(ours, model="selectune"), theirs],
        {"selectune": load, "lm-eval": load},
        [note],
        [],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--task", default="fewclue_bustm")
    parser.add_argument("--split", default="dev")
    parser.add_argument("--batch-size", type=int, default=16)
    add_model_options(parser)
    args = parser.parse_args()
    settings = load_settings(cache_dir=args.cache_dir, data_dir=args.data_dir)
    card, task = find_card(args.model), find_task(args.task)
    manifest = read_manifest(card, settings.model_store)
    if manifest is None:
        print(f"bench-eval: {card.name} is not provisioned; run `make models`", file=sys.stderr)
        return 2
    items = load_items(task, args.split, settings.resolved_data_dir)
    from models.machine import calibration

    peak = calibration(settings.cache_dir)["matmul_gflops"]["float32"]  # measured once, before the timed runs
    estimate = bench_estimate(
        settings, card, task, args.split, items, args.batch_size, Path(manifest["checkpoint"])
    )
    print("\n".join(estimate.lines()), flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        backend = make_backend(
            "hf", card, settings.model_store, batch_size=args.batch_size, prepack=not args.no_prepack
        )
        ours = run_task(
            backend, task, args.split, "ppl", items, open_results(Path(tmp)), chunk_size=args.batch_size
        )
        t_ours = time.perf_counter() - started
        kernel = backend.identity["linear_kernel"]
        order = sorted(items, key=lambda i: (len(i.user), i.id))  # the runner's chunks
        chunks = [
            [
                LoglikelihoodRequest(i.messages(), c, i.raw())
                for i in order[k : k + args.batch_size]
                for c in task.choices
            ]
            for k in range(0, len(order), args.batch_size)
        ]
        gflop = needed_gflop(backend, chunks)
        del backend
        name = export_task(
            task, args.split, items, Path(tmp) / "lm_eval", chat=card.chat_template == "tokenizer"
        )
        started = time.perf_counter()
        theirs = run_lm_eval(
            manifest["checkpoint"],
            name,
            Path(tmp) / "lm_eval",
            chat_template=card.chat_template == "tokenizer",
            batch_size=args.batch_size,
        )
        t_theirs = time.perf_counter() - started

    acc = sum(r["scores"]["accuracy"] for r in ours.items) / len(ours.items)
    differ = sum(theirs.predictions[r["item_id"]] != r["parsed"] for r in ours.items)
    n = len(items)
    print(
        f"{card.name} on {task.name}-{args.split} ppl, {n} items, batch {args.batch_size}; our linears: {kernel}"
    )
    print(f"  selectune: {t_ours:6.1f} s  {n / t_ours:6.2f} items/s  accuracy {acc:.4f}")
    print(f"  lm-eval:   {t_theirs:6.1f} s  {n / t_theirs:6.2f} items/s  accuracy {theirs.accuracy:.4f}")
    print(f"  speed-up {t_theirs / t_ours:.2f}x; predictions that differ: {differ}")
    print(
        f"  our work {gflop:.0f} GFLOP at {gflop / t_ours:.0f} GFLOP/s = "
        f"{gflop / t_ours / peak:.0%} of this machine's calibrated fp32 rate (`make machine`: {peak:.0f} GFLOP/s)"
    )
    for side, took in (("selectune", t_ours), ("lm-eval", t_theirs)):
        guess = sum(c.seconds for c in estimate.costs if c.model == side) + estimate.loads[side]
        print(f"  estimate of {side}'s side {guess:.1f} s against {took:.1f} s measured: {took / guess:.2f}x")
    return 0 if differ == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
