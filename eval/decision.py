"""The decision of `make select`, from the candidates' runs.

Rule: rank candidates on each suite entry's primary metric and take the best mean rank among
those within the memory budget; candidates not significantly worse than it on any entry
(exact McNemar or paired bootstrap, p < 0.05) are tied with it, and among tied candidates the
smallest QLoRA memory wins. No correction for the several entries is made: it errs towards
calling a candidate worse, never towards a tie.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from eval import metrics as M
from eval.runner import git_revision
from eval.stats import ALPHA, compare
from eval.summary import Cell, RunSummary, cells_of, per_fact_recall, render_table
from models.card import ModelCard


@dataclass
class Budget:
    train_gib: float = 24.0
    """QLoRA training must fit in this (card estimate `memory_gib.qlora_train`)."""
    infer_gib: float = 16.0
    """Serving in bf16 must fit in this (card estimate `memory_gib.bf16`)."""

    def check(self, card: ModelCard) -> list[str]:
        if card.memory_gib is None:
            return ["an endpoint: no weights here to fine-tune"]
        problems = []
        if card.memory_gib.qlora_train > self.train_gib:
            problems.append(f"QLoRA needs {card.memory_gib.qlora_train} GiB > {self.train_gib}")
        if card.memory_gib.bf16 > self.infer_gib:
            problems.append(f"bf16 inference needs {card.memory_gib.bf16} GiB > {self.infer_gib}")
        return problems


@dataclass
class Candidate:
    card: ModelCard
    runs: list[RunSummary | None] = field(default_factory=list)
    """One per suite entry; None where the candidate cannot be scored (an endpoint's `ppl` entries)."""
    seconds: float = 0.0
    items: int = 0


def decide(
    candidates: list[Candidate], budget: Budget, ranking: list[tuple[str | None, float]] | None = None
) -> dict:
    """The winner and the evidence, as the dict written to selection.json. `ranking`: per suite
    entry, the metric that ranks it (None: the task's first) and its weight in the mean rank."""
    import numpy as np
    from scipy.stats import rankdata

    names = [c.card.name for c in candidates]
    firsts = entry_runs(candidates)
    ranking = ranking or [(None, 1.0)] * len(firsts)
    entries = [
        (r.task.name, r.split, r.mode, M.ranked_metric(r.task, r.mode, metric))
        for r, (metric, _) in zip(firsts, ranking)
    ]
    weights = np.array([w for _, w in ranking])
    means = np.array(
        [
            [
                np.mean([i["scores"][m] for i in c.runs[k].items]) if c.runs[k] else np.nan
                for k, (*_, m) in enumerate(entries)
            ]
            for c in candidates
        ]
    )
    sign = np.array([1.0 if M.HIGHER_IS_BETTER[m] else -1.0 for *_, m in entries])
    fits = {c.card.name: budget.check(c.card) for c in candidates}
    eligible = [i for i, n in enumerate(names) if not fits[n]]
    # Ranks among eligible candidates only: an out-of-budget model must not shift their gaps.
    mean_rank = np.full(len(candidates), np.nan)
    if eligible:
        ranks = np.column_stack([rankdata(-sign[k] * means[eligible, k]) for k in range(len(entries))])
        # equal weights: the plain mean, to the last bit
        mean_rank[eligible] = (
            ranks.mean(axis=1)
            if np.all(weights == weights[0])
            else (ranks * weights).sum(axis=1) / weights.sum()
        )
    if not eligible:
        return {
            "winner": None,
            "reasons": ["no candidate fits the memory budget"],
            "candidates": _rows(candidates, mean_rank, fits, {}),
        }
    best = min(eligible, key=lambda i: (mean_rank[i], candidates[i].card.memory_gib.qlora_train))
    comparisons, worse = {}, {}
    for i in eligible + [i for i, c in enumerate(candidates) if c.card.is_endpoint]:
        if i == best:
            continue
        comparisons[names[i]], worse[names[i]] = _against(candidates[best], candidates[i], entries)
    tied = [best] + [i for i in eligible if i != best and not worse[names[i]]]
    winner = min(tied, key=lambda i: (candidates[i].card.memory_gib.qlora_train, mean_rank[i]))
    return {
        "winner": names[winner],
        "best_mean_rank": names[best],
        "tied_with_best": [names[i] for i in tied if i != best],
        "reasons": _reasons(names, best, winner, tied, mean_rank, worse, fits, candidates),
        "candidates": _rows(candidates, mean_rank, fits, worse),
        "comparisons_vs_best": comparisons,
    }


def entry_runs(candidates: list[Candidate]) -> list[RunSummary]:
    """Each suite entry's first run with the most items (a sequential entry's candidates stop at
    different points; in the fixed design every run has them all)."""
    return [
        max((c.runs[k] for c in candidates if c.runs[k] is not None), key=lambda r: len(r.items))
        for k in range(len(candidates[0].runs))
    ]


def _against(best: Candidate, other: Candidate, entries) -> tuple[list[dict], list[str]]:
    out, worse = [], []
    for k, (task, split, mode, metric) in enumerate(entries):
        if other.runs[k] is None:
            continue
        if best.runs[k].sequential:
            from eval.anytime import anytime_compare, paired

            record = anytime_compare(*paired(best.runs[k], other.runs[k], metric), metric).record(metric)
        else:
            a = [i["scores"][metric] for i in best.runs[k].items]
            b = [i["scores"][metric] for i in other.runs[k].items]
            record = compare(a, b, binary=metric in M.BINARY).record(metric)
        if record["better"] and record["p_value"] < ALPHA:
            worse.append(f"{task}-{split} {mode} {metric}")
        out.append({"task": task, "split": split, "mode": mode, **record})
    return out, worse


def _rows(candidates, mean_rank, fits, worse) -> list[dict]:
    import numpy as np

    return [
        {
            "model": c.card.name,
            "mean_rank": None if np.isnan(mean_rank[i]) else float(mean_rank[i]),
            "memory_gib": c.card.memory_gib.model_dump() if c.card.memory_gib else None,
            "budget_problems": fits[c.card.name],
            "significantly_worse_on": worse.get(c.card.name, []),
            "seconds": round(c.seconds, 1),
            "items_computed": c.items,
            "items_per_s": round(c.items / c.seconds, 2) if c.seconds and c.items else None,
        }
        for i, c in enumerate(candidates)
    ]


def _reasons(names, best, winner, tied, mean_rank, worse, fits, candidates) -> list[str]:
    out = [f"{names[best]} has the best mean rank ({mean_rank[best]:.2f}) among candidates within budget."]
    for c in candidates:
        if c.card.is_endpoint:
            out.append(
                f"{c.card.name} is an endpoint: scored and compared for reference, not ranked (no weights "
                "here to fine-tune)."
            )
        elif problems := fits[c.card.name]:
            out.append(f"{c.card.name} is out of budget: {'; '.join(problems)}.")
    for n, w in worse.items():
        if candidates[names.index(n)].card.is_endpoint:
            out.append(
                f"Against {names[best]}, the endpoint {n} is "
                + (
                    f"significantly worse on {', '.join(w)}."
                    if w
                    else "not significantly worse on any entry it has."
                )
            )
            continue
        out.append(
            f"{n} is significantly worse on {', '.join(w)}."
            if w
            else f"{n} is not significantly worse on any task: tied with {names[best]}."
        )
    if winner != best:
        out.append(
            f"{names[winner]} wins the tie on memory "
            f"({candidates[winner].card.memory_gib.qlora_train} GiB for QLoRA)."
        )
    return out


def selection_report(
    candidates: list[Candidate],
    budget: Budget,
    *,
    seed: int = 0,
    ranking: list[tuple[str | None, float]] | None = None,
) -> tuple[str, dict]:
    from eval.baselines import BASELINE_COLUMNS, against_majority, baseline_cells, baseline_reasons

    cells: list[Cell] = [cell for c in candidates for r in c.runs if r for cell in cells_of(r, seed)]
    floor = [cell for r in entry_runs(candidates) for cell in baseline_cells(r, seed)]
    table = render_table(
        cells + floor, [c.card.name for c in candidates] + (BASELINE_COLUMNS if floor else [])
    )
    decision = decide(candidates, budget, ranking)
    baselines = [
        b
        for k in range(len(candidates[0].runs))
        if (b := against_majority([c.runs[k] for c in candidates if c.runs[k]])) is not None
    ]
    record = {
        **decision,
        "reasons": decision["reasons"] + baseline_reasons(baselines),
        "baselines": baselines,
        "rule": __doc__.split("Rule: ", 1)[1].replace("\n", " ").strip(),
        "budget": {"train_gib": budget.train_gib, "infer_gib": budget.infer_gib},
        "cells": [
            {
                "task": c.task,
                "version": c.version,
                "split": c.split,
                "mode": c.mode,
                "metric": c.metric,
                "model": c.model,
                "mean": c.estimate.mean,
                "ci95": [c.estimate.low, c.estimate.high],
                "n": c.estimate.n,
            }
            for c in cells
        ],
        "per_fact_recall": {
            c.card.name: recall for c in candidates for r in c.runs if r and (recall := per_fact_recall(r))
        },
        "runs": {c.card.name: [r.run_id for r in c.runs if r] for c in candidates},
        "git_revision": git_revision(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return table, record
