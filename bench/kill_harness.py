"""Kill harness: SIGKILL `select`, `train`, `rescore` and `data-synth` at seeded random points on
small inputs, rerun each to the end, and compare what it leaves with an uninterrupted run.

    .venv/bin/python bench/kill_harness.py                         # 10 kills per command
    .venv/bin/python bench/kill_harness.py --kills 3 --commands select,data-synth

Small inputs: a tiny Qwen2 checkpoint built here stands in for the weights of a hub card (as the
tests do); `select` scores it and the same checkpoint as a directory candidate on docs/byo.md's
FAQ, the style test and the fact test (100 items each); `train` fine-tunes it with docs/byo.md's
recipe; `rescore` serves the merged model with `transformers serve` and re-scores 12 fact items (its
parity gate at 50%: the tiny model's replies are noise, and one token decoded as <unk> on one
side only is not what this checks);
`data-synth` asks a scripted teacher on loopback HTTP (the tests' stub). Each kill lands at a
seeded uniform point of the uninterrupted run's wall time, on the command's whole process group;
a server it started and left behind is counted and stopped. Every run starts from the same
workspace. Compared, after normalising the workspace path and dropping wall times and the
server's port:
select: selection.json and every stored item (output and scores); train: summary.json (floats to
5 significant digits) and the adapter's tensors (largest difference printed, 1e-4 allowed, as
the resume test allows); rescore: the rescore record without its serving figures, and the served
items; data-synth: data.jsonl and report.json. Prints one line per kill and a summary per command;
docs/benchmarks.md records the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CARD = "qwen2.5-1.5b-instruct"
VOLATILE = {
    "created",
    "git_revision",
    "seconds",
    "items_computed",
    "items_per_s",
    "train_seconds",
    "total_seconds",
    "resumed_from",
    "serving",
    "started",
    "finished",
    "time",
    "elapsed_s",
    "versions",
    "wall_s",
    "base_url",
}
SUITE = """name: kill
description: the kill harness's suite
entries:
  - {task: faq.yaml, split: test, mode: gen}
  - {task: style, split: test, mode: gen}
  - {task: fact, split: test, mode: gen}
"""


def scrub(value, work: str):
    """The value with wall times dropped, the workspace path replaced and floats rounded."""
    if isinstance(value, dict):
        return {k: scrub(v, work) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [scrub(v, work) for v in value]
    if isinstance(value, str):
        return value.replace(work, "<W>")
    if isinstance(value, float):
        return float(f"{value:.5g}")
    return value


def read_json(path: Path, work: Path):
    return scrub(json.loads(path.read_text(encoding="utf-8")), str(work)) if path.is_file() else None


def stored_items(runs: Path, **where) -> list:
    from core.workspace import Workspace
    from eval.results import every_item

    db = Workspace(runs).results_db
    if not db.is_file():
        return []
    conn = sqlite3.connect(db)
    try:
        rows = every_item(conn)
    finally:
        conn.close()
    keep = where.get("model_like")
    return sorted(r for r in rows if keep is None or keep in r[3])


def adapter_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    if not (a.is_file() and b.is_file()):
        return float("inf")
    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys():
        return float("inf")
    return max(float((ta[k].float() - tb[k].float()).abs().max()) for k in ta)


class Command:
    def __init__(self, name: str, args: list[str], artifacts):
        self.name, self.args, self.artifacts = name, args, artifacts


def stored(work: Path) -> str:
    """What the workspace holds, to say where a kill landed: rows in the store's tables, the
    training checkpoints and checkpoint evaluations, and whether the merge was written."""
    from core.store import row_counts
    from core.workspace import TrainRun, Workspace

    parts = []
    workspace = Workspace(work / "runs")
    if workspace.results_db.is_file():
        try:
            parts += [
                f"{t} {n}" for t, n in row_counts(workspace.results_db, ("items", "teacher_calls")).items()
            ]
        except sqlite3.Error:
            pass
    for run in (TrainRun(d) for d in workspace.train_dir.glob("*/")):
        steps = run.evaluation_steps()
        done = sum(run.evaluation_scores(step).is_file() for step in steps)
        parts.append(
            f"{len(list(run.checkpoints.glob('checkpoint-*')))} checkpoints, "
            f"{done} checkpoint evaluations"
            + (" and one under way" if len(steps) > done else "")
            + (", merged" if run.merged.is_dir() else "")
        )
    return ", ".join(parts) or "nothing stored"


def prepare(root: Path, teacher_url: str) -> tuple[Path, dict[str, Command]]:
    """The shared inputs and, per command, its base workspace and how to run and read it."""
    from models.card import find_card
    from models.store import provision
    from bench.fixtures import build_tiny_qwen2, page_files, write_synth_recipe

    for name, text in page_files().items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    (root / "my" / "kill.yaml").write_text(SUITE, encoding="utf-8")
    tiny = build_tiny_qwen2(root / "tiny", initializer_range=0.2)
    provision(find_card(CARD), root / "cache" / "models", weights=tiny)
    (root / "synth-inputs").mkdir(exist_ok=True)
    synth_recipe = write_synth_recipe(root / "synth-inputs")
    py = [sys.executable, "-m", "selectune", "--runs-dir", "{W}/runs", "--cache-dir", str(root / "cache")]

    from core.workspace import TrainRun, Workspace

    def select_artifacts(w: Path):
        return {"selection": read_json(Workspace(w / "runs").selection, w), "items": stored_items(w / "runs")}

    def train_artifacts(w: Path):
        run = TrainRun(Workspace(w / "runs").train_run(f"train-{CARD}"))
        return {"summary": read_json(run.summary, w), "adapter": run.adapter / "adapter_model.safetensors"}

    def rescore_artifacts(w: Path):
        records = Workspace(w / "runs").rescore_records()
        return {"record": read_json(records[0], w) if records else None, "items": stored_items(w / "runs")}

    def synth_artifacts(w: Path):
        out = Workspace(w / "runs").synth_output("mini")
        return {
            path.name: path.read_text(encoding="utf-8") if path.is_file() else None
            for path in (out.data, out.report)
        }

    commands = {
        "select": Command(
            "select",
            [
                *py,
                "select",
                "--suite",
                str(root / "my" / "kill.yaml"),
                "--models",
                f"{CARD},{tiny}",
                "--design",
                "fixed",
            ],
            select_artifacts,
        ),
        "train": Command(
            "train",
            [*py, "train", "--recipe", str(root / "my" / "train.yaml"), "--model", CARD],
            train_artifacts,
        ),
        "rescore": Command(
            "rescore",
            [
                *py,
                "rescore",
                "--engine",
                "transformers",
                "--tasks",
                "fact",
                "--limit",
                "12",
                "--figure-concurrency",
                "1",
                "--min-agreement",
                "0.5",
            ],
            rescore_artifacts,
        ),
        "data-synth": Command(
            "data-synth",
            [
                *py,
                "data-synth",
                "--recipe",
                str(synth_recipe),
                "--base-url",
                teacher_url,
                "--teacher-model",
                "teacher",
            ],
            synth_artifacts,
        ),
    }
    return tiny, commands


def run(
    cmd: Command, work: Path, *, kill_after: float | None = None, log: Path | None = None
) -> tuple[int, float]:
    args = [a.replace("{W}", str(work)) for a in cmd.args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    out = open(log or os.devnull, "a", encoding="utf-8")
    started = time.monotonic()
    proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        if kill_after is None:
            return proc.wait(), time.monotonic() - started
        try:
            code = proc.wait(timeout=kill_after)
            return code, time.monotonic() - started  # it finished before the kill
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -9, time.monotonic() - started
    finally:
        out.close()


def leftover_servers(work: Path) -> int:
    """Processes still running from this workspace (a server the killed command started), stopped."""
    found = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(work) in cmdline:
            found += 1
            try:
                os.kill(int(entry.name), signal.SIGKILL)
            except OSError:
                pass
    return found


def same(name: str, a: dict, b: dict) -> tuple[bool, str]:
    if name == "train":
        diff = adapter_diff(a["adapter"], b["adapter"])
        ok = a["summary"] == b["summary"] and a["summary"] is not None and diff <= 1e-4
        return ok, f"adapter max |diff| {diff:.1e}" + (
            "" if a["summary"] == b["summary"] else "; summary differs"
        )
    ok = a == b and all(v is not None for v in a.values())
    return ok, "identical" if ok else "differs: " + ", ".join(k for k in a if a[k] != b.get(k))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commands", default="select,train,rescore,data-synth")
    parser.add_argument(
        "--work", type=Path, help="a folder to keep the workspaces in (default: a temporary one)"
    )
    args = parser.parse_args(argv)

    from bench.fixtures import teacher_reply
    from bench.openai_stub import StubState, serve
    from eval.backends import make_backend

    root = Path(args.work or tempfile.mkdtemp(prefix="kill-harness-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    server, url = serve(StubState(make_backend("fake", respond=teacher_reply)))
    _tiny, commands = prepare(root, url)
    rng = random.Random(args.seed)
    base = root / "base"
    (base / "runs").mkdir(parents=True, exist_ok=True)
    summary = {}
    try:
        for name in args.commands.split(","):
            cmd = commands[name]
            ref = root / f"{name}-ref"
            shutil.copytree(base, ref)
            code, wall = run(cmd, ref, log=root / f"{name}-ref.log")
            if code != 0:
                print(f"{name}: the uninterrupted run failed (exit {code}); see {root / f'{name}-ref.log'}")
                return 1
            reference = cmd.artifacts(ref)
            good = mid = 0
            for k in range(args.kills):
                work = root / f"{name}-{k}"
                shutil.copytree(base, work)
                at = rng.uniform(0.05, 0.95) * wall
                before = stored(work)
                killed, _ = run(cmd, work, kill_after=at, log=root / f"{name}-{k}.log")
                left = leftover_servers(work)
                at_kill = stored(work)
                code, _ = run(cmd, work, log=root / f"{name}-{k}.log")
                ok, why = (
                    same(name, reference, cmd.artifacts(work)) if code == 0 else (False, f"rerun exit {code}")
                )
                good += ok
                mid += killed == -9
                how = "killed" if killed == -9 else "done before"
                print(
                    f"{name} kill {k + 1}: at {at:.1f} s of {wall:.1f} s ({how}; "
                    f"held {at_kill}{'' if at_kill != before else ', as at the start'})"
                    f"{f', {left} server process(es) left and stopped' if left else ''}; resume: {why}",
                    flush=True,
                )
            summary[name] = (good, args.kills, mid, wall)
            print(
                f"{name}: {good}/{args.kills} identical resumes ({mid} killed mid-run; uninterrupted {wall:.1f} s)",
                flush=True,
            )
            if name == "train":  # rescore serves this run's merged model
                shutil.rmtree(base)
                shutil.copytree(ref, base)
            elif name == "select":
                shutil.rmtree(base)
                shutil.copytree(ref, base)
    finally:
        server.shutdown()
    print("kill harness: " + "; ".join(f"{n} {g}/{k} ({m} mid-run)" for n, (g, k, m, _) in summary.items()))
    print(f"workspaces in {root}")
    return 0 if all(g == k for g, k, _, _ in summary.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
