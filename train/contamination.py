"""The contamination gate: training conversations against every item they will be scored on.

Before training, each training conversation (task-derived, user files, synthesised) is compared
with the evaluation items of the selection's suite and the recipe's checks, field by field:

- n-gram containment: the share of an evaluation field's n-grams (UNIT_N units, where a unit is
  one CJK character or one Latin word or number, so the same n suits Chinese and English) found
  in the training conversation's text;
- near-duplicate cosine: TF-IDF over character 2-4-grams (scikit-learn) between the field and each
  turn of the conversation.

A pair at or over either `duplicate` threshold is a duplicate: the run stops with one line naming
both, unless the recipe sets `contamination.allow`. Pairs over the lower `overlap` thresholds are
counted and listed; their evaluation items are left out of the "clean subset" the before/after
page scores again. Which fields of an item are compared: the task's `contamination` list, else the
fields its prompt reads plus its reference field (docs/training.md).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

UNIT_N = 8
UNITS = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[^\W_\u3400-\u9fff\uf900-\ufaff]+")
"""One CJK ideograph, or a run of letters and digits (a word or a number)."""


@dataclass(frozen=True)
class EvalText:
    task: str
    split: str
    item_id: str
    field: str
    text: str


@dataclass
class Hit:
    train: str
    """The training conversation's source (`file:row` or `task:item`)."""
    eval: EvalText
    containment: float
    cosine: float


@dataclass
class GateResult:
    conversations: int
    eval_texts: int
    duplicates: list[Hit] = field(default_factory=list)
    overlaps: list[Hit] = field(default_factory=list)
    train_texts: dict[str, str] = field(default_factory=dict)
    """The flagged training conversations' text, by source, to show beside the evaluation text."""

    def flagged_items(self) -> dict[str, list[str]]:
        """{"task/split": [item ids]} of every evaluation item a duplicate or overlap touches."""
        out: dict[str, set[str]] = {}
        for hit in self.duplicates + self.overlaps:
            out.setdefault(f"{hit.eval.task}/{hit.eval.split}", set()).add(hit.eval.item_id)
        return {k: sorted(v) for k, v in sorted(out.items())}


def units(text: str) -> list[str]:
    return UNITS.findall(unicodedata.normalize("NFKC", text).lower())


SHORTEST = 4
"""Fields of fewer units (a label, a style name) are not compared; from SHORTEST up to UNIT_N units
a field is contained only where a whole turn of the conversation is that field (a common phrase
such as 可以试试 occurs inside many texts)."""


def ngrams(text: str, n: int = UNIT_N) -> set[tuple[str, ...]]:
    u = units(text)
    return {tuple(u[k : k + n]) for k in range(len(u) - n + 1)}


def compared_fields(task) -> list[str]:
    """The item fields a task's items are compared on: its own list, else what its prompt reads
    and its reference."""
    if task.contamination is not None:
        return list(task.contamination)
    import jinja2
    from jinja2 import meta

    names = meta.find_undeclared_variables(jinja2.Environment().parse(task.prompt.user))
    return sorted(names | ({task.reference_field} if task.reference_field else set()))


def eval_texts(task, split: str, items) -> list[EvalText]:
    out = []
    for item in items:
        for name in compared_fields(task):
            value = item.fields.get(name)
            values = value if isinstance(value, list) else [value]
            out += [
                EvalText(task.name, split, item.id, name, v)
                for v in values
                if isinstance(v, str) and v.strip()
            ]
    return out


def check(conversations, texts: list[EvalText], spec) -> GateResult:
    """Every (conversation, evaluation field) pair at or over the overlap thresholds."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    result = GateResult(len(conversations), len(texts))
    if not conversations or not texts:
        return result
    texts = [t for t in texts if len(units(t.text)) >= SHORTEST]
    result.eval_texts = len(texts)
    index: dict[tuple[str, ...], list[int]] = {}
    short: dict[int, str] = {}
    sizes = []
    for k, t in enumerate(texts):
        grams = ngrams(t.text)
        sizes.append(len(grams) or 1)
        if not grams:
            short[k] = " ".join(units(t.text))
        for g in grams:
            index.setdefault(g, []).append(k)
    turns = [
        (c, m["content"])
        for c, conv in enumerate(conversations)
        for m in conv.messages
        if m["content"].strip()
    ]
    vectorizer = TfidfVectorizer(
        analyzer="char",
        ngram_range=(2, 4),
        sublinear_tf=True,
        preprocessor=lambda s: unicodedata.normalize("NFKC", s).lower(),
    )
    vectorizer.fit([t.text for t in texts] + [text for _, text in turns])
    cos = (
        vectorizer.transform([text for _, text in turns]) @ vectorizer.transform([t.text for t in texts]).T
    ).tocsr()
    best_cos: dict[tuple[int, int], float] = {}
    for row, (c, _) in enumerate(turns):
        start, end = cos.indptr[row], cos.indptr[row + 1]
        for k, value in zip(cos.indices[start:end], cos.data[start:end]):
            if value >= spec.overlap_cosine and value > best_cos.get((c, k), 0.0):
                best_cos[(c, k)] = float(value)
    shared: dict[tuple[int, int], int] = {}
    for c, conv in enumerate(conversations):
        text = " ".join(m["content"] for m in conv.messages)
        found: dict[int, int] = {}
        for g in ngrams(text):
            for k in index.get(g, ()):
                found[k] = found.get(k, 0) + 1
        whole = {" ".join(units(m["content"])) for m in conv.messages}
        found.update({k: 1 for k, s in short.items() if s in whole})
        shared.update({(c, k): n for k, n in found.items()})
    for c, k in sorted(set(shared) | set(best_cos)):
        containment = shared.get((c, k), 0) / sizes[k] if sizes[k] else 0.0
        cosine = best_cos.get((c, k), 0.0)
        hit = Hit(conversations[c].source, texts[k], round(containment, 4), round(cosine, 4))
        if containment >= spec.duplicate_containment or cosine >= spec.duplicate_cosine:
            result.duplicates.append(hit)
        elif containment >= spec.overlap_containment or cosine >= spec.overlap_cosine:
            result.overlaps.append(hit)
        else:
            continue
        result.train_texts[hit.train] = "\n".join(
            f"{m['role']}: {m['content']}" for m in conversations[c].messages
        )
    return result


def record(result: GateResult, spec, *, worst: int = 10) -> dict:
    """The gate's summary for train_summary.json and the report: counts and the worst pairs."""

    def row(hit: Hit) -> dict:
        return {
            "train": hit.train,
            "task": hit.eval.task,
            "split": hit.eval.split,
            "item_id": hit.eval.item_id,
            "field": hit.eval.field,
            "eval_text": hit.eval.text,
            "train_text": result.train_texts[hit.train],
            "containment": hit.containment,
            "cosine": hit.cosine,
        }

    hits = sorted(result.duplicates + result.overlaps, key=lambda h: (-max(h.containment, h.cosine), h.train))
    return {
        "conversations": result.conversations,
        "eval_texts": result.eval_texts,
        "duplicates": len(result.duplicates),
        "overlaps": len(result.overlaps),
        "allowed": spec.allow,
        "thresholds": {
            "ngram": UNIT_N,
            "duplicate_containment": spec.duplicate_containment,
            "duplicate_cosine": spec.duplicate_cosine,
            "overlap_containment": spec.overlap_containment,
            "overlap_cosine": spec.overlap_cosine,
        },
        "flagged_items": result.flagged_items(),
        "worst": [row(h) for h in hits[:worst]],
    }


def stop_line(result: GateResult, recipe_path) -> str:
    hit = max(result.duplicates, key=lambda h: (max(h.containment, h.cosine), h.train))
    more = f" (and {len(result.duplicates) - 1} more)" if len(result.duplicates) > 1 else ""
    return (
        f"{recipe_path}: training conversation {hit.train} duplicates evaluation item "
        f"{hit.eval.task}/{hit.eval.split}:{hit.eval.item_id} ({hit.eval.field}: n-gram containment "
        f"{hit.containment:.0%}, cosine {hit.cosine:.2f}){more}; remove it, or set contamination.allow: true "
        "in the recipe to train on it anyway"
    )


def evaluation_texts(recipe, selection, data_dir) -> list[EvalText]:
    """The compared fields of every item that will be scored, each task split once: the recipe's
    checks and the suite the selection scored, else (no selection, e.g. `train --model NAME`) the
    default suite, which `make rescore` and `make report` score then. A default-suite entry whose
    data is not on disk cannot be scored either: it is named and passed over."""
    from core.errors import UserError
    from eval.suite import DEFAULT_SUITE, load_suite
    from eval.task import load_items, resolve_task

    suite = selection.suite_file() if selection else None
    fallback = suite is None
    splits = [(resolve_task(c.task, recipe.path.parent), c.split, False) for c in recipe.checks]
    suite_entries = load_suite(DEFAULT_SUITE if fallback else suite)[1]
    splits += [(task, entry.split, fallback) for task, entry in suite_entries]
    out, seen = [], set()
    for task, split, optional in splits:
        if (task.path, split) in seen:
            continue
        seen.add((task.path, split))
        try:
            out += eval_texts(task, split, load_items(task, split, data_dir))
        except UserError as exc:
            if not optional:
                raise
            print(f"contamination: {task.name}-{split} of the default suite not compared: {exc}")
    return out


def gate(recipe, conversations, texts: list[EvalText]) -> dict:
    """Check, print the counts, stop on a duplicate unless the recipe allows it; the record."""
    from core.errors import UserError

    spec = recipe.contamination
    result = check(conversations, texts, spec)
    print(
        f"contamination: {result.conversations} training conversations against {result.eval_texts} evaluation "
        f"fields: {len(result.duplicates)} duplicates, {len(result.overlaps)} overlaps"
    )
    if result.duplicates and not spec.allow:
        raise UserError(stop_line(result, recipe.path))
    if result.duplicates:
        print(
            f"contamination: {len(result.duplicates)} duplicates allowed by {recipe.path} (contamination.allow)"
        )
    return record(result, spec)
