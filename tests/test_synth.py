"""`make data-synth`: reading teacher output, the filters, and the pipeline against a loopback
OpenAI-compatible teacher (resume without repeated calls, the budget stop, malformed answers)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval.backends.fake import FakeBackend
from eval.backends.openai_http import OpenAIBackend
from eval.results import open_results
from selectune.cli import main
from synth import clean as C
from synth.parse import parse_answer, parse_followup, parse_list
from synth.pipeline import Run
from synth.recipe import load_synth_recipe
from synth.teacher import Budget, Teacher
from tests.conftest import REPO
from bench.fixtures import SYNTH_SEEDS, teacher_reply, write_synth_recipe
from bench.openai_stub import answering

CASES = json.loads((REPO / "tests" / "cases" / "teacher_outputs.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_parse_teacher_lists(case):
    parsed = parse_list(case["text"])
    assert (parsed.items, parsed.broken, parsed.how) == (case["items"], case["broken"], case["how"])


@pytest.mark.parametrize(
    "text, answer",
    [
        ("答：免费版提供15GB。", "免费版提供15GB。"),
        ("“好的，别难过。”", "好的，别难过。"),
        ("回复： 辛苦啦", "辛苦啦"),
        ("  ", ""),
        ("```\n15GB\n```", "15GB"),
    ],
)
def test_parse_answer(text, answer):
    assert parse_answer(text) == answer


@pytest.mark.parametrize(
    "text, answer",
    [
        ("资料说免费版15GB。\n最终答案：免费版提供15GB。", "免费版提供15GB。"),
        ("先想想……\n最终答案: “29元一个月”", "29元一个月"),
        ("推理了半天但没有结论。", ""),  # no marker: nothing is guessed
    ],
)
def test_parse_step_by_step_answer(text, answer):
    assert parse_answer(text, step_by_step=True) == answer


def test_step_by_step_keeps_only_the_final_answer(tmp_path, teacher_server):
    def reply(request):
        text = request.messages[-1]["content"]
        if "最终答案" in text:
            return "资料里写着24小时内回复。\n最终答案：一般24小时内回复。"
        return teacher_reply(request)

    state, url = teacher_server
    state.backend = FakeBackend(respond=reply)
    recipe = write_synth_recipe(
        tmp_path,
        answer={
            "template": "synth/prompts/answer_fact.jinja",
            "shots": 0,
            "context": str(tmp_path / "company.md"),
            "step_by_step": True,
        },
        converse={"fraction": 0.0},
    )
    prov = synthesize(recipe, tmp_path / "runs", url)
    rows = [
        json.loads(line)
        for line in (tmp_path / "runs" / "synth" / "mini" / "data.jsonl").read_text().splitlines()
    ]
    assert prov["counts"]["written"] == len(rows) > 0
    assert {r["messages"][1]["content"] for r in rows} == {"一般24小时内回复。"}


@pytest.mark.parametrize(
    "text, question",
    [
        ("孩子：那为什么是15GB呀？\n（好奇地眨眼）", "那为什么是15GB呀？"),
        ("“为什么要提前24小时申请？”", "为什么要提前24小时申请？"),
        ("", ""),
    ],
)
def test_parse_followup(text, question):
    assert parse_followup(text) == question


def test_question_filters_remove_duplicates_near_duplicates_and_off_language():
    items = [
        {"question": q}
        for q in [
            "云栈盘免费版有多少存储空间?",  # the first seed but for punctuation: exact duplicate
            "云栈盘免费版有多少的存储空间？",  # one character added: near duplicate of a seed
            "周末客服几点下班？",  # new
            "周末客服几点下班呢？",  # near duplicate of the item before
            "周末的客服是几点下班？",  # near duplicate too
            "How many devices can I use at once?",  # not Chinese
            "好？",  # too short
            "注销账号后数据会保留多久？",  # new
            "注销账号后数据保留30天。",  # a statement, not a question
        ]
    ]
    report = C.Report()
    kept = C.clean_questions(items, SYNTH_SEEDS, C.CleanSpec(require_question=True), report)
    assert [i["question"] for i in kept] == ["周末客服几点下班？", "注销账号后数据会保留多久？"]
    assert report.removed == {
        "exact_duplicate": 1,
        "near_duplicate": 3,
        "language": 1,
        "length": 1,
        "not_a_question": 1,
    }
    assert "seed" in report.examples["near_duplicate"][0]["why"]
    assert "earlier item" in report.examples["near_duplicate"][1]["why"]


def test_answer_filters_format_numbers_and_seed_leaks():
    items = [
        {"question": "免费版多大？", "answer": "免费版提供15GB空间。"},  # kept
        {"question": "会员价格？", "answer": "会员每月99元。"},  # 99 is not in the context
        {
            "question": "免费版给多少？",
            "answer": "云栈盘免费版为每个账号提供15GB存储空间。",
        },  # a seed answer copied
        {"question": "客服电话？", "answer": "作为AI语言模型，我无法回答。"},  # meta-talk
        {"question": "怎么注销账号？", "answer": "怎么注销账号？"},  # an echo
        {"question": "能退款吗？", "answer": "嗯"},  # too short
        {"question": "心情不好怎么办？", "answer": "心情不好，情绪低落，" * 8},  # a loop
    ]
    report = C.Report()
    spec = C.CleanSpec(numbers_from="免费版15GB，会员每月29元。")
    kept = C.clean_answers(items, SYNTH_SEEDS, spec, report)
    assert [i["question"] for i in kept] == ["免费版多大？"]
    assert report.removed == {"answer_format": 5, "seed_leak": 1}
    whys = [e["why"] for e in report.examples["answer_format"]]
    assert "numbers not in the context: 99" in whys and "meta-talk or a refusal instead of an answer" in whys


# ---------------------------------------------------------------------------------------------
# The pipeline against a loopback teacher


@pytest.fixture
def teacher_server():
    with answering(teacher_reply) as served:
        yield served


def synthesize(
    recipe_path: Path, runs: Path, url: str, max_calls: int | None = None, called=None, label: str = "teacher"
) -> dict:
    recipe = load_synth_recipe(recipe_path)
    budget = Budget(max_calls or recipe.budget.max_calls, recipe.budget.max_tokens)
    teacher = Teacher(
        OpenAIBackend(url, "teacher", concurrency=1, max_retries=0), open_results(runs), budget, label
    )
    return Run(recipe, teacher, runs / "synth" / recipe.name, called=called).run()


def test_pipeline_writes_a_cleaned_file_the_trainer_reads(tmp_path, teacher_server):
    from train.data import load_conversations

    from collections import Counter

    from synth.estimate import STAGES, stage_calls

    state, url = teacher_server
    recipe, calls = write_synth_recipe(tmp_path), []
    prov = synthesize(recipe, tmp_path / "runs", url, called=calls.append)
    out = tmp_path / "runs" / "synth" / "mini"
    # every call is told as it returns (the whole command's bar), in a stage the estimate counts,
    # and no stage makes more calls than the estimate allows for
    made = Counter(STAGES[stage] for stage in calls)
    assert sum(made.values()) == len(state.bodies) == prov["budget"]["calls_made"]
    bound = stage_calls(load_synth_recipe(recipe), None)
    assert all(made[stage] <= bound[stage] for stage in made) and set(made) <= set(bound)
    counts = prov["counts"]
    assert prov["complete"] and prov["stopped"] is None
    assert counts["malformed_expand"] >= 1 and counts["expanded"] > counts["after_question_filters"] > 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["removed"]["exact_duplicate"] >= 1 and report["removed"]["near_duplicate"] >= 1
    assert report["removed"]["language"] >= 1
    assert report["removed"]["answer_format"] == 1  # the refund answer's invented 99
    assert report["examples"]["answer_format"][0]["why"] == "numbers not in the context: 99"
    conversations = load_conversations(out / "data.jsonl", "messages")
    assert len(conversations) == counts["written"] == counts["after_answer_filters"]
    two_turn = [c for c in conversations if len(c.messages) == 4]
    assert len(two_turn) == counts["conversations"] > 0
    assert two_turn[0].messages[2]["content"] == "那要是忘了怎么办呀？"
    assert len(state.bodies) == prov["budget"]["calls_made"]
    assert all(b["temperature"] in (0.9, 0.3, 0.8) and "seed" in b for b in state.bodies)
    malformed = [
        json.loads(line) for line in (out / "malformed.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert (
        malformed and malformed[0]["stage"] == "expand" and malformed[0]["response"] == "抱歉，我想不出来。"
    )
    assert set(prov["templates_sha256"]) == {
        "synth/prompts/expand.jinja",
        "synth/prompts/answer_fact.jinja",
        "synth/prompts/followup.jinja",
    }


def test_budget_stop_then_resume_pays_for_no_call_twice(tmp_path, teacher_server):
    state, url = teacher_server
    recipe = write_synth_recipe(tmp_path)
    fresh = synthesize(recipe, tmp_path / "fresh", url)
    calls_needed = len(state.bodies)
    state.bodies.clear()

    stopped = synthesize(recipe, tmp_path / "runs", url, max_calls=8)
    assert not stopped["complete"] and stopped["stopped"].startswith(
        "budget: the call budget is spent (8 of 8"
    )
    assert len(state.bodies) == 8
    first_prompts = [json.dumps(b["messages"], ensure_ascii=False) for b in state.bodies]

    resumed = synthesize(recipe, tmp_path / "runs", url)
    assert resumed["complete"] and resumed["budget"]["answers_from_store"] == 8
    assert len(state.bodies) == calls_needed  # 8 before the stop + the rest, none asked twice
    later = [json.dumps(b["messages"], ensure_ascii=False) for b in state.bodies[8:]]
    assert not set(first_prompts) & set(later)

    again = synthesize(recipe, tmp_path / "runs", url)  # everything from the store: no call at all
    assert len(state.bodies) == calls_needed and again["budget"]["calls_made"] == 0
    data = {
        name: (tmp_path / name / "synth" / "mini" / "data.jsonl").read_text(encoding="utf-8")
        for name in ("fresh", "runs")
    }
    assert data["fresh"] == data["runs"]
    assert fresh["data_sha256"] == resumed["data_sha256"] == again["data_sha256"]


def test_the_estimate_replays_the_store_up_to_the_first_new_call(
    tmp_path, teacher_server, tiny_qwen2_dir, monkeypatch
):
    """A run stopped by its budget and started again: the calls the store answers cost nothing, the
    questions the replay saw bound the answer stage, and the stored replies' mean length stands
    for each stage's replies instead of its `max_tokens`; a finished run makes no new call."""
    from collections import Counter

    from core.settings import Settings
    from models import machine
    from models.card import find_card
    from models.store import provision
    from synth.estimate import STAGES, Stored, stage_calls, stored_run, synth_estimate
    from tests.conftest import FIXED_CALIBRATION

    card = "qwen2.5-1.5b-instruct"  # a hub card's weights are a tiny model here; the store's label
    monkeypatch.setattr(machine, "calibration", lambda cache_dir, again=False: FIXED_CALIBRATION)
    settings = Settings(runs_dir=tmp_path / "runs", cache_dir=tmp_path / "cache")
    provision(find_card(card), settings.model_store, weights=tiny_qwen2_dir)
    _state, url = teacher_server
    path = write_synth_recipe(tmp_path)
    recipe = load_synth_recipe(path)

    assert stored_run(settings, recipe, card) == Stored()  # no store yet
    fresh = synth_estimate(settings, recipe, card, max_calls=None, served_here=False)
    assert fresh.upper_bound and fresh.notes == [] and not settings.workspace.results_db.exists()

    first: list[str] = []
    synthesize(path, settings.runs_dir, url, max_calls=8, called=first.append, label=card)
    stored = stored_run(settings, recipe, card)
    assert stored.hits() == Counter(STAGES[s] for s in first) == {"expand": 6, "answer": 2}
    assert not stored.complete and stored_run(settings, recipe, "another teacher").hits() == Counter()
    responses = {r for (r,) in open_results(settings.runs_dir).execute("SELECT response FROM teacher_calls")}
    assert set(stored.replies["expand"]) <= responses and len(stored.replies["answer"]) == 2
    new = stage_calls(recipe, None, stored)
    assert new["expand"] == 0 and new["answer"] == stored.counts["after_question_filters"] - 2
    assert stage_calls(recipe, 3, stored) == {"expand": 0, "answer": 3, "follow-up": 0}

    again = synth_estimate(settings, recipe, card, max_calls=None, served_here=False)
    stages = {c.entry: c for c in again.costs}
    assert set(stages) == {"answer", "follow-up"}  # expand is stored whole
    assert "reply tokens (the mean of 2 stored)" in stages["answer"].detail
    assert not stages["answer"].upper_bound and stages["follow-up"].upper_bound  # no follow-up seen yet
    assert again.notes == ["8 calls answered from the store cost nothing (expand 6, answer 2)"]

    # before the answers are replayed, follow-ups are counted at the fraction the run draws on average
    assert new["follow-up"] == 2 * round(recipe.converse.fraction * stored.counts["after_question_filters"])

    second: list[str] = []  # on to the first follow-up: what it makes, the estimate counted
    synthesize(path, settings.runs_dir, url, max_calls=new["answer"] + 1, called=second.append, label=card)
    made = Counter(STAGES[s] for s in second) - stored.hits()
    assert made == {"answer": new["answer"], "follow-up": 1}
    stored = stored_run(settings, recipe, card)  # the answers replayed: the follow-ups are known
    new = stage_calls(recipe, None, stored)
    assert new["expand"] == new["answer"] == 0 and stored.followups is not None
    assert new["follow-up"] == 2 * stored.followups - 1

    third: list[str] = []
    synthesize(path, settings.runs_dir, url, called=third.append, label=card)
    assert Counter(STAGES[s] for s in third) - stored.hits() == {"follow-up": new["follow-up"]}
    done = stored_run(settings, recipe, card)
    assert done.complete and done.hits() == Counter(STAGES[s] for s in third)
    assert stage_calls(recipe, None, done) == {"expand": 0, "answer": 0, "follow-up": 0}
    finished = synth_estimate(settings, recipe, card, max_calls=None, served_here=False)
    assert finished.costs == [] and finished.notes[0].endswith("; the run makes no new call")


def test_token_budget_stops_cleanly(tmp_path, teacher_server):
    _state, url = teacher_server
    recipe = load_synth_recipe(write_synth_recipe(tmp_path))
    teacher = Teacher(
        OpenAIBackend(url, "teacher", concurrency=1),
        open_results(tmp_path / "runs"),
        Budget(max_calls=None, max_tokens=500),
        "teacher",
    )
    prov = Run(recipe, teacher, tmp_path / "out").run()
    assert prov["stopped"].startswith("budget: the token budget is spent")
    assert 500 <= prov["budget"]["tokens_used"] < 500 + 600  # one call's worth over at most
    assert json.loads((tmp_path / "out" / "provenance.json").read_text(encoding="utf-8"))["complete"] is False


def test_cli_runs_against_an_endpoint_and_rejects_bad_recipes(tmp_path, teacher_server, capsys):
    _state, url = teacher_server
    recipe = write_synth_recipe(tmp_path)
    runs = tmp_path / "runs"
    assert (
        main(
            (
                f"--runs-dir {runs} data-synth --recipe {recipe} --base-url {url} --teacher-model teacher"
            ).split()
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "data-synth: 3 seeds ->" in out and "removed" in out and "teacher calls:" in out
    (tmp_path / "bad").mkdir()
    bad = write_synth_recipe(tmp_path / "bad", expand={"what": "x", "roundz": 2})
    assert (
        main(
            (f"--runs-dir {runs} data-synth --recipe {bad} --base-url {url} --teacher-model teacher").split()
        )
        == 2
    )
    assert (
        capsys.readouterr()
        .err.strip()
        .startswith(f"selectune: error: {bad}: unknown key 'expand.roundz' (expected one of [")
    )
    assert main(["--runs-dir", str(runs), "data-synth", "--recipe", str(recipe), "--base-url", url]) == 2
    assert "needs a model name" in capsys.readouterr().err


def test_shipped_recipes_load_and_their_seeds_exist(shared_data):
    from synth.inputs import load_seeds

    for path in sorted((REPO / "synth").glob("*.yaml")):
        recipe = load_synth_recipe(path)
        seeds = load_seeds(recipe, shared_data)
        assert len(seeds) == recipe.seeds.count == 30, path.name
        if recipe.seeds.distinct:
            assert len({s["question"] for s in seeds}) == 30
