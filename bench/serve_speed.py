"""Serving speed: vLLM's CPU engine against `transformers serve`, on the same requests, in one run.

    make bench-serve
    .venv/bin/python bench/serve_speed.py --model qwen2.5-coder-0.5b-instruct --requests 8 --max-tokens 32

Each engine serves the same checkpoint in fp32 (the card's provisioned one, or --checkpoint) on
127.0.0.1 and gets the same streamed greedy chat requests (the first prompts of the default
suite's free-text tasks), at concurrency 1 and N, after one warm-up request; then it is stopped. Prints, per engine
and level, time to first token, latency p50/p95 and output tokens/s, then the ratios that matter:
each engine's throughput at N against 1, and vLLM's against `transformers serve`'s at each level.
Start-up times are printed too (not part of the throughput).
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
    args = parser.parse_args()

    settings = load_settings(cache_dir=args.cache_dir, data_dir=args.data_dir)
    checkpoint = args.checkpoint
    if checkpoint is None:
        manifest = read_manifest(find_card(args.model), settings.model_store)
        if manifest is None:
            sys.exit(f"bench-serve: {args.model} is not provisioned; run `make models CARD={args.model}`")
        checkpoint = Path(manifest["checkpoint"])
    conversations = prompts(str(settings.resolved_data_dir), args.requests)
    print(
        f"bench-serve: {checkpoint} in fp32, {len(conversations)} requests of {args.max_tokens} tokens, "
        f"concurrency 1 and {args.concurrency}; {cpu_line()}"
    )
    builders = {"vllm": vllm_engine, "transformers": transformers_engine}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.engines.split(","):
            engine = builders[name](checkpoint)
            if name == "vllm":
                engine.env.update(kv.split("=", 1) for kv in args.vllm_env)
            started = time.perf_counter()
            with launch(engine, Path(tmp) / f"{name}.log", timeout_s=900) as server:
                start_s = time.perf_counter() - started
                figures = serving_figures(
                    server.base_url,
                    server.model_name,
                    conversations,
                    max_tokens=args.max_tokens,
                    concurrency=args.concurrency,
                    usage_option=name == "vllm",
                )
            results[name] = {"start_s": round(start_s, 1), "levels": figures}
            print(f"{name}: started in {start_s:.0f} s")
            for level, f in figures.items():
                print(
                    f"  concurrency {level}: TTFT p50 {f['ttft_p50_s'] * 1000:.0f} ms, latency p50 "
                    f"{f['latency_p50_s']:.2f} s p95 {f['latency_p95_s']:.2f} s, {f['output_tokens']} tokens, "
                    f"throughput {f['throughput_output_tokens_per_s']:.1f} tokens/s"
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
