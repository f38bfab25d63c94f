"""Score every candidate on the task suite and choose the winner the evidence supports.

    make select                                     # default offline candidates, suites/default.yaml
    python -m selectune select --models smollm2-135m-instruct,gemma3-270m --suite suites/fewclue-test.yaml

The rule that chooses is in eval/decision.py. Writes `runs/selection.json`.
"""

from __future__ import annotations

import gc
from pathlib import Path

from eval import metrics as M
from eval.backends.base import DEFAULT_BATCH_SIZE
from eval.circular import SPLIT_SUFFIX, circular_summary, rotations
from eval.decision import Budget, Candidate, entry_runs, selection_report
from eval.runner import run_task
from eval.summary import comparison_text
from eval.suite import DEFAULT_SUITE, SuiteEntry
from eval.task import TaskSpec
from models.card import ModelCard


def score_candidates(
    cards: list[ModelCard],
    entries: list[tuple[TaskSpec, SuiteEntry]],
    entry_items: list[list],
    *,
    executor,
    data_dir: Path,
    batch_size: int = DEFAULT_BATCH_SIZE,
    judge=None,
    pilot: float | None = None,
    skip: set[int] = frozenset(),
    estimate=None,
) -> list[Candidate]:
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
            with tqdm(
                total=len(items), desc=f"{card.name} {task.name}-{label} {mode}", unit="item", leave=False
            ) as bar:

                def progress(n: int, bar=bar, share=per_item.get((card.name, k), 0.0)) -> None:
                    bar.update(n)
                    if share:
                        total.update(round(n * share, 1))

                run = run_task(
                    backend,
                    task,
                    label,
                    mode,
                    items,
                    conn,
                    chunk_size=batch_size,
                    data_dir=data_dir,
                    progress=progress,
                    judge=judge,
                )
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

        return make_backend(
            "openai",
            card.source.url,
            card.source.model,
            api_key=api_key(),
            identity={"model": card.name, "served_model": card.source.model},
        )
    from eval.backends import make_backend

    # Lazy: a candidate whose items are all stored never loads its weights.
    return make_backend("hf", card, store, lazy=True, checkpoint=checkpoint, **options)


def select_command(
    settings,
    *,
    models: str | None = None,
    suite: Path = DEFAULT_SUITE,
    train_budget_gib: float | None = None,
    infer_budget_gib: float | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    dtype: str = "auto",
    plan: bool = False,
    pilot: float = 0.2,
    detect: float | None = None,
    power: float = 0.8,
    design: str = "auto",
    tie_margin: float | None = None,
    estimate: bool = False,
) -> int:
    """`selectune select` (`make select`): print what it will cost here, score, decide, print the
    evidence, write selection.json; with `plan`, score a pilot and print the items each entry needs
    instead (eval/plan.py); with `estimate`, print the cost and stop."""
    from core.artifacts import Selection, write_artifact
    from core.files import sha256_file
    from eval.executor import make_executor
    from eval.judge import make_judge
    from eval.results import open_results
    from eval.selection_plan import plan_selection

    judge = make_judge(settings)  # fails before any scoring when half-configured
    raw_dtype = dtype
    spec, cards, checkpoints, entries, entry_items, chosen, dtype, cost = plan_selection(
        settings,
        models=models,
        suite=suite,
        batch_size=batch_size,
        device=device,
        dtype=dtype,
        design=design,
        plan=plan,
        provision_models=not estimate,
    )
    if cost is not None:
        print("\n".join(cost.lines()), flush=True)
    if estimate:
        if cost is None:
            print(
                "select: no estimate: the cost model is for scoring on this machine's CPU with the local "
                "executor (docs/machine.md)"
            )
        return 0
    conn = open_results(settings.runs_dir)
    executor = make_executor(settings, conn)
    try:
        # On Ray each node resolves "auto" itself: its own CPU says whether bf16 is native there.
        executor.open(
            cards,
            settings.model_store,
            checkpoints=checkpoints,
            batch_size=batch_size,
            device=device,
            dtype=raw_dtype if executor.name == "ray" else dtype,
            make=lambda card: _backend(
                card,
                settings.model_store,
                checkpoint=checkpoints.get(card.name),
                batch_size=batch_size,
                device=device,
                dtype=dtype,
            ),
        )
        candidates = score_candidates(
            cards,
            entries,
            entry_items,
            executor=executor,
            data_dir=settings.resolved_data_dir,
            batch_size=batch_size,
            judge=judge,
            pilot=pilot if plan else None,
            skip=chosen,
            estimate=cost if cost is not None and cost.costs else None,
        )
        states = {}
        if chosen:
            states = _score_sequentially(
                candidates,
                entries,
                chosen,
                settings,
                executor,
                batch_size=batch_size,
                judge=judge,
                margin=tie_margin,
                items={k: entry_items[k] for k in chosen},
            )
    finally:
        executor.close()
    if cost is not None and not plan:
        from eval.learned import learn, learnable
        from models.machine import calibration as machine_calibration

        calibration = machine_calibration(settings.cache_dir)

        kept = learn(
            settings,
            calibration,
            learnable(candidates),
            entry_items,
            checkpoints,
            chunk_size=batch_size,
            dtype=dtype,
        )
        if kept:
            print(
                "select: measured over the cost model's estimate, kept for the next estimates here: "
                + ", ".join(f"{key} x{factor:.2f}" for key, factor in sorted(kept.items()))
            )
    if plan:
        from eval.plan import plan as plan_rows
        from eval.plan import print_plan

        metrics = [
            M.ranked_metric(r.task, r.mode, e.metric) for r, (_, e) in zip(entry_runs(candidates), entries)
        ]
        print_plan(
            plan_rows(candidates, metrics, [len(i) for i in entry_items], detect=detect, power=power),
            detect=detect,
            power=power,
        )
        return 0
    budget = Budget(
        **{
            k: v
            for k, v in (("train_gib", train_budget_gib), ("infer_gib", infer_budget_gib))
            if v is not None
        }
    )  # unset: Budget's defaults, written there only
    table, record = selection_report(candidates, budget, ranking=[(e.metric, e.weight) for _, e in entries])
    record["executor"] = executor.describe()
    record["suite"] = {"name": spec.name, "file": str(spec.path), "sha256": sha256_file(spec.path)}
    record["sequential"] = [
        {
            "task": entries[k][0].name,
            "split": entries[k][1].split,
            "mode": entries[k][1].mode,
            "size": st.size,
            "reason": st.reason,
            "stopped": st.stopped,
            "tied": st.tied or [],
            "items": {c.card.name: len(c.runs[k].items) for c in candidates if c.runs[k]},
        }
        for k, st in sorted(states.items())
    ]
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
    runs, states, spent = score_sequential(
        [c.card for c in candidates],
        entries,
        chosen,
        backends,
        executor.connection(),
        data_dir=settings.resolved_data_dir,
        batch_size=batch_size,
        judge=judge,
        executor=executor,
        margin=TIE_MARGIN if margin is None else margin,
        items=items,
    )
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
        rank = (
            f"mean rank {c['mean_rank']:.2f}"
            if c["mean_rank"] is not None
            else "not ranked: " + "; ".join(c["budget_problems"])
        )
        print(
            f"{c['model']}: {rank}, {c['seconds']} s, "
            f"{c['items_computed']} items computed ({c['items_per_s'] or '-'} items/s)"
        )
    for reason in record["reasons"]:
        print(f"- {reason}")
    for other, comps in record.get("comparisons_vs_best", {}).items():
        for comp in comps:
            t = comparison_text(comp)
            print(
                f"  {record['best_mean_rank']} - {other} on {comp['task']}-{comp['split']} {comp['mode']} "
                f"{comp['metric']}: {t['diff_text']} {t['ci']}, p {t['p_text']} ({comp['test']}; "
                f"detectable at n={comp['n']}: {t['mde_text']}): {comp['verdict']} for {record['best_mean_rank']}"
            )
    for entry in record.get("sequential", []):
        print(
            f"sequential {entry['task']}-{entry['split']} {entry['mode']}: {entry['reason']}; items scored: "
            + ", ".join(f"{m} {n}" for m, n in entry["items"].items())
        )
        for model, why in entry["stopped"].items():
            print(f"  {model}: {why}")
    if "style_classifier_accuracy" in record:
        classes = ", ".join(f"{k} {v:.1%}" for k, v in record.get("style_classifier_classes", {}).items())
        print(f"style classifier: {record['style_classifier_accuracy']:.1%} on held-out replies ({classes})")
    print(f"winner: {record['winner']}")
