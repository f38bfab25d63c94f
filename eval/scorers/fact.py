"""Scoring for the fact task: are the required facts in the answer, and are numbers made up?

Both texts are normalised first, so that 15GB = 15 GB = 15G = １５ＧＢ and 二十四小时 = 24小时:
NFKC (full-width to ASCII), lower case, no whitespace, Chinese numeral runs before a unit to
digits (cn2an), and
unit spellings folded (g/gb, t/tb, 个小时/小时, h/小时).
- fact_recall: share of the item's required facts found in the reply;
- hallucinated_numbers: numbers in the reply that the reference does not contain.
Per-fact recall is aggregated by the summary from the per-item `fact:<fact>` entries.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from eval import metrics as M
from eval.task import Item, TaskSpec

_UNIT = r"(?:个)?(?:小时|分钟|天|周|月|年|日|号|元|块|折|台|次|倍|人|岁|%|gb|g|tb|t|mb|m)"
# Only numeral runs that count something are converted: "二十四小时" -> "24小时", "八折" -> "8折",
# while "一下", "一起", "统一" keep their 一 (converting those would invent numbers).
_CN_NUMBER = re.compile(r"[零〇一二两三四五六七八九十百千万]+(?=" + _UNIT + ")")
_UNITS = [
    (re.compile(r"(\d)个?(?:gb|g)(?![a-z])"), r"\1gb"),
    (re.compile(r"(\d)个?(?:tb|t)(?![a-z])"), r"\1tb"),
    (re.compile(r"(\d)(?:mb|m)(?![a-z])"), r"\1mb"),
    (re.compile(r"(\d)(?:个小时|小时|hours?|h)"), r"\1小时"),
    (re.compile(r"(\d)个(月|工作日)"), r"\1\2"),
    (re.compile(r"(\d)(?:人民币|元钱|块钱|块)"), r"\1元"),
]
_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def _to_digits(match: re.Match) -> str:
    import cn2an

    run = match.group(0).replace("两", "二")
    try:
        return str(cn2an.cn2an(run, "smart"))
    except ValueError:  # not a well-formed numeral ("十十"): leave it as written
        return match.group(0)


def chinese_numerals_to_digits(text: str) -> str:
    """Chinese numeral runs that count something (before a unit) as digits: 二十四小时 -> 24小时."""
    return _CN_NUMBER.sub(_to_digits, text)


def normalise(text: str) -> str:
    text = re.sub(r"\s+", "", unicodedata.normalize("NFKC", text).lower())
    text = _CN_NUMBER.sub(_to_digits, text)
    for pattern, repl in _UNITS:
        text = pattern.sub(repl, text)
    return text


def numbers(text: str) -> set[str]:
    return set(_NUMBER.findall(normalise(text)))


def facts_found(reply: str, facts: list[str]) -> dict[str, float]:
    """1.0 for each fact present in the reply after normalisation, else 0.0."""
    norm = normalise(reply)
    return {f: float(normalise(f) in norm) for f in facts}


def fact_scores(reply: str, facts: list[str], reference: str) -> dict[str, float]:
    found = facts_found(reply, facts)
    return {
        M.FACT_RECALL: sum(found.values()) / len(facts) if facts else 0.0,
        M.HALLUCINATED_NUMBERS: float(len(numbers(reply) - numbers(reference))),
        **{f"fact:{f}": v for f, v in found.items()},
    }


def make_fact_scorer(task: TaskSpec, data_dir: Path):
    def score(item: Item, reply: str) -> dict[str, float]:
        return fact_scores(reply, list(item.fields["facts"]), item.gold)

    return score
