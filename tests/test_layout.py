"""The house's floors, read from the code with `ast`: what each package may import, who may
import the command line, and how big a module may grow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

FLOORS = {
    # package: the packages of ours it may import (itself always)
    "core": set(),
    "models": {"core"},
    "eval": {"core", "models"},
    "train": {"core", "models", "eval"},
    "reports": {"core", "models", "eval"},
    "serve": {"core", "models", "eval"},
    "synth": {"core", "models", "eval", "serve"},
    "selectune": {"core", "models", "eval", "train", "reports", "serve", "synth"},
    "bench": {"core", "models", "eval", "train", "reports", "serve", "synth"},
}
PRODUCT = sorted(FLOORS)
MAX_LINES = 400


def modules() -> list[Path]:
    return sorted(p for package in PRODUCT for p in (REPO / package).rglob("*.py"))


def imported(path: Path) -> set[str]:
    """Every module name `path` imports, at any depth (lazy imports inside functions count)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_every_product_package_is_on_a_floor():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")} - {"tests"}
    assert packages <= set(FLOORS), f"packages with no floor in FLOORS: {packages - set(FLOORS)}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(REPO)))
def test_imports_run_down_the_floors_only(path):
    package = path.relative_to(REPO).parts[0]
    ours = {name.split(".")[0] for name in imported(path)} & set(FLOORS)
    wrong = ours - FLOORS[package] - {package}
    assert not wrong, f"{path.relative_to(REPO)} ({package}) imports {sorted(wrong)}: a floor above it"


def test_only_main_imports_the_command_line():
    importers = [p.relative_to(REPO) for p in modules()
                 if any(n == "selectune.cli" or n.startswith("selectune.cli.") for n in imported(p))]
    assert importers == [Path("selectune/__main__.py")]


def test_the_ground_floor_imports_no_stage():
    for path in (REPO / "core").rglob("*.py"):
        ours = {name.split(".")[0] for name in imported(path)} & set(FLOORS)
        assert ours <= {"core"}, f"{path.relative_to(REPO)} imports {sorted(ours - {'core'})}"


def test_no_module_over_the_size_limit():
    long = {str(p.relative_to(REPO)): n for p in modules()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_class_is_defined_inside_a_function():
    found = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found += [f"{path.relative_to(REPO)}:{c.lineno} {c.name} in {node.name}"
                          for c in ast.walk(node) if isinstance(c, ast.ClassDef)]
    assert not found, found


def test_no_task_is_named_in_the_code():
    """Suites, recipes and task files name tasks; Python never does (a task added or renamed in
    YAML needs no code change). Looks for a task name given to find_task/load_task, compared
    with a `.name`, or used as a prefix in `.startswith`."""
    tasks = {p.stem for p in (REPO / "tasks").glob("*.yaml")}
    found = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            consts = []
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                    "find_task", "load_task", "startswith"):
                consts = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                if getattr(node.func, "attr", "") == "startswith":
                    consts = [c for c in consts if any(t.startswith(c) for t in tasks)]
            elif isinstance(node, ast.Compare) and any(getattr(side, "attr", "") == "name"
                                                       for side in [node.left, *node.comparators]):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            found += [f"{path.relative_to(REPO)}:{node.lineno} {c!r}" for c in consts
                      if c in tasks or getattr(node.func if isinstance(node, ast.Call) else node, "attr", "") == "startswith"]
    assert not found, f"task names in the code: {found}"
