"""Where a killed training run picks up: its newest complete checkpoint, with the log and the
checkpoints past it dropped."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from core.files import write_text_atomic


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose trainer_state.json (Trainer writes it last) parses; newer ones
    are what a kill during a save leaves behind, and are removed."""
    if not folder.is_dir():
        return None
    found = sorted(
        (p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()),
        key=lambda p: int(p.name[11:]),
        reverse=True,
    )
    for path in found:
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            return path
        except (OSError, ValueError):
            print(f"train: removing incomplete checkpoint {path}")
            shutil.rmtree(path)
    return None


def drop_checkpoints_from(folder: Path, step: int) -> None:
    """Remove the checkpoints saved at `step` or later: their weights are a run gone bad."""
    for path in folder.glob("checkpoint-*"):
        if path.is_dir() and path.name[11:].isdigit() and int(path.name[11:]) >= step:
            shutil.rmtree(path)


def truncate_log(log_path: Path, step: int) -> None:
    """Drop log records past the checkpoint being resumed: those steps run again."""
    if not log_path.exists():
        return
    keep = [
        line
        for line in log_path.read_text(encoding="utf-8").splitlines()
        if line.strip() and json.loads(line).get("step", 0) <= step
    ]
    write_text_atomic(log_path, "".join(line + "\n" for line in keep))


def finished(checkpoint: Path) -> bool:
    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return state["global_step"] >= state["max_steps"] > 0
