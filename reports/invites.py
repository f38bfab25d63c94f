"""Review invitations: one link per reviewer, holding an unguessable token.

    make review REVIEW_ARGS="--invite ana,ben"    # prints each link once
    make review REVIEW_ARGS="--revoke ben"

The store keeps only each token's SHA-256 (`review_invites`), so a lost link is revoked and the
name invited again; a revoked token stops working at the next request. Names come from here,
never from a form.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
import time

from core.errors import UserError

NAME = re.compile(r"^[\w .@-]{1,64}$")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def invite(conn: sqlite3.Connection, names: list[str]) -> dict[str, str]:
    """A new token for each name ({name: token}); the tokens are shown once, here. A name with a
    live invitation is refused (revoke it first); a revoked one gets a new token."""
    for name in names:
        if not NAME.match(name):
            raise UserError(
                f"review: invitation name {name!r}: expected 1-64 letters, digits, spaces or . @ - _"
            )
    tokens = {}
    conn.execute("BEGIN IMMEDIATE")
    try:
        for name in names:
            row = conn.execute("SELECT revoked FROM review_invites WHERE reviewer = ?", (name,)).fetchone()
            if row is not None and row[0] is None:
                raise UserError(
                    f"review: {name} already has a live invitation; --revoke {name} first for a new link"
                )
            tokens[name] = secrets.token_urlsafe(24)
            conn.execute("DELETE FROM review_invites WHERE reviewer = ?", (name,))
            conn.execute(
                "INSERT INTO review_invites (token_sha256, reviewer, created) VALUES (?, ?, ?)",
                (_digest(tokens[name]), name, time.time()),
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return tokens


def revoke(conn: sqlite3.Connection, names: list[str]) -> None:
    for name in names:
        done = conn.execute(
            "UPDATE review_invites SET revoked = ? WHERE reviewer = ? AND revoked IS NULL",
            (time.time(), name),
        ).rowcount
        if not done:
            raise UserError(f"review: no live invitation for {name!r}")


def reviewer_of(conn: sqlite3.Connection, token: str | None) -> str | None:
    """The reviewer a token was issued to, or None (unknown, revoked or absent)."""
    if not token or len(token) > 128:
        return None
    row = conn.execute(
        "SELECT reviewer FROM review_invites WHERE token_sha256 = ? AND revoked IS NULL", (_digest(token),)
    ).fetchone()
    return row[0] if row else None


def invitations(conn: sqlite3.Connection) -> list[dict]:
    return [
        {"reviewer": r, "created": c, "revoked": v}
        for r, c, v in conn.execute("SELECT reviewer, created, revoked FROM review_invites ORDER BY created")
    ]
