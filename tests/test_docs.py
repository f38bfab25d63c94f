"""What the docs promise exists: every `make` target and `python -m selectune` command named in
the README, docs/ and the code's docstrings and comments; the README stays a short guide."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO

MAKE = re.compile(r"(?:`|^\s*(?:\$ )?|&& |; )make ([a-z][a-z0-9-]*)", re.MULTILINE)
SELECTUNE = re.compile(
    r"(?:python -m selectune|`selectune)((?: --[a-z-]+(?:[ =][^\s`-]\S*)?)*) ([a-z][a-z-]*)"
    r"(?=[\s`]|$)(?: ([a-z][a-z-]*)(?=[\s`]|$))?"
)
TEXTS = [
    "README.md",
    "Makefile",
    *(str(p.relative_to(REPO)) for p in sorted((REPO / "docs").glob("*.md"))),
    *(
        str(p.relative_to(REPO))
        for p in sorted(REPO.glob("*/**/*.py"))
        if p.parts[len(REPO.parts)] not in (".venv", "tests") and not p.parts[len(REPO.parts)].startswith(".")
    ),
]


def make_targets() -> set[str]:
    text = (REPO / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([a-z][a-z0-9-]*):", text, re.MULTILINE))


def commands() -> dict[str, set[str]]:
    import argparse

    from selectune.parser import build_parser

    out = {}
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
                out[name] = set(nested[0].choices) if nested else set()
    return out


@pytest.mark.parametrize("name", TEXTS)
def test_every_make_target_named_exists(name):
    targets = make_targets()
    named = set(MAKE.findall((REPO / name).read_text(encoding="utf-8")))
    assert named <= targets, f"{name} names make targets that do not exist: {sorted(named - targets)}"


@pytest.mark.parametrize("name", TEXTS)
def test_every_selectune_command_named_exists(name):
    known = commands()
    for _options, command, action in SELECTUNE.findall((REPO / name).read_text(encoding="utf-8")):
        assert command in known, f"{name} names `selectune {command}`, which is no command"
        if known[command]:
            assert action in known[command], (
                f"{name} names `selectune {command} {action}`, which is no command"
            )


def test_the_patterns_find_what_they_are_for():
    text = "run `make select`, then\n    make train RECIPE=x\npython -m selectune --runs-dir r models list"
    assert MAKE.findall(text) == ["select", "train"]
    assert [(c, a) for _, c, a in SELECTUNE.findall(text)] == [("models", "list")]
    assert not MAKE.findall("to make sure it works")


def test_the_readme_is_a_guide_not_a_log():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines (at most 250: depth goes to docs/)"
    linked = set(re.findall(r"\(docs/([a-z-]+\.md)", "\n".join(lines)))
    assert {p.name for p in (REPO / "docs").glob("*.md")} <= linked | {"benchmarks.md"}, (
        "a doc no one links to"
    )
    for name in linked:
        assert (REPO / "docs" / name).is_file(), f"README links to docs/{name}, which does not exist"


def test_the_scale_page_commands_are_real():
    """docs/scale.md's commands: each `python -m selectune` line parses, each `ray` command's flags
    are ones its `--help` lists, and each make variable is one the Makefile reads."""
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    from selectune.parser import build_parser

    text = (REPO / "docs" / "scale.md").read_text(encoding="utf-8")
    lines = [
        line.strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()
    ]
    ray = Path(sys.executable).parent / "ray"
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    seen = set()
    for line in filter(None, lines):
        words = shlex.split(line)
        if line.startswith("python -m selectune"):
            build_parser().parse_args(words[3:])  # exits (fails the test) on an unknown flag
            seen.add("selectune")
        elif line.startswith(".venv/bin/ray "):
            help_text = subprocess.run([str(ray), words[1], "--help"], capture_output=True, text=True).stdout
            unknown = [f for f in re.findall(r"(--[a-z-]+)", line) if f not in help_text]
            assert help_text and not unknown, f"`ray {words[1]}` has no {unknown or 'such command'}"
            seen.add("ray")
        elif words[0] == "make":
            for name in (w.split("=")[0] for w in words[2:]):
                assert re.search(rf"\$\({name}\)", makefile), f"the Makefile reads no {name}"
            seen.add("make")
    assert seen == {"selectune", "ray", "make"}
