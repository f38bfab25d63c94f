"""What the report reads besides the results store: the newest rescore record, the training run
behind the served model, the manifest of every run shown, and the systems a blind review compares."""

from __future__ import annotations

import json
import platform
from pathlib import Path

from core.artifacts import MergeProvenance, RescoreRecord, TrainSummary, read_artifact
from core.errors import UserError
from core.store import open_read_only
from core.workspace import TrainRun, Workspace, provenance as provenance_of
from eval.runner import git_revision
from eval.suite import entries_with_role
from reports.records import Rescored, TrainingRun
from reports.before_after import paired_runs
from reports.collect import Run, check_side_by_side, load_run


def newest_rescore(runs_dir: Path) -> Rescored | None:
    files = Workspace(runs_dir).rescore_records()
    if not files:
        return None
    record = read_artifact(files[-1], RescoreRecord)
    provenance = provenance_of(Path(record.model_dir))
    if not provenance.is_file():
        raise UserError(f"{files[-1]}: cannot tell the base model of {record.model} (no {provenance})")
    return Rescored(record, files[-1], read_artifact(provenance, MergeProvenance).base_card)


def training_run(runs_dir: Path, rescore: Rescored | None) -> TrainingRun | None:
    """The training run behind the served model, else the newest one."""
    summaries = Workspace(runs_dir).train_summaries()
    if not summaries:
        return None
    chosen = summaries[-1]
    if rescore:
        for path in summaries:
            if Path(rescore.record.model_dir).resolve() == TrainRun(path.parent).merged.resolve():
                chosen = path
    summary = read_artifact(chosen, TrainSummary)
    log = []
    run = TrainRun(chosen.parent)
    log_path = run.log
    if log_path.is_file():
        for n, line in enumerate(log_path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    log.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"{log_path}:{n}: not a JSON line: {exc}") from exc
    provenance_path = provenance_of(run.merged)
    provenance = read_artifact(provenance_path, MergeProvenance) if provenance_path.is_file() else None
    return TrainingRun(
        chosen.parent.name,
        summary,
        provenance,
        losses=[e for e in log if "loss" in e and "sample" not in e],
        evals=[e for e in log if "eval_loss" in e],
        samples=[e for e in log if "sample" in e],
    )


def manifest(runs: list[Run]) -> dict:
    import jinja2

    rows = []
    for r in sorted(runs, key=lambda r: (r.model, r.entry)):
        ident = r.meta.get("identity", {})
        weights = ident.get("weights_sha256")
        if isinstance(weights, dict):
            weights = ",".join(f"{k}:{v[:12]}" for k, v in sorted(weights.items()))
        rows.append(
            {
                "run_id": r.run_id,
                "model": r.model,
                "task": r.entry[0],
                "split": r.entry[1],
                "mode": r.entry[2],
                "backend": ident.get("backend"),
                "task_sha256": r.task_sha256[:12],
                "data_sha256": (r.meta.get("data_sha256") or "")[:12],
                "prompt_sha256": (r.meta.get("prompt_sha256") or "")[:12],
                "chat_template_sha256": (ident.get("chat_template_sha256") or "")[:12],
                "weights": (weights or "")[:40],
                "versions": {**r.meta.get("versions", {}), "transformers": ident.get("transformers")},
                "git": (r.meta.get("git_revision") or "")[:10],
                "n": len(r.summary.items),
            }
        )
    return {
        "runs": rows,
        "report_git": git_revision(),
        "python": platform.python_version(),
        "jinja2": jinja2.__version__,
    }


def review_systems(runs_dir: Path, *, with_candidates: bool = False) -> dict[str, dict[str, Run]]:
    """The systems a blind review compares on the free-text tasks: the base model and the merged
    model (scored locally), plus the other selection candidates when asked."""
    workspace = Workspace(runs_dir)
    db = workspace.results_db
    if not db.is_file():
        raise UserError(f"{db}: no results store; run `make select` first")
    selection = workspace.read_selection()
    rescore = newest_rescore(runs_dir)
    if rescore is None:
        raise UserError("review: nothing to compare yet; run `make train` and `make rescore` first")
    conn = open_read_only(db)
    try:
        base, local, _served = paired_runs(conn, selection, rescore)
        free_text = [t for t, r in base.runs.items() if r.summary.task.parser != "choice"]
        chosen = {task.name for task, _ in entries_with_role(selection, "review")}
        if chosen:  # the suite names the tasks to review; otherwise every free-text task
            free_text = [t for t in free_text if t in chosen]
        systems = {
            base.label: {t: base.runs[t] for t in free_text},
            local.label: {t: local.runs[t] for t in free_text},
        }
        if with_candidates and selection:
            for model, ids in selection.runs.items():
                if model == rescore.base_card:
                    continue
                for run_id in ids:
                    run = load_run(conn, run_id, str(workspace.selection))
                    if run.summary.mode == "gen" and run.summary.task.name in free_text:
                        check_side_by_side(
                            [base.runs[run.summary.task.name], run],
                            f"the {run.summary.task.name} runs of {model} and the base model",
                        )
                        systems.setdefault(model, {})[run.summary.task.name] = run
    finally:
        conn.close()
    if not free_text:
        raise UserError("review: the re-scored tasks include no free-text task (style, fact) to review")
    return systems
