"""`make train`'s estimate: the steps and evaluation rounds as the Trainer runs them (table-driven),
the training tokens equal to what the trainer tokenises, and `train --estimate` printing every
stage on a tiny model without training."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.conftest import FIXED_CALIBRATION as CALIBRATION
from tests.conftest import REPO, Recorder

CARD = "qwen2.5-1.5b-instruct"


def recipe(epochs=3.0, max_steps=None, batch_size=4, grad_accum=2, eval_steps="epoch"):
    return SimpleNamespace(
        training=SimpleNamespace(
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            eval_steps=eval_steps,
        )
    )


@pytest.mark.parametrize(
    "spec, n_train, steps, epochs",
    [
        (recipe(), 374, 141, 3.0),  # the default job: 94 batches of 4, 47 steps of 2 batches, 3 epochs
        (
            recipe(batch_size=8, grad_accum=1, epochs=1.0),
            100,
            13,
            1.0,
        ),  # the last batch is short, not dropped
        (recipe(epochs=2.5, batch_size=8, grad_accum=1), 16, 5, 2.5),  # a part epoch rounds up
        (recipe(max_steps=30, batch_size=8, grad_accum=1), 56, 30, 30 / 7),  # max_steps overrides epochs
    ],
)
def test_the_steps_are_the_trainers(spec, n_train, steps, epochs):
    from train.estimate import train_steps

    assert train_steps(spec, n_train) == (steps, pytest.approx(epochs))


@pytest.mark.parametrize(
    "spec, steps, epochs, rounds",
    [
        (recipe(), 141, 3.0, 3),  # once an epoch, the last at the end
        (recipe(eval_steps="epoch"), 50, 2.5, 3),  # two epochs, then the end of the half one
        (recipe(eval_steps=15), 30, 30 / 7, 2),  # every 15 steps; the end is one of them
        (recipe(eval_steps=20), 141, 3.0, 8),  # seven times, then at the end
    ],
)
def test_the_evaluation_rounds_are_the_trainers(spec, steps, epochs, rounds):
    from train.estimate import evaluation_rounds

    assert evaluation_rounds(spec, steps, epochs) == rounds


@pytest.fixture
def tiny_card(tmp_path, tiny_qwen2_dir, monkeypatch):
    from models import machine
    from models.card import find_card
    from models.store import provision

    monkeypatch.setattr(machine, "calibration", lambda cache_dir, again=False: CALIBRATION)
    provision(find_card(CARD), tmp_path / "cache" / "models", weights=tiny_qwen2_dir)
    return tmp_path


def test_train_estimate_prints_every_stage_and_trains_nothing(tiny_card, capsys):
    from selectune.cli import main

    runs, quick = tiny_card / "runs", tiny_card / "quick.yaml"
    quick.write_text(
        (REPO / "train" / "quick.yaml").read_text(encoding="utf-8") + "compute_dtype: fp32\n",
        encoding="utf-8",
    )
    assert (
        main(
            (
                f"--runs-dir {runs} --cache-dir {tiny_card / 'cache'} train --recipe {quick} "
                f"--model {CARD} --estimate"
            ).split()
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        f"estimate for `make train` (quick.yaml, {CARD}) here (Test CPU, avx2; float32 at 100 "
        "GFLOP/s, measured by `make machine`):"
    )
    stages = [line.strip().split(":")[0] for line in lines if line.startswith("    ")]
    assert stages == ["training", "evaluations", "checkpoint evaluations", "merge and parity", "check"]
    assert "30 steps" in lines[2] and lines[-1].startswith("  total: at most ")
    assert not runs.exists()


def test_the_training_tokens_are_what_the_trainer_tokenises(tiny_card, monkeypatch):
    """The estimate's tokens and seconds, against prepare_data on the same recipe and tokenizer."""
    from core.settings import Settings
    from eval.estimate import checkpoint_shape
    from models.card import find_card
    from models.store import read_manifest
    from train.estimate import TRAIN_EFFICIENCY, train_estimate
    from train.prepare import prepare_data
    from train.recipe import load_recipe

    settings = Settings(runs_dir=tiny_card / "runs", cache_dir=tiny_card / "cache")
    spec = load_recipe(REPO / "train" / "quick.yaml").model_copy(update={"compute_dtype": "fp32"})
    spec = spec.model_copy(
        update={"training": spec.training.model_copy(update={"max_steps": None, "epochs": 2})}
    )
    training = train_estimate(settings, spec, CARD).costs[0]
    card = find_card(CARD)
    manifest = read_manifest(card, settings.model_store)
    from transformers import AutoTokenizer

    data = prepare_data(
        spec,
        AutoTokenizer.from_pretrained(manifest["checkpoint"]),
        settings.resolved_data_dir,
        tiny_card / "prepared",
    )
    tokens = 2 * sum(len(e.input_ids) for e in data.train)
    assert (
        f"{len(data.train)} conversations" in training.detail
        and f"{tokens} tokens in float32" in training.detail
    )
    body = checkpoint_shape(card, Path(manifest["checkpoint"])).body
    assert training.seconds == pytest.approx(4 * body * tokens / (100e9 * TRAIN_EFFICIENCY["float32"]))
    # what an earlier run's steps measured here scales the stage, and a note says so
    from models import machine

    learned = {"train float32": {"factor": 1.5, "steps": 40, "date": "2026-12-07"}}
    monkeypatch.setattr(
        machine, "calibration", lambda cache_dir, again=False: {**CALIBRATION, "learned": learned}
    )
    corrected = train_estimate(settings, spec, CARD)
    assert corrected.costs[0].seconds == pytest.approx(training.seconds * 1.5)
    assert "train float32 x1.50 (40 steps, 2026-12-07)" in corrected.notes[0]


def test_the_whole_commands_bar_ends_at_the_estimate(tiny_card, monkeypatch, capsys):
    """A real (tiny) `make train`: every stage advances the second bar by its estimate, so it ends
    where the printed total does; the trainer's steps advance it one step's share at a time."""
    from eval.estimate import Estimate
    from selectune.cli import main

    bars, quick = [], tiny_card / "quick.yaml"
    quick.write_text(
        (REPO / "train" / "quick.yaml").read_text(encoding="utf-8") + "compute_dtype: fp32\n",
        encoding="utf-8",
    )
    monkeypatch.setattr(Estimate, "overall_bar", lambda self: bars.append((self, Recorder())) or bars[-1][1])
    assert (
        main(
            (
                f"--runs-dir {tiny_card / 'runs'} --cache-dir {tiny_card / 'cache'} train --recipe "
                f"{quick} --model {CARD}"
            ).split()
        )
        == 0
    )
    ((estimate, bar),) = bars
    assert bar.n == pytest.approx(estimate.seconds)
    per_step = estimate.stage_seconds("training") / 30
    assert bar.updates.count(pytest.approx(per_step)) == 30  # quick.yaml: 30 steps
    assert "total: at most" in capsys.readouterr().out


def _log(*entries):
    return [dict(zip(("step", "time", "loss"), e)) if isinstance(e, tuple) else e for e in entries]


@pytest.mark.parametrize(
    "log, expected",
    [
        (_log((1, 0.0, 5.0), (5, 10.0, 4.0), (10, 22.0, 3.0)), (22.0, 9)),
        # an evaluation round and its samples between two logs: that interval is not a step's time
        (
            _log(
                (1, 0.0, 5.0),
                (5, 10.0, 4.0),
                {"step": 5, "eval_loss": 3.0},
                (10, 90.0, 3.0),
                (15, 101.0, 2.0),
            ),
            (21.0, 9),
        ),
        (_log((1, 0.0, 5.0), {"step": 1, "sample": 0}, (5, 60.0, 4.0)), (0.0, 0)),
        # a log truncated and resumed: the step goes back, the interval across is not counted
        (_log((1, 0.0, 5.0), (5, 10.0, 4.0), (3, 500.0, 4.5), (5, 505.0, 4.0)), (15.0, 6)),
        ([], (0.0, 0)),
    ],
)
def test_the_steps_time_is_read_between_loss_logs_alone(log, expected):
    from eval.learned import steady_steps

    assert steady_steps(log) == pytest.approx(expected)


def test_a_training_runs_steps_are_kept_against_the_estimate_it_printed(tmp_path):
    """Measured seconds a step over the estimate's, the factor the estimate used taken out; kept
    only over enough steps."""
    from core.settings import Settings
    from eval.learned import MIN_TRAIN_STEPS, learn_training
    from models.machine import measured_here

    settings = Settings(runs_dir=tmp_path / "runs", cache_dir=tmp_path / "cache")
    log = _log(*[(step, 6.0 * step, 1.0) for step in range(1, 2 + MIN_TRAIN_STEPS)])  # 6 s a step
    # printed 100 s for 20 steps (5 s a step), with no factor: x1.2
    assert learn_training(settings, CALIBRATION, log, 100.0, 20, "float32") == pytest.approx(1.2)
    entry = measured_here(tmp_path / "cache")["factors"]["train float32"]
    assert entry["factor"] == pytest.approx(1.2) and entry["steps"] == MIN_TRAIN_STEPS
    # printed with a factor of 2 already in it: the same run measures the same x1.2
    used = {**CALIBRATION, "learned": {"train float32": {"factor": 2.0, "steps": 10, "date": "d"}}}
    assert learn_training(settings, used, log, 200.0, 20, "float32") == pytest.approx(1.2)
    assert learn_training(settings, CALIBRATION, log[:MIN_TRAIN_STEPS], 100.0, 20, "float32") is None
