"""`gen` mode against OpenCompass, in one run: its own FewCLUE gen config and CLI with its
HuggingFacewithChatTemplate model class, and our runner, on the same model and items.

    make crosscheck-opencompass                       # qwen2.5-coder-0.5b, bustm dev, 160 items
    .venv/bin/python bench/crosscheck_opencompass.py --model smollm2-135m-instruct --limit 32

Prints both first-capital accuracies (OpenCompass's own evaluator against our
`accuracy_opencompass` column), the items whose first-capital prediction differs (must be 0),
the replies whose text differs, both wall times end to end (model load included; for
OpenCompass also its CLI start-up, printed separately from its own inference timing), and the
GFLOP/s our run achieved on the work it does (each prompt once, a prefix shared by a batch once,
each reply token once, the LM head at the last prompt position and at every reply token) against
this machine's calibrated fp32 rate (`make machine`), and the work with every prompt run whole.
Its estimate of both sides is printed first (`--estimate`: only that), and each side's measured
time against it at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import statistics
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from eval.backends.base import DEFAULT_BATCH_SIZE  # noqa: E402
from eval.backends import make_backend  # noqa: E402
from eval.backends.hf import HFBackend, shared_prefix_length  # noqa: E402
from eval.opencompass_crosscheck import compare, run_opencompass, write_workdir  # noqa: E402
from eval.results import open_results  # noqa: E402
from eval.runner import run_task  # noqa: E402
from eval.task import find_task, load_items  # noqa: E402
from models.card import find_card  # noqa: E402
from models.store import read_manifest  # noqa: E402
from core.settings import load_settings  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # imported by the tests too
from eval_speed import add_model_options, body_and_head  # noqa: E402  (bench/, the script's folder)

OPENCOMPASS_OVERHEAD_SECONDS = 18.0
"""OpenCompass's time besides its inference: its CLI's start, its evaluator, its summary (16-19 s
in three rounds measured here, docs/benchmarks.md)."""


def needed_gflop(
    backend: HFBackend, items, outputs: dict[str, str], max_new_tokens: int, batch_size: int
) -> tuple[float, float]:
    """(GFLOP our run does, GFLOP with every prompt run whole). The runner's chunks; in each, a
    prompt asked twice is generated once, as the backend does. Prompt tokens go through the body
    once, except a prefix shared by a batch, which runs once while it stays the same; reply
    tokens (their end-of-turn token counted, capped at max_new_tokens) through body and head; the
    head once more per prompt for the first token. `outputs`: each item's reply, by item id.
    The whole-prompt figure counts every item, as OpenCompass runs it."""
    body, head = body_and_head(backend.model)
    order = sorted(items, key=lambda i: (len(i.user), i.id))  # the runner's chunks

    def reply(item) -> int:
        ids = backend.tokenizer(outputs[item.id], add_special_tokens=False).input_ids
        return min(len(ids) + 1, max_new_tokens)

    prompt = full = replies = replies_all = generated = 0
    last = None
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        unique = {tuple(backend._encode(backend.render(i.messages(), i.raw()))): i for i in reversed(chunk)}
        seqs = list(unique)
        full += sum(len(backend._encode(backend.render(i.messages(), i.raw()))) for i in chunk)
        replies_all += sum(reply(i) for i in chunk)
        replies += sum(reply(i) for i in unique.values())
        generated += len(seqs)
        shared = shared_prefix_length(seqs)
        shared = shared if shared >= 2 else 0
        prompt += sum(map(len, seqs)) - shared * len(seqs)
        if shared and tuple(seqs[0][:shared]) != last:
            prompt += shared
            last = tuple(seqs[0][:shared])
    ours = 2 * body * prompt + 2 * head * generated + 2 * (body + head) * replies
    whole = 2 * body * full + 2 * head * len(items) + 2 * (body + head) * replies_all
    return ours / 1e9, whole / 1e9


def opencompass_cost(
    backend, shape, task, split: str, items: list, calibration: dict, batch_size: int, known
):
    """OpenCompass's inference at our fp32 rate, as its GenInferencer runs it: batches of
    `batch_size` prompts in the dataset's order, each row padded to the batch's longest prompt,
    no prefix shared, every batch decoding to its longest reply (`known`, the tokens of the
    replies seen before) or to max_new_tokens."""
    from eval.backends.hf import Batch
    from eval.estimate import DTYPE_BYTES, StageCost, batch_seconds

    rates = calibration["matmul_gflops"]["float32"], calibration["decode_gflops"]["float32"]
    steps = min(known, task.gen.max_new_tokens) if known is not None else task.gen.max_new_tokens
    seconds, tokens = 0.0, 0
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        width = max(len(backend._encode(backend.render(i.messages(), i.raw()))) for i in chunk)
        batch = Batch(len(chunk), len(chunk) * width, 1, steps, ())
        tokens += batch.tokens
        seconds += batch_seconds(
            batch, steps, shape, *rates, calibration["bandwidth_gbs"], DTYPE_BYTES["float32"]
        )
    bound = "at most " if known is None else ""
    return StageCost(
        "OpenCompass",
        f"{task.name}-{split} gen",
        f"{len(items)} items, {tokens} prompt tokens padded, every prompt whole, {bound}{steps} decoding steps a batch",
        seconds,
        upper_bound=known is None,
    )


def bench_estimate(
    settings, card, task, split: str, items: list, batch_size: int, checkpoint: Path, repeats: int
):
    """What the bench will cost here (eval/estimate.py): our side as `make select` counts it in
    fp32, OpenCompass's as `opencompass_cost` plus its fixed overhead; replies' lengths from a run
    of the model on the task in the runs directory's store, where there is one."""
    import dataclasses

    from core.store import open_read_only
    from eval import estimate as E
    from eval.learned import learned_note
    from models.machine import calibration as machine_calibration

    calibration = machine_calibration(settings.cache_dir)
    shape = E.checkpoint_shape(card, checkpoint)
    backend = make_backend(
        "hf", card, settings.model_store, batch_size=batch_size, lazy=True, dtype="float32"
    )
    db = settings.workspace.results_db
    conn = open_read_only(db) if db.is_file() else None
    try:
        ours = E.entry_cost(
            backend,
            shape,
            task,
            split,
            "gen",
            items,
            calibration,
            "float32",
            chunk_size=batch_size,
            conn=conn,
        )
        known = E.reply_tokens(conn, backend.tokenizer, card.name, task.name, "gen")
    finally:
        if conn is not None:
            conn.close()
    theirs = opencompass_cost(backend, shape, task, split, items, calibration, batch_size, known)
    theirs = dataclasses.replace(theirs, seconds=theirs.seconds + OPENCOMPASS_OVERHEAD_SECONDS)
    costs = [
        dataclasses.replace(c, entry=f"round {n}: {c.entry}")
        for n in range(1, repeats + 1)
        for c in (dataclasses.replace(ours, model="selectune"), theirs)
    ]
    load = E.load_seconds(shape, calibration["load_gbs"], 4)
    notes = [
        f"OpenCompass's side counts {OPENCOMPASS_OVERHEAD_SECONDS:.0f} s a round for its CLI and evaluator besides "
        "its inference at our rate; its own batching's overheads are not modelled",
        *learned_note(calibration, {"gen float32"}),
    ]
    return E.Estimate(
        "`make crosscheck-opencompass`",
        E.machine_line(calibration, "float32"),
        costs,
        {"selectune": load * repeats, "OpenCompass": load * repeats},
        notes,
        [] if task.limit else ["LIMIT=32 checks the first 32 items"],
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    parser.add_argument("--task", default="fewclue_bustm", choices=["fewclue_bustm", "fewclue_ocnli_fc"])
    parser.add_argument("--split", default="dev")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of both runs; the speed-up printed last is the median of the rounds'",
    )
    parser.add_argument(
        "--estimate", action="store_true", help="print what the bench will cost here, and exit"
    )
    parser.add_argument(
        "--runs-dir", help="a runs directory whose store gives the estimate the replies' lengths"
    )
    add_model_options(parser)
    args = parser.parse_args()
    settings = load_settings(cache_dir=args.cache_dir, data_dir=args.data_dir, runs_dir=args.runs_dir)
    card, task = find_card(args.model), find_task(args.task)
    if card.chat_template != "tokenizer":
        print(
            f"crosscheck: {card.name} has no chat template; this check drives OpenCompass's chat model class",
            file=sys.stderr,
        )
        return 2
    manifest = read_manifest(card, settings.model_store)
    if manifest is None:
        print(f"crosscheck: {card.name} is not provisioned; run `make models`", file=sys.stderr)
        return 2
    if args.limit:
        task = task.model_copy(update={"limit": args.limit})
    items = load_items(task, args.split, settings.resolved_data_dir)
    estimate = bench_estimate(
        settings, card, task, args.split, items, args.batch_size, Path(manifest["checkpoint"]), args.repeats
    )
    print("\n".join(estimate.lines()), flush=True)
    if args.estimate:
        return 0

    rounds = []
    for n in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            backend = make_backend(
                "hf", card, settings.model_store, batch_size=args.batch_size, prepack=not args.no_prepack
            )
            loaded = time.perf_counter()
            ours = run_task(
                backend, task, args.split, "gen", items, open_results(Path(tmp)), chunk_size=args.batch_size
            )
            t_ours = time.perf_counter() - started
            t_ours_infer = time.perf_counter() - loaded
            backend_kernel = backend.identity["linear_kernel"]
            gflop, gflop_whole = needed_gflop(
                backend,
                items,
                {r["item_id"]: r["output"] for r in ours.items},
                task.gen.max_new_tokens,
                args.batch_size,
            )
            del backend
            workdir = Path(tmp) / "oc"
            abbr = write_workdir(
                workdir,
                settings.resolved_data_dir,
                Path(manifest["checkpoint"]),
                args.task,
                args.split,
                limit=args.limit,
                batch_size=args.batch_size,
                max_out_len=task.gen.max_new_tokens,
            )
            theirs = run_opencompass(workdir, abbr)
        order = {item.id: n for n, item in enumerate(items)}
        report = compare(sorted(ours.items, key=lambda r: order[r["item_id"]]), theirs)
        rounds.append((t_ours, t_ours_infer, theirs, report))
    n = report["items"]
    print(
        f"{card.name} on {task.name}-{args.split} gen, {n} items, batch {args.batch_size}, "
        f"{args.repeats} round(s) (each: ours, then OpenCompass); our linears: {backend_kernel}"
    )
    for k, (t_ours, t_ours_infer, theirs, report) in enumerate(rounds, 1):
        print(
            f"  round {k}: selectune {t_ours:6.1f} s ({t_ours_infer:.1f} s without its model load), "
            f"first-capital accuracy {report['selectune_accuracy_opencompass']:.4f}; OpenCompass "
            f"{theirs.seconds:6.1f} s (inference alone {theirs.infer_seconds:.1f} s), accuracy "
            f"{theirs.accuracy:.4f}; {theirs.seconds / t_ours:.2f}x end to end, "
            f"{theirs.infer_seconds / t_ours_infer:.2f}x inference against inference"
        )
        print(
            f"    first-capital predictions that differ: {report['differing_first_capital']}; replies "
            f"whose text differs: {report['differing_text']}; gold mismatches: {report['gold_mismatches']}"
        )
    end_to_end = statistics.median(r[2].seconds / r[0] for r in rounds)
    inference = statistics.median(r[2].infer_seconds / r[1] for r in rounds)
    print(f"  median speed-up {end_to_end:.2f}x end to end, {inference:.2f}x inference against inference")
    t_ours = statistics.median(r[0] for r in rounds)
    from models.machine import calibration

    peak = calibration(settings.cache_dir)["matmul_gflops"]["float32"]
    print(
        f"  our work {gflop:.0f} GFLOP at {gflop / t_ours:.0f} GFLOP/s (median time) = "
        f"{gflop / t_ours / peak:.0%} of this machine's calibrated fp32 rate (`make machine`: {peak:.0f} GFLOP/s); "
        f"{gflop_whole:.0f} GFLOP with every prompt run whole, as OpenCompass does"
    )
    for side, took in (
        ("selectune", sum(r[0] for r in rounds)),
        ("OpenCompass", sum(r[2].seconds for r in rounds)),
    ):
        guess = sum(c.seconds for c in estimate.costs if c.model == side) + estimate.loads[side]
        print(f"  estimate of {side}'s side {guess:.1f} s against {took:.1f} s measured: {took / guess:.2f}x")
    print(json.dumps(report))
    return (
        0 if all(r[3]["differing_first_capital"] == 0 and r[3]["gold_mismatches"] == 0 for r in rounds) else 1
    )


if __name__ == "__main__":
    raise SystemExit(main())
