"""The report and the review pages in a real headless Chromium (Debian's, driven by Playwright).

Opens every report page from file:// with hostile dataset and model text in it, uses the samples
filter, then votes by keyboard on the review server and checks the vote in the store and in the
regenerated report. Screenshots of each page type are kept under test-artifacts/screenshots/.
`make browser` installs Chromium; under CI a missing browser fails instead of skipping.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from reports import invites, review
from reports.runs import review_systems
from reports.render import build_report
from reports.review_server import create_app
from tests import report_fixture
from tests.conftest import REPO
from tests.test_review import LiveServer

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts" / "screenshots"
FLAGS = (
    "--headless --no-sandbox --disable-gpu --disable-quic --no-first-run "
    "--disable-background-networking --disable-component-update --disable-sync"
).split()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"Chromium not found at {CHROMIUM}: `make browser` installs Debian's chromium")
        pytest.skip("Chromium not installed (`make browser`)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def runs(tmp_path):
    runs = report_fixture.build_in(tmp_path, evil=True)
    conn = review.open_review(runs / "results.sqlite")
    review.add_pairs(conn, review_systems(runs))
    conn.close()
    return runs


def _page(browser):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.dialogs = []
    page.on("dialog", lambda d: (page.dialogs.append(d.message), d.dismiss()))
    return page


def test_report_pages_render_inert_and_filter(browser, runs):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pages = build_report(runs)
    page = _page(browser)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    for path in pages:
        page.goto(path.as_uri())
        assert page.evaluate("window.__pwned") is None, path.name
        assert page.locator("h1").count() == 1, path.name
        if path.stem in report_fixture.PAGES or path.stem.endswith("-fact"):
            page.screenshot(path=str(ARTIFACTS / f"report-{path.stem}.png"), full_page=True)
    assert page.dialogs == [] and errors == []
    # the hostile text is on the page as text
    page.goto((runs / "report" / "flips-fact.html").as_uri())
    texts = page.locator(
        "td > pre"
    ).all_inner_texts()  # the flips page's 40 texts, 24 of them carry the hostile text
    assert len(texts) == 40 and sum(report_fixture.EVIL in t for t in texts) == 24
    assert report_fixture.EVIL in texts[0]
    # what the model was sent, per item: the system and the user message, the hostile prompt among them as text
    sent = page.locator("details.request pre").all_text_contents()  # closed: text, not shown
    prompts = page.locator("tbody tr td:nth-child(2) > pre").all_text_contents()
    assert len(sent) == 2 * len(prompts) == 20 and sent[1::2] == prompts
    assert sum(report_fixture.EVIL in t for t in sent) == sum(report_fixture.EVIL in t for t in prompts) > 0
    # the samples filter shows exactly the rows it names; the flips are those of the flips page
    page.goto((runs / "report" / "flips-fewclue_bustm.html").as_uri())
    flips_listed = page.locator("table.flips tbody tr:not(:has(td[colspan]))").count()
    page.goto((runs / "report" / "samples-fewclue_bustm.html").as_uri())
    rows = page.locator("tr.item")
    total = rows.count()
    flipped = page.locator('tr.item:not([data-flip="none"])').count()
    incorrect = page.locator('tr.item[data-correct="no"]').count()
    assert total == 24 and flipped == flips_listed > 0 and incorrect > 0
    page.click('button[data-filter="flipped"]')
    assert page.locator("tr.item:visible").count() == flipped
    page.click('button[data-filter="incorrect"]')
    assert page.locator("tr.item:visible").count() == incorrect
    page.click('button[data-filter="all"]')
    assert page.locator("tr.item:visible").count() == total
    page.close()


def test_vote_by_keyboard_reaches_the_store_and_the_report(browser, runs):
    from playwright.sync_api import expect

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    db = runs / "results.sqlite"
    with LiveServer(create_app(db)) as url:
        page = _page(browser)
        page.goto(url + "/")
        page.screenshot(path=str(ARTIFACTS / "review-start.png"))
        token = invites.invite(review.open_review(db), ["tester"])["tester"]
        page.goto(f"{url}/invite/{token}")  # the link a reviewer is sent, opened from anywhere
        page.wait_for_selector("#pair")
        total = review.pair_count(review.open_review(db))
        assert page.inner_text("#progress") == f"0 / {total}"
        assert page.evaluate("window.__pwned") is None
        page.screenshot(path=str(ARTIFACTS / "review-vote.png"), full_page=True)
        first = page.get_attribute("#pair", "data-pair")
        # typing in the comment box, letters included, votes nothing; Esc leaves it, then "a" votes
        page.click("#comment")
        page.keyboard.type("a bit better </textarea>")
        page.keyboard.press("Escape")
        assert review.votes(review.open_review(db)) == []
        page.keyboard.press("a")
        expect(page.locator("#progress")).to_have_text(f"1 / {total}")  # the page reloaded after the vote
        (vote,) = review.votes(review.open_review(db))
        conn = review.open_review(db)
        left = conn.execute("SELECT left_system FROM review_pairs WHERE pair_id = ?", (first,)).fetchone()[0]
        conn.close()
        assert (vote["pair_id"], vote["vote"], vote["reviewer"], vote["left_system"]) == (
            first,
            "left",
            "tester",
            left,
        )
        assert vote["comment"] == "a bit better </textarea>"

        build_report(runs)
        report = _page(browser)
        report.goto((runs / "report" / "review.html").as_uri())
        assert "1 votes from 1 reviewer over" in report.inner_text("main")
        row = report.locator("#review-pairs tbody tr").first.locator("td").all_inner_texts()
        assert sorted(row[2:4]) == ["0", "1"] and row[4] == "0"  # one win, no tie yet

        assert page.get_attribute("#pair", "data-pair") != first
        page.keyboard.press("t")
        expect(page.locator("#progress")).to_have_text(f"2 / {total}")
        build_report(runs)
        report.goto((runs / "report" / "review.html").as_uri())
        assert "2 votes from 1 reviewer" in report.inner_text("main")
        row = report.locator("#review-pairs tbody tr").first.locator("td").all_inner_texts()
        assert row[4] == "1"  # the tie is counted
        report.screenshot(path=str(ARTIFACTS / "report-review-with-votes.png"), full_page=True)
        assert page.dialogs == [] and report.dialogs == []
        page.close()
        report.close()
