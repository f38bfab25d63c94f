"""The JSON files selectune writes, each a typed schema with a `schema_version`, written and read
through `write_artifact` and `read_artifact` only. docs/artifacts.md documents them key by key.

A file of an older version is migrated when read (a file with no `schema_version` is version 1,
as every file written before versions existed); a file of a newer version than this code knows
is refused with one line rather than misread.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from core.config import format_validation_error
from core.errors import UserError
from core.files import read_json, write_json_atomic


class Artifact(BaseModel):
    """Top-level keys are checked (an unknown or missing one is an error); nested records are
    described in docs/artifacts.md."""

    model_config = ConfigDict(extra="forbid")
    VERSION: ClassVar[int] = 1
    MIGRATIONS: ClassVar[dict[int, Callable[[dict], dict]]] = {}
    """from_version -> a function that turns a record of that version into the next one."""

    schema_version: int


def _rename_comparison(record: dict, old: str) -> dict:
    return {("diff" if k == old else k): v for k, v in record.items()}


def _selection_v1(data: dict) -> dict:
    comparisons = {
        model: [_rename_comparison(c, "diff_best_minus_other") for c in comps]
        for model, comps in data.get("comparisons_vs_best", {}).items()
    }
    return {**data, "comparisons_vs_best": comparisons} if "comparisons_vs_best" in data else data


class Selection(Artifact):
    """runs/selection.json, written by `make select`."""

    VERSION = 2
    MIGRATIONS = {1: _selection_v1}
    winner: str | None
    best_mean_rank: str | None = None
    tied_with_best: list[str] = []
    reasons: list[str]
    candidates: list[dict]
    comparisons_vs_best: dict[str, list[dict]] = {}
    rule: str
    budget: dict[str, float]
    cells: list[dict]
    per_fact_recall: dict[str, dict[str, float]]
    runs: dict[str, list[str]]
    git_revision: str | None
    created: str
    style_classifier_accuracy: float | None = None
    style_classifier_classes: dict[str, float] = {}
    """Held-out accuracy per class of the style classifier: 温柔, 毒舌 and neither (absent before
    it had a third class)."""
    baselines: list[dict] = []
    """Per choice entry: the majority label and its accuracy, chance, each candidate against the majority."""
    suite: dict[str, str] | None = None
    """The suite scored: `name`, `file`, `sha256` (absent before suites were files)."""
    sequential: list[dict] = []
    """Per entry scored sequentially: `task`, `split`, `mode`, `size`, `items` per candidate,
    `stopped` (candidate -> why it stopped early), `tied` (the candidates settled as equivalent,
    the leader first; empty otherwise) and `reason` the entry stopped."""
    executor: dict = {"name": "local"}
    """Where the models ran: `name` (local or ray); on Ray also `address` and `nodes` (model ->
    the node its actor ran on)."""

    def suite_file(self) -> Path | None:
        """The suite file scored, where it still is; None before suites were files or once it is gone."""
        path = Path(self.suite["file"]) if self.suite and self.suite.get("file") else None
        return path if path is not None and path.is_file() else None


def _train_summary_v1(data: dict) -> dict:
    fact = data.get("fact")
    return {**data, "fact": _rename_comparison(fact, "diff_merged_minus_base")} if fact else data


def _train_summary_v2(data: dict) -> dict:
    fact = data.get("fact")
    rest = {k: v for k, v in data.items() if k != "fact"}
    return {**rest, "checks": [{"metric": "fact_recall", **fact}] if fact else []}


class TrainSummary(Artifact):
    """runs/train/<run>/summary.json, written last by `make train`."""

    VERSION = 3
    MIGRATIONS = {1: _train_summary_v1, 2: _train_summary_v2}
    model: str
    merged_model: str
    recipe: str
    run_dir: str
    adapter: str
    merged: str
    steps: int
    train_seconds: float
    total_seconds: float
    resumed_from: str | None
    final_train_loss: float | None
    final_val_loss: float | None
    cleaning: dict[str, Any]
    parity: dict[str, Any]
    checks: list[dict[str, Any]]
    """The recipe's checks and the suite's `check`/`forgetting` entries, each a paired comparison
    (a = merged, b = base) with `task`, `split`, `items`, the `base` and `merged` estimates and
    `role` (absent before suites had roles: a check)."""
    contamination: dict[str, Any] | None = None
    """The contamination gate: counts, thresholds, `flagged_items` per "task/split" and the
    `worst` pairs side by side (absent before the gate existed)."""
    checkpoint: dict[str, Any] | None = None
    """Checkpoints chosen by evidence (train/checkpoints.py): `chosen_step`, `final_step`,
    `reason`, `adapter`, the probe `curves` and the paired `comparisons` against the final step
    (absent before it existed, or with no probe entries)."""


class MergeProvenance(Artifact):
    """runs/train/<run>/merged/provenance.json, beside the merged weights."""

    base_card: str
    base_weights_sha256: str | dict[str, str] | None
    """One hash, or one per weights file (a checkpoint in several shards)."""
    adapter_config: dict[str, Any]
    adapter_sha256: str
    data_sha256: str
    recipe: dict[str, Any]
    recipe_sha256: str | None
    final_train_loss: float | None
    final_val_loss: float | None
    steps: int
    parity: dict[str, Any]
    checkpoint_step: int | None = None
    """The training step whose adapter was merged (absent before checkpoints were chosen)."""


class RescoreRecord(Artifact):
    """runs/serve/rescore-<model>.json, written by `make rescore`."""

    model: str
    model_dir: str
    engine: str
    concurrency: int
    base_url: str
    limit: int | None
    sampling: dict[str, float | int]
    parity: dict[str, Any]
    serving: dict[str, dict[str, Any]]
    served_runs: dict[str, str]


class ServerState(Artifact):
    """runs/serve/server.json: the server `make serve` started."""

    pid: int
    engine: str
    base_url: str
    host: str
    port: int
    model_name: str
    log: str
    argv: list[str]
    model: str | None = None
    model_dir: str | None = None
    base_card: str | None = None


class SynthProvenance(Artifact):
    """runs/synth/<recipe>/provenance.json, written last by `make data-synth`."""

    recipe: str
    recipe_sha256: str | None
    teacher: dict[str, Any]
    templates_sha256: dict[str, str]
    context_sha256: str | None
    sampling: dict[str, dict[str, Any]]
    seed: int
    seeds_sha256: str
    counts: dict[str, int]
    removed: dict[str, Any]
    budget: dict[str, Any]
    stopped: str | None
    complete: bool
    format: str
    data: str
    data_sha256: str
    git_revision: str | None


class CheckpointScores(Artifact):
    """runs/train/<run>/checkpoint_evals/step-N/scores.json, written last by a checkpoint
    evaluation (train/checkpoints.py): a step without it is evaluated again."""

    step: int
    adapter: str
    basis: dict[str, Any]
    """What decides the scores besides the weights: the merge base, the quantization, and each
    entry's metric and item ids."""
    entries: dict[str, dict[str, Any]]
    """Per entry key: `metric`, `role`, `ids`, `scores` and `outputs`, item by item."""


class SynthReport(Artifact):
    """runs/synth/<recipe>/report.json: what `make data-synth`'s filters removed, and why."""

    removed: dict[str, int]
    examples: dict[str, list[dict[str, Any]]]
    counts: dict[str, int]


class MachineCalibration(Artifact):
    """CACHE_DIR/machine/<identity hash>.json: what `selectune machine` measured (models/machine.py)."""

    identity: dict[str, Any]
    """`cpu` (model name), `flags` (those of models.machine.FLAGS it has), `torch`, `threads`."""
    matmul_gflops: dict[str, float]
    """dtype -> GFLOP/s of a linear layer of 512 rows as the stages run it; bfloat16 only where the
    CPU multiplies it natively."""
    decode_gflops: dict[str, float]
    """The same at a decoding step's 16 rows."""
    bandwidth_gbs: float
    load_gbs: float
    measured: str
    seconds: float


A = TypeVar("A", bound=Artifact)


def _validate(schema: type[A], data: dict, where: Path | str) -> A:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(where, exc, data, schema)) from None


def write_artifact(path: Path, schema: type[A], record: dict) -> A:
    """Check `record` against `schema`, stamp its version, write it atomically (the record's own
    keys, in its own nesting, plus `schema_version`); returns it as a `schema` object."""
    stamped = {**record, "schema_version": schema.VERSION}
    typed = _validate(schema, stamped, path)
    write_json_atomic(path, stamped)
    return typed


def read_artifact(path: Path, schema: type[A]) -> A:
    """The file as the current version of `schema` describes it (a `schema` object), older
    versions migrated."""
    data = read_json(path)
    version = data.get("schema_version", 1)
    if not isinstance(version, int) or version > schema.VERSION:
        raise UserError(
            f"{path}: schema_version {version} is newer than this selectune reads "
            f"({schema.VERSION}); update selectune"
        )
    while version < schema.VERSION:
        data = schema.MIGRATIONS.get(version, lambda d: d)(data)
        version += 1
    return _validate(schema, {**data, "schema_version": version}, path)
