"""The runner: scoring from stored outputs, re-scoring without the model, and resume after kill -9."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from eval.backends.fake import FakeBackend
from eval.results import open_results, run_items
from eval.runner import run_task
from eval.task import load_items, load_task
from tests.conftest import REPO, choice_task

TASK = choice_task(
    "mini",
    {"splits": {"dev": "mini.jsonl"}, "id_field": "id"},
    "题目{{ id }}：{{ q }}\nA. 否\nB. 是\n答：",
    metrics=["accuracy", "accuracy_opencompass", "unparsable"],
)


def make_task(tmp_path, n=40):
    (tmp_path / "mini.yaml").write_text(yaml.safe_dump(TASK, allow_unicode=True), encoding="utf-8")
    rows = [{"id": i, "q": "x" * (i % 7), "label": str(i % 2)} for i in range(n)]
    (tmp_path / "mini.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    task = load_task(tmp_path / "mini.yaml")
    return task, load_items(task, "dev", tmp_path)


def reply_for(request):
    """Deterministic answers keyed by the prompt: right on even ids, 'The answer is B' on odd."""
    item_id = int(request.messages[-1]["content"].split("：")[0][2:])
    return "A" if item_id % 4 == 0 else "The answer is B" if item_id % 2 else "我不知道"


def test_scores_and_opencompass_column(tmp_path):
    task, items = make_task(tmp_path, n=8)
    conn = open_results(tmp_path / "runs")
    run = run_task(FakeBackend(respond=reply_for), task, "dev", "gen", items, conn, chunk_size=3)
    by_id = {r["item_id"]: r for r in run.items}
    assert by_id["0"]["scores"] == {"accuracy": 1.0, "accuracy_opencompass": 1.0, "unparsable": 0.0}
    # "The answer is B" on a label-1 item: right for us, "T" (wrong) for OpenCompass's rule.
    assert by_id["1"]["scores"] == {"accuracy": 1.0, "accuracy_opencompass": 0.0, "unparsable": 0.0}
    assert by_id["2"]["scores"] == {"accuracy": 0.0, "accuracy_opencompass": 0.0, "unparsable": 1.0}


def test_ppl_mode_picks_the_likeliest_choice(tmp_path):
    task, items = make_task(tmp_path, n=4)
    fake = FakeBackend(respond=lambda r: -1.0 if r.continuation == "B" else -2.0)
    run = run_task(fake, task, "dev", "ppl", items, open_results(tmp_path / "runs"))
    assert [r["parsed"] for r in run.items] == ["B"] * 4
    assert sum(r["scores"]["accuracy"] for r in run.items) == 2
    assert {c.continuation for c in fake.calls} == {"A", "B"} and len(fake.calls) == 8


def test_rerun_computes_nothing_and_rescoring_needs_no_model(tmp_path):
    task, items = make_task(tmp_path, n=10)
    conn = open_results(tmp_path / "runs")
    first = run_task(FakeBackend(respond=reply_for), task, "dev", "gen", items, conn)
    idle = FakeBackend()  # would fail on any call: nothing is queued
    again = run_task(idle, task, "dev", "gen", items, conn)
    assert again.computed == 0 and idle.calls == [] and again.items == first.items
    # A parser change re-scores stored outputs: simulate by corrupting the stored scores.
    conn.execute("UPDATE items SET scores_json = '{}', parsed = NULL")
    conn.commit()
    assert run_task(idle, task, "dev", "gen", items, conn).items == first.items


RUN_SCRIPT = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r})
    from pathlib import Path
    from eval.backends.fake import FakeBackend
    from eval.results import open_results
    from eval.runner import run_task
    from eval.task import load_items, load_task
    from tests.test_runner import reply_for

    class Slow(FakeBackend):
        def generate(self, requests):
            time.sleep(float(sys.argv[2]))
            return super().generate(requests)

    task = load_task(Path({tmp!r}) / "mini.yaml")
    items = load_items(task, "dev", Path({tmp!r}))
    run_task(Slow(respond=reply_for), task, "dev", "gen", items, open_results(Path(sys.argv[1])),
             chunk_size=4)
""")


def test_kill_9_then_rerun_gives_identical_results(tmp_path):
    make_task(tmp_path, n=40)
    script = tmp_path / "run.py"
    script.write_text(RUN_SCRIPT.format(repo=str(REPO), tmp=str(tmp_path)), encoding="utf-8")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    subprocess.run([sys.executable, str(script), str(tmp_path / "clean"), "0"], check=True, env=env)

    killed = subprocess.Popen([sys.executable, str(script), str(tmp_path / "killed"), "0.2"], env=env)
    db = tmp_path / "killed" / "results.sqlite"
    deadline = time.monotonic() + 60
    stored = 0
    while time.monotonic() < deadline and stored < 12:
        time.sleep(0.05)
        try:
            stored = sqlite3.connect(db).execute("SELECT COUNT(*) FROM items").fetchone()[0]
        except sqlite3.Error:
            stored = 0
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert 12 <= stored < 40, "the kill must land mid-run"
    subprocess.run([sys.executable, str(script), str(tmp_path / "killed"), "0"], check=True, env=env)

    def final(runs):
        conn = sqlite3.connect(runs / "results.sqlite")
        (run_id,) = conn.execute("SELECT run_id FROM runs").fetchone()
        assert conn.execute("SELECT finished FROM runs").fetchone()[0] is not None
        return [{k: v for k, v in r.items() if k != "latency_s"} for r in run_items(conn, run_id)]

    assert final(tmp_path / "killed") == final(tmp_path / "clean")
    assert len(final(tmp_path / "killed")) == 40


def test_a_users_text_task_is_scored_with_any_text_metric_and_several_references(tmp_path):
    from eval.summary import cells_of, render_table

    spec = {
        "name": "rewrite",
        "version": 1,
        "description": "Rewrite politely.",
        "data": {"root": "data", "format": "jsonl", "splits": {"test": "rewrite.jsonl"}, "id_field": "id"},
        "default_split": "test",
        "prompt": {"user": "改写：{{ text }}"},
        "modes": ["gen"],
        "reference_field": "polite",
        "normalize": ["whitespace", "punctuation"],
        "regex": "请",
        "metrics": [
            "chrf",
            "exact_match",
            "contains",
            "char_f1",
            "rouge_l",
            "bleu",
            "regex_match",
            "reply_length",
        ],
    }
    (tmp_path / "rewrite.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    rows = [
        {"id": 1, "text": "关门", "polite": ["请关门", "麻烦关一下门"]},
        {"id": 2, "text": "走开", "polite": "请让一下"},
    ]
    (tmp_path / "rewrite.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    task = load_task(tmp_path / "rewrite.yaml")
    items = load_items(task, "test", tmp_path)
    assert items[0].references == ("请关门", "麻烦关一下门") and items[0].gold == "请关门"
    replies = {"改写：关门": "麻烦关一下门。", "改写：走开": "你走吧"}
    run = run_task(
        FakeBackend(respond=lambda r: replies[r.messages[-1]["content"]]),
        task,
        "test",
        "gen",
        items,
        open_results(tmp_path / "runs"),
    )
    first, second = run.items
    assert (
        first["scores"]["exact_match"] == 1.0 and first["scores"]["contains"] == 1.0
    )  # the second reference
    assert first["scores"]["regex_match"] == 0.0 and first["scores"]["reply_length"] == 7.0
    assert second["scores"]["exact_match"] == 0.0 and second["scores"]["char_f1"] == 0.0
    assert set(first["scores"]) == set(spec["metrics"])
    table = render_table(cells_of(run), [run.model])
    assert all(f"| {m} " in table for m in spec["metrics"])


def test_fewshot_examples_come_from_another_split_the_same_for_every_item_and_enter_the_run_identity(
    tmp_path,
):
    from core.errors import UserError

    spec = {
        **TASK,
        "data": {**TASK["data"], "splits": {"dev": "mini.jsonl", "train": "shots.jsonl"}},
        "fewshot": {"split": "train", "n": 2, "seed": 3},
    }
    (tmp_path / "mini.yaml").write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    (tmp_path / "mini.jsonl").write_text(
        "".join(json.dumps({"id": i, "q": "x", "label": str(i % 2)}) + "\n" for i in range(4)),
        encoding="utf-8",
    )
    (tmp_path / "shots.jsonl").write_text(
        "".join(json.dumps({"id": 100 + i, "q": "y", "label": "1"}) + "\n" for i in range(5)),
        encoding="utf-8",
    )
    task = load_task(tmp_path / "mini.yaml")
    items = load_items(task, "dev", tmp_path)
    assert len({i.shots for i in items}) == 1 and len(items[0].shots) == 2
    assert items[0].shots == load_items(task, "dev", tmp_path)[0].shots  # seeded: drawn the same again
    (user, reply), _ = items[0].shots
    assert user.startswith("题目10") and reply == "B"
    messages = items[0].messages()
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[1]["content"] == "B" and messages[-1]["content"] == items[0].user
    assert items[0].raw().count("题目") == 3
    seen = []
    backend = FakeBackend(respond=lambda r: seen.append(r.messages) or "B")
    conn = open_results(tmp_path / "runs")
    with_shots = run_task(backend, task, "dev", "gen", items, conn)
    assert all(len(m) == 5 for m in seen)
    without = load_items(task.model_copy(update={"fewshot": None}), "dev", tmp_path)
    assert (
        run_task(FakeBackend(respond=lambda r: "B"), task, "dev", "gen", without, conn).run_id
        != with_shots.run_id
    )
    with pytest.raises(
        UserError, match=r"key 'fewshot.split': the examples come from the split 'train' being scored"
    ):
        load_items(task, "train", tmp_path)
    with pytest.raises(UserError, match=r"key 'fewshot.n': 9 examples asked, split 'train' has 5"):
        load_items(
            task.model_copy(update={"fewshot": task.fewshot.model_copy(update={"n": 9})}), "dev", tmp_path
        )


@pytest.mark.parametrize("mode", ["gen", "ppl"])
def test_each_item_stores_the_request_its_backend_received_and_is_scored_once(tmp_path, monkeypatch, mode):
    import eval.runner as runner

    task, items = make_task(tmp_path, n=6)
    fake = FakeBackend(respond=reply_for if mode == "gen" else (lambda r: -1.0))
    real, scored = runner.score_output, []
    monkeypatch.setattr(runner, "score_output", lambda *a: scored.append(a[2].id) or real(*a))
    run = run_task(fake, task, "dev", mode, items, open_results(tmp_path / "runs"), chunk_size=4)
    assert sorted(scored) == sorted(i.id for i in items)  # once each, not once more after storing
    stored = {r["item_id"]: r["request"] for r in run.items}

    def item_of(call):
        return call.messages[-1]["content"].split("：")[0][2:]

    assert [stored[item_of(c)]["messages"] for c in fake.calls] == [c.messages for c in fake.calls]
    if mode == "gen":
        assert {(r["max_new_tokens"], tuple(r["stop"])) for r in stored.values()} == {
            (task.gen.max_new_tokens, tuple(task.gen.stop))
        }
    else:
        assert sorted((item_of(c), c.continuation) for c in fake.calls) == sorted(
            (k, c) for k, r in stored.items() for c in r["continuations"]
        )
    assert stored["3"]["messages"][-1]["content"] == "题目3：xxx\nA. 否\nB. 是\n答："
