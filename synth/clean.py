"""Filters between the teacher and the training file, each counted with examples for the report.

Question filters run on what the expand step wrote: length, language, exact duplicates and near
duplicates (cosine of character 1-2-gram count vectors, which suits Chinese: no word
segmentation needed; without IDF weights, so two texts' similarity does not depend on the batch),
both against the seeds and among the new items; optionally, that a question is one. Answer
filters run once answers exist: format (empty, a refusal or meta-talk, a bare echo of the
question, numbers the context does not hold)
and leaks (most of a seed's answer copied verbatim). A degenerate answer (a looping phrase) is
caught by the trainer's own collapse check.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from difflib import SequenceMatcher

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_PUNCT = re.compile(r"[\W_]+", re.U)
_META = re.compile(
    r"作为(?:一个)?(?:AI|人工智能|语言模型)|I'm an AI|as an AI|我无法|抱歉，我不能|以下是"
    r"|示例\d|^\d+[.、]",
    re.I,
)
EXAMPLES = 3


@dataclass
class CleanSpec:
    min_chars: int = 4
    max_question_chars: int = 200
    max_answer_chars: int = 400
    min_cjk_ratio: float = 0.3
    """Share of CJK characters among letters and CJK characters; 0 turns the filter off."""
    near_duplicate: float = 0.75
    """Cosine similarity of character 1-2-gram vectors at or above which an item is a near duplicate."""
    leak_fraction: float = 0.8
    """An answer that copies, in one run, this share of a seed's answer leaks that answer."""
    leak_min_chars: int = 1
    """Seed answers shorter than this are not checked for leaks (a one-word riddle answer is no leak)."""
    similarity: str = "chars"
    """`chars`: character 1-2-grams (Chinese); `words`: word 1-2-grams (English and other spaced text)."""
    require_question: bool = False
    """Questions must end in a question mark (a teacher asked for questions may copy statements)."""
    numbers_from: str | None = None
    """Text every number in an answer must come from (the fact context); None: not checked."""


@dataclass
class Report:
    removed: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[dict]] = field(default_factory=dict)

    def drop(self, reason: str, item: dict, why: str = "") -> None:
        self.removed[reason] = self.removed.get(reason, 0) + 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES:
            shown.append(
                {**{k: item[k] for k in ("question", "answer") if k in item}, **({"why": why} if why else {})}
            )


def norm(text: str) -> str:
    """Text as compared for exact duplicates: NFKC, lower case, no whitespace or punctuation."""
    return _PUNCT.sub("", unicodedata.normalize("NFKC", text).lower())


def strip_article(text: str) -> str:
    """An English answer without its leading article: "a light" and "light" name the same thing."""
    return re.sub(r"^\s*(?:a|an|the)\s+", "", text, flags=re.I)


def cjk_ratio(text: str) -> float:
    letters = [c for c in text if c.isalpha() or _CJK.match(c)]
    return sum(bool(_CJK.match(c)) for c in letters) / len(letters) if letters else 0.0


def clean_questions(items: list[dict], seeds: list[dict], spec: CleanSpec, report: Report) -> list[dict]:
    kept = []
    for item in items:
        q = item["question"]
        if not spec.min_chars <= len(q) <= spec.max_question_chars:
            report.drop("length", item, f"{len(q)} characters")
        elif spec.min_cjk_ratio and cjk_ratio(q) < spec.min_cjk_ratio:
            report.drop("language", item, f"CJK share {cjk_ratio(q):.2f}")
        elif spec.require_question and not q.rstrip().endswith(("？", "?")):
            report.drop("not_a_question", item)
        else:
            kept.append(item)
    seen = {norm(s["question"]) for s in seeds}
    unique = []
    for item in kept:
        key = norm(item["question"])
        if key in seen:
            report.drop("exact_duplicate", item)
        else:
            seen.add(key)
            unique.append(item)
    return _drop_near_duplicates(unique, seeds, spec, report)


def similarities(a: list[str], b: list[str], unit: str = "chars"):
    """Cosine similarity of every text in a with every text in b (character or word 1-2-gram counts)."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    if unit == "words":
        vectorizer = TfidfVectorizer(analyzer="word", ngram_range=(1, 2), use_idf=False, lowercase=True)
        vectors = vectorizer.fit_transform(a + b)
    else:
        vectorizer = TfidfVectorizer(analyzer="char", ngram_range=(1, 2), use_idf=False)
        vectors = vectorizer.fit_transform([norm(t) or t for t in a + b])
    return (vectors[: len(a)] @ vectors[len(a) :].T).toarray()  # rows are L2-normalised


def _drop_near_duplicates(
    items: list[dict], seeds: list[dict], spec: CleanSpec, report: Report
) -> list[dict]:
    if not items:
        return items
    texts = [s["question"] for s in seeds] + [i["question"] for i in items]
    sims = similarities(texts, texts, spec.similarity)
    n_seeds = len(seeds)
    kept_rows: list[int] = list(range(n_seeds))
    out = []
    for k, item in enumerate(items):
        row = n_seeds + k
        best = max(kept_rows, key=lambda j: sims[row, j]) if kept_rows else None
        if best is not None and sims[row, best] >= spec.near_duplicate:
            what = "seed" if best < n_seeds else "earlier item"
            report.drop("near_duplicate", item, f"cosine {sims[row, best]:.2f} with {what} “{texts[best]}”")
            continue
        kept_rows.append(row)
        out.append(item)
    return out


def _longest_common(a: str, b: str) -> int:
    return SequenceMatcher(None, a, b, autojunk=False).find_longest_match(0, len(a), 0, len(b)).size


def _leak(answer: str, seed_answers: list[str], fraction: float) -> str | None:
    for seed in seed_answers:
        run = _longest_common(answer, seed)
        if run >= max(fraction * len(seed), 1):
            return f"copies {run} of the {len(seed)} characters of the seed answer “{seed}”"
    return None


def clean_answers(items: list[dict], seeds: list[dict], spec: CleanSpec, report: Report) -> list[dict]:
    from eval.scorers.fact import numbers
    from eval.scorers.text import degenerate

    allowed = numbers(spec.numbers_from) if spec.numbers_from is not None else None
    seed_answers = [s["answer"] for s in seeds if len(s.get("answer") or "") >= spec.leak_min_chars]
    out = []
    for item in items:
        a, q = item["answer"], item["question"]
        if len(a) < spec.min_chars or len(a) > spec.max_answer_chars:
            report.drop("answer_format", item, f"answer of {len(a)} characters")
        elif why := degenerate(a):
            report.drop("answer_format", item, f"degenerate answer: {why}")
        elif _META.search(a):
            report.drop("answer_format", item, "meta-talk or a refusal instead of an answer")
        elif (
            norm(a) == norm(q) or norm(q) and norm(a).startswith(norm(q)) and len(norm(a)) < 2 * len(norm(q))
        ):
            report.drop("answer_format", item, "the answer repeats the question")
        elif allowed is not None and (extra := sorted(numbers(a) - allowed)):
            report.drop("answer_format", item, f"numbers not in the context: {', '.join(extra)}")
        elif (leak := _leak(a, seed_answers, spec.leak_fraction)) is not None:
            report.drop("seed_leak", item, leak)
        else:
            out.append(item)
    return out
