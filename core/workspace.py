"""The runs directory's layout: every path under it is named here and nowhere else.

    runs/
      results.sqlite                 results store: runs, items, judge verdicts, review, teacher calls
      selection.json                 `make select`'s decision and evidence
      train/<run>/summary.json       a finished training run (written last), beside its
                  data/ train_log.jsonl checkpoints/ adapter/ merged/
      serve/server.json              the server `make serve` started
      serve/<engine>.log             its log; teacher-<engine>.log for data-synth's teacher
      serve/rescore-<model>.json     `make rescore`'s parity gate and serving figures
      report/                        `make report`'s pages
      synth/<recipe>/                `make data-synth`'s output
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError


def slug(text: str) -> str:
    """`text` as a file-name part: letters, digits, '-', '_' and '.' kept, the rest '_'."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


@dataclass(frozen=True)
class Workspace:
    root: Path

    @property
    def results_db(self) -> Path:
        return self.root / "results.sqlite"

    @property
    def selection(self) -> Path:
        return self.root / "selection.json"

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    def train_run(self, name: str) -> Path:
        return self.train_dir / name

    @staticmethod
    def train_summary(run_dir: Path) -> Path:
        return run_dir / "summary.json"

    def train_summaries(self) -> list[Path]:
        """Finished training runs' summaries, oldest first."""
        return sorted(self.train_dir.glob("*/summary.json"), key=lambda p: p.stat().st_mtime)

    @property
    def serve_dir(self) -> Path:
        return self.root / "serve"

    @property
    def server_state(self) -> Path:
        return self.serve_dir / "server.json"

    def server_log(self, engine: str, role: str = "") -> Path:
        return self.serve_dir / f"{role + '-' if role else ''}{engine}.log"

    def rescore_record(self, model_label: str) -> Path:
        return self.serve_dir / f"rescore-{slug(model_label)}.json"

    def rescore_records(self) -> list[Path]:
        """Every rescore record, oldest first."""
        return sorted(self.serve_dir.glob("rescore-*.json"), key=lambda p: p.stat().st_mtime)

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    def synth_dir(self, recipe_name: str) -> Path:
        return self.root / "synth" / recipe_name

    def read_selection(self) -> dict | None:
        """selection.json, or None before `make select` has written one."""
        return read_json(self.selection) if self.selection.is_file() else None

    def winner(self) -> str:
        """The selected model's name; a UserError naming the file when there is none."""
        record = self.read_selection()
        if record is None:
            raise UserError(f"{self.selection}: not found; run `make select` first, or name a model")
        if not record.get("winner"):
            raise UserError(f"{self.selection}: has no winner; name a model")
        return record["winner"]

    def newest_train_summary(self) -> tuple[Path, dict] | None:
        """(path, record) of the newest finished training run, or None."""
        summaries = self.train_summaries()
        return (summaries[-1], read_json(summaries[-1])) if summaries else None


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read: {' '.join(str(exc).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
