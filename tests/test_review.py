"""Blind review: pairs, the vote endpoint's guards, concurrent votes, import/export, aggregation."""

from __future__ import annotations

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from reports import invites, review, review_stats
from reports.runs import review_systems
from reports.review_server import create_app
from selectune.cli import main
from core.errors import UserError
from tests import report_fixture


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return report_fixture.build_in(tmp_path_factory.mktemp("review"), evil=True)


@pytest.fixture
def runs(built, tmp_path):
    """A fresh copy with the review pairs of the base and merged models, and no votes."""
    copy = tmp_path / "runs"
    shutil.copytree(built, copy)
    conn = review.open_review(copy / "results.sqlite")
    review.add_pairs(conn, review_systems(copy))
    conn.close()
    return copy


def _conn(runs):
    return review.open_review(runs / "results.sqlite")


def test_pairs_are_seeded_stable_and_skip_identical_answers(built, tmp_path):
    systems = review_systems(built)
    assert list(systems) == [f"{report_fixture.WINNER} (base)", f"{report_fixture.MERGED} (local)"]
    assert sorted(systems[list(systems)[0]]) == ["fact", "style"]  # free-text tasks only
    sides = []
    for seed in (0, 0, 1):
        conn = review.open_review(tmp_path / f"s{len(sides)}.sqlite")
        counts = review.add_pairs(conn, systems, seed=seed)
        # 12 style and 12 fact items; none answered identically by the two
        assert counts["added"] + counts["identical_skipped"] == 24 and counts["added"] > 0
        sides.append(
            conn.execute(
                "SELECT pair_id, left_system, position FROM review_pairs ORDER BY pair_id"
            ).fetchall()
        )
        again = review.add_pairs(conn, systems, seed=seed)
        assert again["added"] == 0 and again["total"] == counts["added"]
        conn.close()
    assert sides[0] == sides[1]
    assert [s[1] for s in sides[0]] != [s[1] for s in sides[2]]
    lefts = [s[1] for s in sides[0]]
    assert 0 < lefts.count(lefts[0]) < len(lefts)  # both systems appear on the left


def _client(runs):
    from fastapi.testclient import TestClient

    client = TestClient(create_app(runs / "results.sqlite", secret=b"k" * 32), base_url="http://127.0.0.1")
    client.runs = runs
    return client


def _invite(runs, *names):
    conn = _conn(runs)
    try:
        return invites.invite(conn, list(names))
    finally:
        conn.close()


def _start(client, name="ana"):
    token = _invite(client.runs, name)[name]
    r = client.get(f"/invite/{token}", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    page = client.get("/")
    csrf = page.text.split('data-csrf="')[1].split('"')[0]
    pair = page.text.split('data-pair="')[1].split('"')[0]
    return page, csrf, pair


def test_vote_endpoint_guards_and_stores(runs):
    client = _client(runs)
    first = client.get("/")
    assert "open the link you were given" in first.text and "<form" not in first.text  # no name to type
    assert "script-src 'nonce-" in first.headers["content-security-policy"]
    page, csrf, pair = _start(client)
    assert "0 / " in page.text
    vote = {"pair_id": pair, "vote": "left", "comment": "", "vote_id": "v-000000001"}
    assert client.post("/vote", json=vote).status_code == 403  # no CSRF token
    assert client.post("/vote", json=vote, headers={"X-CSRF-Token": "0" * 64}).status_code == 403
    stranger = _client(runs)
    assert stranger.post("/vote", json=vote, headers={"X-CSRF-Token": csrf}).status_code == 403  # no cookie
    forged = _client(runs)
    forged.cookies.set("selectune_reviewer", "YW5h.0000")  # a guessed token
    assert forged.post("/vote", json=vote, headers={"X-CSRF-Token": csrf}).status_code == 403
    assert forged.get("/invite/" + "A" * 32, follow_redirects=False).status_code == 403
    h = {"X-CSRF-Token": csrf}
    assert client.post("/vote", json={**vote, "vote": "maybe"}, headers=h).status_code == 422
    assert client.post("/vote", json={**vote, "extra": 1}, headers=h).status_code == 422
    assert client.post("/vote", json={**vote, "pair_id": "0" * 16}, headers=h).status_code == 404
    assert client.post("/vote", json={**vote, "comment": "x" * 2001}, headers=h).status_code == 422
    assert client.post("/start", data={"name": "eve"}).status_code in (404, 405)  # names are never typed
    r = client.post("/vote", json={**vote, "comment": report_fixture.EVIL}, headers=h)
    assert r.status_code == 200 and r.json()["stored"] == "added" and r.json()["done"] == 1
    assert client.post("/vote", json={**vote, "comment": "again"}, headers=h).json()["stored"] == "duplicate"
    conn = _conn(runs)
    (stored,) = review.votes(conn)
    left = conn.execute("SELECT left_system FROM review_pairs WHERE pair_id = ?", (pair,)).fetchone()[0]
    conn.close()
    assert stored["reviewer"] == "ana" and stored["vote"] == "left" and stored["left_system"] == left
    assert stored["comment"] == report_fixture.EVIL
    # the next page shows the next pair, and voting again on the first replaces the vote
    assert client.get("/").text.split('data-pair="')[1].split('"')[0] != pair
    r = client.post("/vote", json={**vote, "vote": "tie", "vote_id": "v-000000002"}, headers=h)
    assert r.json()["stored"] == "replaced"


def test_only_a_live_invitation_votes_and_a_revoked_one_stops_at_once(runs):
    client = _client(runs)
    _page, csrf, pair = _start(client, "ana")
    vote = {"pair_id": pair, "vote": "left", "comment": "", "vote_id": "v-000000001"}
    h = {"X-CSRF-Token": csrf}
    assert client.post("/vote", json=vote, headers=h).status_code == 200
    conn = _conn(runs)
    stored_hash = conn.execute("SELECT token_sha256 FROM review_invites WHERE reviewer = 'ana'").fetchone()[0]
    token = client.cookies.get("selectune_reviewer")
    assert token not in stored_hash and len(token) >= 32  # the store keeps only the hash
    with pytest.raises(UserError, match="ana already has a live invitation"):
        invites.invite(conn, ["ana"])
    with pytest.raises(UserError, match="invitation name '<b>'"):
        invites.invite(conn, ["<b>"])
    invites.revoke(conn, ["ana"])
    conn.close()
    assert client.post("/vote", json={**vote, "vote_id": "v-000000002"}, headers=h).status_code == 403
    assert "open the link you were given" in client.get("/").text
    assert client.get(f"/invite/{token}", follow_redirects=False).status_code == 403
    # a new invitation for the same name: a new link, and the old one stays dead
    fresh = _client(runs)
    _page, csrf2, _pair = _start(fresh, "ana")
    assert fresh.cookies.get("selectune_reviewer") != token and csrf2 != csrf


def test_review_binds_beyond_loopback_only_when_told_and_warns(runs, capsys):
    args = ["--runs-dir", str(runs), "review", "--no-serve"]
    assert main([*args, "--host", "0.0.0.0"]) == 2
    assert "--host 0.0.0.0 is reachable from other machines; add --allow-remote" in capsys.readouterr().err
    assert main([*args, "--host", "0.0.0.0", "--allow-remote", "--invite", "ana,ben"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: binding 0.0.0.0:8765, reachable from other machines" in out
    links = [line.rsplit("/invite/", 1)[1] for line in out.splitlines() if "/invite/" in line]
    assert len(links) == 2 and len(set(links)) == 2
    conn = _conn(runs)
    assert {invites.reviewer_of(conn, t) for t in links} == {"ana", "ben"}
    conn.close()
    assert main([*args[:3], "--revoke", "ben"]) == 0
    assert main([*args[:3], "--revoke", "ben"]) == 2
    assert "no live invitation for 'ben'" in capsys.readouterr().err


def test_vote_page_renders_hostile_text_inert(runs):
    from tests.test_report import Outline

    client = _client(runs)
    page, _csrf, _pair = _start(client)
    o = Outline()
    o.feed(page.text)
    assert len(o.scripts) == 1 and "__pwned" not in o.scripts[0]
    assert o.active == ["textarea"]  # the comment box, and nothing from the data
    assert sum(report_fixture.EVIL in t for t in o.pre_texts) >= 1


class LiveServer:
    def __init__(self, app):
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "review server did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def test_concurrent_votes_none_lost_none_duplicated(runs):
    import httpx

    conn = _conn(runs)
    pairs = [r[0] for r in conn.execute("SELECT pair_id FROM review_pairs ORDER BY position")]
    conn.close()
    reviewers = [f"r{k}" for k in range(12)]
    with LiveServer(create_app(runs / "results.sqlite")) as url:
        sessions = {}
        for name in reviewers:
            client = httpx.Client(base_url=url)
            client.get(f"/invite/{_invite(runs, name)[name]}")
            csrf = client.get("/").text.split('data-csrf="')[1].split('"')[0]
            sessions[name] = (client, csrf)

        def cast(job):
            name, k, pair = job
            client, csrf = sessions[name]
            body = {
                "pair_id": pair,
                "vote": review.VOTES[k % 4],
                "comment": "",
                "vote_id": f"{name}-vote-{k:04d}",
            }
            return client.post("/vote", json=body, headers={"X-CSRF-Token": csrf}).json()["stored"]

        jobs = [(name, k, pair) for name in reviewers for k, pair in enumerate(pairs)]
        with ThreadPoolExecutor(max_workers=16) as pool:
            outcomes = list(pool.map(cast, jobs + jobs[::7]))  # every 7th vote is sent twice
        for client, _ in sessions.values():
            client.close()
    assert outcomes.count("added") == len(jobs) and outcomes.count("duplicate") == len(jobs[::7])
    conn = _conn(runs)
    stored = review.votes(conn)
    conn.close()
    assert len(stored) == len(jobs) == len(reviewers) * len(pairs)
    assert len({(v["reviewer"], v["pair_id"]) for v in stored}) == len(jobs)
    assert {v["vote_id"] for v in stored} == {f"{n}-vote-{k:04d}" for n, k, _ in jobs}


def test_export_import_round_trip_and_merge(runs, tmp_path):
    conn = _conn(runs)
    pairs = conn.execute("SELECT pair_id FROM review_pairs ORDER BY position").fetchall()
    for k, (pid,) in enumerate(pairs[:6]):
        review.record_vote(
            conn,
            vote_id=f"here-{k:05d}",
            pair=pid,
            vote=review.VOTES[k % 4],
            reviewer="bo",
            comment=f'say "{k}", then <b>',
            at=1000.0 + k,
        )
    for fmt in ("csv", "json"):
        assert review.export_votes(conn, tmp_path / f"votes.{fmt}") == 6
    conn.close()
    # a second copy of the store, where another reviewer votes, then merges the first one's file
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(runs, elsewhere)
    other = _conn(elsewhere)
    other.execute("DELETE FROM review_votes")
    review.record_vote(other, vote_id="there-00001", pair=pairs[0][0], vote="tie", reviewer="cy", at=5.0)
    assert review.import_votes(other, tmp_path / "votes.csv") == {
        "added": 6,
        "replaced": 0,
        "duplicate": 0,
        "older": 0,
    }
    assert review.import_votes(other, tmp_path / "votes.json") == {
        "added": 0,
        "replaced": 0,
        "duplicate": 6,
        "older": 0,
    }
    merged = {v["vote_id"]: v for v in review.votes(other)}
    conn = _conn(runs)
    original = review.votes(conn)
    conn.close()
    assert len(merged) == 7 and all(merged[v["vote_id"]] == v for v in original)
    # the same reviewer's newer vote on a pair replaces the older one, an older one is ignored
    rows = json.loads((tmp_path / "votes.json").read_text(encoding="utf-8"))
    newer = [{**rows[0], "vote_id": "later-00001", "vote": "both_bad", "time": 9999.0}]
    older = [{**rows[1], "vote_id": "early-00001", "time": 1.0}]
    (tmp_path / "newer.json").write_text(json.dumps(newer), encoding="utf-8")
    (tmp_path / "older.json").write_text(json.dumps(older), encoding="utf-8")
    assert review.import_votes(other, tmp_path / "newer.json")["replaced"] == 1
    assert review.import_votes(other, tmp_path / "older.json")["older"] == 1
    assert len(review.votes(other)) == 7
    other.close()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"vote": "maybe"}, "row 2: 'vote' must be one of left, right, tie, both_bad, got 'maybe'"),
        (
            {"pair_id": "ffffffffffffffff"},
            "row 2: pair 'ffffffffffffffff' is not among this store's review pairs "
            "(build them with `make review` on the same runs first)",
        ),
        (
            {"left_system": "someone else"},
            "row 2: systems or left side differ from the recorded pair "
            "(qwen2.5-coder-0.5b-instruct (base) vs "
            "qwen2.5-coder-0.5b-instruct@merged (local), "
            "qwen2.5-coder-0.5b-instruct (base) on the left)",
        ),
        ({"time": "yesterday"}, "row 2: 'time' must be seconds since the epoch, got 'yesterday'"),
        ({"reviewer": " "}, "row 2: 'reviewer' and 'vote_id' must not be empty"),
        ({"vote": None, "_drop": "vote"}, "row 2: missing 'vote'"),
    ],
)
def test_bad_import_rows_are_one_line_and_import_nothing(runs, tmp_path, change, message):
    conn = _conn(runs)
    pairs = conn.execute("SELECT pair_id FROM review_pairs ORDER BY position").fetchall()
    for k, (pid,) in enumerate(pairs[:2]):
        review.record_vote(conn, vote_id=f"bad-test-{k}", pair=pid, vote="left", reviewer="di", at=10.0 + k)
    path = tmp_path / "votes.json"
    review.export_votes(conn, path)
    conn.execute("DELETE FROM review_votes")
    rows = json.loads(path.read_text(encoding="utf-8"))
    drop = change.pop("_drop", None)
    rows[1].update(change)
    if drop:
        del rows[1][drop]
    path.write_text(json.dumps(rows), encoding="utf-8")
    with pytest.raises(UserError) as err:
        review.import_votes(conn, path)
    assert str(err.value) == f"{path}: {message}"
    assert review.votes(conn) == []
    conn.close()


def test_cli_builds_pairs_exports_and_imports(runs, tmp_path, capsys):
    assert main(["--runs-dir", str(runs), "review", "--no-serve", "--with-candidates"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "new pairs" in out
    assert main(["--runs-dir", str(runs), "review", "--export", str(tmp_path / "v.csv")]) == 0
    assert "0 votes written" in capsys.readouterr().out
    (tmp_path / "v.txt").write_text("x")
    assert main(["--runs-dir", str(runs), "review", "--import", str(tmp_path / "v.txt")]) == 2
    assert "votes are imported from .csv or .json" in capsys.readouterr().err


def test_aggregation_against_known_values():
    def vote(a, b, left, v):
        return {"system_a": a, "system_b": b, "left_system": left, "vote": v, "reviewer": "r", "comment": ""}

    # A beats B 6-2 and ties once; A and C split 4-4; the left side wins 11 of the 16 decisive votes
    votes = (
        [vote("A", "B", "A", "left")] * 5
        + [vote("A", "B", "B", "right")]
        + [vote("A", "B", "B", "left")] * 2
        + [vote("A", "B", "A", "tie"), vote("A", "B", "A", "both_bad")]
        + [vote("A", "C", "A", "left")] * 2
        + [vote("A", "C", "C", "right")] * 2
        + [vote("A", "C", "C", "left")] * 2
        + [vote("A", "C", "A", "right")] * 2
    )
    agg = review_stats.aggregate(votes)
    ab = next(p for p in agg["pairs"] if p["b"] == "B")
    assert (ab["wins_a"], ab["wins_b"], ab["ties"], ab["both_bad"], ab["decisive"]) == (6, 2, 1, 1, 8)
    # Wilson 95% interval of 6/8 (statsmodels): [0.4093, 0.9285]
    assert ab["ci95"] == pytest.approx([0.4093, 0.9285], abs=1e-4)
    pos = agg["position"]
    assert (pos["left_wins"], pos["decisive"]) == (11, 16)
    assert pos["p_value"] == pytest.approx(0.2101, abs=1e-4)  # two-sided binomial test of 11/16
    # Star design: the MLE is pairwise. The tie is half a win each way, so A:B = 6.5:2.5 and
    # A:C = 4:4; log-strengths relative to A: log(2.5/6.5) and 0.
    bt = {r["system"]: r for r in agg["bradley_terry"]["rows"]}
    assert bt["A"]["log_strength"] == 0.0
    assert bt["B"]["log_strength"] == pytest.approx(-0.9555, abs=1e-3)
    assert bt["C"]["log_strength"] == pytest.approx(0.0, abs=1e-6)
    assert sum(r["share"] for r in bt.values()) == pytest.approx(1.0)


def test_bradley_terry_says_when_it_cannot_be_estimated():
    votes = [
        {"system_a": "A", "system_b": s, "left_system": "A", "vote": "left", "reviewer": "r", "comment": ""}
        for s in ("B", "C")
        for _ in range(5)
    ]
    bt = review_stats.aggregate(votes)["bradley_terry"]
    assert bt == {"estimable": False, "why": "one system wins or loses every vote (perfect separation)"}


def test_style_controlled_bradley_terry_against_a_hand_worked_fit():
    def vote(left_a: bool, a_wins: bool, a_longer: bool):
        a_text, b_text = ("xxxx", "xx") if a_longer else ("xx", "xxxx")
        return {
            "system_a": "a",
            "system_b": "b",
            "left_system": "a" if left_a else "b",
            "vote": "left" if a_wins == left_a else "right",
            "reviewer": "r",
            "comment": "",
            "output_a": a_text,
            "output_b": b_text,
        }

    # a longer in 5 votes, winning 4; shorter in 5, winning 2. The length difference is
    # (4 - 2) / 6 = +-1/3, scaled by its root mean square to +-1; emoji and punctuation are 0
    # everywhere. The two-group logistic fit is saturated: a's advantage beta and the length
    # coefficient gamma solve logit(0.8) = beta + gamma, logit(0.4) = beta - gamma, so beta =
    # (log 4 + log 2/3) / 2 = 0.4904 and gamma = (log 4 - log 2/3) / 2 = 0.8959; b's log-strength
    # relative to a is -beta. The plain fit: a wins 6 of 10, b's log-strength -logit(0.6) = -0.4055.
    votes = [vote(k % 2 == 0, k < 4, True) for k in range(5)] + [
        vote(k % 2 == 0, k < 2, False) for k in range(5)
    ]
    agg = review_stats.aggregate(votes)
    styled = agg["style_controlled"]
    b = next(r for r in styled["rows"] if r["system"] == "b")
    assert b["log_strength"] == pytest.approx(-0.4904, abs=1e-4)
    assert b["plain"] == pytest.approx(-0.4055, abs=1e-4)
    (length,) = styled["features"]
    assert length["feature"] == "length" and length["coef"] == pytest.approx(0.8959, abs=1e-4)
    assert styled["constant"] == ["emoji", "punctuation"]
    # the fit does not depend on which system of a pair is stored as a
    swapped = [
        {**v, "system_a": "b", "system_b": "a", "output_a": v["output_b"], "output_b": v["output_a"]}
        for v in votes
    ]
    again = review_stats.aggregate(swapped)["style_controlled"]
    assert next(r for r in again["rows"] if r["system"] == "b")["log_strength"] == pytest.approx(
        -0.4904, abs=1e-4
    )


@pytest.mark.parametrize(
    "text, counts",
    [
        ("", (0, 0, 0)),
        ("好的，马上来！", (7, 0, 2)),
        ("Sure! 😀👍🏻", (9, 2, 1)),
        ("**bold** - list", (15, 0, 5)),
    ],
)
def test_style_counts(text, counts):
    assert review_stats.style_counts(text) == counts
