"""The runs directory's layout: every path under it is named here and nowhere else.

runs/
  results.sqlite                 results store: runs, items, judge verdicts, review, teacher calls
  selection.json                 `make select`'s decision and evidence
  train/<run>/summary.json       a finished training run (written last), beside its
              data/ train_log.jsonl checkpoints/ adapter/ merged/ checkpoint_evals/step-N/
              (TrainRun names them)
  serve/server.json              the server `make serve` started
  serve/<engine>.log             its log; teacher-<engine>.log for data-synth's teacher
  serve/rescore-<model>.json     `make rescore`'s parity gate and serving figures
  report/                        `make report`'s pages
  synth/<recipe>/                `make data-synth`'s output: data.jsonl malformed.jsonl
                                 report.json provenance.json (SynthOutput names them)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from core.artifacts import Selection, TrainSummary, read_artifact
from core.errors import UserError


def slug(text: str) -> str:
    """`text` as a file-name part: letters, digits, '-', '_' and '.' kept, the rest '_'."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


LAYOUT = {
    "results_db": "results.sqlite",
    "selection": "selection.json",
    "train_dir": "train",
    "serve_dir": "serve",
    "server_state": "serve/server.json",
    "report_dir": "report",
    "synth_root": "synth",
}
"""The fixed paths under the runs directory, as attributes of a Workspace."""


def provenance(model_dir: Path) -> Path:
    """The provenance record beside a merged checkpoint (wherever it is), or a synthesis output."""
    return model_dir / "provenance.json"


class _Folder:
    """A folder whose fixed paths are named by its class's LAYOUT, as attributes."""

    LAYOUT: dict[str, str] = {}

    def __init__(self, root: Path):
        self.root = Path(root)
        for name, relative in self.LAYOUT.items():
            setattr(self, name, self.root / relative)

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.root == self.root


class TrainRun(_Folder):
    """One training run's folder, runs/train/<run>/: the cleaned split as trained on (`data`), the
    log, Trainer's checkpoints, the adapter, the merged model, the checkpoint evaluations (one
    folder per step, train/checkpoints.py) and Ray Train's own storage on a cluster."""

    LAYOUT = {
        "summary": "summary.json",
        "data": "data",
        "log": "train_log.jsonl",
        "checkpoints": "checkpoints",
        "adapter": "adapter",
        "merged": "merged",
        "evaluations": "checkpoint_evals",
        "ray_storage": "ray",
    }
    summary: Path
    data: Path
    log: Path
    checkpoints: Path
    adapter: Path
    merged: Path
    evaluations: Path
    ray_storage: Path

    def evaluation_steps(self) -> dict[int, Path]:
        """step -> its evaluation folder, for every step with one, in step order."""
        found = {int(p.name[5:]): p for p in self.evaluations.glob("step-*") if p.name[5:].isdigit()}
        return dict(sorted(found.items()))

    def evaluation(self, step: int) -> Path:
        return self.evaluations / f"step-{step}"

    def evaluation_adapter(self, step: int) -> Path:
        return self.evaluation(step) / "adapter"

    def evaluation_scores(self, step: int) -> Path:
        return self.evaluation(step) / "scores.json"


class SynthOutput(_Folder):
    """One `make data-synth` output folder, runs/synth/<recipe>/."""

    LAYOUT = {
        "data": "data.jsonl",
        "malformed": "malformed.jsonl",
        "report": "report.json",
        "provenance": "provenance.json",
    }
    data: Path
    malformed: Path
    report: Path
    provenance: Path


@dataclass(frozen=True)
class Workspace:
    root: Path
    results_db: Path = field(init=False)
    selection: Path = field(init=False)
    train_dir: Path = field(init=False)
    serve_dir: Path = field(init=False)
    server_state: Path = field(init=False)
    report_dir: Path = field(init=False)
    synth_root: Path = field(init=False)

    def __post_init__(self) -> None:
        for name, relative in LAYOUT.items():
            object.__setattr__(self, name, self.root / relative)

    def train_run(self, name: str) -> Path:
        return self.train_dir / name

    @staticmethod
    def train_summary(run_dir: Path) -> Path:
        return TrainRun(run_dir).summary

    @staticmethod
    def merged_model(run_dir: Path) -> Path:
        """A training run's merged checkpoint, found from the run's folder wherever the runs
        directory is and whatever folder the command started in."""
        return TrainRun(run_dir).merged

    def train_summaries(self) -> list[Path]:
        """Finished training runs' summaries, oldest first."""
        summaries = (TrainRun(d).summary for d in self.train_dir.glob("*/"))
        return sorted((p for p in summaries if p.is_file()), key=lambda p: p.stat().st_mtime)

    def server_log(self, engine: str, role: str = "") -> Path:
        return self.serve_dir / f"{role + '-' if role else ''}{engine}.log"

    def rescore_record(self, model_label: str) -> Path:
        return self.serve_dir / f"rescore-{slug(model_label)}.json"

    def rescore_records(self) -> list[Path]:
        """Every rescore record, oldest first."""
        return sorted(self.serve_dir.glob("rescore-*.json"), key=lambda p: p.stat().st_mtime)

    def synth_dir(self, recipe_name: str) -> Path:
        return self.synth_root / recipe_name

    def synth_output(self, recipe_name: str) -> SynthOutput:
        return SynthOutput(self.synth_dir(recipe_name))

    def read_selection(self) -> Selection | None:
        """selection.json, or None before `make select` has written one."""
        return read_artifact(self.selection, Selection) if self.selection.is_file() else None

    def winner(self) -> str:
        """The selected model's name; a UserError naming the file when there is none."""
        record = self.read_selection()
        if record is None:
            raise UserError(f"{self.selection}: not found; run `make select` first, or name a model")
        if not record.winner:
            raise UserError(f"{self.selection}: has no winner; name a model")
        return record.winner

    def newest_train_summary(self) -> tuple[Path, TrainSummary] | None:
        """(path, record) of the newest finished training run, or None."""
        summaries = self.train_summaries()
        return (summaries[-1], read_artifact(summaries[-1], TrainSummary)) if summaries else None
