"""Scoring for the style task: does the reply sound 温柔 or 毒舌 as asked, and how close is it?

- style_accuracy: a character n-gram TF-IDF + logistic-regression classifier, trained here on the
  task's train split (reference replies labelled by style); its accuracy on the held-out test
  references is printed by `select` and stored in selection.json (`style_classifier_accuracy`).
- chrf: sentence chrF (sacrebleu) against the reference. chrF works on character n-grams with
  whitespace ignored, so Chinese needs no word segmentation.
- reply_length: characters in the reply, stripped.
"""

from __future__ import annotations

import functools
from pathlib import Path

from eval import metrics as M
from eval.task import Item, TaskSpec, load_items


@functools.lru_cache(maxsize=4)
def _train(task_path: Path, task_sha: str, data_dir: Path):
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    from eval.task import load_task

    task = load_task(task_path)
    train = load_items(task, "train", data_dir)
    clf = make_pipeline(TfidfVectorizer(analyzer="char", ngram_range=(1, 3), sublinear_tf=True),
                        LogisticRegression(max_iter=1000, C=10.0))
    clf.fit([i.gold for i in train], [i.fields["style"] for i in train])
    held_out = load_items(task, "test", data_dir)
    accuracy = clf.score([i.gold for i in held_out], [i.fields["style"] for i in held_out])
    return clf, float(accuracy)


def style_classifier(task: TaskSpec, data_dir: Path):
    """(classifier, held-out accuracy), trained once per process and task file version."""
    return _train(task.path, task.sha256, data_dir)


def make_style_scorer(task: TaskSpec, data_dir: Path):
    from sacrebleu.metrics import CHRF

    clf, _ = style_classifier(task, data_dir)
    chrf = CHRF()

    def score(item: Item, reply: str) -> dict[str, float]:
        reply = reply.strip()
        return {
            M.STYLE_ACCURACY: float(clf.predict([reply])[0] == item.fields["style"]) if reply else 0.0,
            M.CHRF: chrf.sentence_score(reply, [item.gold]).score,
            M.REPLY_LENGTH: float(len(reply)),
        }

    return score
