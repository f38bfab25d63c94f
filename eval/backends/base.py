"""The protocol every backend implements, and nothing else: generate and loglikelihood."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

DEFAULT_BATCH_SIZE = 16
"""Rows a local model runs at once, and the unit of work a run commits. 16 rather than 8: on a
2-core CPU a decode step costs nearly the same at 16 rows as at 8 (it reads every weight either
way; docs/benchmarks.md)."""


@dataclass(frozen=True)
class GenRequest:
    messages: list[dict]
    max_new_tokens: int
    stop: list[str] = field(default_factory=list)
    raw: str | None = None
    """The prompt for a model without a chat template; None: the messages' contents joined."""


@dataclass(frozen=True)
class LoglikelihoodRequest:
    messages: list[dict]
    """The context, rendered exactly as for generation (chat template and generation prompt)."""
    continuation: str
    raw: str | None = None
    """The context for a model without a chat template; None: the messages' contents joined."""


class Backend(Protocol):
    identity: dict
    """What makes results reproducible: model, weights hash, chat template hash, dtype..."""

    def generate(self, requests: list[GenRequest]) -> list[str]:
        """Greedy replies, one per request, cut at the first stop string."""
        ...

    def loglikelihood(self, requests: list[LoglikelihoodRequest]) -> list[float]:
        """Sum of log-probabilities of each continuation's tokens given its context."""
        ...


def cut_at_stop(text: str, stop: list[str]) -> str:
    cuts = [i for s in stop if (i := text.find(s)) >= 0]
    return text[: min(cuts)] if cuts else text
