"""The results store, runs/results.sqlite: every table in it is created here, and the file's
version (SQLite's `user_version`) says which of the migrations below it has had.

Migration 1 creates what selectune wrote before versions existed, with CREATE TABLE IF NOT
EXISTS, so a store from then opens as version 1 with its rows untouched; later migrations run in
order. A store of a newer
version than this code knows is refused with one line. The tables, by owner of their rows:
results (runs, items, judge_verdicts: eval/results.py), review (review_pairs, review_votes,
review_invites: reports/invites.py; review_judgements: reports/pair_judge.py), synthesis
(teacher_calls: synth/teacher.py); docs/artifacts.md describes them.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from core.errors import UserError

MIGRATIONS = [
    # 1: the results, the judge's verdicts, the blind review and the teacher's replies
    """CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    task TEXT NOT NULL, split TEXT NOT NULL, mode TEXT NOT NULL, model TEXT NOT NULL,
    meta_json TEXT NOT NULL,
    n_items INTEGER NOT NULL,
    started REAL NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS items (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    item_id TEXT NOT NULL,
    prompt TEXT NOT NULL,
    output TEXT NOT NULL,
    gold TEXT,
    parsed TEXT,
    scores_json TEXT NOT NULL,
    latency_s REAL NOT NULL,
    PRIMARY KEY (run_id, item_id)
);
CREATE TABLE IF NOT EXISTS judge_verdicts (
    key TEXT PRIMARY KEY,
    judge_model TEXT NOT NULL,
    output TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS review_pairs (
    pair_id TEXT PRIMARY KEY,
    position INTEGER NOT NULL,
    task TEXT NOT NULL, item_id TEXT NOT NULL, prompt TEXT NOT NULL,
    system_a TEXT NOT NULL, system_b TEXT NOT NULL,
    output_a TEXT NOT NULL, output_b TEXT NOT NULL,
    run_a TEXT NOT NULL, run_b TEXT NOT NULL,
    left_system TEXT NOT NULL,
    seed INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS review_votes (
    vote_id TEXT PRIMARY KEY,
    pair_id TEXT NOT NULL REFERENCES review_pairs(pair_id),
    left_system TEXT NOT NULL,
    vote TEXT NOT NULL CHECK (vote IN ('left', 'right', 'tie', 'both_bad')),
    reviewer TEXT NOT NULL,
    comment TEXT NOT NULL DEFAULT '',
    time REAL NOT NULL,
    UNIQUE (pair_id, reviewer)
);
CREATE TABLE IF NOT EXISTS teacher_calls (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    request_json TEXT NOT NULL,
    response TEXT NOT NULL,
    usage_json TEXT NOT NULL,
    time REAL NOT NULL
);
""",
    # 2: where each run's task file was, so a task outside tasks/ can be found again by the report
    "ALTER TABLE runs ADD COLUMN task_file TEXT;",
    # 3: review invitations (one unguessable link per reviewer, stored as the token's hash) and an
    # LLM judge's verdicts on the review pairs, in both orders
    """CREATE TABLE IF NOT EXISTS review_invites (
    token_sha256 TEXT PRIMARY KEY,
    reviewer TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    revoked REAL
);
CREATE TABLE IF NOT EXISTS review_judgements (
    pair_id TEXT NOT NULL REFERENCES review_pairs(pair_id),
    judge_model TEXT NOT NULL,
    first_system TEXT NOT NULL,
    verdict TEXT CHECK (verdict IN ('first', 'second', 'tie')),
    output TEXT NOT NULL,
    PRIMARY KEY (pair_id, judge_model, first_system)
);""",
    # 4: the request each item's backend received (chat messages, and the generation settings or
    # the scored continuations), as JSON; NULL on rows written before
    "ALTER TABLE items ADD COLUMN request_json TEXT;",
]
VERSION = len(MIGRATIONS)
TABLES = (
    "runs",
    "items",
    "judge_verdicts",
    "review_pairs",
    "review_votes",
    "review_invites",
    "review_judgements",
    "teacher_calls",
)


def migrate(conn: sqlite3.Connection, where: Path | str = "the results store") -> sqlite3.Connection:
    """Bring an open store to VERSION; returns the connection."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > VERSION:
        raise UserError(
            f"{where}: store version {version} is newer than this selectune reads ({VERSION}); "
            "update selectune"
        )
    for number in range(version, VERSION):
        conn.executescript(MIGRATIONS[number])
        conn.execute(f"PRAGMA user_version = {number + 1}")
    return conn


def row_counts(path: Path, tables: tuple[str, ...]) -> dict[str, int]:
    """Rows in each of `tables` of the store at `path`, read as they are (no migration), for a
    harness that looks at a store another process may be writing."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables if t in TABLES}
    finally:
        conn.close()


def open_read_only(path: Path) -> sqlite3.Connection:
    """The store at `path` for reading: migrated first (a store written by an older selectune),
    then opened read-only, so nothing a reader does can change it."""
    open_store(path).close()
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True)


def open_store(path: Path, *, autocommit: bool = False) -> sqlite3.Connection:
    """The store at `path`, created or migrated. `autocommit`: transactions are the caller's
    (BEGIN ... COMMIT), as the review server's concurrent votes need."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30.0, **({"isolation_level": None} if autocommit else {}))
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA busy_timeout=30000")
    return migrate(conn, path)
