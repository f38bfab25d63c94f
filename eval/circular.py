"""Option-order robustness: a choice task asked once per rotation of its options, as OpenCompass's
CircularEval asks it.

    entries:
      - {task: fewclue_ocnli_fc, split: dev, mode: gen, circular: true}

The option lines are found in each rendered prompt ("A. 对", "B) yes", "C：可能": the choice
letter at a line's start, then a separator); rotation k shows option i's text under letter
(i - k) mod n and relabels the gold letter, the letters and everything else staying where they
were. An item counts for `circular_accuracy` only when every rotation is answered right; its
answers follow a letter rather than the content (`letter_following`) when every rotation got the
same letter although the content under it moved. A task whose prompts have no such lines cannot
be asked this way, and the suite says so when it loads.
"""

from __future__ import annotations

import re
from dataclasses import replace

from eval import metrics as M
from eval.summary import RunSummary
from eval.task import Item, TaskSpec

SPLIT_SUFFIX = "@circular"
"""The stored run's split label, so its rotated items never pair with the plain entry's."""


def option_spans(task: TaskSpec, text: str) -> list[tuple[int, int]] | None:
    """(start, end) of each choice's option text in the prompt, in choice order; None when a
    choice has no line of its own."""
    if not task.choices:
        return None
    spans = []
    for letter in task.choices:
        found = list(re.finditer(rf"^{re.escape(letter)}\s*[.．、:：)）]\s*(.+?)\s*$", text, re.M))
        if len(found) != 1:
            return None
        spans.append(found[0].span(1))
    return spans


def rotations(task: TaskSpec, items: list[Item]) -> list[Item]:
    """Every item once per rotation of its options (ids `<id>@<k>`), gold relabelled."""
    from core.errors import UserError

    choices = task.choices or []
    out = []
    for item in items:
        spans = option_spans(task, item.user)
        if spans is None:
            raise UserError(
                f"{task.path}: item {item.id}: the prompt has no line per option "
                f"({', '.join(f'{c}. ...' for c in choices)}), so its options cannot be rotated"
            )
        texts = [item.user[a:b] for a, b in spans]
        for k in range(len(choices)):
            user = item.user
            for i, (a, b) in sorted(enumerate(spans), key=lambda s: -s[1][0]):
                user = user[:a] + texts[(i + k) % len(choices)] + user[b:]
            gold = (
                choices[(choices.index(item.gold) - k) % len(choices)] if item.gold in choices else item.gold
            )
            out.append(replace(item, id=f"{item.id}@{k}", user=user, gold=gold))
    return out


def circular_summary(run: RunSummary, split: str) -> RunSummary:
    """The rotated run as one row per original item, with the two circular metrics."""
    groups: dict[str, list[dict]] = {}
    for row in run.items:
        base, _, k = row["item_id"].rpartition("@")
        groups.setdefault(base, []).append({**row, "rotation": int(k)})
    items = []
    for base, rows in sorted(groups.items()):
        rows.sort(key=lambda r: r["rotation"])
        letters = [r["parsed"] for r in rows]
        items.append(
            {
                "item_id": base,
                "prompt": rows[0]["prompt"],
                "request": rows[0].get("request"),
                "output": rows[0]["output"],
                "gold": rows[0]["gold"],
                "parsed": letters,
                "scores": {
                    M.CIRCULAR_ACCURACY: float(all(r["scores"][M.ACCURACY] == 1.0 for r in rows)),
                    M.LETTER_FOLLOWING: float(
                        len(rows) > 1 and letters[0] is not None and len(set(letters)) == 1
                    ),
                },
            }
        )
    task = run.task.model_copy(update={"metrics": [M.CIRCULAR_ACCURACY, M.LETTER_FOLLOWING]})
    return RunSummary(run.run_id, task, split, run.mode, run.model, items, run.seconds, run.computed)
