"""Scoring for the style task: does the reply sound 温柔 or 毒舌 as asked, and how close is it?

- style_accuracy: is the reply in the requested style? A character n-gram TF-IDF +
  logistic-regression classifier with three classes, trained here: 温柔 and 毒舌 (the task's train
  split, reference replies labelled by style) and "neither" (plain replies: NEUTRAL_FILE and the
  fact task's answers), so a reply with no style counts as wrong, not as a coin toss between the
  two. Its held-out accuracy, overall and per class, is printed by `select` and stored in
  selection.json (`style_classifier_accuracy`, `style_classifier_classes`).
- chrf: sentence chrF (sacrebleu) against the reference. chrF works on character n-grams with
  whitespace ignored, so Chinese needs no word segmentation.
- reply_length: characters in the reply, stripped.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from eval import metrics as M
from eval.task import Item, TaskSpec, load_items


NEITHER = "neither"
"""The classifier's third class: a reply in no requested style (a plain answer, English, noise)."""
NEUTRAL_FILE = "style_neutral.jsonl"
FACT_FILE = "fact_faq.jsonl"
ABSTAIN_SHARE = 0.01
"""The share of val-split references whose own-style probability may fall under the threshold."""
FACT_HELD_OUT = 46
"""FAQ entries q046-q060 are held out of the neither class's training, q001-q045 train it."""


def _neutral(task_path: Path) -> dict[str, list[str]]:
    """Plain replies by split: the style task's neutral file (written for selectune: matter-of-fact
    replies to the style prompts, and a few in English) and the fact task's answers."""
    import json

    data = task_path.parent / "data"
    out: dict[str, list[str]] = {"train": [], "test": []}
    for line in (data / NEUTRAL_FILE).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        out[row["split"]].append(row["reply"])
    answers = {}
    for line in (data / FACT_FILE).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        answers[row["fact_id"]] = row["answer"]
    for fact_id, answer in sorted(answers.items()):
        out["test" if int(fact_id[1:]) >= FACT_HELD_OUT else "train"].append(answer)
    return out


@functools.lru_cache(maxsize=4)
def _train(task_path: Path, task_sha: str, data_dir: Path):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from eval.task import load_task

    task = load_task(task_path)
    neutral = _neutral(task_path)
    train = load_items(task, "train", data_dir)
    clf = make_pipeline(
        TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True),
        LogisticRegression(max_iter=2000, C=10.0, class_weight="balanced"),
    )
    clf.fit(
        [i.gold for i in train] + neutral["train"],
        [i.fields["style"] for i in train] + [NEITHER] * len(neutral["train"]),
    )
    # Abstention, calibrated on the val split: a style is named only with at least the
    # probability that 99% of val references get for their own style.
    val = load_items(task, "val", data_dir)
    proba = clf.predict_proba([i.gold for i in val])
    own = [proba[k, list(clf.classes_).index(i.fields["style"])] for k, i in enumerate(val)]
    clf.min_style_probability = float(np.percentile(own, 100 * ABSTAIN_SHARE))
    held_out = load_items(task, "test", data_dir)
    texts = [i.gold for i in held_out] + neutral["test"]
    labels = [i.fields["style"] for i in held_out] + [NEITHER] * len(neutral["test"])
    predicted = predict(clf, texts)
    per_class = {
        label: sum(p == t for p, t in zip(predicted, labels) if t == label) / labels.count(label)
        for label in sorted(set(labels))
    }
    accuracy = sum(p == t for p, t in zip(predicted, labels)) / len(labels)
    return clf, float(accuracy), per_class


def predict(clf, texts: list[str]) -> list[str]:
    """The classifier's labels; "neither" where it names no style with its calibrated confidence,
    and for a text with none of its features (no character it has seen), not whatever class the
    intercept favours."""
    vectors = clf[0].transform(texts)
    proba = clf[-1].predict_proba(vectors)
    out = []
    for k, row in enumerate(proba):
        label = clf.classes_[int(np.argmax(row))]
        sure = row.max() >= getattr(clf, "min_style_probability", 0.0)
        out.append(str(label) if vectors[k].nnz and (label == NEITHER or sure) else NEITHER)
    return out


def style_classifier(task: TaskSpec, data_dir: Path):
    """(classifier, held-out accuracy over the three classes), trained once per process and task
    file version."""
    clf, accuracy, _ = _train(task.path, task.sha256, data_dir)
    return clf, accuracy


def style_classes(task: TaskSpec, data_dir: Path) -> dict[str, float]:
    """Held-out accuracy per class: 温柔 and 毒舌 test references, and the held-out plain replies."""
    return _train(task.path, task.sha256, data_dir)[2]


def make_style_scorer(task: TaskSpec, data_dir: Path):
    from sacrebleu.metrics import CHRF

    clf, _ = style_classifier(task, data_dir)
    chrf = CHRF()

    def score(item: Item, reply: str) -> dict[str, float]:
        reply = reply.strip()
        return {
            M.STYLE_ACCURACY: float(predict(clf, [reply])[0] == item.fields["style"]) if reply else 0.0,
            M.CHRF: chrf.sentence_score(reply, [item.gold]).score,
            M.REPLY_LENGTH: float(len(reply)),
        }

    return score
