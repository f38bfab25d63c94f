"""A loopback OpenAI-compatible server for client tests, answering from a real local model.

It records every request body, can fail the first N requests with 503, and can withhold
logprobs, so the client's pinning, retries and refusals are checked over real HTTP.
"""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from eval.backends.base import GenRequest


class StubState:
    def __init__(
        self, backend, *, fail_first: int = 0, logprobs: bool = True, models: tuple[str, ...] = ("stub",)
    ):
        self.backend = backend
        self.models = models
        self.fail_first = fail_first
        self.logprobs = logprobs
        self.bodies: list[dict] = []
        self.lock = threading.Lock()

    def completion_logprobs(self, prompt: str) -> dict:
        import torch

        tok, model = self.backend.tokenizer, self.backend.model
        enc = tok(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc.input_ids
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        values = [None] + [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]
        return {
            "text_offset": [s for s, _ in enc.offset_mapping] + [len(prompt)],
            "token_logprobs": values + [-1.0],
            "tokens": [tok.decode([i]) for i in ids] + ["x"],
        }


class Handler(BaseHTTPRequestHandler):
    """Answers from the StubState its server carries (`server.state`)."""

    def log_message(self, *args):
        pass

    def _send(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        state = self.server.state
        if self.path == "/v1/models":
            return self._send(
                200, {"object": "list", "data": [{"id": m, "object": "model"} for m in state.models]}
            )
        self._send(404, {"error": "no such route"})

    def do_POST(self):
        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with state.lock:
            state.bodies.append(body)
            if state.fail_first > 0:
                state.fail_first -= 1
                return self._send(503, {"error": "warming up"})
            if self.path == "/v1/chat/completions":
                text = state.backend.generate([GenRequest(body["messages"], body["max_tokens"])])[0]
                return self._send(200, {"choices": [{"message": {"role": "assistant", "content": text}}]})
            if self.path == "/v1/completions":
                lp = state.completion_logprobs(body["prompt"]) if state.logprobs else None
                return self._send(200, {"choices": [{"text": "x", "logprobs": lp}]})
        self._send(404, {"error": "no such route"})


def serve(state: StubState):
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.state = state
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@contextmanager
def answering(respond, **options):
    """A stub server whose replies are `respond(request)` (a FakeBackend's): (its state, its URL),
    shut down on leaving."""
    from eval.backends import make_backend

    server, url = serve(state := StubState(make_backend("fake", respond=respond), **options))
    try:
        yield state, url
    finally:
        server.shutdown()
