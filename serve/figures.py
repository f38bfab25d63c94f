"""Serving figures of a running server: time to first token, output tokens/s, p50/p95 request
latency and throughput at concurrency 1 and N, from streamed chat requests."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from serve.stream import stream_chat


def _stream_one(
    client, model: str, messages: list[dict], max_tokens: int, usage_option: bool, extra: dict | None
) -> dict:
    started = time.perf_counter()
    first, chunks, usage = None, 0, None
    replies = stream_chat(
        client, model, messages, max_tokens=max_tokens, usage_option=usage_option, extra=extra
    )
    for kind, value in replies:
        if kind == "usage":
            usage = value
        else:
            chunks += 1
            first = first if first is not None else time.perf_counter()
    ended = time.perf_counter()
    tokens = usage["completion_tokens"] if usage and usage.get("completion_tokens") is not None else chunks
    return {"ttft_s": (first or ended) - started, "latency_s": ended - started, "output_tokens": tokens}


def serving_figures(
    base_url: str,
    model: str,
    conversations: list[list[dict]],
    *,
    max_tokens: int,
    concurrency: int,
    usage_option: bool = False,
    extra: dict | None = None,
) -> dict:
    """`extra`: the engine's own fields on every request (stream_chat)."""
    import httpx
    import numpy as np

    out = {}
    with httpx.Client(base_url=base_url, timeout=600.0) as client:
        _stream_one(client, model, conversations[0], 4, usage_option, extra)  # warm-up, not counted
        for level in sorted({1, concurrency}):
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=level) as pool:
                rows = list(
                    pool.map(
                        lambda m: _stream_one(client, model, m, max_tokens, usage_option, extra),
                        conversations,
                    )
                )
            wall = time.perf_counter() - started
            lat = np.array([r["latency_s"] for r in rows])
            ttft = np.array([r["ttft_s"] for r in rows])
            tokens = sum(r["output_tokens"] for r in rows)
            decode = [
                r["output_tokens"] / (r["latency_s"] - r["ttft_s"])
                for r in rows
                if r["output_tokens"] > 1 and r["latency_s"] > r["ttft_s"]
            ]
            out[str(level)] = {
                "requests": len(rows),
                "wall_s": round(wall, 3),
                "ttft_p50_s": round(float(np.percentile(ttft, 50)), 4),
                "latency_p50_s": round(float(np.percentile(lat, 50)), 4),
                "latency_p95_s": round(float(np.percentile(lat, 95)), 4),
                "output_tokens": tokens,
                "output_tokens_per_s_per_request": round(float(np.median(decode)), 2) if decode else None,
                "throughput_output_tokens_per_s": round(tokens / wall, 2),
                "throughput_requests_per_s": round(len(rows) / wall, 3),
            }
    return out
