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

from eval_speed import add_model_options, body_and_head  # noqa: E402  (bench/, the script's folder)


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
    add_model_options(parser)
    args = parser.parse_args()
    settings = load_settings(cache_dir=args.cache_dir, data_dir=args.data_dir)
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
    print(json.dumps(report))
    return (
        0 if all(r[3]["differing_first_capital"] == 0 and r[3]["gold_mismatches"] == 0 for r in rounds) else 1
    )


if __name__ == "__main__":
    raise SystemExit(main())
