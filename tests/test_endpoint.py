"""An OpenAI-compatible endpoint as a candidate (`--models name=URL`), over real loopback HTTP,
beside a checkpoint directory, on a user's own choice task in both modes."""

from __future__ import annotations

import json
import sqlite3

import pytest

from core.errors import UserError
from bench.fixtures import build_tiny_qwen2
from bench.openai_stub import StubState, serve
from tests.pairs_fixture import pairs_rows, pairs_task

TASK = pairs_task({"dev": "pairs.jsonl"}, max_new_tokens=4)
SUITE = """name: suite
entries:
  - {task: pairs.yaml, split: dev, mode: gen}
  - {task: pairs.yaml, split: dev, mode: ppl}
"""


def pairs_suite(
    folder, n: int, entries: str = "  - {task: pairs.yaml, split: dev, mode: ppl}\n"
) -> list[str]:
    """A user's choice task of n rows, a suite of `entries` on it and two tiny checkpoints in
    `folder`: the arguments `select` is given (suite, models, runs and cache directories)."""
    from bench.fixtures import build_tiny_qwen2

    (folder / "pairs.jsonl").write_text(pairs_rows(range(n), 3, lambda k: "AB"[k % 2]), encoding="utf-8")
    (folder / "pairs.yaml").write_text(TASK, encoding="utf-8")
    (folder / "suite.yaml").write_text(f"name: suite\nentries:\n{entries}", encoding="utf-8")
    a = build_tiny_qwen2(folder / "a", initializer_range=0.2)
    b = build_tiny_qwen2(folder / "b", initializer_range=0.02)
    return (
        f"--runs-dir {folder / 'runs'} --cache-dir {folder / 'cache'} select "
        f"--suite {folder / 'suite.yaml'} --models {a},{b}"
    ).split()


@pytest.fixture
def user_files(tmp_path):
    (tmp_path / "pairs.jsonl").write_text(pairs_rows(range(6), 3, lambda k: "AB"[k % 2]), encoding="utf-8")
    (tmp_path / "pairs.yaml").write_text(TASK, encoding="utf-8")
    (tmp_path / "suite.yaml").write_text(SUITE, encoding="utf-8")
    return tmp_path


@pytest.fixture
def endpoint(tmp_path):
    from eval.backends.hf import HFBackend
    from models.local import checkpoint_card

    folder = build_tiny_qwen2(tmp_path / "served", initializer_range=0.2)
    backend = HFBackend(checkpoint_card(folder), tmp_path / "store", batch_size=1, checkpoint=folder)
    server, url = serve(StubState(backend, models=("served-model",)))
    yield url
    server.shutdown()


def test_an_endpoint_is_scored_in_gen_beside_a_checkpoint_and_ppl_is_na(user_files, endpoint, capsys):
    from selectune.cli import main

    local = build_tiny_qwen2(user_files / "local-model", initializer_range=0.02)
    args = ["--runs-dir", str(user_files / "runs"), "--cache-dir", str(user_files / "cache")]
    code = main(
        [
            *args,
            "select",
            "--suite",
            str(user_files / "suite.yaml"),
            "--models",
            f"{local},hosted={endpoint}/v1",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0, err
    ppl_row = next(line for line in out.splitlines() if line.startswith("pairs-dev") and "| ppl" in line)
    assert ppl_row.split("|")[5].strip() == "n/a"  # the endpoint's column: never 0
    selection = json.loads((user_files / "runs" / "selection.json").read_text(encoding="utf-8"))
    rows = {c["model"]: c for c in selection["candidates"]}
    assert selection["winner"] == "local-model"
    assert rows["hosted"]["mean_rank"] is None and rows["hosted"]["memory_gib"] is None
    assert rows["hosted"]["items_computed"] == 6 and len(selection["runs"]["hosted"]) == 1
    (comparison,) = selection["comparisons_vs_best"]["hosted"]  # gen only, on the same 6 items
    assert (comparison["mode"], comparison["n"]) == ("gen", 6)
    assert any(r.startswith("hosted is an endpoint") for r in selection["reasons"])
    with sqlite3.connect(user_files / "runs" / "results.sqlite") as db:
        (meta,) = [json.loads(m) for (m,) in db.execute("SELECT meta_json FROM runs WHERE model = 'hosted'")]
    assert meta["identity"]["served_model"] == "served-model" and meta["identity"]["backend"] == "openai"

    assert main([*args, "report"]) == 0
    page = (user_files / "runs" / "report" / "leaderboard.html").read_text(encoding="utf-8")
    assert "n/a" in page and ">majority<" in page and 'id="against-majority"' in page


def test_an_unreachable_endpoint_is_one_line_and_records_nothing(user_files, capsys):
    from selectune.cli import main

    runs = user_files / "runs"
    code = main(
        (
            f"--runs-dir {runs} --cache-dir {user_files / 'cache'} select --suite "
            f"{user_files / 'suite.yaml'} --models hosted=http://127.0.0.1:9/v1"
        ).split()
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("selectune: error: --models http://127.0.0.1:9/v1: unreachable (ConnectError")
    assert not (runs / "selection.json").exists() and not (runs / "results.sqlite").exists()


@pytest.mark.parametrize(
    ("entry", "served", "expected"),
    [
        ("Bad=http://x", ("m",), "the name before '=' must be lower-case"),
        ("mine=ftp://x", ("m",), "expected name=http://host:port/v1"),
        (
            "mine={url}",
            ("a", "b"),
            "the server lists 2 models (a, b); name the candidate after the one to score",
        ),
    ],
)
def test_endpoint_entries_that_cannot_be_used_say_why(entry, served, expected, tmp_path):
    from models.endpoint import endpoint_card

    server, url = serve(StubState(None, models=served))
    try:
        with pytest.raises(UserError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            endpoint_card(entry.format(url=url))
    finally:
        server.shutdown()


@pytest.mark.parametrize(("name", "served", "model"), [("b", ("a", "b"), "b"), ("mine", ("only",), "only")])
def test_the_model_id_sent_is_the_name_when_served_else_the_only_one(name, served, model):
    from models.endpoint import endpoint_card

    server, url = serve(StubState(None, models=served))
    try:
        card = endpoint_card(f"{name}={url}/v1/")
    finally:
        server.shutdown()
    assert (card.name, card.source.model, card.source.url, card.memory_gib) == (name, model, url, None)


def test_several_servers_without_the_ray_executor_are_one_line(user_files, capsys):
    from selectune.cli import main

    args = (
        f"--runs-dir {user_files / 'runs'} --cache-dir {user_files / 'cache'} eval --task "
        f"{user_files / 'pairs.yaml'} --model m --mode gen --base-url http://127.0.0.1:9 "
        "--base-url http://127.0.0.1:10"
    ).split()
    assert main(args) == 2
    assert capsys.readouterr().err.strip() == (
        "selectune: error: 2 --base-url: spreading one model over several servers runs on the Ray executor "
        "(--executor ray: one actor per server)"
    )
