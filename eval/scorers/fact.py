"""Scoring for the fact task: are the required facts in the answer, and are numbers made up?

Both texts are normalised first, so that 15GB = 15 GB = 15G = １５ＧＢ and 二十四小时 = 24小时:
NFKC (full-width to ASCII), Chinese numerals to digits (cn2an), lower case, no whitespace, and
unit spellings folded (g/gb, t/tb, 个小时/小时, h/小时).
- fact_recall: share of the item's required facts found in the reply;
- hallucinated_numbers: numbers in the reply that the reference does not contain.
Per-fact recall is aggregated by the summary from the per-item `fact:<fact>` entries.
"""

from __future__ import annotations

import re
import unicodedata
import warnings
from pathlib import Path

from eval import metrics as M
from eval.task import Item, TaskSpec

_UNITS = [
    (re.compile(r"(\d)个?(?:gb|g)(?![a-z])"), r"\1gb"),
    (re.compile(r"(\d)个?(?:tb|t)(?![a-z])"), r"\1tb"),
    (re.compile(r"(\d)(?:mb|m)(?![a-z])"), r"\1mb"),
    (re.compile(r"(\d)(?:个小时|小时|h|hours?)"), r"\1小时"),
    (re.compile(r"(\d)个(月|工作日)"), r"\1\2"),
    (re.compile(r"(\d)(?:人民币|元钱|块钱|块)"), r"\1元"),
]
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def normalise(text: str) -> str:
    import cn2an

    text = unicodedata.normalize("NFKC", text)
    with warnings.catch_warnings():  # cn2an warns on numeral runs it leaves alone ("千"): fine here
        warnings.simplefilter("ignore", UserWarning)
        try:
            text = cn2an.transform(text, "cn2an")
        except (ValueError, KeyError):  # and rejects a few odd ones outright: keep the text as is
            pass
    text = re.sub(r"\s+", "", text.lower())
    for pattern, repl in _UNITS:
        text = pattern.sub(repl, text)
    return text


def numbers(text: str) -> set[str]:
    return set(_NUMBER.findall(normalise(text)))


def fact_scores(reply: str, facts: list[str], reference: str) -> dict[str, float]:
    norm = normalise(reply)
    found = {f: float(normalise(f) in norm) for f in facts}
    return {
        M.FACT_RECALL: sum(found.values()) / len(facts) if facts else 0.0,
        M.HALLUCINATED_NUMBERS: float(len(numbers(reply) - numbers(reference))),
        **{f"fact:{f}": v for f, v in found.items()},
    }


def make_fact_scorer(task: TaskSpec, data_dir: Path):
    def score(item: Item, reply: str) -> dict[str, float]:
        return fact_scores(reply, list(item.fields["facts"]), item.gold)

    return score
