"""Every YAML file in the repository, found by walking it, loads with the schema of its folder:
a file no schema reads, or one its schema refuses, fails here rather than in a user's run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import REPO


def loaders() -> dict[str, object]:
    from eval.suite import load_suite
    from eval.task import load_task
    from models.card import load_card
    from synth.recipe import load_synth_recipe
    from train.recipe import load_recipe

    return {
        "tasks": load_task,
        "suites": load_suite,
        "train": load_recipe,
        "synth": load_synth_recipe,
        "models/cards": load_card,
    }


def yaml_files() -> list[Path]:
    """Every .yaml/.yml file under the repository, less hidden folders (.git, .venv*) and the
    runs and caches a checkout may hold."""
    found = []
    for folder, dirs, files in os.walk(REPO):
        dirs[:] = [
            d for d in dirs if not d.startswith(".") and d not in ("runs", "node_modules", "__pycache__")
        ]
        found += [Path(folder) / f for f in files if f.endswith((".yaml", ".yml"))]
    return sorted(found)


def test_the_walk_finds_every_kind():
    kinds = {p.relative_to(REPO).parts[0] for p in yaml_files()}
    assert {"tasks", "suites", "train", "synth", "models"} <= kinds


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_file_loads_with_its_schema(path):
    relative = path.relative_to(REPO).as_posix()
    folder = max((f for f in loaders() if relative.startswith(f + "/")), key=len, default=None)
    assert folder is not None, f"{relative}: no schema reads YAML here (known folders: {sorted(loaders())})"
    loaders()[folder](path)
