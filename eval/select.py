"""Score every candidate on the task suite and choose the winner the evidence supports.

    make select                                     # default offline candidates, suites/default.yaml
    python -m selectune select --models smollm2-135m-instruct,gemma3-270m --suite suites/fewclue-test.yaml

Rule: rank candidates on each suite entry's primary metric and take the best mean rank among
those within the memory budget; candidates not significantly worse than it on any entry
(exact McNemar or paired bootstrap, p < 0.05) are tied with it, and among tied candidates the
smallest QLoRA memory wins. No correction for the several entries is made: it errs towards
calling a candidate worse, never towards a tie. Writes `runs/selection.json`.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path

from eval import metrics as M
from eval.backends.base import DEFAULT_BATCH_SIZE
from eval.circular import SPLIT_SUFFIX, circular_summary, rotations
from eval.runner import git_revision, run_task
from eval.stats import ALPHA, compare
from eval.summary import (Cell, RunSummary, cells_of, comparison_text, per_fact_recall, render_table)
from eval.suite import DEFAULT_SUITE, SuiteEntry, load_suite
from eval.task import TaskSpec, load_items
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


def score_candidates(cards: list[ModelCard], entries: list[tuple[TaskSpec, SuiteEntry]], entry_items: list[list],
                     *, executor, data_dir: Path, batch_size: int = DEFAULT_BATCH_SIZE, judge=None,
                     pilot: float | None = None, skip: set[int] = frozenset(), estimate=None) -> list[Candidate]:
    """Every card on every entry, through `executor` (eval/executor.py, opened on `cards`): one
    card after another here, or all at once on a Ray cluster. `entry_items`: each entry's items,
    loaded and rendered once for every candidate; `pilot`: only that seeded share of them (`--plan`);
    `estimate` (eval/estimate.py): a second bar shows the time left for the whole command."""
    from contextlib import nullcontext

    from tqdm import tqdm

    overall = estimate.overall_bar() if estimate is not None else nullcontext()
    per_item = estimate.per_item() if estimate is not None else {}

    def one(card: ModelCard) -> Candidate:
        cand = Candidate(card)
        backend, conn = executor.backend(card), executor.connection()
        for k, (task, entry) in enumerate(entries):
            split, mode = entry.split, entry.mode
            if k in skip:  # scored sequentially (eval/sequential.py)
                cand.runs.append(None)
                continue
            if card.is_endpoint and mode == "ppl":
                cand.runs.append(None)  # no prompt log-probabilities over chat completions: n/a
                continue
            items = entry_items[k]
            if pilot is not None:
                from eval.plan import pilot_items

                items = pilot_items(items, pilot)
            label = split
            if entry.circular:
                items, label = rotations(task, items), split + SPLIT_SUFFIX
            with tqdm(total=len(items), desc=f"{card.name} {task.name}-{label} {mode}",
                      unit="item", leave=False) as bar:
                def progress(n: int, bar=bar, share=per_item.get((card.name, k), 0.0)) -> None:
                    bar.update(n)
                    if share:
                        total.update(round(n * share, 1))

                run = run_task(backend, task, label, mode, items, conn, chunk_size=batch_size,
                               data_dir=data_dir, progress=progress, judge=judge)
            if entry.circular:
                run = circular_summary(run, split)
            cand.runs.append(run)
            cand.seconds += run.seconds
            cand.items += run.computed
        executor.done_with(backend)
        return cand

    with overall as total:
        return executor.map(one, cards)


def _backend(card: ModelCard, store: Path, *, checkpoint: Path | None, **options):
    if card.is_endpoint:
        from eval.backends import make_backend
        from models.endpoint import api_key

        return make_backend("openai", card.source.url, card.source.model, api_key=api_key(),
                             identity={"model": card.name, "served_model": card.source.model})
    from eval.backends import make_backend

    # Lazy: a candidate whose items are all stored never loads its weights.
    return make_backend("hf", card, store, lazy=True, checkpoint=checkpoint, **options)


def decide(candidates: list[Candidate], budget: Budget, ranking: list[tuple[str | None, float]] | None = None) -> dict:
    """The winner and the evidence, as the dict written to selection.json. `ranking`: per suite
    entry, the metric that ranks it (None: the task's first) and its weight in the mean rank."""
    import numpy as np
    from scipy.stats import rankdata

    names = [c.card.name for c in candidates]
    firsts = entry_runs(candidates)
    ranking = ranking or [(None, 1.0)] * len(firsts)
    entries = [(r.task.name, r.split, r.mode, M.ranked_metric(r.task, r.mode, metric))
               for r, (metric, _) in zip(firsts, ranking)]
    weights = np.array([w for _, w in ranking])
    means = np.array([[np.mean([i["scores"][m] for i in c.runs[k].items]) if c.runs[k] else np.nan
                       for k, (*_, m) in enumerate(entries)] for c in candidates])
    sign = np.array([1.0 if M.HIGHER_IS_BETTER[m] else -1.0 for *_, m in entries])
    fits = {c.card.name: budget.check(c.card) for c in candidates}
    eligible = [i for i, n in enumerate(names) if not fits[n]]
    # Ranks among eligible candidates only: an out-of-budget model must not shift their gaps.
    mean_rank = np.full(len(candidates), np.nan)
    if eligible:
        ranks = np.column_stack([rankdata(-sign[k] * means[eligible, k]) for k in range(len(entries))])
        # equal weights: the plain mean, to the last bit
        mean_rank[eligible] = (ranks.mean(axis=1) if np.all(weights == weights[0])
                               else (ranks * weights).sum(axis=1) / weights.sum())
    if not eligible:
        return {"winner": None, "reasons": ["no candidate fits the memory budget"],
                "candidates": _rows(candidates, mean_rank, fits, {})}
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
    return [max((c.runs[k] for c in candidates if c.runs[k] is not None), key=lambda r: len(r.items))
            for k in range(len(candidates[0].runs))]


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

    return [{"model": c.card.name, "mean_rank": None if np.isnan(mean_rank[i]) else float(mean_rank[i]),
             "memory_gib": c.card.memory_gib.model_dump() if c.card.memory_gib else None,
             "budget_problems": fits[c.card.name],
             "significantly_worse_on": worse.get(c.card.name, []),
             "seconds": round(c.seconds, 1), "items_computed": c.items,
             "items_per_s": round(c.items / c.seconds, 2) if c.seconds and c.items else None}
            for i, c in enumerate(candidates)]


def _reasons(names, best, winner, tied, mean_rank, worse, fits, candidates) -> list[str]:
    out = [f"{names[best]} has the best mean rank ({mean_rank[best]:.2f}) among candidates within budget."]
    for c in candidates:
        if c.card.is_endpoint:
            out.append(f"{c.card.name} is an endpoint: scored and compared for reference, not ranked (no weights "
                       "here to fine-tune).")
        elif problems := fits[c.card.name]:
            out.append(f"{c.card.name} is out of budget: {'; '.join(problems)}.")
    for n, w in worse.items():
        if candidates[names.index(n)].card.is_endpoint:
            out.append(f"Against {names[best]}, the endpoint {n} is " + (
                f"significantly worse on {', '.join(w)}." if w else "not significantly worse on any entry it has."))
            continue
        out.append(f"{n} is significantly worse on {', '.join(w)}." if w else
                   f"{n} is not significantly worse on any task: tied with {names[best]}.")
    if winner != best:
        out.append(f"{names[winner]} wins the tie on memory "
                   f"({candidates[winner].card.memory_gib.qlora_train} GiB for QLoRA).")
    return out


def selection_report(candidates: list[Candidate], budget: Budget, *, seed: int = 0,
                     ranking: list[tuple[str | None, float]] | None = None) -> tuple[str, dict]:
    from eval.baselines import BASELINE_COLUMNS, against_majority, baseline_cells, baseline_reasons

    cells: list[Cell] = [cell for c in candidates for r in c.runs if r for cell in cells_of(r, seed)]
    floor = [cell for r in entry_runs(candidates) for cell in baseline_cells(r, seed)]
    table = render_table(cells + floor, [c.card.name for c in candidates] + (BASELINE_COLUMNS if floor else []))
    decision = decide(candidates, budget, ranking)
    baselines = [b for k in range(len(candidates[0].runs))
                 if (b := against_majority([c.runs[k] for c in candidates if c.runs[k]])) is not None]
    record = {
        **decision,
        "reasons": decision["reasons"] + baseline_reasons(baselines),
        "baselines": baselines,
        "rule": __doc__.split("Rule: ", 1)[1].split("Writes")[0].replace("\n", " ").strip(),
        "budget": {"train_gib": budget.train_gib, "infer_gib": budget.infer_gib},
        "cells": [{"task": c.task, "version": c.version, "split": c.split, "mode": c.mode,
                   "metric": c.metric, "model": c.model, "mean": c.estimate.mean,
                   "ci95": [c.estimate.low, c.estimate.high], "n": c.estimate.n} for c in cells],
        "per_fact_recall": {c.card.name: recall for c in candidates for r in c.runs
                            if r and (recall := per_fact_recall(r))},
        "runs": {c.card.name: [r.run_id for r in c.runs if r] for c in candidates},
        "git_revision": git_revision(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return table, record


def select_command(settings, *, models: str | None = None, suite: Path = DEFAULT_SUITE,
                   train_budget_gib: float | None = None, infer_budget_gib: float | None = None,
                   batch_size: int = DEFAULT_BATCH_SIZE, device: str = "auto", dtype: str = "auto",
                   plan: bool = False, pilot: float = 0.2, detect: float | None = None, power: float = 0.8,
                   design: str = "auto", tie_margin: float | None = None, estimate: bool = False) -> int:
    """`selectune select` (`make select`): print what it will cost here, score, decide, print the
    evidence, write selection.json; with `plan`, score a pilot and print the items each entry needs
    instead (eval/plan.py); with `estimate`, print the cost and stop."""
    from core.artifacts import Selection, write_artifact
    from core.files import sha256_file
    from eval.executor import make_executor
    from eval.judge import make_judge
    from eval.results import open_results
    from models.card import load_cards
    from models.local import resolve_candidates
    from models.store import provision

    from models.loading import resolve_device, scoring_dtype

    raw_dtype, dtype = dtype, scoring_dtype(dtype, device)  # bf16 where the machine multiplies it natively
    spec, entries = load_suite(suite)  # every entry checked before any model runs
    chosen = resolve_candidates(models.split(",")) if models else [
        (c, None) for c in load_cards().values() if c.default]
    cards, checkpoints = [c for c, _ in chosen], {c.name: path for c, path in chosen if path is not None}
    judge = make_judge(settings)  # fails before any scoring when half-configured
    for card in cards:
        if card.name not in checkpoints and not card.is_endpoint and not estimate:
            provision(card, settings.model_store)
    from eval.sequential import sequential_entries

    entry_items = [load_items(task, e.split, settings.resolved_data_dir) for task, e in entries]
    sizes = [len(items) for items in entry_items]
    chosen = set() if plan else sequential_entries(entries, sizes, design, len(cards))
    cost = None
    if not plan and settings.executor == "local" and resolve_device(device) == "cpu":  # the CPU cost model
        from eval.estimate import select_estimate

        cost = select_estimate(settings, cards, checkpoints, entries, entry_items, batch_size=batch_size,
                               dtype=dtype, sequential=chosen)
        print("\n".join(cost.lines()), flush=True)
    if estimate:
        if cost is None:
            print("select: no estimate: the cost model is for scoring on this machine's CPU with the local "
                  "executor (docs/machine.md)")
        return 0
    conn = open_results(settings.runs_dir)
    executor = make_executor(settings, conn)
    try:
        # On Ray each node resolves "auto" itself: its own CPU says whether bf16 is native there.
        executor.open(cards, settings.model_store, checkpoints=checkpoints, batch_size=batch_size, device=device,
                      dtype=raw_dtype if executor.name == "ray" else dtype,
                      make=lambda card: _backend(card, settings.model_store, checkpoint=checkpoints.get(card.name),
                                                 batch_size=batch_size, device=device, dtype=dtype))
        candidates = score_candidates(cards, entries, entry_items, executor=executor,
                                      data_dir=settings.resolved_data_dir,
                                      batch_size=batch_size, judge=judge, pilot=pilot if plan else None, skip=chosen,
                                      estimate=cost if cost is not None and cost.costs else None)
        states = {}
        if chosen:
            states = _score_sequentially(candidates, entries, chosen, settings, executor, batch_size=batch_size,
                                         judge=judge, margin=tie_margin,
                                         items={k: entry_items[k] for k in chosen})
    finally:
        executor.close()
    if plan:
        from eval.plan import plan as plan_rows
        from eval.plan import print_plan

        metrics = [M.ranked_metric(r.task, r.mode, e.metric) for r, (_, e) in zip(entry_runs(candidates), entries)]
        print_plan(plan_rows(candidates, metrics, sizes, detect=detect, power=power), detect=detect, power=power)
        return 0
    budget = Budget(**{k: v for k, v in (("train_gib", train_budget_gib), ("infer_gib", infer_budget_gib))
                       if v is not None})  # unset: Budget's defaults, written there only
    table, record = selection_report(candidates, budget,
                                     ranking=[(e.metric, e.weight) for _, e in entries])
    record["executor"] = executor.describe()
    record["suite"] = {"name": spec.name, "file": str(spec.path), "sha256": sha256_file(spec.path)}
    record["sequential"] = [{"task": entries[k][0].name, "split": entries[k][1].split, "mode": entries[k][1].mode,
                             "size": st.size, "reason": st.reason, "stopped": st.stopped, "tied": st.tied or [],
                             "items": {c.card.name: len(c.runs[k].items) for c in candidates if c.runs[k]}}
                            for k, st in sorted(states.items())]
    styled = [task for task, _ in entries if task.scorer and task.scorer.startswith("eval.scorers.style:")]
    if styled:
        from eval.scorers.style import style_classes, style_classifier

        _, record["style_classifier_accuracy"] = style_classifier(styled[0], settings.resolved_data_dir)
        record["style_classifier_classes"] = style_classes(styled[0], settings.resolved_data_dir)
    print(table)
    print()
    print_decision(record)
    out = settings.workspace.selection
    write_artifact(out, Selection, record)
    print(f"wrote {out}")
    return 0 if record["winner"] else 1


def _score_sequentially(candidates, entries, chosen, settings, executor, *, batch_size, judge, margin, items):
    """Fill the chosen entries' runs of every candidate round by round (eval/sequential.py)."""
    from eval.sequential import TIE_MARGIN, score_sequential

    backends = {c.card.name: executor.backend(c.card) for c in candidates}
    runs, states, spent = score_sequential([c.card for c in candidates], entries, chosen, backends,
                                           executor.connection(), data_dir=settings.resolved_data_dir,
                                           batch_size=batch_size, judge=judge, executor=executor,
                                           margin=TIE_MARGIN if margin is None else margin, items=items)
    for cand in candidates:
        for k in chosen:
            cand.runs[k] = runs.get((cand.card.name, k))
        seconds, computed = spent.get(cand.card.name, (0.0, 0))
        cand.seconds += seconds
        cand.items += computed
    for backend in backends.values():
        executor.done_with(backend)
    del backends
    gc.collect()
    return states


def print_decision(record: dict) -> None:
    for c in record["candidates"]:
        rank = (f"mean rank {c['mean_rank']:.2f}" if c["mean_rank"] is not None else
                "not ranked: " + "; ".join(c["budget_problems"]))
        print(f"{c['model']}: {rank}, {c['seconds']} s, "
              f"{c['items_computed']} items computed ({c['items_per_s'] or '-'} items/s)")
    for reason in record["reasons"]:
        print(f"- {reason}")
    for other, comps in record.get("comparisons_vs_best", {}).items():
        for comp in comps:
            t = comparison_text(comp)
            print(f"  {record['best_mean_rank']} - {other} on {comp['task']}-{comp['split']} {comp['mode']} "
                  f"{comp['metric']}: {t['diff_text']} {t['ci']}, p {t['p_text']} ({comp['test']}; "
                  f"detectable at n={comp['n']}: {t['mde_text']}): {comp['verdict']} for {record['best_mean_rank']}")
    for entry in record.get("sequential", []):
        print(f"sequential {entry['task']}-{entry['split']} {entry['mode']}: {entry['reason']}; items scored: "
              + ", ".join(f"{m} {n}" for m, n in entry["items"].items()))
        for model, why in entry["stopped"].items():
            print(f"  {model}: {why}")
    if "style_classifier_accuracy" in record:
        classes = ", ".join(f"{k} {v:.1%}" for k, v in record.get("style_classifier_classes", {}).items())
        print(f"style classifier: {record['style_classifier_accuracy']:.1%} on held-out replies ({classes})")
    print(f"winner: {record['winner']}")
