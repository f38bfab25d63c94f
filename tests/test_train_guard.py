"""The guard and resuming (train/callbacks.py, train/resume.py): a collapsed or diverging run
stops at its first bad step with its last good checkpoint kept, and a run killed with -9 resumes
to the uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from core.errors import UserError
from tests.conftest import REPO
from tests.train_fixture import losses, recipe


def test_collapse_is_flagged():
    from eval.scorers.text import degenerate

    assert degenerate("") == "empty reply"
    assert degenerate("哈哈哈哈哈哈哈哈哈哈") is not None
    assert degenerate("云栈盘免费版为每个账号提供15GB存储空间。") is None
    assert degenerate("心情不好，情绪低落，" * 8).startswith("a phrase repeats")
    long_reply = (
        "辛苦你了，连轴转谁都会累的。先好好吃顿饭，把能推的事情列出来，找机会和老板温和地谈谈工作量，"
        "你的休息也很重要哦。"
    )
    assert degenerate(long_reply) is None


NAN = float("nan")
GUARD_CASES = [
    # (losses, gradient norms, problem expected (a pattern) or None, first bad step)
    ([2.0, 1.8, 1.5, 1.2], [1.0, 0.9, 0.8, 0.7], None, None),
    ([2.0, 1.8, NAN], [1.0, 0.9, 0.8], r"loss became nan at step 3", 3),
    ([2.0, 1.8, 1.7], [1.0, 0.9, NAN], r"gradient norm became nan at step 3", 3),
    ([2.0, 5.0, 9.0], [1.0, 3.0, 9.0], r"diverged at step 3: 9.000 > 4.0 x the first logged 2.000", 3),
    # the AMX machine's run: the loss rises, then no gradient and a frozen loss
    ([2.0, 4.0, 5.7, 5.7, 5.7, 5.7], [1.0, 7.0, 0.0, 0.0, 0.0, 0.0], r"collapsed at step 3: .* 3 logs", 3),
    # zero gradients that do not last collapse_logs logs are not a collapse
    ([2.0, 1.9, 1.9, 1.8, 1.7, 1.7], [1.0, 0.0, 0.0, 0.5, 0.0, 0.0], None, None),
]


@pytest.mark.parametrize("losses_, norms, problem, bad_step", GUARD_CASES)
def test_the_guard_stops_divergence_and_collapse_at_the_first_bad_step(losses_, norms, problem, bad_step):
    from types import SimpleNamespace

    from train.callbacks import TrainingGuard

    guard = TrainingGuard(divergence_factor=4.0, collapse_logs=3)
    control = SimpleNamespace(should_training_stop=False, should_save=True)
    for step, (loss, norm) in enumerate(zip(losses_, norms), start=1):
        guard.on_log(None, SimpleNamespace(global_step=step), control, logs={"loss": loss, "grad_norm": norm})
        if guard.problem:
            break
    if problem is None:
        assert guard.problem is None and not control.should_training_stop
    else:
        assert re.search(problem, guard.problem), guard.problem
        assert guard.bad_step == bad_step and control.should_training_stop and not control.should_save


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, setup):
    from train.trainer import run_training

    model, data = setup
    bad = recipe(data, quantization="none", learning_rate=50.0, save_steps=1, max_steps=30)
    # Too high a learning rate ends as a NaN, a blown-up loss or a collapse (zero gradients, a
    # frozen loss), by the CPU's or GPU's kernels: each stops the run the same way.
    with pytest.raises(
        UserError,
        match=r"(diverged|became nan|collapsed) at step \d+.*stopped\. "
        r"Last good checkpoint",
    ) as err:
        run_training(bad, str(model), tmp_path / "run", tmp_path)
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "run" / "checkpoints").glob("checkpoint-*"))
    bad_step = int(re.search(r" at step (\d+)", str(err.value)).group(1))
    assert steps and max(steps) < bad_step
    assert not (tmp_path / "run" / "adapter").exists()


SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from tests.train_fixture import recipe
    from train.trainer import run_training
    run_training(recipe(Path({data!r}), quantization="none", lora_dropout=0.1, max_steps=30, save_steps=5),
                 {model!r}, Path(sys.argv[1]), Path({data!r}).parent)
""")


def test_kill_9_then_rerun_repeats_the_uninterrupted_run(tmp_path, setup):
    model, data = setup
    script = tmp_path / "train.py"
    script.write_text(SCRIPT.format(repo=str(REPO), data=str(data), model=str(model)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, str(script), str(straight)], check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(killed)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "checkpoint-15").is_dir() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists(), "killed too late to test resume"
    done = subprocess.run([sys.executable, str(script), str(killed)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = losses(straight), losses(killed)
    assert [s for s, _ in b] == list(range(1, 31))  # every step once: none lost, none repeated
    assert [s for s, _ in a] == [s for s, _ in b]
    assert [x for _, x in b] == pytest.approx([x for _, x in a], rel=1e-4)


def test_a_checkpoint_cut_short_by_a_kill_is_not_resumed_from(tmp_path):
    from train.resume import last_complete_checkpoint

    for step, state in [(10, "{}"), (15, "{}"), (20, None), (25, '{"trunc')]:
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if state is not None:
            (path / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(tmp_path) == tmp_path / "checkpoint-15"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10", "checkpoint-15"]
    assert last_complete_checkpoint(tmp_path / "none") is None
