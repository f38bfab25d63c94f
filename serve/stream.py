"""The one streaming client for an OpenAI-compatible chat endpoint (chat, serving figures)."""

from __future__ import annotations

import json
from collections.abc import Iterator

from core.errors import UserError

SAMPLING = {"temperature": 0.0, "top_p": 1.0, "seed": 0}
"""Pinned on every request (lmdeploy defaults to temperature 0.7, top_k 40, max_tokens 16)."""


def stream_chat(
    client,
    model: str,
    messages: list[dict],
    *,
    max_tokens: int,
    usage_option: bool = False,
    extra: dict | None = None,
) -> Iterator[tuple[str, object]]:
    """("delta", text) for every piece of the reply, ("usage", dict) when the server reports it.
    `client` is an httpx.Client whose base_url is the server's; `extra`: the engine's own request
    fields (vLLM's `ignore_eos`, for one)."""
    body = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "n": 1,
        **SAMPLING,
        **(extra or {}),
    }
    if usage_option:
        body["stream_options"] = {"include_usage": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise UserError(
                f"{client.base_url}/v1/chat/completions: HTTP {response.status_code}: "
                f"{' '.join(response.text.split())[:200]}"
            )
        for line in response.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            event = json.loads(line[5:])
            if event.get("usage"):
                yield "usage", event["usage"]
            for choice in event.get("choices") or []:
                if piece := (choice.get("delta") or {}).get("content"):
                    yield "delta", piece
