"""`make report`: golden page structure, untrusted text, refusals, and the numbers it shows.

Golden files hold each page type's outline (headings, table headers and row counts, links
between pages), not its bytes; `UPDATE_GOLDEN=1 pytest tests/test_report.py` rewrites them after
an intended change, and the diff is reviewed like code.
"""

from __future__ import annotations

import json
import re
import os
import sqlite3
from html.parser import HTMLParser
from pathlib import Path

import pytest

from reports.render import build_report
from selectune.cli import main
from tests import report_fixture
from tests.conftest import REPO

GOLDEN = REPO / "tests" / "golden" / "report"
PAGE_TYPES = [*report_fixture.PAGES, "flips-fact", "samples-fact"]


class Outline(HTMLParser):
    """Headings, tables (header cells and body row count), links, scripts and anything active."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.lines: list[str] = []
        self.active: list[str] = []
        self.scripts: list[str] = []
        self.pre_texts: list[str] = []
        self._heading = None
        self._text: list[str] = []
        self._table = None
        self._in_script = self._in_pre = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in attrs:
            if name.startswith("on"):
                self.active.append(f"{tag}[{name}]")
        if tag in ("img", "iframe", "object", "embed", "textarea", "form"):
            self.active.append(tag)
        if tag in ("h1", "h2", "h3"):
            self._heading, self._text = f"{tag}#{attrs.get('id', '')}", []
        elif tag == "table":
            self._table = {
                "id": attrs.get("id") or attrs.get("class") or "",
                "th": [],
                "rows": 0,
                "in_body": False,
            }
        elif tag == "th" and self._table is not None:
            self._text = []
        elif tag == "tbody" and self._table is not None:
            self._table["in_body"] = True
        elif tag == "tr" and self._table is not None and self._table["in_body"]:
            self._table["rows"] += 1
        elif tag == "a" and attrs.get("href", "").endswith(".html"):
            self.lines.append(f"link {attrs['href']}")
        elif tag == "script":
            self._in_script, self._text = True, []
        elif tag == "pre":
            self._in_pre, self._text = True, []
        elif tag == "svg":
            self.lines.append("svg")

    def handle_endtag(self, tag):
        text = " ".join("".join(self._text).split())
        if tag in ("h1", "h2", "h3") and self._heading:
            self.lines.append(f"{self._heading}: {text}")
            self._heading = None
        elif tag == "th" and self._table is not None and not self._table["in_body"]:
            self._table["th"].append(text)
        elif tag == "table" and self._table is not None:
            t = self._table
            self.lines.append(f"table#{t['id']}: {' | '.join(t['th'])} ({t['rows']} rows)")
            self._table = None
        elif tag == "script":
            self._in_script = False
            self.scripts.append("".join(self._text))
        elif tag == "pre":
            self._in_pre = False
            self.pre_texts.append("".join(self._text))

    def handle_data(self, data):
        self._text.append(data)


def outline(path: Path) -> Outline:
    parser = Outline()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def fixture_runs(tmp_path_factory):
    return report_fixture.build_in(tmp_path_factory.mktemp("report"), votes=True)


@pytest.fixture(scope="module")
def evil_runs(tmp_path_factory):
    runs = report_fixture.build_in(tmp_path_factory.mktemp("evil"), evil=True, votes=True)
    return runs


def test_every_page_type_matches_its_golden_outline(fixture_runs):
    written = {p.stem for p in build_report(fixture_runs)}
    tasks = ("fewclue_bustm", "style", "fact")
    assert written == {
        *report_fixture.PAGES,
        *(f"{kind}-{t}" for kind in ("flips", "samples") for t in tasks),
    }
    for page in PAGE_TYPES:
        got = outline(fixture_runs / "report" / f"{page}.html").lines
        golden = GOLDEN / f"{page}.json"
        if os.environ.get("UPDATE_GOLDEN"):
            golden.parent.mkdir(parents=True, exist_ok=True)
            golden.write_text(json.dumps(got, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        assert got == json.loads(golden.read_text(encoding="utf-8")), f"{page}.html differs from {golden}"


def test_numbers_are_those_of_the_stored_items(fixture_runs):
    """FewCLUE: the base is right when k % 3 != 0, the merged model when k % 4 != 0 (k = item
    position in the split), so 6 items flip wrong->right and 4 right->wrong out of 24."""
    build_report(fixture_runs)
    flips = outline(fixture_runs / "report" / "flips-fewclue_bustm.html").lines
    assert "h2#flips-up: Wrong before, right after (6)" in flips
    assert "h2#flips-down: Right before, wrong after (4)" in flips
    html = (fixture_runs / "report" / "before_after.html").read_text(encoding="utf-8")
    # accuracy 16/24 -> 18/24: +8.3 points, 10 discordant items split 6/4: exact McNemar p = 0.754
    assert "66.7" in html and "75.0" in html and "+8.3" in html and "0.754" in html
    leaderboard = (fixture_runs / "report" / "leaderboard.html").read_text(encoding="utf-8")
    assert "Winner: <strong>qwen2.5-coder-0.5b-instruct</strong>" in leaderboard


def test_untrusted_text_renders_inert_on_every_page(evil_runs):
    pages = build_report(evil_runs)
    for path in pages:
        o = outline(path)
        assert o.active == [], f"{path.name}: active markup from data: {o.active}"
        expected_scripts = 1 if path.stem.startswith("samples-") else 0
        assert len(o.scripts) == expected_scripts, path.name
        assert all("__pwned" not in s for s in o.scripts), path.name
    # ... and the hostile text is still shown, as text
    texts = outline(evil_runs / "report" / "flips-fact.html").pre_texts
    assert any(report_fixture.EVIL in t for t in texts)
    assert any(report_fixture.EVIL in t for t in outline(evil_runs / "report" / "training.html").pre_texts)
    assert any(report_fixture.EVIL in t for t in outline(evil_runs / "report" / "serving.html").pre_texts)


def test_leaderboard_leaves_out_an_entry_it_cannot_compare_and_cuts_one_to_shared_items(
    fixture_runs, tmp_path
):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(fixture_runs, runs)
    shutil.rmtree(runs / "report", ignore_errors=True)
    selection = json.loads((runs / "selection.json").read_text(encoding="utf-8"))
    other_bustm, other_style = selection["runs"][report_fixture.OTHER][:2]
    with sqlite3.connect(runs / "results.sqlite") as db:
        meta = json.loads(
            db.execute("SELECT meta_json FROM runs WHERE run_id = ?", (other_style,)).fetchone()[0]
        )
        meta["task_sha256"] = "0" * 64
        db.execute("UPDATE runs SET meta_json = ? WHERE run_id = ?", (json.dumps(meta), other_style))
        db.execute(
            "DELETE FROM items WHERE run_id = ? AND item_id = (SELECT MIN(item_id) FROM items WHERE run_id = ?)",
            (other_bustm, other_bustm),
        )
    build_report(runs)  # never blank: what can be compared is
    page = (runs / "report" / "leaderboard.html").read_text(encoding="utf-8")
    assert re.search(r"style-test gen: left out, their task files differ \(.*000000000000", page)
    assert re.search(
        r"fewclue_bustm-dev gen: compared on the 23 items all of them scored \(\S+ 24, \S+ 23\)", page
    )
    assert "style-test" not in page.split('id="scores"')[1].split("</table>")[0]


def test_before_after_compares_on_the_items_both_sides_scored_and_says_so(fixture_runs, tmp_path):
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(fixture_runs, runs)
    record = json.loads(next((runs / "serve").glob("rescore-*.json")).read_text(encoding="utf-8"))
    local_fact = next(t["local_run"] for t in record["parity"]["tasks"] if t["task"] == "fact")
    with sqlite3.connect(runs / "results.sqlite") as db:
        db.execute(
            "DELETE FROM items WHERE run_id = ? AND item_id = (SELECT MIN(item_id) FROM items WHERE run_id = ?)",
            (local_fact, local_fact),
        )
    build_report(runs)  # a limited re-score never blanks the report
    page = (runs / "report" / "before_after.html").read_text(encoding="utf-8")
    assert re.search(
        r"fact: the base and fine-tuned runs: compared on the 11 items all of them scored "
        r"\(\S+ 12, \S+ 11, \S+ 12\)",
        page,
    ), page[:2000]
    assert "fact-test (11 items)" in page


def test_report_of_a_selection_alone_points_at_the_next_steps(fixture_runs, tmp_path, capsys):
    import shutil

    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copy(fixture_runs / "results.sqlite", runs)
    shutil.copy(fixture_runs / "selection.json", runs)
    assert main(["--runs-dir", str(runs), "report"]) == 0
    assert "6 pages" in capsys.readouterr().out
    assert "make train" in (runs / "report" / "training.html").read_text(encoding="utf-8")
    assert "make rescore" in (runs / "report" / "serving.html").read_text(encoding="utf-8")


def test_report_without_a_store_is_one_line(tmp_path, capsys):
    assert main(["--runs-dir", str(tmp_path / "none"), "report"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no results store; run `make select` first" in err


def test_the_leaderboard_shows_the_comparisons_that_decided_when_a_smaller_tied_model_wins(tmp_path):
    """qwen 0.5b is best (40/40), smollm tied (36/40, McNemar p = 0.125) and smaller, so it wins; the
    page must compare against the best mean rank, as the decision did, not against the winner."""
    from core.artifacts import Selection, write_artifact
    from core.workspace import Workspace
    from eval.results import open_results
    from eval.decision import Budget, selection_report
    from tests.test_select import _candidate
    from tests.test_runner import make_task

    task, items = make_task(tmp_path, n=40)
    runs_dir = tmp_path / "runs"
    conn = open_results(runs_dir)
    candidates = [
        _candidate("qwen2.5-coder-0.5b-instruct", set(), task, items, conn),
        _candidate("smollm2-135m-instruct", {1, 2, 3, 4}, task, items, conn),
        _candidate("gemma3-270m", set(range(12)), task, items, conn),
    ]
    conn.close()
    _, record = selection_report(candidates, Budget(train_gib=2.3, infer_gib=16))
    assert (record["best_mean_rank"], record["winner"]) == (
        "qwen2.5-coder-0.5b-instruct",
        "smollm2-135m-instruct",
    )
    write_artifact(Workspace(runs_dir).selection, Selection, record)
    build_report(runs_dir)
    rows = [
        [td.strip() for td in re.findall(r"<td[^>]*>(.*?)</td>", tr)]
        for tr in re.findall(
            r"<tr>(.*?)</tr>",
            (runs_dir / "report" / "leaderboard.html")
            .read_text(encoding="utf-8")
            .split('id="vs-best"')[1]
            .split("</table>")[0],
        )
    ]
    # best - candidate: +10.0 points on 4 discordant items (p 0.125), +30.0 on 12 (p < 0.001)
    assert sorted((r[0], r[5], r[7], r[10]) for r in rows if r) == [
        ("gemma3-270m", "+30.0", "&lt; 0.001", "significantly worse"),
        ("smollm2-135m-instruct", "+10.0", "0.125", "not shown to differ"),
    ]
    assert sorted(
        (m, c["diff"], c["p_value"]) for m, cs in record["comparisons_vs_best"].items() for c in cs
    ) == [("gemma3-270m", 0.3, pytest.approx(0.00048828125)), ("smollm2-135m-instruct", 0.1, 0.125)]


def test_before_after_shows_the_training_checks_before_any_rescore(fixture_runs, tmp_path):
    import shutil

    runs_dir = shutil.copytree(fixture_runs, tmp_path / "runs")
    for record in (runs_dir / "serve").glob("rescore-*.json"):
        record.unlink()
    build_report(runs_dir)
    page = runs_dir / "report" / "before_after.html"
    html = page.read_text(encoding="utf-8")
    assert "Nothing to compare yet" not in html and "FewCLUE" not in html
    # the fixture's check: fact_recall 10.0 (base) -> 70.0 (merged), +60.0 [30.0, 80.0], p 0.002
    row = re.findall(r"<td[^>]*>(.*?)</td>", html.split('class="before-after"')[1].split("</table>")[0], re.S)
    assert [" ".join(re.sub(r"<[^>]+>", " ", c).split()) for c in row] == [
        "fact_recall",
        "10.0 [0.0, 20.0]",
        "70.0 [50.0, 90.0]",
        "+60.0 [30.0, 80.0]",
        "0.002",
    ]
    assert "h2#task-fact: fact-test (12 items)" in outline(page).lines


def test_the_leaderboard_leads_each_entry_with_the_metric_its_suite_entry_ranks_by(fixture_runs, tmp_path):
    """A suite entry that ranks style by chrf: the report's primary row and chart for style are
    chrf's, as the decision's are (metrics.ranked_metric, the one rule)."""
    from core.workspace import Workspace
    from core.store import open_read_only
    from reports.collect import leaderboard

    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: suite\ndescription: d\nentries:\n  - {task: fewclue_bustm, split: dev, mode: gen}\n"
        "  - {task: style, split: test, mode: gen, metric: chrf}\n"
        "  - {task: fact, split: test, mode: gen}\n",
        encoding="utf-8",
    )
    selection = Workspace(fixture_runs).read_selection().model_copy(update={"suite": {"file": str(suite)}})
    conn = open_read_only(Workspace(fixture_runs).results_db)
    try:
        before = leaderboard(conn, selection.model_copy(update={"suite": None}), "selection.json")
        board = leaderboard(conn, selection, "selection.json")
    finally:
        conn.close()
    primary = {r["task"]: r["metric"] for r in board.rows if r["primary"]}
    assert primary == {"fewclue_bustm": "accuracy", "style": "chrf", "fact": "fact_recall"}
    assert {r["task"]: r["metric"] for r in before.rows if r["primary"]}["style"] == "style_accuracy"
    assert [c["title"] for c in board.charts] == [
        "fewclue_bustm-dev gen accuracy",
        "style-test gen chrf",
        "fact-test gen fact_recall",
    ]
