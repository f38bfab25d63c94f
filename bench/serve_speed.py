"""Serving speed: vLLM's CPU engine against `transformers serve`, on the same requests, in one run.

    make bench-serve
    .venv/bin/python bench/serve_speed.py --model qwen2.5-coder-0.5b-instruct --requests 8 --max-tokens 32

Each engine serves the same checkpoint in fp32 (the card's provisioned one, or --checkpoint) on
127.0.0.1 and gets the same streamed greedy chat requests (the first prompts of the default
suite's free-text tasks), at concurrency 1 and N, after one warm-up request, every reply decoded to
--max-tokens with the end token ignored (as vLLM's serving benchmark's --ignore-eos), so both
engines and the estimate count the same tokens; then it is stopped. Prints, per engine
and level, time to first token, latency p50/p95 and output tokens/s, then the ratios that matter:
each engine's throughput at N against 1, and vLLM's against `transformers serve`'s at each level.
Start-up times are printed too (not part of the throughput). Its estimate is printed first
(`--estimate`: only that), and each engine's measured time against it at the end; each engine's
start and its serving time over the estimate's are kept for the next estimate.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.settings import load_settings  # noqa: E402
from models.card import find_card  # noqa: E402
from models.store import read_manifest  # noqa: E402
from serve.engines import transformers_engine, vllm_engine  # noqa: E402
from serve.launcher import launch  # noqa: E402
from serve.figures import serving_figures  # noqa: E402
from models.machine import calibration as machine_calibration, record_server_start  # noqa: E402


def cpu_line() -> str:
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(fields.get("Flags", "").split())
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile") if f in flags]
    return (
        f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs, "
        f"flags {' '.join(wanted)}"
    )


def prompts(data_dir: str, count: int) -> list[list[dict]]:
    from eval.suite import DEFAULT_SUITE, load_suite
    from eval.task import load_items

    _, entries = load_suite(DEFAULT_SUITE)
    out: list[list[dict]] = []
    # free-text tasks first: a choice task's reply is a letter and an end token, too short to
    # measure decoding by
    for task, entry in sorted(entries, key=lambda te: te[0].parser == "choice"):
        if entry.mode == "gen":
            out += [i.messages() for i in load_items(task, entry.split, Path(data_dir))]
    return out[:count]


def exact_length(engine: str, max_tokens: int) -> dict:
    """The request fields that make `engine` decode `max_tokens` tokens whatever it predicts:
    vLLM's `ignore_eos`; `transformers serve` takes a generation config, whose `min_new_tokens`
    holds the end token back until then."""
    if engine == "vllm":
        return {"ignore_eos": True}
    return {"generation_config": json.dumps({"min_new_tokens": max_tokens})}


BATCHED = {"vllm": True, "transformers": False}
"""Whether the engine batches the requests in flight: `transformers serve` answers one at a time
on CPU (concurrency 4 at 0.94x concurrency 1, docs/benchmarks.md), vLLM batches them."""


def bench_estimate(
    settings, card, checkpoint: Path, conversations, engines, max_tokens: int, concurrency: int
):
    """What the bench will cost here (eval/estimate.py's cost model at the fp32 rate): per engine,
    its start (its last start of the card here, else a constant: serve/estimate.py), a warm-up
    request, then every request decoded to `max_tokens` (`exact_length`) at concurrency 1 and at
    `concurrency` (one batch of the requests in flight, or one at a time where the engine does
    not batch), times what this bench last measured of the engine here (`learn_serving`)."""
    from eval.backends import make_backend
    from eval.backends.hf import Batch
    from eval import estimate as E
    from eval.learned import learned_note
    from models.machine import calibration as machine_calibration
    from serve.estimate import server_start

    calibration = machine_calibration(settings.cache_dir)
    shape = E.checkpoint_shape(card, checkpoint)
    tokenizer = make_backend("hf", card, settings.model_store, lazy=True, checkpoint=checkpoint).tokenizer
    lengths = [E.prompt_tokens(tokenizer, m) for m in conversations]
    rates = (
        *(calibration[k]["float32"] for k in ("matmul_gflops", "decode_gflops")),
        calibration["bandwidth_gbs"],
    )

    def batched(part: list[int]) -> float:
        batch = Batch(len(part), len(part) * max(part), 1, max_tokens, ())
        return E.batch_seconds(batch, max_tokens, shape, *rates, 4)

    one = sum(E.decode_seconds(n, max_tokens, shape, rates, 4) for n in lengths)
    costs, loads, notes = [], {}, []
    for name in engines:
        start, source = server_start(settings.cache_dir, name, card.name)
        loads[name], notes = start, [*notes, source]
        factor = E.scoring_factor(calibration, "serve", name)
        many = (
            sum(batched(lengths[k : k + concurrency]) for k in range(0, len(lengths), concurrency))
            if BATCHED.get(name, False)
            else one
        )
        detail = f"{len(lengths)} requests of {max_tokens} tokens"
        costs += [
            E.StageCost(
                name, "warm-up", "1 request of 4 tokens", E.decode_seconds(lengths[0], 4, shape, rates, 4)
            ),
            E.StageCost(name, "concurrency 1", detail, one * factor),
        ]
        if concurrency > 1:  # serving_figures runs each level once
            costs.append(
                E.StageCost(
                    name,
                    f"concurrency {concurrency}",
                    f"{detail}, {'batched' if BATCHED.get(name) else 'one at a time'}",
                    many * factor,
                )
            )
    notes += learned_note(calibration, {f"serve {name}" for name in engines}) or [
        "each engine's serving at our backend's fp32 cost model: its own speed is not modelled until "
        "this bench has measured it here"
    ]
    return E.Estimate("`make bench-serve`", E.machine_line(calibration, "float32"), costs, loads, notes, [])


def learn_serving(cache_dir: Path, calibration: dict, estimate, name: str, figures: dict) -> float:
    """Keep `name`'s measured serving time (its timed levels' walls) over the estimate's (the
    factor it printed with taken out) as `serve <engine>`, which the next estimate of this bench
    multiplies by (eval/learned.py does the same for scoring); returns the factor kept."""
    import datetime

    from eval.estimate import scoring_factor
    from models.machine import record_measured

    levels = [c for c in estimate.costs if c.model == name and c.entry.startswith("concurrency ")]
    raw = sum(c.seconds for c in levels) / scoring_factor(calibration, "serve", name)
    measured = sum(f["wall_s"] for f in figures.values())
    factor = round(measured / raw, 3)
    requests = sum(f["requests"] for f in figures.values())
    entry = {"factor": factor, "requests": requests, "date": datetime.date.today().isoformat()}
    record_measured(cache_dir, "factors", f"serve {name}", entry)
    return factor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="a provisioned card")
    parser.add_argument("--checkpoint", type=Path, help="serve this directory instead of the card's")
    parser.add_argument("--engines", default="vllm,transformers")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--cache-dir")
    parser.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    parser.add_argument(
        "--vllm-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an environment variable for vLLM, e.g. VLLM_CPU_NUM_OF_RESERVED_CPU=0",
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--estimate", action="store_true", help="print what the bench will cost here, and exit"
    )
    args = parser.parse_args()

    settings = load_settings(cache_dir=args.cache_dir, data_dir=args.data_dir)
    checkpoint, card = args.checkpoint, find_card(args.model)
    if checkpoint is None:
        manifest = read_manifest(card, settings.model_store)
        if manifest is None:
            sys.exit(f"bench-serve: {args.model} is not provisioned; run `make models CARD={args.model}`")
        checkpoint = Path(manifest["checkpoint"])
    conversations = prompts(str(settings.resolved_data_dir), args.requests)
    engines = args.engines.split(",")
    estimate = bench_estimate(
        settings, card, checkpoint, conversations, engines, args.max_tokens, args.concurrency
    )
    print("\n".join(estimate.lines()), flush=True)
    if args.estimate:
        return 0
    calibration_here = machine_calibration(settings.cache_dir)
    print(
        f"bench-serve: {checkpoint} in fp32, {len(conversations)} requests of {args.max_tokens} tokens, "
        f"concurrency 1 and {args.concurrency}; {cpu_line()}"
    )
    builders = {"vllm": vllm_engine, "transformers": transformers_engine}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in engines:
            engine = builders[name](checkpoint)
            if name == "vllm":
                engine.env.update(kv.split("=", 1) for kv in args.vllm_env)
            started = time.perf_counter()
            with launch(engine, Path(tmp) / f"{name}.log", timeout_s=900) as server:
                start_s = time.perf_counter() - started
                if args.checkpoint is None:  # the card's own: the next estimate's start
                    record_server_start(settings.cache_dir, name, card.name, server.start_seconds)
                figures = serving_figures(
                    server.base_url,
                    server.model_name,
                    conversations,
                    max_tokens=args.max_tokens,
                    concurrency=args.concurrency,
                    usage_option=name == "vllm",
                    extra=exact_length(name, args.max_tokens),
                )
            if args.checkpoint is None:  # the card's own: the next estimate's decoding
                learn_serving(settings.cache_dir, calibration_here, estimate, name, figures)
            results[name] = {
                "start_s": round(start_s, 1),
                "wall_s": round(time.perf_counter() - started, 1),
                "levels": figures,
            }
            print(f"{name}: started in {start_s:.0f} s")
            for level, f in figures.items():
                print(
                    f"  concurrency {level}: TTFT p50 {f['ttft_p50_s'] * 1000:.0f} ms, latency p50 "
                    f"{f['latency_p50_s']:.2f} s p95 {f['latency_p95_s']:.2f} s, {f['output_tokens']} tokens, "
                    f"throughput {f['throughput_output_tokens_per_s']:.1f} tokens/s"
                )
    for name, r in results.items():
        guess = sum(c.seconds for c in estimate.costs if c.model == name) + estimate.loads[name]
        print(
            f"{name}: estimate {guess:.0f} s against {r['wall_s']:.0f} s measured (its stop included): "
            f"{r['wall_s'] / guess:.2f}x"
        )
    high = str(args.concurrency)
    print("ratios:")
    for name, r in results.items():
        one, many = (r["levels"][k]["throughput_output_tokens_per_s"] for k in ("1", high))
        print(f"  {name}: throughput at concurrency {high} / at 1 = {many / one:.2f}x")
    if {"vllm", "transformers"} <= set(results):
        for level in ("1", high):
            v, t = (
                results[n]["levels"][level]["throughput_output_tokens_per_s"]
                for n in ("vllm", "transformers")
            )
            print(f"  vllm / transformers at concurrency {level}: {v / t:.2f}x")
    if args.json:
        args.json.write_text(
            json.dumps({"cpu": cpu_line(), "checkpoint": str(checkpoint), **results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
