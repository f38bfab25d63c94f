"""The records the report reads besides the results store, as the report's modules pass them on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.artifacts import MergeProvenance, RescoreRecord, TrainSummary


@dataclass(frozen=True)
class Rescored:
    """The newest rescore record, the file it was read from and the base card of the model it scored
    (from the merged model's provenance)."""

    record: RescoreRecord
    file: Path
    base_card: str


@dataclass(frozen=True)
class TrainingRun:
    """A finished training run as the report shows it: its summary, the merge's provenance and
    its log's losses, evaluations and samples."""

    name: str
    summary: TrainSummary
    provenance: MergeProvenance | None
    losses: list[dict]
    evals: list[dict]
    samples: list[dict]
