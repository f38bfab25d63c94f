"""Shared fixtures: the public data beside the checkout, tiny wheels, and card files in tmp dirs."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import os
import zipfile
from pathlib import Path

import pytest
import yaml

# The trainer's tests share the `setup` fixture (a tiny checkpoint and a memorisable data set).
pytest_plugins = ["tests.train_fixture"]

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def scoring_in_fp32(monkeypatch):
    """`select` and `eval` score in bf16 on CPUs that multiply it natively (models/loading.py):
    in process, tests score in fp32 on every CPU kind, so their numbers do not depend on which
    machine CI draws. tests/test_hf_backend.py checks the resolution itself."""
    import models.loading as loading

    monkeypatch.setattr(
        loading,
        "scoring_dtype",
        lambda dtype, device: loading.resolve_dtype(dtype, loading.resolve_device(device)),
    )


@pytest.fixture(autouse=True)
def one_calibration(request, monkeypatch, tmp_path_factory):
    """`select`, `train`, `rescore` and `data-synth` print their cost from this machine's
    calibration (models/machine.py), which each test's own cache dir would measure again, seconds
    each time: the tests share one cache for it, but tests/test_machine.py, which tests the cache."""
    if request.module.__name__.endswith("test_machine"):
        return
    import models.machine as machine

    shared, path = tmp_path_factory.getbasetemp() / "machine-cache", machine.calibration_path
    monkeypatch.setattr(machine, "calibration_path", lambda cache_dir, identity: path(shared, identity))


FIXTURE_DATA = REPO / "tests" / "fixtures" / "data"
"""Project-written files of the public data's shape (tests/fixtures/data/README.md)."""
FIXED_CALIBRATION = {
    "identity": {"cpu": "Test CPU", "flags": ["avx2"], "torch": "2.13.0", "threads": 2},
    "matmul_gflops": {"float32": 100.0},
    "decode_gflops": {"float32": 50.0},
    "bandwidth_gbs": 20.0,
    "load_gbs": 2.0,
}
"""A calibration fixed for the tests, as `make machine` records one."""


def choice_task(name: str, data: dict, prompt: str, **fields) -> dict:
    """A task file's fields for a two-way choice task (A = no, B = yes; labels "0" and "1"), in
    both modes, scored on accuracy; `fields` add to or replace them."""
    return {
        "name": name,
        "version": 1,
        "description": "d",
        "data": {"root": "data", "format": "jsonl", **data},
        "default_split": "dev",
        "prompt": {"user": prompt},
        "modes": ["gen", "ppl"],
        "choices": ["A", "B"],
        "label": {"field": "label", "map": {"0": "A", "1": "B"}},
        "parser": "choice",
        "metrics": ["accuracy"],
    } | fields


class Recorder:
    """Stands for the whole command's progress bar: what it was advanced by, in estimated seconds."""

    def __init__(self):
        self.n, self.updates = 0.0, []

    def update(self, seconds: float) -> None:
        self.n += seconds
        self.updates.append(seconds)

    def close(self) -> None:
        pass


def public_data(fallback: Path | None = None, needs: tuple[str, ...] = ("fewclue",)) -> Path:
    """Where the public data is read in place, never copied into the repository: `../shared/data`
    beside the checkout, else the folder `make data` filled (SELECTUNE_DATA_DIR, else the cache's
    data/). Where neither holds the folders `needs` names, `fallback`, else the test skips, naming
    both places."""
    from core.settings import Settings

    named = os.environ.get("SELECTUNE_DATA_DIR")
    places = [SHARED_DATA, Path(named) if named else Settings().resolved_data_dir]
    for place in places:
        if all((place / part).is_dir() for part in needs):
            return place
    if fallback is not None:
        return fallback
    pytest.skip(f"public test data not found at {' or '.join(map(str, places))}: run `make data`")


def is_fixture(data: Path) -> bool:
    return data == FIXTURE_DATA


RIDDLE_SPLITS = {
    "public": (296, 90, "Come up and let us go", "anchor"),
    "fixture": (36, 8, "I rise each morning", "sun"),
}
"""The riddles' split by source: train and test sizes, the first test item's opening and answer."""


def manifests(data: Path) -> dict[str, list]:
    """The files each dataset of `selectune data` holds in `data`, with their checksums: the
    pinned upstream ones for the public data, FIXTURE_DATA/SHA256SUMS for the project's files of
    the same paths."""
    from eval.data import DATASETS

    if not is_fixture(data):
        return {name: files for name, (files, _) in DATASETS.items()}
    sums = dict(line.split()[::-1] for line in (FIXTURE_DATA / "SHA256SUMS").read_text().splitlines())
    return {
        name: [dataclasses.replace(f, sha256=sums[f.local]) for f in files if f.local in sums]
        for name, (files, _) in DATASETS.items()
    }


@pytest.fixture
def shared_data(monkeypatch) -> Path:
    """The public data (FewCLUE, the riddles, the style dialogues) where it is, else the project's
    files of the same shape and paths, with `selectune data` checking them against their own
    checksums. A test of contents reads its expected figures for the source it got."""
    data = public_data(FIXTURE_DATA, needs=("fewclue", "riddles", "style"))
    if is_fixture(data):
        import eval.data

        fixture = manifests(data)
        monkeypatch.setattr(
            eval.data,
            "DATASETS",
            {name: (fixture[name], url) for name, (_, url) in eval.data.DATASETS.items()},
        )
    return data


@pytest.fixture
def task_data() -> Path:
    """The public data where it is, else the project's files of its shape (FIXTURE_DATA): for
    tests that need FewCLUE's shape, not its contents."""
    return public_data(FIXTURE_DATA)


def make_wheel(wheelhouse: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """Write a minimal valid pure-Python wheel holding `files` (paths inside site-packages)."""
    name = dist.replace("-", "_")
    info = f"{name}-{version}.dist-info"
    contents = dict(files)
    contents[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    contents[f"{info}/WHEEL"] = (
        b"Wheel-Version: 1.0\nGenerator: selectune-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    )
    record = []
    for path, data in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    contents[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheelhouse.mkdir(parents=True, exist_ok=True)
    out = wheelhouse / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as zf:
        for path, data in contents.items():
            zf.writestr(path, data)
    return out


DELETE = object()


def edited(obj: dict, **changes) -> dict:
    """A deep copy of `obj` with `a__b=value` set (or removed with DELETE) at key path a.b."""
    import copy

    out = copy.deepcopy(obj)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = out
        for p in parents:
            node = node[p]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return out


def write_card(cards_dir: Path, card: dict) -> Path:
    cards_dir.mkdir(parents=True, exist_ok=True)
    path = cards_dir / f"{card['name']}.yaml"
    path.write_text(yaml.safe_dump(card, allow_unicode=True), encoding="utf-8")
    return path


def pypi_card(name: str, packages: list[str], files: list[str], sha256: str) -> dict:
    return {
        "name": name,
        "description": "test card",
        "source": {
            "kind": "pypi-gguf",
            "packages": packages,
            "files": files,
            "sha256": sha256,
            "gguf_name": f"{name}.gguf",
        },
        "architecture": "llama",
        "parameters": 1000,
        "license": {"id": "apache-2.0", "provenance": "made in the test"},
        "chat_template": "tokenizer",
        "add_bos": False,
        "memory_gib": {"fp32": 0.1, "bf16": 0.05, "nf4": 0.02, "qlora_train": 0.2},
    }


@pytest.fixture
def tiny_qwen2_dir(tmp_path) -> Path:
    """A real qwen2 checkpoint with random weights and a 300-token BPE tokenizer, built here."""
    from bench.fixtures import build_tiny_qwen2

    return build_tiny_qwen2(tmp_path / "tiny-qwen2")


def scored_on_tiny_weights(
    tmp_path: Path, weights: Path, task_name: str, limit: int, mode: str, data_dir: Path
):
    """A hub card given a tiny checkpoint as its weights, scored through the real runner on the
    first `limit` dev items of `task_name`, as the cross-checks compare it: (task, items, run)."""
    from eval.backends import make_backend
    from eval.results import open_results
    from eval.runner import run_task
    from eval.task import find_task, load_items
    from models.card import find_card
    from models.store import provision

    card = find_card("qwen2.5-1.5b-instruct")
    provision(card, tmp_path / "store", weights=weights)
    task = find_task(task_name).model_copy(update={"limit": limit})
    items = load_items(task, "dev", data_dir)
    run = run_task(
        make_backend("hf", card, tmp_path / "store", batch_size=4),
        task,
        "dev",
        mode,
        items,
        open_results(tmp_path / "runs"),
        chunk_size=4,
    )
    return task, items, run
