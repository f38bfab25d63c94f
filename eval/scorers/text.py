"""Text checks and metrics any stage and any task can use: whether a reply has collapsed, and
the reply against its references (exact match, contains, regex, token and character F1,
ROUGE-L, BLEU, chrF, length), with declared normalisation."""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter


def degenerate(reply: str) -> str | None:
    """Why a reply looks collapsed, or None: empty, one character making up most of it, or a
    phrase looping (few distinct character pairs in a long reply)."""
    text = reply.strip()
    if not text:
        return "empty reply"
    if len(text) >= 8:
        top = max(text.count(c) for c in set(text))
        if top / len(text) > 0.5:
            return f"one character is {top / len(text):.0%} of the reply"
    if len(text) >= 40:
        pairs = [text[k : k + 2] for k in range(len(text) - 1)]
        if len(set(pairs)) / len(pairs) < 0.35:
            return f"a phrase repeats: {len(set(pairs))} distinct character pairs in {len(text)} characters"
    return None


# ---------------------------------------------------------------------------------------------
# Metrics any text task can name: the reply against one or more references.

NORMALIZERS = ("nfkc", "case", "punctuation", "articles", "whitespace", "numerals")
"""What `normalize:` in a task may list, applied in this order (to the reply and the references).
`[case, punctuation, articles, whitespace]` is the normalisation of SQuAD's and NQ-open's
official scorers (lower-case, punctuation out, the English articles a/an/the out, whitespace
collapsed); `punctuation` removes Unicode punctuation and ASCII's punctuation characters, as
MLQA's official scorer does."""

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")

_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_UNITS = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)


def normalize(text: str, steps) -> str:
    if "nfkc" in steps:
        text = unicodedata.normalize("NFKC", text)
    if "case" in steps:
        text = text.lower()
    if "punctuation" in steps:
        text = "".join(
            c for c in text if c not in _PUNCTUATION and not unicodedata.category(c).startswith("P")
        )
    if "articles" in steps:
        text = _ARTICLES.sub(" ", text)
    if "whitespace" in steps:
        text = " ".join(text.split())
    if "numerals" in steps:
        from eval.scorers.fact import chinese_numerals_to_digits

        text = chinese_numerals_to_digits(text)
    return text


def units(text: str) -> list[str]:
    """Chinese characters one by one, other words whole: what F1 and ROUGE-L count."""
    return _UNITS.findall(text)


def _f1(pred: list[str], ref: list[str]) -> float:
    common = sum((Counter(pred) & Counter(ref)).values())
    if not pred or not ref or not common:
        return float(pred == ref)
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class _UnitTokenizer:
    """rouge_score's tokenizer interface over `units` (its default drops Chinese characters)."""

    def tokenize(self, text: str) -> list[str]:
        return units(text)


def text_scores(metrics, reply: str, references: list[str], *, steps=(), pattern: str | None = None) -> dict:
    """The generic text metrics among `metrics`, the best over the references for each."""
    from eval import metrics as M

    out = {}
    reply = reply.strip()
    norm, refs = normalize(reply, steps), [normalize(r.strip(), steps) for r in references]
    wanted = set(metrics)
    if M.EXACT_MATCH in wanted:
        out[M.EXACT_MATCH] = float(any(norm == r for r in refs))
    if M.CONTAINS in wanted:
        out[M.CONTAINS] = float(any(r and r in norm for r in refs))
    if M.REGEX_MATCH in wanted:
        out[M.REGEX_MATCH] = float(re.search(pattern, reply) is not None)
    if M.TOKEN_F1 in wanted:
        out[M.TOKEN_F1] = max(_f1(norm.split(), r.split()) for r in refs)
    if M.CHAR_F1 in wanted:
        out[M.CHAR_F1] = max(
            _f1([c for c in norm if not c.isspace()], [c for c in r if not c.isspace()]) for r in refs
        )
    if M.ROUGE_L in wanted:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnitTokenizer())
        out[M.ROUGE_L] = max(scorer.score(r, norm)["rougeL"].fmeasure for r in refs)
    if M.BLEU in wanted:
        from sacrebleu.metrics import BLEU

        cjk = any(_CJK.search(t) for t in [norm, *refs])
        bleu = BLEU(tokenize="zh" if cjk else "13a", effective_order=True)
        out[M.BLEU] = bleu.sentence_score(norm, refs).score
    if M.CHRF in wanted:
        from sacrebleu.metrics import CHRF

        out[M.CHRF] = CHRF().sentence_score(norm, refs).score
    if M.REPLY_LENGTH in wanted:
        out[M.REPLY_LENGTH] = float(len(reply))
    return out
