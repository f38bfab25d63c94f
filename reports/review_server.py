"""The review pages: a small FastAPI app over the pairs and votes in the results store.

    make review                                  # prints your link on 127.0.0.1; Ctrl-C stops
    make review REVIEW_ARGS="--invite ana,ben"   # one link per reviewer
    make review REVIEW_ARGS="--revoke ben"

A reviewer opens the link of their invitation once (/invite/TOKEN); the token is then kept in an
HTTP-only cookie and looked up in the store on every request, so a revoked one stops working at
once. Names come from the invitations, never from a form. Every vote is a JSON POST carrying a
CSRF token derived from a secret drawn at start and the invitation (a page from another origin can
neither read it nor set the header), and is validated field by field. Each
request writes through its own SQLite connection inside BEGIN IMMEDIATE, so concurrent votes are
serialised by SQLite and none is lost. (Imported only by `review`: FastAPI is loaded at import.)
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from pathlib import Path
from typing import Literal

from fastapi import Cookie, FastAPI, Header, HTTPException
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field

from reports import invites, review
from reports.render import environment

COOKIE = "selectune_reviewer"


class Vote(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pair_id: str = Field(pattern=r"^[0-9a-f]{16}$")
    vote: Literal["left", "right", "tie", "both_bad"]
    comment: str = Field(default="", max_length=review.MAX_COMMENT)
    vote_id: str = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")


def create_app(db_path: Path, secret: bytes | None = None) -> FastAPI:
    secret = secret or secrets.token_bytes(32)
    env = environment()
    app = FastAPI(title="selectune review", docs_url=None, redoc_url=None, openapi_url=None)

    def sign(purpose: str, token: str) -> str:
        return hmac.new(secret, f"{purpose}\0{token}".encode(), hashlib.sha256).hexdigest()

    def reviewer_of(token: str | None) -> str | None:
        conn = review.open_review(db_path)
        try:
            return invites.reviewer_of(conn, token)
        finally:
            conn.close()

    def page(template: str, nonce: str, **context) -> HTMLResponse:
        html = env.get_template(template).render(nonce=nonce, **context)
        response = HTMLResponse(html)
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-{nonce}'; connect-src 'self'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "same-origin"  # "no-referrer" makes forms send Origin: null
        return response

    @app.get("/", response_class=HTMLResponse)
    def index(selectune_reviewer: str | None = Cookie(default=None)):
        nonce = secrets.token_urlsafe(16)
        name = reviewer_of(selectune_reviewer)
        if name is None:
            return page("review_start.html", nonce)
        conn = review.open_review(db_path)
        try:
            pair = review.next_pair(conn, name)
            done, total = review.progress(conn, name)
        finally:
            conn.close()
        return page(
            "review_vote.html",
            nonce,
            reviewer=name,
            pair=pair,
            done=done,
            total=total,
            csrf=sign("csrf", selectune_reviewer),
        )

    @app.get("/invite/{token}")
    def accept(token: str):
        if reviewer_of(token) is None:
            raise HTTPException(403, "no such invitation, or it was revoked")
        response = RedirectResponse("/", status_code=303)
        # lax: the link arrives from a mail or a chat (another site); votes also need the CSRF header
        response.set_cookie(COOKIE, token, httponly=True, samesite="lax", max_age=30 * 24 * 3600)
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    @app.post("/vote")
    def vote(
        body: Vote,
        selectune_reviewer: str | None = Cookie(default=None),
        x_csrf_token: str | None = Header(default=None),
    ):
        name = reviewer_of(selectune_reviewer)
        if name is None:
            raise HTTPException(403, "no valid invitation: open the link you were given")
        if not x_csrf_token or not hmac.compare_digest(x_csrf_token, sign("csrf", selectune_reviewer)):
            raise HTTPException(403, "missing or wrong CSRF token")
        conn = review.open_review(db_path)
        try:
            try:
                outcome = review.record_vote(
                    conn,
                    vote_id=body.vote_id,
                    pair=body.pair_id,
                    vote=body.vote,
                    reviewer=name,
                    comment=body.comment,
                )
            except KeyError:
                raise HTTPException(404, f"no review pair {body.pair_id}") from None
            done, total = review.progress(conn, name)
        finally:
            conn.close()
        return JSONResponse({"stored": outcome, "done": done, "total": total})

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(db_path: Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    import uvicorn

    conn = review.open_review(db_path)
    total = review.pair_count(conn)
    live = sum(i["revoked"] is None for i in invites.invitations(conn))
    conn.close()
    print(
        f"review: {total} pairs, {live} live invitations; serving on http://{host}:{port}/ (Ctrl-C stops)",
        flush=True,
    )
    uvicorn.run(create_app(db_path), host=host, port=port, log_level="warning")


def review_command(
    settings,
    *,
    host: str = "127.0.0.1",
    port: int = 8765,
    seed: int = 0,
    with_candidates: bool = False,
    no_serve: bool = False,
    export_to: Path | None = None,
    import_from: Path | None = None,
    invite: str | None = None,
    revoke: str | None = None,
    allow_remote: bool = False,
    judge_pairs: bool = False,
) -> int:
    """`selectune review` (`make review`): record the pairs, invite reviewers, then serve the
    pages; or move votes, or revoke invitations."""
    from core.errors import UserError
    from reports.runs import review_systems

    if not is_loopback(host) and not allow_remote:
        raise UserError(
            f"review: --host {host} is reachable from other machines; add --allow-remote to bind it"
        )
    judge_backend = None
    if judge_pairs:
        from eval.judge import make_judge

        judge_backend = make_judge(settings)
        if judge_backend is None:
            raise UserError(
                "review --judge-pairs: no judge configured; set judge_url and judge_model "
                "(settings or --judge-url/--judge-model)"
            )
    db = settings.workspace.results_db
    conn = review.open_review(db)
    try:
        if export_to:
            print(f"review: {review.export_votes(conn, export_to)} votes written to {export_to}")
            return 0
        if import_from:
            counts = review.import_votes(conn, import_from)
            print(f"review: {import_from}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
            return 0
        if revoke:
            names = [n.strip() for n in revoke.split(",") if n.strip()]
            invites.revoke(conn, names)
            print(f"review: revoked {', '.join(names)}; their links no longer work")
            return 0
        names = [n.strip() for n in invite.split(",") if n.strip()] if invite else []
        if not names and not no_serve and not any(i["revoked"] is None for i in invites.invitations(conn)):
            names = [_local_name()]  # the first `make review`: a link for whoever runs it
        tokens = invites.invite(conn, names) if names else {}
        systems = review_systems(settings.runs_dir, with_candidates=with_candidates)
        counts = review.add_pairs(conn, systems, seed=seed)
        print(
            f"review: systems {', '.join(systems)}; {counts['added']} new pairs, {counts['total']} in all "
            f"({counts['identical_skipped']} items with identical answers left out)"
        )
        if judge_backend is not None:
            from reports import pair_judge

            asked = pair_judge.judge_pairs(conn, judge_backend)
            print(
                f"review: judge {asked['model']}: {asked['asked']} new verdicts (each pair in both orders); "
                "`make report` compares them with the votes"
            )
    finally:
        conn.close()
    shown = host if is_loopback(host) or host not in ("0.0.0.0", "::") else _hostname()
    for name, token in tokens.items():
        print(
            f"review: link for {name} (shown once; --revoke {name} to cancel): "
            f"http://{shown}:{port}/invite/{token}"
        )
    if not is_loopback(host):
        print(
            f"review: WARNING: binding {host}:{port}, reachable from other machines. Only invited links can "
            "vote, but plain HTTP carries them unencrypted: beyond a trusted network put HTTPS in front.",
            flush=True,
        )
    if not no_serve:
        serve(db, host=host, port=port)
    return 0


def _local_name() -> str:
    import getpass

    name = getpass.getuser()
    return name if invites.NAME.match(name) else "owner"


def _hostname() -> str:
    import socket

    return socket.gethostname()
