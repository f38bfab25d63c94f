"""The review pages: a small FastAPI app over the pairs and votes in the results store.

    make review                       # http://127.0.0.1:PORT/ ; Ctrl-C stops

A reviewer gives a name once; it is kept in a cookie signed with a secret drawn at start. Every
vote is a JSON POST carrying a CSRF token derived from that secret and the name (a page from
another origin can neither read it nor set the header), and is validated field by field. Each
request writes through its own SQLite connection inside BEGIN IMMEDIATE, so concurrent votes are
serialised by SQLite and none is lost. (Imported only by `review`: FastAPI is loaded at import.)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from pathlib import Path
from typing import Literal

from fastapi import Cookie, FastAPI, Form, Header, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field

from reports import review
from reports.render import environment

COOKIE = "selectune_reviewer"
NAME = re.compile(r"^[\w .@-]{1,64}$")


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

    def sign(purpose: str, name: str) -> str:
        return hmac.new(secret, f"{purpose}\0{name}".encode(), hashlib.sha256).hexdigest()

    def reviewer_of(cookie: str | None) -> str | None:
        if not cookie or "." not in cookie:
            return None
        encoded, mac = cookie.rsplit(".", 1)
        try:
            name = base64.urlsafe_b64decode(encoded.encode()).decode()
        except (ValueError, UnicodeDecodeError):
            return None
        return name if hmac.compare_digest(mac, sign("cookie", name)) else None

    def page(template: str, nonce: str, **context) -> HTMLResponse:
        html = env.get_template(template).render(nonce=nonce, **context)
        response = HTMLResponse(html)
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-{nonce}'; connect-src 'self'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
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
        return page("review_vote.html", nonce, reviewer=name, pair=pair, done=done, total=total,
                    csrf=sign("csrf", name))

    @app.post("/start")
    def start(request: Request, name: str = Form(...)):
        origin = request.headers.get("origin")
        if origin and origin.rstrip("/") != str(request.base_url).rstrip("/"):
            raise HTTPException(403, "cross-origin form")
        name = name.strip()
        if not NAME.match(name):
            raise HTTPException(422, "a name is 1-64 letters, digits, spaces or . @ - _")
        response = RedirectResponse("/", status_code=303)
        value = base64.urlsafe_b64encode(name.encode()).decode() + "." + sign("cookie", name)
        response.set_cookie(COOKIE, value, httponly=True, samesite="strict", max_age=30 * 24 * 3600)
        return response

    @app.post("/vote")
    def vote(body: Vote, selectune_reviewer: str | None = Cookie(default=None),
             x_csrf_token: str | None = Header(default=None)):
        name = reviewer_of(selectune_reviewer)
        if name is None:
            raise HTTPException(403, "no reviewer: open / and give your name first")
        if not x_csrf_token or not hmac.compare_digest(x_csrf_token, sign("csrf", name)):
            raise HTTPException(403, "missing or wrong CSRF token")
        conn = review.open_review(db_path)
        try:
            try:
                outcome = review.record_vote(conn, vote_id=body.vote_id, pair=body.pair_id, vote=body.vote,
                                             reviewer=name, comment=body.comment)
            except KeyError:
                raise HTTPException(404, f"no review pair {body.pair_id}") from None
            done, total = review.progress(conn, name)
        finally:
            conn.close()
        return JSONResponse({"stored": outcome, "done": done, "total": total})

    return app


def serve(db_path: Path, host: str = "127.0.0.1", port: int = 8765) -> None:
    import uvicorn

    conn = review.open_review(db_path)
    total = review.pair_count(conn)
    conn.close()
    print(f"review: {total} pairs; open http://{host}:{port}/ (Ctrl-C stops)", flush=True)
    uvicorn.run(create_app(db_path), host=host, port=port, log_level="warning")


def review_command(settings, *, host: str = "127.0.0.1", port: int = 8765, seed: int = 0,
                   with_candidates: bool = False, no_serve: bool = False, export_to: Path | None = None,
                   import_from: Path | None = None) -> int:
    """`selectune review` (`make review`): record the pairs, then serve the pages; or move votes."""
    from reports.collect import review_systems

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
        systems = review_systems(settings.runs_dir, with_candidates=with_candidates)
        counts = review.add_pairs(conn, systems, seed=seed)
    finally:
        conn.close()
    print(f"review: systems {', '.join(systems)}; {counts['added']} new pairs, {counts['total']} in all "
          f"({counts['identical_skipped']} items with identical answers left out)")
    if not no_serve:
        serve(db, host=host, port=port)
    return 0
