"""A backend for tests: replies queued with `enqueue([...])`, or computed by `respond(request)`."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from eval.backends.base import GenRequest, LoglikelihoodRequest, cut_at_stop


class FakeBackend:
    def __init__(
        self,
        replies: list[str] | None = None,
        *,
        respond: Callable | None = None,
        loglikelihoods: list[float] | None = None,
        name: str = "fake",
    ):
        self.replies = deque(replies or [])
        self.loglikelihoods = deque(loglikelihoods or [])
        self.respond = respond
        self.identity = {"model": name, "backend": "fake"}
        self.calls: list[GenRequest | LoglikelihoodRequest] = []

    def enqueue(self, replies: list[str]) -> None:
        self.replies.extend(replies)

    def _next(self, request, queue: deque):
        self.calls.append(request)
        return self.respond(request) if self.respond else queue.popleft()

    def generate(self, requests: list[GenRequest]) -> list[str]:
        return [cut_at_stop(self._next(r, self.replies), r.stop) for r in requests]

    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[float]:
        return [self._next(r, self.loglikelihoods) for r in requests]
