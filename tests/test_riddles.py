"""docs/riddles.md as a user runs it: the shipped task, suite, synthesis and training recipes,
through the command line, on the shared riddles, a tiny model standing in for a hub card's weights
and a scripted English teacher over real loopback HTTP."""

from __future__ import annotations

import json
import re

import pytest

from eval.backends.fake import FakeBackend
from bench.fixtures import build_tiny_qwen2
from tests.conftest import REPO, RIDDLE_SPLITS, is_fixture
from bench.openai_stub import StubState, serve

PAGE = REPO / "docs" / "riddles.md"
CARD = "qwen2.5-1.5b-instruct"
NEW = [  # what the teacher "writes": distinct riddles, one of them answered wrongly below
    ("What has keys but can't open locks?", "piano"),
    ("What has hands but cannot clap?", "clock"),
    ("The more you take, the more you leave behind. What are they?", "footsteps"),
    ("What can travel around the world while staying in a corner?", "stamp"),
    ("What gets wetter the more it dries?", "towel"),
    ("What has a neck but no head?", "bottle"),
    ("What runs but never walks, has a mouth but never talks?", "river"),
    ("What has one eye but cannot see?", "needle"),
    ("What is full of holes but still holds water?", "sponge"),
    ("What goes through cities and fields but never moves?", "road"),
]
WRONG = "sponge"


def teacher_reply(request) -> str:
    text = request.messages[-1]["content"]
    if "Output only a JSON array" in text:
        return "Here they are:\n" + json.dumps([{"question": q, "answer": a} for q, a in NEW])
    if text.startswith("You are a curious ten-year-old"):
        return "But why is that the answer?"
    if "step by step" in text:
        solution = re.search(r'the answer is "([^"]+)"', text).group(1)
        said = "bucket" if solution == WRONG else solution
        return (
            f"The riddle describes something ordinary. Each clue fits a {said} and nothing else.\n"
            f"Answer: a {said}"
        )
    return "Because every clue in the riddle points to it."  # the follow-up's answer


@pytest.fixture
def teacher():
    server, url = serve(StubState(FakeBackend(respond=teacher_reply)))
    yield url
    server.shutdown()


def test_the_page_names_the_shipped_files_and_the_commands_this_test_runs():
    page = PAGE.read_text(encoding="utf-8")
    for name in ("tasks/riddles.yaml", "suites/riddles.yaml", "synth/riddles.yaml", "train/riddles.yaml"):
        assert f"`{name}`" in page and (REPO / name).is_file()
    for command in (
        "make select SUITE=suites/riddles.yaml DATASET=riddles",
        "make data-synth SYNTH_RECIPE=synth/riddles.yaml",
        "make train RECIPE=train/riddles.yaml",
        "make report",
    ):
        assert command in page


def test_the_riddle_workflow_end_to_end(tmp_path, shared_data, teacher, capsys):
    from models.card import find_card
    from models.store import provision
    from selectune.cli import main

    provision(
        find_card(CARD),
        tmp_path / "cache" / "models",
        weights=build_tiny_qwen2(tmp_path / "tiny", initializer_range=0.2),
    )
    args = (
        f"--runs-dir {tmp_path / 'runs'} --cache-dir {tmp_path / 'cache'} --data-dir {shared_data}"
    ).split()
    runs = tmp_path / "runs"

    assert main([*args, "data", "--dataset", "riddles"]) == 0
    assert main([*args, "select", "--suite", str(REPO / "suites" / "riddles.yaml"), "--models", CARD]) == 0
    selection = json.loads((runs / "selection.json").read_text(encoding="utf-8"))
    n_test = RIDDLE_SPLITS["fixture" if is_fixture(shared_data) else "public"][1]
    assert [(c["task"], c["split"], c["metric"], c["n"]) for c in selection["cells"]][0] == (
        "riddles",
        "test",
        "contains",
        n_test,
    )

    assert (
        main(
            [
                *args,
                "data-synth",
                "--recipe",
                str(REPO / "synth" / "riddles.yaml"),
                "--base-url",
                teacher,
                "--teacher-model",
                "teacher",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "data-synth: 30 seeds ->" in out
    rows = [json.loads(line) for line in (runs / "synth" / "riddles" / "data.jsonl").read_text().splitlines()]
    assert (
        len(rows) == len(NEW) - 1
    )  # the wrongly answered riddle is dropped; the repeats of later rounds too
    from eval.task import find_task

    system = find_task("riddles").prompt.system  # the conversations are prompted as the task scores
    for row in rows:
        roles = [m["role"] for m in row["messages"]]
        assert roles[:3] == ["system", "user", "assistant"] and row["messages"][0]["content"] == system
        reasoning = row["messages"][2]["content"]
        assert reasoning.startswith("The riddle describes") and reasoning.splitlines()[-1].startswith(
            "Answer: a "
        )
    assert any(len(row["messages"]) == 5 for row in rows)  # a child's follow-up and its answer
    malformed = [
        json.loads(line) for line in (runs / "synth" / "riddles" / "malformed.jsonl").read_text().splitlines()
    ]
    assert any("does not contain the solution 'sponge'" in m["why"] for m in malformed)

    assert main([*args, "train", "--recipe", str(REPO / "train" / "riddles.yaml")]) == 0
    summary = json.loads((runs / "train" / f"riddles-{CARD}" / "summary.json").read_text(encoding="utf-8"))
    (check,) = summary["checks"]
    assert (check["task"], check["split"], check["metric"], check["items"]) == (
        "riddles",
        "test",
        "contains",
        n_test,
    )
    assert summary["cleaning"]["read"] == len(rows) and summary["parity"]["passed"]

    assert main([*args, "report"]) == 0
    assert "contains on riddles-test" in (runs / "report" / "index.html").read_text(encoding="utf-8")


@pytest.mark.parametrize(
    ("solution", "final", "kept"),
    [
        ("a light", "light", True),
        ("light", "a light", True),
        ("The Moon", "the moon", True),
        ("an echo", "echoes", True),
        ("a light", "a lamp", False),
        ("anchor", "a chain", False),
    ],
)
def test_the_solution_check_ignores_english_articles(solution, final, kept):
    from synth.clean import norm, strip_article

    assert (norm(strip_article(solution)) in norm(final)) == kept


def test_seeds_come_from_the_train_split_only(shared_data):
    from eval.task import find_task, load_items
    from synth.inputs import load_seeds
    from synth.recipe import load_synth_recipe

    seeds = load_seeds(load_synth_recipe(REPO / "synth" / "riddles.yaml"), shared_data)
    test = {i.fields["question"] for i in load_items(find_task("riddles"), "test", shared_data)}
    assert len(seeds) == 30 and not {s["question"] for s in seeds} & test
