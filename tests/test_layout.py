"""The house's floors, read from the code with `ast`: what each package may import, who may
import the command line, how big a module may grow and how its lines are written."""

from __future__ import annotations

import ast
import subprocess
import sys
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
    importers = [
        p.relative_to(REPO)
        for p in modules()
        if any(n == "selectune.cli" or n.startswith("selectune.cli.") for n in imported(p))
    ]
    assert importers == [Path("selectune/__main__.py")]


def test_the_ground_floor_imports_no_stage():
    for path in (REPO / "core").rglob("*.py"):
        ours = {name.split(".")[0] for name in imported(path)} & set(FLOORS)
        assert ours <= {"core"}, f"{path.relative_to(REPO)} imports {sorted(ours - {'core'})}"


def test_no_module_over_the_size_limit():
    long = {
        str(p.relative_to(REPO)): n
        for p in modules()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_class_is_defined_inside_a_function():
    found = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found += [
                    f"{path.relative_to(REPO)}:{c.lineno} {c.name} in {node.name}"
                    for c in ast.walk(node)
                    if isinstance(c, ast.ClassDef)
                ]
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
                "find_task",
                "load_task",
                "startswith",
            ):
                consts = [
                    a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
                ]
                if getattr(node.func, "attr", "") == "startswith":
                    consts = [c for c in consts if any(t.startswith(c) for t in tasks)]
            elif isinstance(node, ast.Compare) and any(
                getattr(side, "attr", "") == "name" for side in [node.left, *node.comparators]
            ):
                consts = [c.value for c in [node.left, *node.comparators] if isinstance(c, ast.Constant)]
            found += [
                f"{path.relative_to(REPO)}:{node.lineno} {c!r}"
                for c in consts
                if c in tasks
                or getattr(node.func if isinstance(node, ast.Call) else node, "attr", "") == "startswith"
            ]
    assert not found, f"task names in the code: {found}"


# ---------------------------------------------------------------------------------------------
# Owners that own: paths inside runs/, the store's tables, and no loops inside a floor. Each check
# is a function of one file, run over the code and over a probe file that must fail it.

WORKSPACE = REPO / "core" / "workspace.py"
STORE = REPO / "core" / "store.py"
TABLE_OWNERS = {
    "runs": "eval/results.py",
    "items": "eval/results.py",
    "judge_verdicts": "eval/results.py",
    "review_pairs": "reports/review.py",
    "review_votes": "reports/review.py",
    "review_invites": "reports/invites.py",
    "review_judgements": "reports/pair_judge.py",
    "teacher_calls": "synth/teacher.py",
}


def run_names() -> set[str]:
    """The names core/workspace.py joins onto paths under runs/ (file and folder names), less the
    ones that are also folders of this repository (train/, serve/, synth/), which code may join
    onto the repository's root, and `data`, the data cache's folder too."""
    tree = ast.parse(WORKSPACE.read_text(encoding="utf-8"))
    names = {
        n.right.value
        for n in ast.walk(tree)
        if isinstance(n, ast.BinOp)
        and isinstance(n.op, ast.Div)
        and isinstance(n.right, ast.Constant)
        and isinstance(n.right.value, str)
    }
    for layout in (
        n.value
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign | ast.AnnAssign)
        and getattr(n.targets[0] if isinstance(n, ast.Assign) else n.target, "id", "") == "LAYOUT"
        and isinstance(n.value, ast.Dict)
    ):
        names |= {Path(v.value).name for v in layout.values}
    return {n for n in names if not (REPO / n).is_dir()} - {"data"}


def runs_paths_built(path: Path, names: set[str]) -> list[str]:
    """`x / "adapter"`, or a glob for "*/summary.json": a path inside runs/ built by hand."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Div)
            and isinstance(node.right, ast.Constant)
            and node.right.value in names
        ):
            found.append(f"{path.name}:{node.lineno} / {node.right.value!r}")
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("glob", "rglob"):
            found += [
                f"{path.name}:{node.lineno} glob {a.value!r}"
                for a in node.args
                if isinstance(a, ast.Constant)
                and isinstance(a.value, str)
                and names & set(a.value.split("/"))
            ]
    return found


def tables_queried(path: Path) -> set[str]:
    """The store's tables that SQL in `path` names (FROM, INTO, UPDATE, JOIN, TABLE)."""
    import re

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found |= set(
                re.findall(r"\b(?:FROM|INTO|UPDATE|JOIN|TABLE(?: IF NOT EXISTS)?)\s+(\w+)", node.value)
            )
    return found & set(TABLE_OWNERS)


def foreign_sql(path: Path, as_module: str) -> list[str]:
    return sorted(t for t in tables_queried(path) if as_module not in (TABLE_OWNERS[t], "core/store.py"))


def test_paths_inside_runs_are_named_by_the_workspace_only():
    names = run_names()
    assert {"summary.json", "adapter", "scores.json", "provenance.json", "results.sqlite"} <= names
    found = [f for p in modules() if p != WORKSPACE for f in runs_paths_built(p, names)]
    assert not found, f"paths inside runs/ built outside core/workspace.py: {found}"


def test_the_runs_path_check_fails_a_probe(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "def f(run_dir, root):\n    a = run_dir / 'adapter'\n    return a, root.glob('*/summary.json')\n"
    )
    assert runs_paths_built(probe, run_names()) == [
        "probe.py:2 / 'adapter'",
        "probe.py:3 glob '*/summary.json'",
    ]


def test_sql_names_a_table_only_in_the_module_that_owns_its_rows():
    found = {
        str(p.relative_to(REPO)): bad for p in modules() if (bad := foreign_sql(p, str(p.relative_to(REPO))))
    }
    assert not found, f"SQL on tables owned elsewhere (owners: {TABLE_OWNERS}): {found}"


def test_the_sql_check_fails_a_probe(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        'def f(conn):\n    return conn.execute("SELECT run_id FROM runs WHERE model = ?", ("m",))\n'
    )
    assert (
        foreign_sql(probe, "reports/collect.py") == ["runs"] and foreign_sql(probe, "eval/results.py") == []
    )


def imports_of_tests(path: Path) -> list[str]:
    return sorted(n for n in imported(path) if n == "tests" or n.startswith("tests."))


def test_no_product_or_bench_module_imports_a_test_module():
    found = {str(p.relative_to(REPO)): bad for p in modules() if (bad := imports_of_tests(p))}
    assert not found, f"modules importing tests: {found}"


def test_the_tests_import_check_fails_a_probe(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from tests.conftest import build_tiny_qwen2\n")
    assert imports_of_tests(probe) == ["tests.conftest", "tests.conftest.build_tiny_qwen2"]


def import_cycles(files: dict[str, Path]) -> list[list[str]]:
    """The loops among `files` (module name -> path) through any import, lazy ones included."""
    graph = {m: {n for n in imported(p) if n in files and n != m} for m, p in files.items()}
    cycles, done = [], set()

    def walk(node: str, trail: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt in trail:
                loop = trail[trail.index(nxt) :]
                if frozenset(loop) not in done:
                    done.add(frozenset(loop))
                    cycles.append(loop)
            elif len(trail) < len(graph):
                walk(nxt, trail + [nxt])

    for start in sorted(graph):
        walk(start, [start])
    return cycles


def test_no_import_cycle_inside_a_floor():
    files = {".".join(p.relative_to(REPO).with_suffix("").parts): p for p in modules()}
    assert import_cycles(files) == []


def test_the_cycle_check_fails_a_probe(tmp_path):
    (tmp_path / "a.py").write_text("from b import thing\n")
    (tmp_path / "b.py").write_text("def thing():\n    from a import other\n")
    assert import_cycles({"a": tmp_path / "a.py", "b": tmp_path / "b.py"}) == [["a", "b"]]


def backends_built(path: Path) -> list[str]:
    """Backend classes called directly: backends are made through eval.backends.make_backend."""
    from eval.backends import REGISTRY

    classes = {target.rpartition(":")[2] for target in REGISTRY.values()}
    return [
        f"{path.name}:{n.lineno} {n.func.id}"
        for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in classes
    ]


def test_backends_are_made_through_the_registry_only():
    found = [f for p in modules() if p.parent != REPO / "eval" / "backends" for f in backends_built(p)]
    assert not found, f"backends built directly, not through eval.backends.make_backend: {found}"


def test_the_backend_factory_check_fails_a_probe(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from eval.backends.hf import HFBackend\n\ndef f(card, store):\n    return HFBackend(card, store)\n"
    )
    assert backends_built(probe) == ["probe.py:4 HFBackend"]


def ruff(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ruff", *args], cwd=cwd, capture_output=True, text=True)


def test_the_tree_is_formatted_and_linted_as_pyproject_says():
    formatted, linted = ruff("format", "--check", "."), ruff("check", ".")
    assert formatted.returncode == 0, formatted.stdout + formatted.stderr
    assert linted.returncode == 0, linted.stdout + linted.stderr


def test_the_format_check_fails_a_probe(tmp_path):
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    (tmp_path / "probe.py").write_text("def f(a,b):\n    return {'a':a,\n  'b':b}\n")
    assert ruff("format", "--check", ".", cwd=tmp_path).returncode == 1
    (tmp_path / "probe.py").write_text(f"def f(a, b):\n    return {'x' * 102!r}\n")
    assert ruff("check", ".", cwd=tmp_path).returncode == 0  # a 115-character line of one string: allowed
    (tmp_path / "probe.py").write_text(f"def f(a, b):\n    return {'x' * 112!r}\n")
    assert ruff("check", ".", cwd=tmp_path).returncode == 1
