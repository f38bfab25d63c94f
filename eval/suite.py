"""A selection suite: one YAML file under suites/ naming what `make select` scores.

    make select SUITE=suites/fewclue-test.yaml
    python -m selectune select --suite suites/default.yaml

Each entry names a task (by name, or by the path of its YAML file), a split, a mode, and
optionally the metric that ranks candidates on it (default: the task's first metric) and its
weight in the mean rank (default 1). Everything is checked when the suite loads, before any
model runs: an unknown task, split, mode or metric is one line naming the suite and the entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import Field

from core.config import NamedConfig, Strict, load_named_yaml
from core.errors import UserError
from eval import metrics as M
from eval.circular import option_spans
from eval.task import Mode, TaskSpec, resolve_task

if TYPE_CHECKING:
    from core.artifacts import Selection

SUITES_DIR = Path(__file__).resolve().parents[1] / "suites"
DEFAULT_SUITE = SUITES_DIR / "default.yaml"


class SuiteEntry(Strict):
    task: str
    """A task name (tasks/<name>.yaml), or the path of a task file, relative to the suite file."""
    split: str
    mode: Mode
    metric: str | None = None
    """The metric that ranks the candidates on this entry; default the task's first metric."""
    weight: float = Field(default=1.0, gt=0)
    """This entry's weight in the mean rank."""
    roles: list[Literal["check", "forgetting", "sample", "review"]] = []
    """What else the entry is for, after selection: `check`, scored on the base and the merged
    model by `make train` (beside the recipe's checks); `forgetting`, the same, as a probe of what
    fine-tuning must not lose; `sample`, two of its items generated during training at every
    sample step, with the under-fitting check where items list facts; `review`, a task the blind
    review pages pair (default: every free-text task)."""
    circular: bool = False
    """Ask a choice task once per rotation of its options (eval/circular.py); its metrics are then
    circular_accuracy (ranks by default) and letter_following."""


class Suite(NamedConfig):
    home: ClassVar[Path] = SUITES_DIR
    name: str
    description: str = ""
    entries: list[SuiteEntry] = Field(min_length=1)


def load_suite(path: Path) -> tuple[Suite, list[tuple[TaskSpec, SuiteEntry]]]:
    """The suite and each entry's task, every entry checked against its task."""
    if not path.is_file():
        known = ", ".join(sorted(p.name for p in SUITES_DIR.glob("*.yaml")))
        raise UserError(f"{path}: suite file not found (suites: {known})")
    suite = load_named_yaml(path, Suite, "suite")
    out = []
    for n, entry in enumerate(suite.entries):
        where = f"{path}: entries.{n} ({entry.task} {entry.split} {entry.mode})"
        try:
            task = resolve_task(entry.task, path.parent)
        except UserError as exc:
            raise UserError(f"{where}: {exc}") from None
        if entry.split not in task.data.splits:
            raise UserError(
                f"{where}: task '{task.name}' has no split '{entry.split}' "
                f"(splits: {', '.join(task.data.splits)})"
            )
        if entry.mode not in task.modes:
            raise UserError(
                f"{where}: task '{task.name}' has no mode '{entry.mode}' (modes: {', '.join(task.modes)})"
            )
        metrics = M.CIRCULAR if entry.circular else task.metrics
        if entry.circular and option_spans(task, task.prompt.user) is None:
            raise UserError(
                f"{where}: circular needs a choice task whose prompt has a line per option "
                f"({', '.join(f'{c}. ...' for c in task.choices or ['A'])}); task '{task.name}' has none"
            )
        if entry.metric is not None and entry.metric not in metrics:
            raise UserError(
                f"{where}: task '{task.name}' does not compute metric '{entry.metric}' "
                f"{'when circular ' if entry.circular else ''}(metrics: {', '.join(metrics)})"
            )
        out.append((task, entry))
    return suite, out


def ranked_metrics(selection: Selection | None) -> dict[tuple[str, str, str], str]:
    """(task, split, mode) -> the metric each entry of the selection's suite is ranked by
    (metrics.ranked_metric); empty when there was no selection or its suite file is gone."""
    path = selection.suite_file() if selection else None
    if path is None:
        return {}
    out = {}
    for task, e in load_suite(path)[1]:
        chosen = e.metric or (M.CIRCULAR_ACCURACY if e.circular else None)  # a circular entry's summary
        out[(task.name, e.split, e.mode)] = M.ranked_metric(task, e.mode, chosen)
    return out


def entries_with_role(selection: Selection | None, role: str) -> list[tuple[TaskSpec, SuiteEntry]]:
    """The entries of the suite the selection scored that have `role`; none when there was no
    selection or its suite file is gone."""
    path = selection.suite_file() if selection else None
    if path is None:
        return []
    return [(task, entry) for task, entry in load_suite(path)[1] if role in entry.roles]
