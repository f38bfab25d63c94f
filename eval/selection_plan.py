"""What a `make select` will score and what it will cost here, before any model runs: the
candidates, the suite's entries and items, the entries the sequential design takes, the dtype, the
estimate (eval/estimate.py). `select` and `make bench-ray` (bench/ray_select.py) both start here.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from eval.backends.base import DEFAULT_BATCH_SIZE
from eval.suite import DEFAULT_SUITE, load_suite
from eval.task import load_items
from models.card import ModelCard


class Planned(NamedTuple):
    """What a `select` will score, and its estimate where the CPU cost model applies."""

    spec: object
    """The suite (eval/suite.py)."""
    cards: list[ModelCard]
    checkpoints: dict[str, Path]
    entries: list
    entry_items: list[list]
    sequential: set[int]
    """The entries the sequential design scores round by round (eval/sequential.py)."""
    dtype: str
    """The dtype scoring runs in here ("auto" resolved)."""
    cost: object | None
    """Its Estimate (eval/estimate.py): None off this machine's CPU or off the local executor."""


def plan_selection(
    settings,
    *,
    models: str | None = None,
    suite: Path = DEFAULT_SUITE,
    batch_size: int = DEFAULT_BATCH_SIZE,
    device: str = "auto",
    dtype: str = "auto",
    design: str = "auto",
    plan: bool = False,
    provision_models: bool = True,
) -> Planned:
    """Resolve the candidates (provisioning the missing ones with `provision_models`), read the
    suite and its items, and count what scoring will cost here; `make bench-ray` prints this too."""
    from eval.sequential import sequential_entries
    from models.card import load_cards
    from models.loading import resolve_device, scoring_dtype
    from models.local import resolve_candidates
    from models.store import provision

    dtype = scoring_dtype(dtype, device)  # bf16 where the machine multiplies it natively
    spec, entries = load_suite(suite)  # every entry checked before any model runs
    chosen = (
        resolve_candidates(models.split(","))
        if models
        else [(c, None) for c in load_cards().values() if c.default]
    )
    cards, checkpoints = [c for c, _ in chosen], {c.name: path for c, path in chosen if path is not None}
    for card in cards:
        if card.name not in checkpoints and not card.is_endpoint and provision_models:
            provision(card, settings.model_store)
    entry_items = [load_items(task, e.split, settings.resolved_data_dir) for task, e in entries]
    sizes = [len(items) for items in entry_items]
    sequential = set() if plan else sequential_entries(entries, sizes, design, len(cards))
    cost = None
    if not plan and settings.executor == "local" and resolve_device(device) == "cpu":  # the CPU cost model
        from eval.estimate import select_estimate
        from eval.learned import learned_note
        from models.machine import calibration

        cost = select_estimate(
            settings,
            cards,
            checkpoints,
            entries,
            entry_items,
            batch_size=batch_size,
            dtype=dtype,
            sequential=sequential,
        )
        cost.notes += learned_note(calibration(settings.cache_dir), {f"{e.mode} {dtype}" for _, e in entries})
    return Planned(spec, cards, checkpoints, entries, entry_items, sequential, dtype, cost)
