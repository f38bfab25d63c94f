"""The command line as users run it: statuses of every card, one-line errors, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def run_cli(*args, cache_dir, env_extra=None):
    env = {**os.environ, "HF_HUB_CACHE": str(cache_dir / "hf"), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "selectune", "--cache-dir", str(cache_dir), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )


def test_models_list_shows_all_eight_cards_with_true_statuses(tmp_path):
    done = run_cli("models", "list", "--json", cache_dir=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = {r["name"]: r for r in json.loads(done.stdout)}
    assert len(rows) == 8
    assert {n for n, r in rows.items() if r["status"] == "provisionable offline"} == {
        "smollm2-135m-instruct",
        "gemma3-270m",
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
    }
    assert {n for n, r in rows.items() if r["status"] == "needs hub"} == {
        "qwen2.5-1.5b-instruct",
        "internlm2.5-1.8b-chat",
        "phi-2",
        "phi-3-mini-4k-instruct",
    }


def test_unknown_settings_key_is_one_line_and_exit_2(tmp_path):
    config = tmp_path / "settings.yaml"
    config.write_text("runs_dir: out\ncahce_dir: /tmp/x\n")
    done = run_cli("--config", str(config), "models", "list", cache_dir=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"selectune: error: {config}: unknown key 'cahce_dir' (expected one of ['cache_dir', 'cpus_per_model', "
        "'data_dir', 'executor', 'judge_model', 'judge_url', 'ray_address', 'runs_dir', 'task_dirs'])"
    ]


def test_unknown_card_is_refused(tmp_path):
    done = run_cli("models", "provision", "--card", "llama-70b", cache_dir=tmp_path)
    assert done.returncode == 2
    assert "unknown model card 'llama-70b'" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_hub_card_offline_through_the_cli(tmp_path):
    done = run_cli(
        "models", "provision", "--card", "phi-2", cache_dir=tmp_path, env_extra={"HF_HUB_OFFLINE": "1"}
    )
    assert done.returncode == 2
    assert "needs microsoft/phi-2@810d367871c1 from the Hugging Face hub" in done.stderr
    list_done = run_cli("models", "list", "--json", cache_dir=tmp_path, env_extra={"HF_HUB_OFFLINE": "1"})
    assert {r["name"]: r["status"] for r in json.loads(list_done.stdout)}["phi-2"] == "needs hub"


def test_make_help_lists_every_target():
    done = subprocess.run(["make", "-s", "help"], cwd=REPO, capture_output=True, text=True)
    targets = {line.split()[0] for line in done.stdout.splitlines() if line.strip()}
    assert {
        "setup",
        "models",
        "data",
        "select",
        "train",
        "serve",
        "rescore",
        "report",
        "review",
        "test",
        "bench",
        "clean",
        "help",
    } <= targets


def test_every_command_names_an_entry_that_exists_and_no_entry_is_unused():
    import argparse
    import importlib

    from selectune.parser import ENTRIES, build_parser

    reached = set()
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                inner = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
                parsers = inner[0].choices.values() if inner else [sub]
                reached |= {p.get_default("entry") for p in parsers}
    assert reached == set(ENTRIES.values())
    for entry in ENTRIES.values():
        module, function = entry.split(":")
        assert callable(getattr(importlib.import_module(module), function)), entry
