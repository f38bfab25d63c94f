"""The estimates `make crosscheck-opencompass` and `make bench-serve` print before they run: the
work counted from the job on a fixed calibration (tests/conftest.py), no model loaded, no server
started."""

from __future__ import annotations

import json

import pytest

from eval.backends.hf import Batch
from eval.estimate import Shape, batch_seconds, decode_seconds, prompt_tokens
from tests.conftest import FIXED_CALIBRATION as FIXED
from tests.conftest import FIXTURE_DATA, public_data

RATES = (FIXED["matmul_gflops"]["float32"], FIXED["decode_gflops"]["float32"], FIXED["bandwidth_gbs"])


@pytest.fixture
def fixed(monkeypatch):
    from models import machine

    monkeypatch.setattr(machine, "calibration", lambda cache_dir, again=False: FIXED)


@pytest.fixture
def fixed_learning(monkeypatch):
    """The fixed calibration with what was measured in the test's cache, as `calibration` adds it."""
    from models import machine

    def calibration(cache_dir, again=False):
        return {**FIXED, "learned": machine.measured_here(cache_dir).get("factors") or {}}

    monkeypatch.setattr(machine, "calibration", calibration)


def _shape(card, checkpoint) -> Shape:
    return Shape.of(card.parameters, json.loads((checkpoint / "config.json").read_text()))


def _store_with_replies(runs, card, task, items, reply: str) -> None:
    """A finished `gen` run of `card` on `task` in `runs`' store, every reply `reply`."""
    from eval.results import add_items, ensure_run, finish_run, open_results

    conn = open_results(runs)
    ensure_run(conn, "r1", {"model": card.name, "task": task.name, "split": "dev", "mode": "gen"}, len(items))
    rows = [
        {
            "item_id": i.id,
            "prompt": "p",
            "output": reply,
            "gold": "A",
            "parsed": "A",
            "scores": {},
            "latency_s": 0,
        }
        for i in items
    ]
    add_items(conn, "r1", rows)
    finish_run(conn, "r1")
    conn.close()


def test_crosscheck_estimates_opencompass_padded_whole_prompts_and_its_overhead(
    tmp_path, tiny_qwen2_dir, fixed
):
    """OpenCompass's side: batches in the dataset's order, each row padded to the batch's longest
    prompt, nothing shared, its fixed overhead once a round; both sides at most max_new_tokens
    until a run in the store says how long the replies are."""
    from bench.crosscheck_opencompass import OPENCOMPASS_OVERHEAD_SECONDS, bench_estimate
    from core.settings import load_settings
    from eval.task import find_task, load_items
    from models.card import find_card
    from models.store import provision
    from transformers import AutoTokenizer

    card, task = find_card("qwen2.5-1.5b-instruct"), find_task("fewclue_bustm")
    provision(card, tmp_path / "cache" / "models", weights=tiny_qwen2_dir)
    settings = load_settings(
        cache_dir=str(tmp_path / "cache"),
        data_dir=str(public_data(FIXTURE_DATA)),
        runs_dir=str(tmp_path / "runs"),
    )
    items = load_items(task, "dev", settings.resolved_data_dir)[:6]
    estimate = bench_estimate(settings, card, task, "dev", items, 4, tiny_qwen2_dir, 2)
    assert [(c.model, c.entry) for c in estimate.costs] == [
        (side, f"round {n}: fewclue_bustm-dev gen") for n in (1, 2) for side in ("selectune", "OpenCompass")
    ]
    ours, theirs = estimate.costs[:2]
    assert ours.upper_bound and theirs.upper_bound and estimate.upper_bound

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    lengths = [prompt_tokens(tokenizer, i.messages()) for i in items]
    shape, steps = _shape(card, tiny_qwen2_dir), task.gen.max_new_tokens
    batches = [Batch(len(part), len(part) * max(part), 1, steps) for part in (lengths[:4], lengths[4:])]
    inference = sum(batch_seconds(b, steps, shape, *RATES, 4) for b in batches)
    assert f"{sum(b.tokens for b in batches)} prompt tokens padded" in theirs.detail
    assert theirs.seconds == pytest.approx(inference + OPENCOMPASS_OVERHEAD_SECONDS)
    assert estimate.loads["OpenCompass"] == estimate.loads["selectune"] > 0

    _store_with_replies(tmp_path / "runs", card, task, items, "A")  # replies seen: a letter and its end
    estimate = bench_estimate(settings, card, task, "dev", items, 4, tiny_qwen2_dir, 1)
    ours_seen, theirs_seen = estimate.costs
    assert not estimate.upper_bound and "2 decoding steps a batch" in theirs_seen.detail
    assert theirs_seen.seconds < theirs.seconds and ours_seen.seconds < ours.seconds
    assert estimate.lines()[0].startswith("estimate for `make crosscheck-opencompass` here (Test CPU, avx2")


def test_bench_serve_estimates_each_engine_from_its_start_and_its_batching(tmp_path, tiny_qwen2_dir, fixed):
    """Each engine: its start (the constant, then its last start here), a warm-up, every request
    decoded to max_tokens one at a time, then at the concurrency: one batch of the requests in flight for
    vLLM, one at a time again for `transformers serve`, which does not batch."""
    from bench.serve_speed import bench_estimate
    from core.settings import load_settings
    from models.card import find_card
    from models.machine import record_server_start
    from serve.estimate import SERVER_START_SECONDS
    from transformers import AutoTokenizer

    card = find_card("qwen2.5-1.5b-instruct")
    settings = load_settings(cache_dir=str(tmp_path / "cache"))
    conversations = [[{"role": "user", "content": "问题" * n}] for n in (3, 9, 5, 12, 7)]
    engines = ["vllm", "transformers"]
    estimate = bench_estimate(settings, card, tiny_qwen2_dir, conversations, engines, 16, 4)
    stages = {(c.model, c.entry): c.seconds for c in estimate.costs}
    assert list(stages) == [(e, s) for e in engines for s in ("warm-up", "concurrency 1", "concurrency 4")]
    assert estimate.loads == {e: SERVER_START_SECONDS[e] for e in engines}

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    lengths = [prompt_tokens(tokenizer, m) for m in conversations]
    shape = _shape(card, tiny_qwen2_dir)
    one = sum(decode_seconds(n, 16, shape, RATES, 4) for n in lengths)
    batched = sum(
        batch_seconds(Batch(len(p), len(p) * max(p), 1, 16), 16, shape, *RATES, 4)
        for p in (lengths[:4], lengths[4:])
    )
    assert stages["vllm", "concurrency 1"] == pytest.approx(one) == stages["transformers", "concurrency 1"]
    assert stages["vllm", "concurrency 4"] == pytest.approx(batched) and batched < one
    assert stages["transformers", "concurrency 4"] == pytest.approx(one)
    # every reply is decoded to max_tokens (bench.serve_speed.exact_length): a count, not a bound
    assert not any(c.upper_bound for c in estimate.costs) and "at most" not in "\n".join(estimate.lines())

    # at concurrency 1 the bench runs one level, and its estimate counts one
    single = bench_estimate(settings, card, tiny_qwen2_dir, conversations, ["vllm"], 16, 1)
    assert [c.entry for c in single.costs] == ["warm-up", "concurrency 1"]

    record_server_start(settings.cache_dir, "vllm", card.name, 236.0)
    estimate = bench_estimate(settings, card, tiny_qwen2_dir, conversations, ["vllm"], 16, 4)
    assert estimate.loads == {"vllm": 236.0}
    assert any(f"as its last start of {card.name} here took" in n for n in estimate.notes)


@pytest.mark.parametrize("slower", [1.35, 0.8, 5.0])
def test_bench_serve_keeps_each_engines_serving_time_and_the_next_estimate_uses_it(
    tmp_path, tiny_qwen2_dir, fixed_learning, slower
):
    """What an engine's timed levels took over the estimate's (its own speed, which the cost model
    does not know) is kept as `serve <engine>`; the next estimate multiplies those levels by it,
    clipped as every learned factor is, and names it; the warm-up and the start are not scaled."""
    from bench.serve_speed import bench_estimate, learn_serving
    from core.settings import load_settings
    from eval.estimate import LEARNED_BOUNDS
    from models.card import find_card
    from models.machine import calibration

    card = find_card("qwen2.5-1.5b-instruct")
    settings = load_settings(cache_dir=str(tmp_path / "cache"))
    conversations = [[{"role": "user", "content": "问题" * n}] for n in (3, 9, 5, 12, 7)]
    first = bench_estimate(settings, card, tiny_qwen2_dir, conversations, ["transformers"], 16, 4)
    before = {c.entry: c.seconds for c in first.costs}
    figures = {
        level: {"wall_s": before[f"concurrency {level}"] * slower, "requests": 5} for level in ("1", "4")
    }
    assert learn_serving(
        settings.cache_dir, calibration(settings.cache_dir), first, "transformers", figures
    ) == (pytest.approx(slower, abs=1e-3))
    kept = min(max(slower, LEARNED_BOUNDS[0]), LEARNED_BOUNDS[1])
    after = bench_estimate(settings, card, tiny_qwen2_dir, conversations, ["transformers"], 16, 4)
    seconds = {c.entry: c.seconds for c in after.costs}
    assert seconds["warm-up"] == before["warm-up"] and after.loads == first.loads
    for level in ("concurrency 1", "concurrency 4"):
        assert seconds[level] == pytest.approx(before[level] * kept, rel=1e-3)
    assert any(f"serve transformers x{kept:.2f} (10 requests" in n for n in after.notes)
    # measured again with the factor in force: the factor it printed with is taken out
    figures = {level: {"wall_s": seconds[f"concurrency {level}"], "requests": 5} for level in ("1", "4")}
    assert learn_serving(
        settings.cache_dir, calibration(settings.cache_dir), after, "transformers", figures
    ) == (pytest.approx(kept, abs=1e-3))


@pytest.mark.parametrize(
    "layout, expected",
    [
        ("local", 60 + 100 + 40),  # one after another
        ("1x2:2", 200),  # one slot at the calibration's 2 threads: as local
        ("1x1:1", 200 * 1.84),  # one slot on one thread: each candidate 2 / 1 x 0.92 slower
        ("2x1:1", 1.84 * 100),  # two slots: 60 and 100, then 40 to the first that frees (60)
        ("1x2:1", 1.84 * 100),  # one node holding two one-thread actors: the same slots
        ("3x2:2", 100),  # a slot each: the slowest candidate
        ("2x4:2", 100),  # four slots, three candidates
    ],
)
def test_a_ray_layouts_estimate_is_its_slots_makespan(layout, expected):
    from bench.ray_select import layout_seconds

    assert layout_seconds(layout, [60.0, 100.0, 40.0], threads=2) == pytest.approx(expected)


def test_bench_ray_prints_selects_estimate_and_each_layouts(tmp_path, tiny_qwen2_dir, fixed):
    """`select`'s estimate from an empty runs directory (nothing provisioned, nothing scored), and
    each layout's from its candidates' local estimates, a cluster's start as its load."""
    from bench.ray_select import CLUSTER_START_SECONDS, bench_estimate, layout_seconds

    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: suite\ndescription: d\nentries:\n  - {task: fewclue_bustm, split: dev, mode: ppl}\n",
        encoding="utf-8",
    )
    extra = ["--models", str(tiny_qwen2_dir), "--device", "cpu", "--dtype", "float32", "--tie-margin", "0.1"]
    data = str(public_data(FIXTURE_DATA))
    select, estimate = bench_estimate(str(suite), extra, str(tmp_path / "cache"), data, ["local", "2x1:1"])
    assert select.lines()[0].startswith("estimate for `make select` here (Test CPU, avx2; float32")
    one = [sum(c.seconds for c in select.costs if c.model == m) + select.loads[m] for m in select.loads]
    assert len(one) == 1 and one[0] > 0
    local, ray = estimate.costs
    assert (local.model, ray.model) == ("local", "2x1:1")
    assert local.seconds == pytest.approx(one[0]) and ray.seconds == pytest.approx(
        layout_seconds("2x1:1", one, 2)
    )
    assert estimate.loads == {"2x1:1": CLUSTER_START_SECONDS}
    assert ray.seconds == pytest.approx(one[0] * 1.84)  # one candidate on one thread of two
