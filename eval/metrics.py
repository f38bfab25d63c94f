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
EXACT_MATCH = "exact_match"
CONTAINS = "contains"
"""1 when a reference appears in the reply (after normalisation)."""
REGEX_MATCH = "regex_match"
"""1 when the task's `regex` is found in the reply."""
TOKEN_F1 = "token_f1"
"""F1 of whitespace tokens; SQuAD's with `normalize: [case, punctuation, articles, whitespace]`;
for Chinese, char_f1."""
CHAR_F1 = "char_f1"
ROUGE_L = "rouge_l"
"""ROUGE-L F-measure over Chinese characters and other words (rouge_score)."""
BLEU = "bleu"
"""sacrebleu's sentence BLEU, its Chinese tokeniser where either side has Chinese characters."""

CIRCULAR_ACCURACY = "circular_accuracy"
"""1 when every rotation of the options is answered right (a suite entry with `circular: true`)."""
LETTER_FOLLOWING = "letter_following"
"""1 when every rotation got the same letter although the content under it moved."""


def ranked_metric(task, mode: str, chosen: str | None = None) -> str:
    """The one rule for the metric an entry (or a check) is ranked and compared by: the one it
    names, else a circular summary's own first metric (eval/circular.py, either mode), else accuracy
    in `ppl` mode, else the task's first metric."""
    if chosen:
        return chosen
    return ACCURACY if mode == "ppl" and CIRCULAR_ACCURACY not in task.metrics else task.metrics[0]


BINARY = {
    ACCURACY,
    ACCURACY_OPENCOMPASS,
    UNPARSABLE,
    STYLE_ACCURACY,
    STYLE_JUDGE,
    EXACT_MATCH,
    CONTAINS,
    REGEX_MATCH,
    CIRCULAR_ACCURACY,
    LETTER_FOLLOWING,
}
"""Per-item 0/1 metrics: compared between models with exact McNemar tests."""

HIGHER_IS_BETTER = {
    ACCURACY: True,
    ACCURACY_OPENCOMPASS: True,
    UNPARSABLE: False,
    STYLE_ACCURACY: True,
    STYLE_JUDGE: True,
    CHRF: True,
    REPLY_LENGTH: True,
    FACT_RECALL: True,
    HALLUCINATED_NUMBERS: False,
    EXACT_MATCH: True,
    CONTAINS: True,
    REGEX_MATCH: True,
    TOKEN_F1: True,
    CHAR_F1: True,
    ROUGE_L: True,
    BLEU: True,
    CIRCULAR_ACCURACY: True,
    LETTER_FOLLOWING: False,
}

CHOICE = {ACCURACY, ACCURACY_OPENCOMPASS, UNPARSABLE}
"""Computed for tasks whose answer is one of their choices."""
REFERENCE = {EXACT_MATCH, CONTAINS, TOKEN_F1, CHAR_F1, ROUGE_L, BLEU, CHRF}
"""Computed for any text task with references (`reference_field`)."""
GENERIC_TEXT = REFERENCE | {REGEX_MATCH, REPLY_LENGTH}
"""What eval/scorers/text.py computes for any text task."""
SCORER_ONLY = {STYLE_ACCURACY, FACT_RECALL, HALLUCINATED_NUMBERS}
"""Computed only by a task's own scorer (style, fact)."""
CIRCULAR = [CIRCULAR_ACCURACY, LETTER_FOLLOWING]
"""Computed for a suite entry asked with `circular: true` (eval/circular.py), never named by a task."""

KNOWN = set(HIGHER_IS_BETTER)


def is_better(metric: str, diff: float) -> bool:
    """Whether a difference a - b in `metric` favours a."""
    return diff > 0 if HIGHER_IS_BETTER[metric] else diff < 0
