"""What a choice task's accuracy is worth without reading the question: the majority label and
uniform chance, as rows beside the candidates, and each candidate tested against the majority.

On FewCLUE bustm dev about half the items are "A": a model that always answers A scores about
50%, so a candidate just below that has shown nothing about the task, only that it follows the
answer format.
The majority label is counted on the items scored (the figure a colleague would check first);
ties go to the option listed first.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from eval import metrics as M
from eval.summary import RunSummary
from eval.stats import ALPHA, compare
from eval.summary import Cell, cell_of, metrics_of

MAJORITY, CHANCE = "majority", "chance"
BASELINE_COLUMNS = [MAJORITY, CHANCE]
CHOICE_METRICS = (M.ACCURACY, M.ACCURACY_OPENCOMPASS)
"""The metrics a baseline has a value for: whether the chosen option is the gold one."""


@dataclass(frozen=True)
class Baselines:
    letter: str
    """The majority label."""
    majority: list[float]
    chance: list[float]


def baselines_of(run: RunSummary) -> Baselines | None:
    """The baselines of a choice task's run, None for a free-text task."""
    choices = run.task.choices
    if (
        not choices
        or (run.task.parser != "choice" and run.mode != "ppl")
        or M.ACCURACY not in metrics_of(run)
    ):
        return None
    golds = [item["gold"] for item in run.items]
    counts = Counter(golds)
    letter = max(choices, key=lambda c: (counts[c], -choices.index(c)))
    return Baselines(letter, [float(g == letter) for g in golds], [1.0 / len(choices)] * len(golds))


def baseline_cells(run: RunSummary, seed: int = 0) -> list[Cell]:
    found = baselines_of(run)
    if found is None:
        return []
    return [
        cell_of(run, metric, name, values, seed, marked=False)
        for metric in metrics_of(run)
        if metric in CHOICE_METRICS
        for name, values in ((MAJORITY, found.majority), (CHANCE, found.chance))
    ]


def against_majority(entry_runs: list[RunSummary]) -> dict | None:
    """One suite entry's runs (one per candidate): the majority baseline and each candidate's
    accuracy compared with it (exact McNemar), or None for a free-text entry."""
    first = max(entry_runs, key=lambda run: len(run.items))  # a sequential entry's runs may stop early
    found = baselines_of(first)
    if found is None:
        return None
    vs = {}
    for run in entry_runs:
        acc = [i["scores"][M.ACCURACY] for i in run.items]
        majority = [float(i["gold"] == found.letter) for i in run.items]
        if run.sequential:
            from eval.anytime import anytime_compare

            vs[run.model] = anytime_compare(acc, majority, M.ACCURACY).record(M.ACCURACY)
        else:
            vs[run.model] = compare(acc, majority, binary=True).record(M.ACCURACY)
    return {
        "task": first.task.name,
        "split": first.split,
        "mode": first.mode,
        "n": len(found.majority),
        "majority_label": found.letter,
        "majority": sum(found.majority) / len(found.majority),
        "chance": found.chance[0] if found.chance else None,
        "vs_majority": vs,
        "beaten_by": [m for m, c in vs.items() if c["better"] and c["p_value"] < ALPHA],
    }


def baseline_reasons(entries: list[dict]) -> list[str]:
    """The decision's sentence about the baselines: the entries where no candidate beats the majority."""
    unbeaten = [
        f"{e['task']}-{e['split']} {e['mode']} (always {e['majority_label']}: {e['majority']:.1%})"
        for e in entries
        if not e["beaten_by"]
    ]
    if not unbeaten:
        return []
    return [
        f"No candidate is significantly better than answering the majority label on {', '.join(unbeaten)}: "
        "there the ranking shows which model follows the answer format, not which one solves the task."
    ]
