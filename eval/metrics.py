"""Metric names (constants, never retyped strings) and the per-item metrics for choice tasks."""

from __future__ import annotations

ACCURACY = "accuracy"
ACCURACY_OPENCOMPASS = "accuracy_opencompass"
UNPARSABLE = "unparsable"
STYLE_ACCURACY = "style_accuracy"
CHRF = "chrf"
REPLY_LENGTH = "reply_length"
STYLE_JUDGE = "style_judge"
"""1 when an LLM judge hears the requested style in the reply (optional; needs a judge endpoint)."""
FACT_RECALL = "fact_recall"
HALLUCINATED_NUMBERS = "hallucinated_numbers"

BINARY = {ACCURACY, ACCURACY_OPENCOMPASS, UNPARSABLE, STYLE_ACCURACY, STYLE_JUDGE}
"""Per-item 0/1 metrics: compared between models with exact McNemar tests."""

HIGHER_IS_BETTER = {ACCURACY: True, ACCURACY_OPENCOMPASS: True, UNPARSABLE: False,
                    STYLE_ACCURACY: True, STYLE_JUDGE: True, CHRF: True, REPLY_LENGTH: True, FACT_RECALL: True,
                    HALLUCINATED_NUMBERS: False}

KNOWN = set(HIGHER_IS_BETTER)


def is_better(metric: str, diff: float) -> bool:
    """Whether a difference a - b in `metric` favours a."""
    return diff > 0 if HIGHER_IS_BETTER[metric] else diff < 0
