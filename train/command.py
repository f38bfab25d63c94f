"""`selectune train` (`make train`): the cost here first (train/estimate.py), then the run
(train/pipeline.py)."""

from __future__ import annotations

from pathlib import Path

from core.settings import Settings


def train_entry(
    settings: Settings,
    *,
    recipe: Path,
    model: str | None = None,
    run_name: str | None = None,
    workers: int = 1,
    estimate: bool = False,
) -> int:
    """`selectune train` (`make train`): prints what the run will cost here (only that, with
    `estimate`), trains; exits non-zero when the merge fails its parity check.
    `workers`: Ray Train workers on the Ray executor (train/cluster.py)."""
    from train.recipe import load_recipe

    recipe = load_recipe(recipe)
    import torch

    cost = None
    if settings.executor == "local" and not torch.cuda.is_available():  # the CPU cost model
        from train.estimate import train_estimate

        cost = train_estimate(settings, recipe, model)
        print("\n".join(cost.lines()), flush=True)
    elif estimate:
        print(
            "train: no estimate: the cost model is for training on this machine's CPU with the local executor "
            "(docs/machine.md)"
        )
    if estimate:
        return 0
    from train.pipeline import train_command

    summary = train_command(settings, recipe, model, run_name, workers, cost if cost and cost.costs else None)
    return 0 if summary["parity"]["passed"] else 1
