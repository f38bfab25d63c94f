"""The JSON artifacts: stamped with their schema version when written, checked when read, and
files written before versions existed (tests/golden/artifacts/, from main at 9cfaa4e) still load."""

from __future__ import annotations

import json

import pytest

from core.artifacts import RescoreRecord, Selection, TrainSummary, read_artifact, write_artifact
from core.errors import UserError
from tests.conftest import REPO

GOLDEN = REPO / "tests" / "golden" / "artifacts"


def test_a_selection_written_before_versions_loads_as_the_current_version():
    path = GOLDEN / "selection-v1.json"
    old = json.loads(path.read_text(encoding="utf-8"))
    record = read_artifact(path, Selection)
    assert isinstance(record, Selection)
    assert "schema_version" not in old and record.schema_version == Selection.VERSION
    assert record.winner == old["winner"] and record.cells == old["cells"]
    for model, comps in old["comparisons_vs_best"].items():
        for before, after in zip(comps, record.comparisons_vs_best[model]):
            assert after["diff"] == before["diff_best_minus_other"] and "diff_best_minus_other" not in after
            assert {k: v for k, v in after.items() if k != "diff"} == {
                k: v for k, v in before.items() if k != "diff_best_minus_other"
            }


def test_a_training_summary_written_before_versions_loads_with_its_fact_comparison_renamed():
    record = read_artifact(GOLDEN / "summary-v1.json", TrainSummary)
    (check,) = record.checks
    assert record.schema_version == 3 and "fact" not in record.model_dump()
    assert check["task"] == "fact" and check["metric"] == "fact_recall"
    assert check["diff"] == pytest.approx(0.1667, abs=1e-4) and "diff_merged_minus_base" not in check


def test_a_written_artifact_carries_its_version_and_reads_back_the_same(tmp_path):
    record = read_artifact(GOLDEN / "selection-v1.json", Selection)
    path = tmp_path / "selection.json"
    written = write_artifact(path, Selection, record.model_dump(exclude={"schema_version"}))
    assert json.loads(path.read_text(encoding="utf-8"))["schema_version"] == 2
    assert read_artifact(path, Selection) == written == record


@pytest.mark.parametrize(
    "change, message",
    [
        ({"schema_version": 3}, "schema_version 3 is newer than this selectune reads (2); update selectune"),
        ({"colour": "red"}, "unknown key 'colour' (expected one of ["),
        ({"winner": 7}, "key 'winner': Input should be a valid string"),
    ],
)
def test_a_bad_or_newer_file_is_refused_with_one_line(tmp_path, change, message):
    record = json.loads((GOLDEN / "selection-v1.json").read_text(encoding="utf-8"))
    path = tmp_path / "selection.json"
    path.write_text(json.dumps({**record, **change}), encoding="utf-8")
    with pytest.raises(UserError) as err:
        read_artifact(path, Selection)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value) and "\n" not in str(err.value)


def test_a_record_missing_a_key_is_not_written(tmp_path):
    path = tmp_path / "rescore.json"
    with pytest.raises(UserError, match="missing key 'served_runs'"):
        write_artifact(
            path,
            RescoreRecord,
            {
                "model": "m",
                "model_dir": "d",
                "engine": "e",
                "concurrency": 1,
                "base_url": "u",
                "limit": None,
                "sampling": {},
                "parity": {},
                "serving": {},
            },
        )
    assert not path.exists()


def test_a_store_written_before_versions_is_migrated_with_its_rows(tmp_path):
    import sqlite3

    from core.store import TABLES, VERSION, open_store

    path = tmp_path / "results.sqlite"
    with sqlite3.connect(path) as old:  # as main at 9cfaa4e left it: the results tables, no version
        old.execute(
            "CREATE TABLE runs (run_id TEXT PRIMARY KEY, task TEXT NOT NULL, split TEXT NOT NULL, "
            "mode TEXT NOT NULL, model TEXT NOT NULL, meta_json TEXT NOT NULL, n_items INTEGER NOT NULL, "
            "started REAL NOT NULL, finished REAL)"
        )
        old.execute("INSERT INTO runs VALUES ('r1', 'fact', 'test', 'gen', 'm', '{}', 60, 1.0, 2.0)")
        old.execute(
            "CREATE TABLE items (run_id TEXT NOT NULL REFERENCES runs(run_id), item_id TEXT NOT NULL, "
            "prompt TEXT NOT NULL, output TEXT NOT NULL, gold TEXT, parsed TEXT, scores_json TEXT NOT NULL, "
            "latency_s REAL NOT NULL, PRIMARY KEY (run_id, item_id))"
        )
        old.execute("""INSERT INTO items VALUES ('r1', '7', 'q', 'a', 'g', NULL, '{"x": 1.0}', 0.5)""")
    conn = open_store(path)
    from eval.results import run_items

    assert run_items(conn, "r1") == [
        {
            "item_id": "7",
            "prompt": "q",
            "output": "a",
            "gold": "g",
            "parsed": None,
            "scores": {"x": 1.0},
            "latency_s": 0.5,
            "request": None,
        }
    ]
    assert conn.execute("PRAGMA user_version").fetchone()[0] == VERSION == 4
    assert conn.execute("SELECT run_id, n_items, task_file FROM runs").fetchall() == [("r1", 60, None)]
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert set(TABLES) <= tables  # every table, the ones added since version 1 too
    conn.execute("PRAGMA user_version = 9")
    conn.close()
    with pytest.raises(
        UserError, match=r"results.sqlite: store version 9 is newer than this selectune reads \(4\)"
    ):
        open_store(path)
