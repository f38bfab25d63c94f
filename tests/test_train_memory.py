"""glibc's malloc settings and heap trims on a CPU (train/cpu_memory.py)."""

from __future__ import annotations

import json

import pytest

from tests.train_fixture import short_recipe


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim",))
        return 1


@pytest.mark.parametrize(
    "policy, exported, thresholds",
    [
        ("glibc", False, [(-3, 2 << 20), (-3, 32 << 20), (-1, 64 << 20)]),
        ("compact", False, [(-3, 2 << 20)]),
        ("glibc", True, []),
    ],
)
def test_cpu_allocator_loads_under_a_low_threshold_and_trims_after_every_pass(
    tmp_path, setup, monkeypatch, policy, exported, thresholds
):
    """The model loads with glibc's mmap threshold at 2 MB; `glibc` then raises it to 32 MB
    (trim threshold 64 MB), `compact` keeps it; a threshold the user exported is left alone;
    the heap is trimmed after loading, after each pass (2 a step here) and each evaluation."""
    import ctypes

    from train.trainer import run_training

    libc = _FakeLibc()
    real_cdll = ctypes.CDLL
    monkeypatch.setattr(
        ctypes, "CDLL", lambda name, *a, **k: libc if name == "libc.so.6" else real_cdll(name, *a, **k)
    )
    if exported:
        monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    model, data = setup
    r = short_recipe(
        data, compute_dtype="auto", batch_size=2, grad_accum=2, eval_steps=2, cpu_allocator=policy
    )
    r = r.model_copy(update={"split": (0.5, 0.5, 0.0)})  # 4 rows: one step of 2 passes an epoch
    run_training(r, str(model), tmp_path / "run", tmp_path)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    evaluations = sum("eval_loss" in rec for rec in log)
    assert evaluations == 2  # at step 2 and at the end
    assert [c[1:] for c in libc.calls if c[0] == "mallopt"] == thresholds
    assert sum(c[0] == "malloc_trim" for c in libc.calls) == 1 + 3 * 2 + evaluations
