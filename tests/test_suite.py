"""Selection suites: the shipped ones load, the default is the suite selection always ran, and a
bad entry is one line naming the file and the entry before any model runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import UserError
from eval.suite import DEFAULT_SUITE, SUITES_DIR, load_suite

REPO_TASKS = Path(__file__).resolve().parents[1] / "tasks"
GOOD = "name: s\nentries:\n  - {task: fewclue_bustm, split: dev, mode: gen}\n"


@pytest.mark.parametrize("path", sorted(SUITES_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_suite_loads(path):
    suite, entries = load_suite(path)
    assert suite.name == path.stem and len(entries) == len(suite.entries) > 0


def test_the_default_suite_is_the_one_selection_ran_before_suites_were_files():
    _, entries = load_suite(DEFAULT_SUITE)
    assert [(t.name, e.split, e.mode, e.metric, e.weight) for t, e in entries] == [
        ("fewclue_bustm", "dev", "gen", None, 1.0),
        ("fewclue_bustm", "dev", "ppl", None, 1.0),
        ("fewclue_ocnli_fc", "dev", "gen", None, 1.0),
        ("fewclue_ocnli_fc", "dev", "ppl", None, 1.0),
        ("style", "test", "gen", None, 1.0),
        ("fact", "test", "gen", None, 1.0),
    ]
    _, test = load_suite(SUITES_DIR / "fewclue-test.yaml")
    assert [(t.name, e.split) for t, e in test] == [(t.name, "test") for t, _ in entries]


@pytest.mark.parametrize(
    "entry, message",
    [
        ("{task: nope, split: dev, mode: gen}", "entries.0 (nope dev gen): unknown task 'nope' (known: "),
        ("{task: ../no/such.yaml, split: dev, mode: gen}", "entries.0 (../no/such.yaml dev gen): task file "),
        (
            "{task: fewclue_bustm, split: train_all, mode: gen}",
            "task 'fewclue_bustm' has no split 'train_all' (splits: ",
        ),
        ("{task: style, split: test, mode: ppl}", "task 'style' has no mode 'ppl' (modes: gen)"),
        (
            "{task: fact, split: test, mode: gen, metric: chrf}",
            "task 'fact' does not compute metric 'chrf' (metrics: ",
        ),
        ("{task: fact, split: test, mode: beam}", "key 'entries.0.mode': Input should be 'gen' or 'ppl'"),
        ("{task: fact, split: test, mode: gen, weigth: 2}", "unknown key 'entries.0.weigth'"),
        (
            "{task: fact, split: test, mode: gen, weight: 0}",
            "key 'entries.0.weight': Input should be greater than 0",
        ),
    ],
)
def test_a_bad_entry_is_one_line_naming_the_suite_and_the_entry(tmp_path, entry, message):
    path = tmp_path / "s.yaml"
    path.write_text(f"name: s\nentries:\n  - {entry}\n", encoding="utf-8")
    with pytest.raises(UserError) as err:
        load_suite(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text, text


def test_a_task_can_be_named_by_its_file(tmp_path):
    from tests.conftest import REPO

    path = tmp_path / "s.yaml"
    path.write_text(
        f"name: s\nentries:\n  - {{task: {REPO / 'tasks' / 'fact.yaml'}, split: test, mode: gen}}\n",
        encoding="utf-8",
    )
    _, [(task, entry)] = load_suite(path)
    assert task.name == "fact" and task.path == REPO / "tasks" / "fact.yaml"


def test_a_missing_suite_file_names_the_shipped_ones(tmp_path):
    with pytest.raises(
        UserError, match=r"suite file not found \(suites: default.yaml, fewclue-test.yaml, riddles.yaml\)"
    ):
        load_suite(tmp_path / "nope.yaml")


def test_folders_named_in_the_settings_are_searched_for_task_names(tmp_path):
    from core.settings import load_settings
    from eval.task import include_task_dirs, load_tasks

    mine = tmp_path / "my-tasks"
    mine.mkdir()
    fact = (REPO_TASKS / "fact.yaml").read_text(encoding="utf-8")
    (mine / "faq2.yaml").write_text(fact.replace("name: fact", "name: faq2"), encoding="utf-8")
    (tmp_path / "settings.yaml").write_text(f"task_dirs: [{mine}]\n", encoding="utf-8")
    suite = tmp_path / "s.yaml"
    suite.write_text("name: s\nentries:\n  - {task: faq2, split: test, mode: gen}\n", encoding="utf-8")
    with pytest.raises(UserError, match="unknown task 'faq2'"):
        load_suite(suite)
    try:
        include_task_dirs(load_settings(tmp_path / "settings.yaml").task_dirs)
        _, [(task, _)] = load_suite(suite)
        assert task.path == mine / "faq2.yaml" and {"fact", "faq2"} <= set(load_tasks())
        (mine / "fact.yaml").write_text(fact, encoding="utf-8")
        with pytest.raises(UserError, match=f"{mine / 'fact.yaml'}: task name 'fact' is already used by "):
            load_tasks()
    finally:
        include_task_dirs([])


def test_a_task_folder_that_does_not_exist_is_one_line(tmp_path):
    from core.settings import load_settings

    (tmp_path / "settings.yaml").write_text(f"task_dirs: [{tmp_path / 'nope'}]\n", encoding="utf-8")
    with pytest.raises(
        UserError, match=f"key 'task_dirs': Value error, {tmp_path / 'nope'} is not a folder"
    ) as err:
        load_settings(tmp_path / "settings.yaml")
    assert "\n" not in str(err.value)


def test_suite_roles_add_checks_and_forgetting_probes_to_training_and_choose_review_tasks(
    tmp_path, task_data
):
    from core.settings import load_settings
    from core.workspace import Workspace
    from eval.task import find_task, load_items
    from eval.suite import entries_with_role
    from train.checks import all_checks, with_suite_samples
    from train.recipe import load_recipe

    suite = tmp_path / "s.yaml"
    suite.write_text(
        "name: s\nentries:\n"
        "  - {task: fewclue_bustm, split: dev, mode: gen, roles: [forgetting]}\n"
        "  - {task: fewclue_bustm, split: dev, mode: ppl, roles: [forgetting]}\n"
        "  - {task: style, split: test, mode: gen, roles: [check, review]}\n"
        "  - {task: fact, split: test, mode: gen, roles: [check, sample]}\n"
        "  - {task: style, split: test, mode: gen, roles: [sample]}\n",
        encoding="utf-8",
    )
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "selection.json").write_text(
        json.dumps(
            {
                "schema_version": 2,
                "winner": "m",
                "reasons": [],
                "candidates": [],
                "rule": "",
                "budget": {},
                "cells": [],
                "per_fact_recall": {},
                "runs": {},
                "git_revision": None,
                "created": "",
                "suite": {"name": "s", "file": str(suite), "sha256": ""},
            }
        ),
        encoding="utf-8",
    )
    recipe = load_recipe(REPO_TASKS.parent / "train" / "default.yaml")  # checks fact test itself
    checks = all_checks(recipe, load_settings(runs_dir=str(runs)))
    assert [(Path(c.task).stem, c.split, c.mode, role) for c, role in checks] == [
        ("fact", "test", "gen", "check"),
        ("style", "test", "gen", "check"),
        ("fewclue_bustm", "dev", "gen", "forgetting"),
        ("fewclue_bustm", "dev", "ppl", "forgetting"),
    ]
    from train.checkpoints import probe_entries  # the same entries, scored at every evaluation

    selection = Workspace(runs).read_selection()
    probe = probe_entries(recipe, selection, task_data)
    bustm = len(load_items(find_task("fewclue_bustm"), "dev", task_data))  # 160; 32 in the fixture
    cut = (min(bustm, 60), bustm <= 60)  # checkpoint_selection.max_items: 60
    assert [(e.key, e.role, len(e.items), e.complete) for e in probe] == [
        ("fact-test-gen", "check", 60, True),
        ("style-test-gen", "check", 36, True),
        ("fewclue_bustm-dev-gen", "forgetting", *cut),
        ("fewclue_bustm-dev-ppl", "forgetting", *cut),
    ]
    riddles = load_recipe(REPO_TASKS.parent / "train" / "riddles.yaml")
    sampled = with_suite_samples(riddles, load_settings(runs_dir=str(runs))).samples.tasks
    assert [(Path(t.task).stem, t.split, t.count) for t in sampled] == [
        ("riddles", "test", 2),
        ("fact", "test", 2),
        ("style", "test", 2),
    ]
    assert with_suite_samples(recipe, load_settings(runs_dir=str(runs))) is recipe  # samples both already
    assert [t.name for t, _ in entries_with_role(selection, "review")] == ["style"]
    from serve.rescore import rescore_entries, selection_suite

    settings = load_settings(runs_dir=str(runs))
    assert [(t.name, split, mode) for t, split, mode in rescore_entries(None, selection_suite(settings))] == [
        ("fewclue_bustm", "dev", "gen"),
        ("style", "test", "gen"),
        ("fact", "test", "gen"),
    ]  # the suite scored
    # through a server with prompt logprobs (vLLM) each entry keeps its mode
    assert [
        (t.name, mode) for t, _, mode in rescore_entries(None, selection_suite(settings), logprobs=True)
    ] == [("fewclue_bustm", "gen"), ("fewclue_bustm", "ppl"), ("style", "gen"), ("fact", "gen")]
    suite.unlink()  # a suite file that is gone gives no roles, not an error
    assert selection_suite(settings) is None
    assert entries_with_role(selection, "review") == []
    assert len(all_checks(recipe, load_settings(runs_dir=str(runs)))) == 1


def test_an_unknown_role_is_one_line(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(
        "name: s\nentries:\n  - {task: fact, split: test, mode: gen, roles: [judge]}\n", encoding="utf-8"
    )
    with pytest.raises(
        UserError,
        match=r"key 'entries.0.roles.0': Input should be 'check', 'forgetting', 'sample' or 'review'",
    ):
        load_suite(path)
