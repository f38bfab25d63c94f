"""The results store: one SQLite database per workspace (`runs/results.sqlite`).

A `runs` row describes a run completely (task file hash, model identity and weights hash, prompt
and chat-template hashes, sampling, library versions, git revision, seed); an `items` row holds
one scored item. Items are committed chunk by chunk as they finish, and a run's id is a hash of
what determines its outputs, so rerunning the same thing finds its earlier items and resumes.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

from core.store import open_store
from core.workspace import Workspace


def open_results(runs_dir: Path) -> sqlite3.Connection:
    return open_store(Workspace(runs_dir).results_db)


def ensure_run(
    conn: sqlite3.Connection, run_id: str, meta: dict, n_items: int, task_file: Path | None = None
) -> None:
    """Record a run once; `task_file` (not part of the run's identity) says where its task was read."""
    with conn:
        conn.execute(
            "INSERT OR IGNORE INTO runs (run_id, task, split, mode, model, meta_json, n_items, started, task_file)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                run_id,
                meta["task"],
                meta["split"],
                meta["mode"],
                meta["model"],
                json.dumps(meta, ensure_ascii=False, sort_keys=True),
                n_items,
                time.time(),
                str(task_file.resolve()) if task_file else None,
            ),
        )
        if task_file is not None:
            conn.execute(
                "UPDATE runs SET task_file = ? WHERE run_id = ? AND task_file IS NULL",
                (str(task_file.resolve()), run_id),
            )


def done_item_ids(conn: sqlite3.Connection, run_id: str) -> set[str]:
    return {r[0] for r in conn.execute("SELECT item_id FROM items WHERE run_id = ?", (run_id,))}


def add_items(conn: sqlite3.Connection, run_id: str, rows: list[dict]) -> None:
    """Insert finished items in one transaction; an item already stored is left as it is."""
    with conn:
        conn.executemany(
            "INSERT OR IGNORE INTO items (run_id, item_id, prompt, output, gold, parsed, scores_json,"
            " latency_s, request_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    run_id,
                    r["item_id"],
                    r["prompt"],
                    r["output"],
                    r["gold"],
                    r["parsed"],
                    json.dumps(r["scores"], sort_keys=True),
                    r["latency_s"],
                    json.dumps(r["request"], ensure_ascii=False) if r.get("request") is not None else None,
                )
                for r in rows
            ],
        )


def update_scores(conn: sqlite3.Connection, run_id: str, rows: list[dict]) -> None:
    with conn:
        conn.executemany(
            "UPDATE items SET parsed = ?, scores_json = ? WHERE run_id = ? AND item_id = ?",
            [(r["parsed"], json.dumps(r["scores"], sort_keys=True), run_id, r["item_id"]) for r in rows],
        )


def finish_run(conn: sqlite3.Connection, run_id: str) -> None:
    with conn:
        conn.execute(
            "UPDATE runs SET finished = ? WHERE run_id = ? AND finished IS NULL", (time.time(), run_id)
        )


def run_row(conn: sqlite3.Connection, run_id: str) -> tuple | None:
    """(task, split, mode, model, meta_json, finished, task_file) of a run, or None."""
    return conn.execute(
        "SELECT task, split, mode, model, meta_json, finished, task_file FROM runs WHERE run_id = ?",
        (run_id,),
    ).fetchone()


def newest_finished_run(
    conn: sqlite3.Connection, model: str, task: str, split: str, mode: str = "gen"
) -> str | None:
    row = conn.execute(
        "SELECT run_id FROM runs WHERE model = ? AND task = ? AND split = ? AND mode = ?"
        " AND finished IS NOT NULL ORDER BY finished DESC LIMIT 1",
        (model, task, split, mode),
    ).fetchone()
    return row[0] if row else None


def newest_model_run(conn: sqlite3.Connection, model: str, task: str, mode: str) -> str | None:
    """The newest finished run of `model` on `task` in `mode`, any split."""
    row = conn.execute(
        "SELECT run_id FROM runs WHERE model = ? AND task = ? AND mode = ? AND finished IS NOT NULL"
        " ORDER BY finished DESC LIMIT 1",
        (model, task, mode),
    ).fetchone()
    return row[0] if row else None


def finished_runs(conn: sqlite3.Connection) -> list[tuple]:
    """(run_id, model, task, split, mode, meta_json, wall seconds) of every finished run, oldest first."""
    return conn.execute(
        "SELECT run_id, model, task, split, mode, meta_json, finished - started FROM runs "
        "WHERE finished IS NOT NULL ORDER BY started"
    ).fetchall()


def every_item(conn: sqlite3.Connection) -> list[tuple]:
    """Every stored item with its run: (task, split, mode, model, item_id, output, scores_json,
    finished), for harnesses that compare two stores whole."""
    return conn.execute(
        "SELECT r.task, r.split, r.mode, r.model, i.item_id, i.output, i.scores_json, "
        "r.finished IS NOT NULL FROM items i JOIN runs r USING (run_id)"
    ).fetchall()


def run_items(conn: sqlite3.Connection, run_id: str) -> list[dict]:
    cur = conn.execute(
        "SELECT item_id, prompt, output, gold, parsed, scores_json, latency_s, request_json FROM items"
        " WHERE run_id = ? ORDER BY item_id",
        (run_id,),
    )
    return [
        {
            "item_id": i,
            "prompt": p,
            "output": o,
            "gold": g,
            "parsed": pa,
            "scores": json.loads(s),
            "latency_s": lat,
            "request": json.loads(req) if req else None,
        }
        for i, p, o, g, pa, s, lat, req in cur
    ]


def cached_verdicts(conn: sqlite3.Connection, keys: set[str]) -> dict[str, str]:
    """Stored judge answers by key (a hash of judge model and prompt)."""
    found = {}
    keys_list = sorted(keys)
    for start in range(0, len(keys_list), 500):  # SQLite caps the number of bound variables
        part = keys_list[start : start + 500]
        marks = ",".join("?" * len(part))
        found.update(conn.execute(f"SELECT key, output FROM judge_verdicts WHERE key IN ({marks})", part))
    return found


def add_verdicts(conn: sqlite3.Connection, judge_model: str, outputs: dict[str, str]) -> None:
    with conn:
        conn.executemany(
            "INSERT OR IGNORE INTO judge_verdicts (key, judge_model, output) VALUES (?, ?, ?)",
            [(k, judge_model, v) for k, v in outputs.items()],
        )
