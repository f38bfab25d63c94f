"""docs/byo.md as a user runs it: its files written as the page shows them, then select, train and
report through the command line, on a tiny model standing in for a hub card's weights."""

from __future__ import annotations

import json

from bench.fixtures import build_tiny_qwen2, page_files

CARD = "qwen2.5-1.5b-instruct"


def test_the_page_names_its_four_files():
    assert sorted(page_files()) == ["my/faq.csv", "my/faq.yaml", "my/suite.yaml", "my/train.yaml"]


def test_a_users_csv_to_a_selection_a_fine_tune_and_a_report_with_yaml_only(tmp_path, capsys):
    from models.card import find_card
    from models.store import provision
    from selectune.cli import main

    for name, text in page_files().items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    provision(
        find_card(CARD),
        tmp_path / "cache" / "models",
        weights=build_tiny_qwen2(tmp_path / "tiny", initializer_range=0.2),
    )
    args = ["--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    my = tmp_path / "my"

    assert main([*args, "select", "--suite", str(my / "suite.yaml"), "--models", CARD]) == 0
    out = capsys.readouterr().out
    assert "faq-test" in out and "char_f1" in out and f"winner: {CARD}" in out
    selection = json.loads((tmp_path / "runs" / "selection.json").read_text(encoding="utf-8"))
    assert selection["suite"]["name"] == "suite" and {c["n"] for c in selection["cells"]} == {4}

    assert main([*args, "train", "--recipe", str(my / "train.yaml")]) == 0
    summary = json.loads((tmp_path / "runs" / "train" / f"train-{CARD}" / "summary.json").read_text())
    (check,) = summary["checks"]
    assert (check["task"], check["split"], check["metric"], check["items"]) == ("faq", "test", "char_f1", 4)
    assert summary["cleaning"]["read"] == 6 and summary["parity"]["passed"]

    assert main([*args, "report"]) == 0
    index = (tmp_path / "runs" / "report" / "index.html").read_text(encoding="utf-8")
    assert "char_f1 on faq-test" in index and (tmp_path / "runs" / "report" / "leaderboard.html").is_file()


def test_checkpoint_directories_are_candidates_beside_cards(tmp_path, capsys):
    from selectune.cli import main

    for name, text in page_files().items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    a = build_tiny_qwen2(tmp_path / "Tiny A", initializer_range=0.2)
    b = build_tiny_qwen2(tmp_path / "tiny-b", initializer_range=0.02)
    args = ["--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    suite = str(tmp_path / "my" / "suite.yaml")
    assert main([*args, "select", "--suite", suite, "--models", f"{a},{b}"]) == 0
    selection = json.loads((tmp_path / "runs" / "selection.json").read_text(encoding="utf-8"))
    rows = {c["model"]: c for c in selection["candidates"]}
    assert set(rows) == {"tiny-a", "tiny-b"} and selection["winner"] in rows
    assert rows["tiny-a"]["memory_gib"]["fp32"] > 0 and rows["tiny-a"]["items_computed"] == 4
    import sqlite3

    with sqlite3.connect(tmp_path / "runs" / "results.sqlite") as db:
        weights = {
            json.loads(m)["identity"]["weights_sha256"] for (m,) in db.execute("SELECT meta_json FROM runs")
        }
    assert len(weights) == 2 and None not in weights  # each identified by its own weights
    capsys.readouterr()
    assert main([*args, "select", "--suite", suite, "--models", f"{tmp_path / 'my'}"]) == 2
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(
            "not a checkpoint directory (no config.json); --models takes "
            "card names and checkpoint directories"
        )
    )
