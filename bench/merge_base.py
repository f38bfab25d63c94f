"""Which merge to ship: two finished training runs of the same recipe that differ only in
`merge_base` (fp32, dequantized), compared item by item on every check and forgetting probe of
the default job, as `make train` scored them (paired: the same items, the same metric).

    .venv/bin/python bench/merge_base.py --runs-dir runs --a merge-fp32 --b merge-dq

A merge wins when it is significantly better on at least one check and significantly worse on no
check or probe (the rule train/checkpoints.py uses for checkpoints); otherwise neither does.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.artifacts import CheckpointScores, TrainSummary, read_artifact  # noqa: E402
from core.workspace import TrainRun, Workspace  # noqa: E402
from eval import metrics as M  # noqa: E402
from eval.results import newest_finished_run, run_items  # noqa: E402
from eval.stats import compare  # noqa: E402
from eval.summary import comparison_text  # noqa: E402


def merged_scores(
    workspace: Workspace, run: TrainRun, summary: TrainSummary, check: dict
) -> dict[str, float]:
    """item id -> the merged model's score on `check`: from the checkpoint evaluation it reused,
    else from the run `make train` stored."""
    metric = check["metric"]
    if check.get("merged_scored_at", "").startswith("checkpoint evaluation"):
        step = summary.checkpoint["chosen_step"]
        record = read_artifact(run.evaluation_scores(step), CheckpointScores)
        entry = record.entries[f"{check['task']}-{check['split']}-{check.get('mode', 'gen')}"]
        return dict(zip(entry["ids"], entry["scores"]))
    conn = sqlite3.connect(workspace.results_db)
    try:
        run_id = newest_finished_run(
            conn, summary.merged_model, check["task"], check["split"], check.get("mode", "gen")
        )
        if run_id is None:
            sys.exit(
                f"{run.root}: no stored run of {summary.merged_model} on {check['task']}-{check['split']}"
            )
        return {i["item_id"]: i["scores"][metric] for i in run_items(conn, run_id)}
    finally:
        conn.close()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs-dir", type=Path, default=Path("runs"))
    parser.add_argument("--a", required=True, help="a training run's name (runs/train/NAME)")
    parser.add_argument("--b", required=True, help="the other run's name")
    args = parser.parse_args(argv)
    workspace = Workspace(args.runs_dir)
    runs = {name: TrainRun(workspace.train_run(name)) for name in (args.a, args.b)}
    summaries = {name: read_artifact(run.summary, TrainSummary) for name, run in runs.items()}
    bases = {name: s.recipe for name, s in summaries.items()}
    print(f"a = {args.a} ({bases[args.a]}), b = {args.b} ({bases[args.b]}); difference = b - a")
    better = {args.a: [], args.b: []}
    worse = {args.a: [], args.b: []}
    for check in summaries[args.a].checks:
        key = (check["task"], check["split"], check.get("mode", "gen"))
        other = next(
            c for c in summaries[args.b].checks if (c["task"], c["split"], c.get("mode", "gen")) == key
        )
        a = merged_scores(workspace, runs[args.a], summaries[args.a], check)
        b = merged_scores(workspace, runs[args.b], summaries[args.b], other)
        ids = sorted(set(a) & set(b))
        metric = check["metric"]
        c = compare([b[i] for i in ids], [a[i] for i in ids], binary=metric in M.BINARY).record(metric)
        t = comparison_text(c)
        role = check.get("role", "check")
        mean_a, mean_b = (sum(x[i] for i in ids) / len(ids) for x in (a, b))
        print(
            f"{key[0]}-{key[1]} {key[2]} {metric} ({role}, {len(ids)} items): a {mean_a:.4f}, b {mean_b:.4f}, "
            f"b - a {t['diff_text']} {t['ci']}, p {t['p_text']} ({c['test']}): {c['verdict']} for b"
        )
        if c["significant"]:
            (better if c["better"] else worse)[args.b].append((role, key))
            (worse if c["better"] else better)[args.a].append((role, key))
    winners = [n for n in (args.a, args.b) if any(r == "check" for r, _ in better[n]) and not worse[n]]
    print(
        f"wins: {winners[0] if winners else 'neither (no significant difference on a check without a loss)'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
