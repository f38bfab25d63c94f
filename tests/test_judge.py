"""The optional LLM judge: asked over real loopback HTTP, verdicts cached, absent when unset."""

from __future__ import annotations

import pytest

from eval.backends.fake import FakeBackend
from eval.backends.openai_http import OpenAIBackend
from eval.judge import judge_scores, make_judge, verdict_label
from eval.results import open_results
from eval.runner import run_task
from eval.summary import cells_of, metrics_of
from eval.task import find_task, load_items
from selectune.cli import main
from core.errors import UserError
from core.settings import load_settings
from bench.openai_stub import answering

LABELS = ["温柔", "毒舌"]


@pytest.mark.parametrize(
    "output, expected",
    [
        ("毒舌", "毒舌"),
        ("这条回复很「温柔」。", "温柔"),
        ("不是毒舌，是温柔", "毒舌"),  # the first label named wins; judges are told to answer one word
        ("无法判断", None),
        ("", None),
    ],
)
def test_verdict_label(output, expected):
    assert verdict_label(output, LABELS) == expected


def judge_rule(request) -> str:
    """A deterministic judge: replies with 笨 are snarky, with ？ undecidable, the rest gentle."""
    reply = request.messages[-1]["content"].split("回复：", 1)[1]
    return "毒舌" if "笨" in reply else "无法判断" if "？" in reply else "我认为是「温柔」"


def model_reply(request) -> str:
    """The candidate model: snarky when asked to be, except for two undecidable replies."""
    prompt = request.messages[-1]["content"]
    return "你真笨" if "毒舌" in prompt else "抱抱你？" if "天气" in prompt else "辛苦啦，慢慢来"


@pytest.fixture
def judge_server():
    with answering(judge_rule) as served:
        yield served


def test_judge_scores_over_http_and_caches_verdicts(tmp_path, judge_server):
    state, url = judge_server
    task = find_task("style")
    items = load_items(task, "test", tmp_path)
    conn = open_results(tmp_path / "runs")
    judge = OpenAIBackend(url, "judge-x")
    run = run_task(
        FakeBackend(respond=model_reply), task, "test", "gen", items, conn, data_dir=tmp_path, judge=judge
    )
    by_id = {i.id: i for i in items}
    for row in run.items:
        item = by_id[row["item_id"]]
        reply = model_reply(type("R", (), {"messages": item.messages()}))
        expected = "毒舌" if "笨" in reply else None if "？" in reply else "温柔"
        assert row["scores"]["style_judge"] == float(expected == item.fields["style"]), row
    assert "style_judge" in metrics_of(run)
    asked = len(state.bodies)
    assert asked == len({r["output"].strip() for r in run.items})  # one question per distinct prompt
    assert all(b["temperature"] == 0.0 and b["max_tokens"] == 8 for b in state.bodies)

    # A rerun re-scores stored outputs: every verdict comes from the cache, none from the judge.
    again = run_task(
        FakeBackend(respond=model_reply), task, "test", "gen", items, conn, data_dir=tmp_path, judge=judge
    )
    assert len(state.bodies) == asked
    assert [r["scores"] for r in again.items] == [r["scores"] for r in run.items]

    # Without a judge the metric is absent from the scores and from the table, not zero.
    plain = run_task(FakeBackend(respond=model_reply), task, "test", "gen", items, conn, data_dir=tmp_path)
    assert "style_judge" not in metrics_of(plain)
    assert all(c.metric != "style_judge" for c in cells_of(plain))


def test_identical_prompts_are_asked_once(tmp_path, judge_server):
    state, url = judge_server
    task = find_task("style")
    items = load_items(task, "test", tmp_path)[:6]
    conn = open_results(tmp_path / "runs")
    scores = judge_scores(conn, OpenAIBackend(url, "judge-x"), task, [(i, "你真笨") for i in items])
    assert len(state.bodies) == 1
    assert scores == [float(i.fields["style"] == "毒舌") for i in items]


def test_half_configured_judge_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(UserError, match="both judge_url and judge_model"):
        make_judge(load_settings(judge_url="http://127.0.0.1:9"))
    assert make_judge(load_settings()) is None
    code = main(
        ["--runs-dir", str(tmp_path), "--judge-model", "j", "select", "--models", "smollm2-135m-instruct"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "judge_url" in err[0]


def test_judge_settings_from_config_file(tmp_path):
    cfg = tmp_path / "s.yaml"
    cfg.write_text("judge_url: http://127.0.0.1:8000\njudge_model: qwen\n", encoding="utf-8")
    settings = load_settings(cfg)
    assert settings.judge_url == "http://127.0.0.1:8000" and settings.judge_model == "qwen"
