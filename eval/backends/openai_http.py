"""An OpenAI-compatible HTTP server as a backend (lmdeploy, vLLM, `transformers serve`, hosted).

Servers have surprising defaults (lmdeploy: max_tokens=16, temperature=0.7, top_k=40), so every
sampling parameter is sent explicitly: temperature 0, top_p 1, max_tokens, stop, seed.
Log-likelihood needs prompt logprobs (`/v1/completions` with echo); a server that returns none
is refused with a clear error rather than scored wrongly.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from eval.backends.base import GenRequest, LoglikelihoodRequest, cut_at_stop
from core.errors import UserError

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}


def greedy_sampling(seed: int) -> dict:
    """The sampling parameters every scoring request (generate, log-likelihood) sends."""
    return {"temperature": 0.0, "top_p": 1.0, "seed": seed}


def sampling_sha256(sampling: dict) -> str:
    """The hash a run's identity records of the sampling parameters its requests send."""
    import json

    from core.files import sha256_text

    return sha256_text(json.dumps(sampling, sort_keys=True))


class OpenAIBackend:
    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        concurrency: int = 4,
        timeout_s: float = 120.0,
        max_retries: int = 5,
        seed: int = 0,
        sampling: dict | None = None,
        render: Callable[[list[dict], str | None], str] | None = None,
        identity: dict | None = None,
        split_ids: Callable[[LoglikelihoodRequest], tuple[list[int], list[int]]] | None = None,
    ):
        """`base_url`: the server, with `concurrency` requests in flight (several servers of one
        model: the Ray executor's pool, eval/executor.py). `split_ids`: the model's own tokenization
        of a log-likelihood request, (context ids, continuation ids); with it the prompt is sent as
        token ids (lm-eval's tokenized requests), so the served model scores exactly the tokens the
        local one does."""
        import httpx

        self.base_url = base_url.rstrip("/")
        self.model = model
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.seed = seed
        self.render = render
        self.split_ids = split_ids
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)
        self.sampling = dict(sampling) if sampling is not None else greedy_sampling(seed)
        # What the requests send, hashed here, so a run's identity changes with any sent value.
        self.identity = {
            "backend": "openai",
            "model": model,
            "base_url": self.base_url,
            **(identity or {}),
            "sampling_sha256": sampling_sha256(self.sampling),
        }

    def _post(self, path: str, body: dict) -> dict:
        import httpx

        client, url = self.client, self.base_url
        for attempt in range(self.max_retries + 1):
            try:
                response = client.post(path, json=body)
                if response.status_code not in _RETRY_STATUS:
                    response.raise_for_status()
                    try:
                        return response.json()
                    except ValueError:
                        raise UserError(f"{url}{path}: the reply is not JSON") from None
                problem = f"HTTP {response.status_code}"
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}: {exc}"
            except httpx.HTTPStatusError as exc:
                text = " ".join(exc.response.text.split())[:200]
                raise UserError(f"{url}{path}: HTTP {exc.response.status_code}: {text}") from None
            if attempt == self.max_retries:
                raise UserError(f"{url}{path}: gave up after {attempt + 1} tries ({problem})")
            delay = min(0.5 * 2**attempt, 30.0)
            print(
                f"selectune: {url}{path}: {problem}; retrying in {delay:.1f} s "
                f"({attempt + 1}/{self.max_retries})",
                file=sys.stderr,
            )
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _map(self, fn, requests):
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(fn, requests))

    def chat(
        self,
        messages: list[dict],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> tuple[str, dict]:
        """One chat completion with every sampling parameter sent: (text, the server's usage or {})."""
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_tokens,
            "seed": self.seed if seed is None else seed,
            "n": 1,
            "stream": False,
        }
        if stop:
            body["stop"] = stop
        reply = self._post("/v1/chat/completions", body)
        try:
            text = reply["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError):
            raise UserError(
                f"{self.base_url}/v1/chat/completions: a reply without choices[0].message"
            ) from None
        return cut_at_stop(text, stop or []), reply.get("usage") or {}

    def _chat(self, request: GenRequest) -> str:
        return self.chat(
            request.messages,
            max_tokens=request.max_new_tokens,
            stop=request.stop,
            temperature=self.sampling["temperature"],
            top_p=self.sampling["top_p"],
            seed=self.sampling["seed"],
        )[0]

    def generate(self, requests: list[GenRequest]) -> list[str]:
        return self._map(self._chat, requests)

    def _loglikelihood_ids(self, request: LoglikelihoodRequest) -> float:
        ctx, cont = self.split_ids(request)
        body = {
            "model": self.model,
            "prompt": [*ctx, *cont],
            "max_tokens": 1,
            "echo": True,
            "logprobs": 1,
            **self.sampling,
        }
        values = (self._post("/v1/completions", body)["choices"][0].get("logprobs") or {}).get(
            "token_logprobs"
        )
        if (
            not values
            or len(values) < len(ctx) + len(cont)
            or any(v is None for v in values[len(ctx) :][: len(cont)])
        ):
            raise UserError(
                f"{self.base_url}: the server returns no prompt logprobs, so `ppl` mode "
                "cannot be scored through it; use `gen` mode"
            )
        return float(sum(values[len(ctx) : len(ctx) + len(cont)]))

    def _loglikelihood(self, request: LoglikelihoodRequest) -> float:
        if self.split_ids is not None:
            return self._loglikelihood_ids(request)
        context = self.render(request.messages, request.raw)
        body = {
            "model": self.model,
            "prompt": context + request.continuation,
            "max_tokens": 1,
            "echo": True,
            "logprobs": 1,
            **self.sampling,
        }
        choice = self._post("/v1/completions", body)["choices"][0]
        logprobs = choice.get("logprobs") or {}
        offsets, values = logprobs.get("text_offset"), logprobs.get("token_logprobs")
        if not offsets or not values:
            raise UserError(
                f"{self.base_url}: the server returns no prompt logprobs, so `ppl` mode "
                "cannot be scored through it; use `gen` mode"
            )
        # Prompt tokens starting at or after the context's end are the continuation; the one
        # generated token (max_tokens=1) sits beyond the prompt and is left out.
        end = len(context) + len(request.continuation)
        if len(context) not in offsets:
            # A token straddles the context/continuation boundary: the sum would leave part of
            # the continuation out (an empty sum scores as certainty), so refuse instead.
            raise UserError(
                f"{self.base_url}: no token starts where the continuation "
                f"{request.continuation!r} does; cannot score it from prompt logprobs"
            )
        return float(sum(v for off, v in zip(offsets, values) if len(context) <= off < end))

    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[float]:
        if self.render is None and self.split_ids is None:
            raise UserError(
                f"{self.base_url}: log-likelihood needs the model's prompt renderer "
                "(its chat template); use `gen` mode"
            )
        return self._map(self._loglikelihood, requests)
