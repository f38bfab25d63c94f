"""Blind side-by-side review: the pairs shown, the votes cast, and what they add up to.

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
EXPORT_FIELDS = ("vote_id", "pair_id", "task", "item_id", "system_a", "system_b", "left_system", "vote",
                 "reviewer", "comment", "time")
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
                rows.append((pid, rng.random(), task, item["item_id"], item["prompt"], a, b, item["output"],
                             other["output"], run_a.run_id, run_b.run_id, a if rng.random() < 0.5 else b, seed))
    rows.sort(key=lambda r: r[1])  # a seeded order that mixes tasks and system pairs
    conn.execute("BEGIN IMMEDIATE")
    try:
        start = conn.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM review_pairs").fetchone()[0]
        for row in rows:
            cur = conn.execute(
                "INSERT OR IGNORE INTO review_pairs (pair_id, position, task, item_id, prompt, system_a, system_b,"
                " output_a, output_b, run_a, run_b, left_system, seed) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (row[0], start + added, *row[2:]))
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
    return conn.execute("SELECT pair_id, prompt, system_a, system_b, output_a, output_b FROM review_pairs"
                        " ORDER BY position").fetchall()


def pair_systems(conn) -> dict[str, tuple[str, str]]:
    """Each pair's two systems, by pair id."""
    return {pid: (a, b) for pid, a, b in conn.execute("SELECT pair_id, system_a, system_b FROM review_pairs")}


def next_pair(conn, reviewer: str) -> dict | None:
    """The first pair, in the recorded order, this reviewer has not voted on."""
    row = conn.execute(
        "SELECT pair_id, task, item_id, prompt, system_a, system_b, output_a, output_b, left_system FROM review_pairs"
        " WHERE pair_id NOT IN (SELECT pair_id FROM review_votes WHERE reviewer = ?) ORDER BY position LIMIT 1",
        (reviewer,)).fetchone()
    if row is None:
        return None
    pid, task, item_id, prompt, a, b, out_a, out_b, left = row
    outputs = {a: out_a, b: out_b}
    right = b if left == a else a
    return {"pair_id": pid, "task": task, "item_id": item_id, "prompt": prompt,
            "left": outputs[left], "right": outputs[right]}


def progress(conn, reviewer: str) -> tuple[int, int]:
    done = conn.execute("SELECT COUNT(*) FROM review_votes WHERE reviewer = ?", (reviewer,)).fetchone()[0]
    return done, pair_count(conn)


def record_vote(conn, *, vote_id: str, pair: str, vote: str, reviewer: str, comment: str = "",
                at: float | None = None, left_system: str | None = None) -> str:
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
            raise ValueError(f"left_system {left_system!r} is not the side recorded for pair {pair} ({row[0]!r})")
        earlier = conn.execute("SELECT time FROM review_votes WHERE pair_id = ? AND reviewer = ?",
                               (pair, reviewer)).fetchone()
        if earlier and earlier[0] > at:
            conn.execute("COMMIT")
            return "older"
        conn.execute("DELETE FROM review_votes WHERE pair_id = ? AND reviewer = ?", (pair, reviewer))
        conn.execute("INSERT INTO review_votes (vote_id, pair_id, left_system, vote, reviewer, comment, time)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?)", (vote_id, pair, row[0], vote, reviewer, comment, at))
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
        " v.comment, v.time" + (", p.output_a, p.output_b" if outputs else "")
        + " FROM review_votes v JOIN review_pairs p USING (pair_id) ORDER BY v.time, v.vote_id")
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
    pairs = {r[0]: r[1:] for r in conn.execute("SELECT pair_id, system_a, system_b, left_system FROM review_pairs")}
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
            raise UserError(f"{where}: pair '{text['pair_id']}' is not among this store's review pairs "
                            "(build them with `make review` on the same runs first)")
        system_a, system_b, left = pairs[text["pair_id"]]
        if {text["system_a"], text["system_b"]} != {system_a, system_b} or text["left_system"] != left:
            raise UserError(f"{where}: systems or left side differ from the recorded pair "
                            f"({system_a} vs {system_b}, {left} on the left)")
        if text["vote"] not in VOTES:
            raise UserError(f"{where}: 'vote' must be one of {', '.join(VOTES)}, got '{text['vote']}'")
        if not text["reviewer"].strip() or not text["vote_id"].strip():
            raise UserError(f"{where}: 'reviewer' and 'vote_id' must not be empty")
        try:
            at = float(text["time"])
        except ValueError:
            raise UserError(f"{where}: 'time' must be seconds since the epoch, got '{text['time']}'") from None
        checked.append((text, at))
    counts = {"added": 0, "replaced": 0, "duplicate": 0, "older": 0}
    for text, at in checked:
        outcome = record_vote(conn, vote_id=text["vote_id"], pair=text["pair_id"], vote=text["vote"],
                              reviewer=text["reviewer"], comment=text["comment"][:MAX_COMMENT], at=at,
                              left_system=text["left_system"])
        counts[outcome] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# Aggregation


def wilson(k: int, n: int) -> tuple[float, float]:
    from statsmodels.stats.proportion import proportion_confint

    if n == 0:
        return 0.0, 1.0
    low, high = proportion_confint(k, n, alpha=0.05, method="wilson")
    return float(low), float(high)


def position_bias(first_wins: int, decisive: int) -> dict:
    """The one position-bias test: the share of decisive verdicts won by the answer shown first
    (left), its Wilson CI and the exact binomial p against 50%; None values with no decisive one."""
    from scipy.stats import binomtest

    if not decisive:
        return {"rate": None, "ci95": [None, None], "p_value": None}
    return {"rate": first_wins / decisive, "ci95": list(wilson(first_wins, decisive)),
            "p_value": float(binomtest(first_wins, decisive, 0.5).pvalue)}


def aggregate(all_votes: list[dict]) -> dict:
    """Win/tie/loss per system pair with Wilson CIs, Bradley-Terry strengths plain and
    style-controlled (when the votes carry the answers), and the position-bias check (how often the
    left answer wins decisive votes)."""
    pairs: dict[tuple[str, str], dict] = {}
    left_wins = decisive = 0
    for v in all_votes:
        a, b = sorted((v["system_a"], v["system_b"]))
        cell = pairs.setdefault((a, b), {"a": a, "b": b, "wins_a": 0, "wins_b": 0, "ties": 0, "both_bad": 0})
        if v["vote"] in ("left", "right"):
            winner = v["left_system"] if v["vote"] == "left" else (b if v["left_system"] == a else a)
            cell["wins_a" if winner == a else "wins_b"] += 1
            decisive += 1
            left_wins += v["vote"] == "left"
        else:
            cell["ties" if v["vote"] == "tie" else "both_bad"] += 1
    rows = []
    for cell in pairs.values():
        n = cell["wins_a"] + cell["wins_b"]
        low, high = wilson(cell["wins_a"], n)
        rows.append({**cell, "votes": n + cell["ties"] + cell["both_bad"], "decisive": n,
                     "win_rate_a": cell["wins_a"] / n if n else None, "ci95": [low, high]})
    position = ({"left_wins": left_wins, "decisive": decisive, **position_bias(left_wins, decisive)}
                if decisive else None)
    systems = sorted({s for key in pairs for s in key})
    comments = [{k: v[k] for k in ("task", "item_id", "system_a", "system_b", "left_system", "vote", "reviewer",
                                    "comment")} for v in all_votes if v["comment"].strip()]
    plain = bradley_terry(all_votes, systems) if len(systems) > 1 else None
    styled = (bradley_terry(all_votes, systems, style=True)
              if len(systems) > 1 and all("output_a" in v for v in all_votes) else None)
    if styled and styled["estimable"]:
        by_system = {r["system"]: r["log_strength"] for r in plain["rows"]} if plain["estimable"] else {}
        for r in styled["rows"]:
            r["plain"] = by_system.get(r["system"])
    return {"pairs": rows, "position": position, "systems": systems, "votes": len(all_votes), "comments": comments,
            "reviewers": len({v["reviewer"] for v in all_votes}), "bradley_terry": plain, "style_controlled": styled}


STYLE_FEATURES = ("length", "emoji", "punctuation")


def style_counts(text: str) -> tuple[int, int, int]:
    """An answer's style covariates: characters, emoji (the `emoji` package's count) and
    punctuation marks (Unicode category P*, Chinese and ASCII alike)."""
    import unicodedata

    import emoji

    return len(text), emoji.emoji_count(text), sum(unicodedata.category(ch).startswith("P") for ch in text)


def bradley_terry(all_votes: list[dict], systems: list[str], *, style: bool = False) -> dict:
    """Bradley-Terry strengths as a logistic regression without intercept (a tie counts half a
    win each way; 'both bad' says nothing about order and is left out). The first system is the
    reference with log-strength 0.

    With `style`, as FastChat's style control: each vote also carries, per style feature, the
    normalised difference (a - b) / (a + b) of the two answers' counts, divided by its root mean
    square over the votes (not centred, so the fit does not depend on which system of a pair is
    called a); the strengths are then those left once length, emoji and punctuation are
    accounted for, and each feature's coefficient says how much it sways a vote."""
    import numpy as np
    import statsmodels.api as sm

    index = {s: k for k, s in enumerate(systems)}
    x, y, diffs = [], [], []
    for v in all_votes:
        if v["vote"] == "both_bad":
            continue
        a, b = v["system_a"], v["system_b"]
        row = np.zeros(len(systems))
        row[index[a]], row[index[b]] = 1.0, -1.0
        right = b if v["left_system"] == a else a
        winner = {"left": v["left_system"], "right": right}.get(v["vote"])
        x.append(row[1:])
        y.append(0.5 if winner is None else float(winner == a))
        if style:
            fa, fb = np.array(style_counts(v["output_a"]), float), np.array(style_counts(v["output_b"]), float)
            total = fa + fb
            diffs.append(np.divide(fa - fb, total, out=np.zeros_like(total), where=total > 0))
    features: list[str] = []
    if style and diffs:
        d = np.asarray(diffs)
        rms = np.sqrt((d ** 2).mean(axis=0))
        keep = rms > 0  # a feature equal in every pair says nothing
        features = [f for f, k in zip(STYLE_FEATURES, keep) if k]
        x = [np.concatenate([row, dv[keep] / rms[keep]]) for row, dv in zip(x, d)]
    if len(y) < len(systems) + len(features):
        return {"estimable": False, "why": f"{len(y)} ordered votes for {len(systems)} systems"
                + (f" and {len(features)} style features" if features else "")}
    import warnings

    from statsmodels.tools.sm_exceptions import PerfectSeparationWarning

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PerfectSeparationWarning)
            fit = sm.GLM(np.asarray(y), np.asarray(x), family=sm.families.Binomial()).fit()
    except PerfectSeparationWarning:
        return {"estimable": False, "why": "one system wins or loses every vote (perfect separation)"}
    except (ValueError, np.linalg.LinAlgError) as exc:  # e.g. systems never compared with the rest
        return {"estimable": False, "why": f"the fit failed: {exc}"}
    m = len(systems) - 1
    params = np.concatenate([[0.0], fit.params[:m]])
    ses = np.concatenate([[0.0], fit.bse[:m]])
    if not np.all(np.isfinite(fit.params)) or np.any(np.abs(fit.params) > 20):
        return {"estimable": False, "why": "one system wins or loses every vote (perfect separation)"}
    strengths = np.exp(params) / np.exp(params).sum()
    order = np.argsort(-params)
    out = {"estimable": True, "reference": systems[0],
           "rows": [{"system": systems[k], "log_strength": float(params[k]), "se": float(ses[k]),
                     "share": float(strengths[k])} for k in order]}
    if style:
        out["features"] = [{"feature": f, "coef": float(fit.params[m + j]), "se": float(fit.bse[m + j]),
                            "p_value": float(fit.pvalues[m + j])} for j, f in enumerate(features)]
        out["constant"] = [f for f in STYLE_FEATURES if f not in features]
    return out
