"""Blind side-by-side review: the pairs shown and the votes cast (reports/review_stats.py adds them up).

Pairs and votes live in the results store (`runs/results.sqlite`) next to the items they come
from. A pair is one item of a free-text task answered by two systems; which system is shown on
the left is drawn per pair from the recorded seed. A vote carries an id made where it was cast,
so a resent vote (a retry, an import of a file already merged) is stored once; a reviewer voting
again on the same pair replaces their earlier vote. Reviewers come from
invitations (reports/invites.py).
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import sqlite3
import time
from itertools import combinations
from pathlib import Path

from core.errors import UserError
from core.store import open_store


VOTES = ("left", "right", "tie", "both_bad")
EXPORT_FIELDS = (
    "vote_id",
    "pair_id",
    "task",
    "item_id",
    "system_a",
    "system_b",
    "left_system",
    "vote",
    "reviewer",
    "comment",
    "time",
)
MAX_COMMENT = 2000


def open_review(db_path: Path) -> sqlite3.Connection:
    return open_store(db_path, autocommit=True)  # transactions are explicit (BEGIN IMMEDIATE)


def pair_id(task: str, item_id: str, a: str, b: str) -> str:
    first, second = sorted((a, b))
    return hashlib.sha256(f"{task}\0{item_id}\0{first}\0{second}".encode()).hexdigest()[:16]


def add_pairs(conn: sqlite3.Connection, systems: dict[str, dict[str, object]], *, seed: int = 0) -> dict:
    """Record a pair for every item two systems answered differently.

    systems: label -> {task name: collect.Run}. A pair already recorded keeps its side and place,
    so adding systems later never reshuffles what reviewers have seen.
    """
    added = identical = 0
    rows = []
    for a, b in combinations(sorted(systems), 2):
        for task, run_a in systems[a].items():
            run_b = systems[b].get(task)
            if run_b is None:
                continue
            by_id = {i["item_id"]: i for i in run_b.summary.items}
            for item in run_a.summary.items:
                other = by_id.get(item["item_id"])
                if other is None:
                    continue
                if item["output"].strip() == other["output"].strip():
                    identical += 1  # nothing to choose between
                    continue
                pid = pair_id(task, item["item_id"], a, b)
                rng = random.Random(f"{seed}:{pid}")
                rows.append(
                    (
                        pid,
                        rng.random(),
                        task,
                        item["item_id"],
                        item["prompt"],
                        a,
                        b,
                        item["output"],
                        other["output"],
                        run_a.run_id,
                        run_b.run_id,
                        a if rng.random() < 0.5 else b,
                        seed,
                    )
                )
    rows.sort(key=lambda r: r[1])  # a seeded order that mixes tasks and system pairs
    conn.execute("BEGIN IMMEDIATE")
    try:
        start = conn.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM review_pairs").fetchone()[0]
        for row in rows:
            cur = conn.execute(
                "INSERT OR IGNORE INTO review_pairs (pair_id, position, task, item_id, prompt, system_a, system_b,"
                " output_a, output_b, run_a, run_b, left_system, seed) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (row[0], start + added, *row[2:]),
            )
            added += cur.rowcount
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    total = conn.execute("SELECT COUNT(*) FROM review_pairs").fetchone()[0]
    return {"added": added, "identical_skipped": identical, "total": total}


def pair_count(conn) -> int:
    return conn.execute("SELECT COUNT(*) FROM review_pairs").fetchone()[0]


def pairs_in_order(conn) -> list[tuple]:
    """Every pair as (pair_id, prompt, system_a, system_b, output_a, output_b), in review order."""
    return conn.execute(
        "SELECT pair_id, prompt, system_a, system_b, output_a, output_b FROM review_pairs ORDER BY position"
    ).fetchall()


def pair_systems(conn) -> dict[str, tuple[str, str]]:
    """Each pair's two systems, by pair id."""
    return {pid: (a, b) for pid, a, b in conn.execute("SELECT pair_id, system_a, system_b FROM review_pairs")}


def next_pair(conn, reviewer: str) -> dict | None:
    """The first pair, in the recorded order, this reviewer has not voted on."""
    row = conn.execute(
        "SELECT pair_id, task, item_id, prompt, system_a, system_b, output_a, output_b, left_system FROM review_pairs"
        " WHERE pair_id NOT IN (SELECT pair_id FROM review_votes WHERE reviewer = ?) ORDER BY position LIMIT 1",
        (reviewer,),
    ).fetchone()
    if row is None:
        return None
    pid, task, item_id, prompt, a, b, out_a, out_b, left = row
    outputs = {a: out_a, b: out_b}
    right = b if left == a else a
    return {
        "pair_id": pid,
        "task": task,
        "item_id": item_id,
        "prompt": prompt,
        "left": outputs[left],
        "right": outputs[right],
    }


def progress(conn, reviewer: str) -> tuple[int, int]:
    done = conn.execute("SELECT COUNT(*) FROM review_votes WHERE reviewer = ?", (reviewer,)).fetchone()[0]
    return done, pair_count(conn)


def record_vote(
    conn,
    *,
    vote_id: str,
    pair: str,
    vote: str,
    reviewer: str,
    comment: str = "",
    at: float | None = None,
    left_system: str | None = None,
) -> str:
    """Store one vote; returns 'added', 'replaced' (the reviewer's earlier vote on the pair),
    'duplicate' (this vote id is stored already) or 'older' (an import older than the stored vote)."""
    at = time.time() if at is None else at
    conn.execute("BEGIN IMMEDIATE")  # one writer at a time: the check and the write are atomic
    try:
        if conn.execute("SELECT 1 FROM review_votes WHERE vote_id = ?", (vote_id,)).fetchone():
            conn.execute("COMMIT")
            return "duplicate"
        row = conn.execute("SELECT left_system FROM review_pairs WHERE pair_id = ?", (pair,)).fetchone()
        if row is None:
            raise KeyError(pair)
        if left_system is not None and left_system != row[0]:
            raise ValueError(
                f"left_system {left_system!r} is not the side recorded for pair {pair} ({row[0]!r})"
            )
        earlier = conn.execute(
            "SELECT time FROM review_votes WHERE pair_id = ? AND reviewer = ?", (pair, reviewer)
        ).fetchone()
        if earlier and earlier[0] > at:
            conn.execute("COMMIT")
            return "older"
        conn.execute("DELETE FROM review_votes WHERE pair_id = ? AND reviewer = ?", (pair, reviewer))
        conn.execute(
            "INSERT INTO review_votes (vote_id, pair_id, left_system, vote, reviewer, comment, time)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (vote_id, pair, row[0], vote, reviewer, comment, at),
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return "replaced" if earlier else "added"


def votes(conn, *, outputs: bool = False) -> list[dict]:
    """Every vote in cast order; with `outputs`, also both answers (`output_a`, `output_b`), which
    the style-controlled fit reads and an export leaves out."""
    fields = EXPORT_FIELDS + (("output_a", "output_b") if outputs else ())
    cur = conn.execute(
        "SELECT v.vote_id, v.pair_id, p.task, p.item_id, p.system_a, p.system_b, v.left_system, v.vote, v.reviewer,"
        " v.comment, v.time"
        + (", p.output_a, p.output_b" if outputs else "")
        + " FROM review_votes v JOIN review_pairs p USING (pair_id) ORDER BY v.time, v.vote_id"
    )
    return [dict(zip(fields, row)) for row in cur]


# ---------------------------------------------------------------------------------------------
# Export and import, so that a review done elsewhere can be merged in


def export_votes(conn, path: Path) -> int:
    import io

    from core.files import write_text_atomic

    rows = votes(conn)
    if path.suffix == ".csv":
        buffer = io.StringIO(newline="")
        writer = csv.DictWriter(buffer, fieldnames=EXPORT_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    elif path.suffix == ".json":
        text = json.dumps(rows, ensure_ascii=False, indent=1)
    else:
        raise UserError(f"{path}: votes are exported as .csv or .json")
    write_text_atomic(path, text)
    return len(rows)


def _read_rows(path: Path) -> list[dict]:
    try:
        if path.suffix == ".csv":
            with path.open(newline="", encoding="utf-8") as f:
                return list(csv.DictReader(f))
        if path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise UserError(f"{path}: expected a JSON list of votes, got {type(data).__name__}")
            return data
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, csv.Error) as exc:
        raise UserError(f"{path}: cannot read votes: {exc}") from exc
    raise UserError(f"{path}: votes are imported from .csv or .json")


def import_votes(conn, path: Path) -> dict:
    """Validate every row first (one line naming the row on the first problem), then merge."""
    rows = _read_rows(path)
    pairs = {
        r[0]: r[1:] for r in conn.execute("SELECT pair_id, system_a, system_b, left_system FROM review_pairs")
    }
    checked = []
    for n, row in enumerate(rows, 1):
        where = f"{path}: row {n}"
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected an object with {', '.join(EXPORT_FIELDS)}")
        missing = [k for k in EXPORT_FIELDS if k not in row]
        if missing:
            raise UserError(f"{where}: missing '{missing[0]}'")
        text = {k: row[k] if isinstance(row[k], str) else str(row[k]) for k in EXPORT_FIELDS}
        if text["pair_id"] not in pairs:
            raise UserError(
                f"{where}: pair '{text['pair_id']}' is not among this store's review pairs "
                "(build them with `make review` on the same runs first)"
            )
        system_a, system_b, left = pairs[text["pair_id"]]
        if {text["system_a"], text["system_b"]} != {system_a, system_b} or text["left_system"] != left:
            raise UserError(
                f"{where}: systems or left side differ from the recorded pair "
                f"({system_a} vs {system_b}, {left} on the left)"
            )
        if text["vote"] not in VOTES:
            raise UserError(f"{where}: 'vote' must be one of {', '.join(VOTES)}, got '{text['vote']}'")
        if not text["reviewer"].strip() or not text["vote_id"].strip():
            raise UserError(f"{where}: 'reviewer' and 'vote_id' must not be empty")
        try:
            at = float(text["time"])
        except ValueError:
            raise UserError(
                f"{where}: 'time' must be seconds since the epoch, got '{text['time']}'"
            ) from None
        checked.append((text, at))
    counts = {"added": 0, "replaced": 0, "duplicate": 0, "older": 0}
    for text, at in checked:
        outcome = record_vote(
            conn,
            vote_id=text["vote_id"],
            pair=text["pair_id"],
            vote=text["vote"],
            reviewer=text["reviewer"],
            comment=text["comment"][:MAX_COMMENT],
            at=at,
            left_system=text["left_system"],
        )
        counts[outcome] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# Aggregation
