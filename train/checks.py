"""The checks of `make train`: which (the recipe's, then the selection suite's `check` and
`forgetting` entries; its `sample` entries join the sample prompts), and each one scored on the
base and the merged model and compared item by item."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from core.settings import Settings
from train.recipe import CheckSpec, Recipe, SampleTaskSpec


def check_comparison(
    check,
    recipe_dir: Path,
    base_card,
    merged_card,
    merged_dir: Path,
    settings: Settings,
    conn,
    evaluated: dict | None = None,
) -> dict:
    """One of the recipe's checks: its task scored on the base and the merged model, compared
    item by item on its metric (merged minus base). `evaluated`: the merged model's scores from the
    checkpoint evaluation of the merged step ({"step", "ids", "scores", "outputs"}), when it scored every item
    of this check: the same weights, prompts and batches, so they are used, not computed again."""
    from eval import metrics as M
    from eval.backends import make_backend
    from eval.runner import run_task
    from eval.stats import bootstrap_mean, compare
    from eval.task import load_items, resolve_task

    task = resolve_task(check.task, recipe_dir)
    metric = M.ranked_metric(task, check.mode, check.metric)
    items = load_items(task, check.split, settings.resolved_data_dir)
    scored = {}
    reuse = evaluated is not None and sorted(evaluated["ids"]) == sorted(i.id for i in items)
    for label, card, checkpoint in (("base", base_card, None), ("merged", merged_card, merged_dir)):
        # the merged side reused is stored as the merged model's run, so `make rescore` finds it
        known = dict(zip(evaluated["ids"], evaluated["outputs"])) if label == "merged" and reuse else None
        backend = make_backend("hf", card, settings.model_store, checkpoint=checkpoint, lazy=True)
        run = run_task(
            backend,
            task,
            check.split,
            check.mode,
            items,
            conn,
            data_dir=settings.resolved_data_dir,
            known=known,
        )
        scored[label] = {r["item_id"]: r["scores"][metric] for r in run.items}
        del backend
    out = {
        label: [by_id[i] for i in scored["base"]] for label, by_id in scored.items()
    }  # paired item by item
    comp = compare(out["merged"], out["base"], binary=metric in M.BINARY)
    return {
        "task": task.name,
        "split": check.split,
        "mode": check.mode,
        "items": len(items),
        "base": asdict(bootstrap_mean(out["base"])),
        "merged": asdict(bootstrap_mean(out["merged"])),
        **comp.record(metric),
        "merged_scored_at": f"checkpoint evaluation of step {evaluated['step']}"
        if reuse
        else "merged checkpoint",
    }


def chosen_scores(result, check, recipe: Recipe) -> dict | None:
    """The merged step's checkpoint-evaluation scores of `check` ({"step", "ids", "scores", "outputs"}), if any."""
    from eval.metrics import ranked_metric
    from eval.task import resolve_task
    from train.checkpoints import evaluated_steps

    choice = result.checkpoint_choice
    if choice is None:
        return None
    record = evaluated_steps(Path(result.run_dir)).get(choice["chosen_step"])
    task = resolve_task(check.task, recipe.path.parent)
    entry = record.entries.get(f"{task.name}-{check.split}-{check.mode}") if record else None
    metric = ranked_metric(task, check.mode, check.metric)
    if entry is None or entry["metric"] != metric or record.basis["merge_base"] != recipe.merge_base:
        return None
    return {
        "step": choice["chosen_step"],
        "ids": entry["ids"],
        "scores": entry["scores"],
        "outputs": entry["outputs"],
    }


def all_checks(recipe: Recipe, settings: Settings) -> list[tuple[CheckSpec, str]]:
    """The recipe's checks, then the entries of the selection's suite with the role `check` or
    `forgetting` (not circular) that the recipe does not already check."""
    from eval.suite import entries_with_role
    from eval.task import resolve_task

    out = [(c, "check") for c in recipe.checks]
    seen = {(resolve_task(c.task, recipe.path.parent).path, c.split, c.mode) for c in recipe.checks}
    selection = settings.workspace.read_selection()
    for role in ("check", "forgetting"):
        for task, entry in entries_with_role(selection, role):
            if not entry.circular and (task.path, entry.split, entry.mode) not in seen:
                seen.add((task.path, entry.split, entry.mode))
                out.append(
                    (
                        CheckSpec(
                            task=str(task.path), split=entry.split, mode=entry.mode, metric=entry.metric
                        ),
                        role,
                    )
                )
    return out


def with_suite_samples(recipe: Recipe, settings: Settings) -> Recipe:
    """The recipe with two items of each selection-suite entry with the role `sample` added to its
    sample prompts (unless the recipe samples that task split already)."""
    from eval.suite import entries_with_role
    from eval.task import resolve_task

    seen = {(resolve_task(t.task, recipe.path.parent).path, t.split) for t in recipe.samples.tasks}
    extra = []
    for task, entry in entries_with_role(settings.workspace.read_selection(), "sample"):
        if (task.path, entry.split) not in seen:
            seen.add((task.path, entry.split))
            extra.append(SampleTaskSpec(task=str(task.path), split=entry.split, count=2))
    if not extra:
        return recipe
    return recipe.model_copy(
        update={"samples": recipe.samples.model_copy(update={"tasks": [*recipe.samples.tasks, *extra]})}
    )
