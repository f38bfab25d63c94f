"""Cost estimates: the arithmetic on fixed calibrations (table-driven), the batches planned from the
tokenizer against the work the real backend runs on a tiny model, replies' lengths from the store,
and `select --estimate` printing without scoring anything."""

from __future__ import annotations

import pytest

from eval.backends.hf import Batch
from eval.estimate import (
    DECODE_EFFICIENCY,
    FORWARD_EFFICIENCY,
    LAYER_STEP_SECONDS,
    Shape,
    batch_seconds,
    entry_cost,
    fmt_duration,
)
from tests.conftest import FIXED_CALIBRATION as FIXED
from tests.conftest import FIXTURE_DATA, public_data

SHAPE = Shape(body=100_000_000, head=10_000_000, weights=120_000_000, layers=10)


def forward(half_flops: float, gflops: float) -> float:
    """A forward pass of 2 x `half_flops` at the forward's share of `gflops`."""
    return 2 * half_flops / (gflops * 1e9 * FORWARD_EFFICIENCY)


# 10 decoding steps of 16 rows bound by their matrix products at the decoding rate (50 GFLOP/s)
MATMUL_BOUND = 10 * (2 * 1.1e8 * 16 / (50e9 * DECODE_EFFICIENCY) + 10 * LAYER_STEP_SECONDS)
# 10 decoding steps bound by reading the weights (bf16: 2 bytes each) at 2 GB/s
READ_BOUND = 10 * (1.2e8 * 2 / 2e9 + 10 * LAYER_STEP_SECONDS)


@pytest.mark.parametrize(
    "batch, steps, gflops, decode_gflops, bandwidth, expected",
    [
        # a forward pass only: 2 x (body x tokens + head x rows x kept) FLOPs at the forward's share of the rate
        (Batch(16, 1000, 1, 0), 0, 100.0, 50.0, 20.0, forward(1e11 + 1.6e8, 100)),
        # twice the rate, half the time
        (Batch(16, 1000, 1, 0), 0, 200.0, 50.0, 20.0, forward(1e11 + 1.6e8, 200)),
        # then decoding, bound by its matrix products, or by reading the weights
        (Batch(16, 1000, 1, 32), 10, 100.0, 50.0, 1000.0, forward(1e11 + 1.6e8, 100) + MATMUL_BOUND),
        (Batch(1, 10, 1, 32), 10, 1000.0, 1000.0, 2.0, forward(1e9 + 1e7, 1000) + READ_BOUND),
    ],
)
def test_a_batchs_seconds_on_a_fixed_calibration(batch, steps, gflops, decode_gflops, bandwidth, expected):
    assert batch_seconds(batch, steps, SHAPE, gflops, decode_gflops, bandwidth, 2) == pytest.approx(expected)


@pytest.mark.parametrize(
    "config, body, head",
    [
        (
            {"hidden_size": 10, "vocab_size": 100, "num_hidden_layers": 2, "tie_word_embeddings": True},
            9000,
            1000,
        ),
        (
            {"hidden_size": 10, "vocab_size": 100, "num_hidden_layers": 2, "tie_word_embeddings": False},
            8000,
            1000,
        ),
        (
            {"text_config": {"hidden_size": 10, "vocab_size": 100, "num_hidden_layers": 2}},
            9000,
            1000,
        ),  # nested
    ],
)
def test_the_shape_counts_the_embeddings_once_or_twice(config, body, head):
    assert Shape.of(10_000, config) == Shape(body=body, head=head, weights=10_000, layers=2)


@pytest.mark.parametrize("seconds, text", [(12.4, "12 s"), (89, "89 s"), (600, "10 min"), (7200, "2.0 h")])
def test_durations_read_as_a_person_says_them(seconds, text):
    assert fmt_duration(seconds) == text


@pytest.fixture
def tiny_backend(tmp_path, tiny_qwen2_dir):
    from eval.backends import make_backend
    from models.card import find_card
    from models.store import provision

    card = find_card("qwen2.5-1.5b-instruct")
    provision(card, tmp_path / "store", weights=tiny_qwen2_dir)
    return make_backend("hf", card, tmp_path / "store", batch_size=4)


@pytest.mark.parametrize("mode", ["ppl", "gen"])
def test_the_planned_batches_are_the_work_the_backend_runs(tiny_backend, mode):
    """Every token the model's forward passes receive, counted by a hook, equals the planned
    tokens plus one token per row at each decoding step after the first (a random model never
    ends its reply early, so each batch decodes to max_new_tokens)."""
    from eval.runner import backend_requests, compute_outputs, fixed_chunks
    from eval.task import find_task, load_items

    task = find_task("fewclue_bustm").model_copy(
        update={"gen": find_task("fewclue_bustm").gen.model_copy(update={"max_new_tokens": 3, "stop": []})}
    )
    items = load_items(task, "dev", public_data(FIXTURE_DATA))[:10]
    seen = []
    tiny_backend.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    planned = []
    for chunk in fixed_chunks(items, 4):
        planned += tiny_backend.planned_batches(backend_requests(task, mode, chunk))
        compute_outputs(tiny_backend, task, mode, chunk)
    decoded = sum(b.rows * (b.max_new_tokens - 1) for b in planned) if mode == "gen" else 0
    prefixes = sum(
        len(b.prefix) for k, b in enumerate(planned) if b.prefix != (planned[k - 1].prefix if k else ())
    )
    assert [b.max_new_tokens for b in planned] == [3 if mode == "gen" else 0] * len(planned)
    assert prefixes > 0 and sum(seen) == sum(b.tokens for b in planned) + prefixes + decoded
    assert sum(b.rows for b in planned) == 10 * (1 if mode == "gen" else 1)  # bustm's choices are one token


def test_replies_seen_before_bound_the_decoding_and_the_estimate_says_when_they_were_not(
    tiny_backend, tmp_path
):
    from eval.backends.fake import FakeBackend
    from eval.estimate import entry_cost
    from eval.results import open_results
    from eval.runner import run_task
    from eval.task import find_task, load_items

    task = find_task("fewclue_bustm")
    items = load_items(task, "dev", public_data(FIXTURE_DATA))[:12]
    calibration = {
        "matmul_gflops": {"float32": 100.0},
        "decode_gflops": {"float32": 50.0},
        "bandwidth_gbs": 20.0,
    }
    conn = open_results(tmp_path / "runs")
    before = entry_cost(
        tiny_backend, SHAPE, task, "dev", "gen", items, calibration, "float32", chunk_size=4, conn=conn
    )
    assert before.upper_bound and before.steps == 3 * task.gen.max_new_tokens
    run_task(FakeBackend(respond=lambda r: "A", name=tiny_backend.card.name), task, "dev", "gen", items, conn)
    after = entry_cost(
        tiny_backend, SHAPE, task, "test", "gen", items, calibration, "float32", chunk_size=4, conn=conn
    )  # any split of the task counts
    reply = len(tiny_backend.tokenizer("A", add_special_tokens=False).input_ids) + 1
    assert not after.upper_bound and after.steps == 3 * reply and after.seconds < before.seconds
    assert after.tokens == before.tokens and after.items == 12


def test_select_estimate_prints_the_cost_and_scores_nothing(tmp_path, tiny_qwen2_dir, capsys, monkeypatch):
    from models import machine
    from selectune.cli import main

    monkeypatch.setattr(machine, "calibration", lambda cache_dir, again=False: FIXED)
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: suite\ndescription: d\nentries:\n  - {task: fewclue_bustm, split: dev, mode: gen}\n"
        "  - {task: fewclue_bustm, split: dev, mode: ppl}\n",
        encoding="utf-8",
    )
    runs = tmp_path / "runs"
    args = (
        f"--runs-dir {runs} --cache-dir {tmp_path / 'cache'} --data-dir "
        f"{public_data(FIXTURE_DATA)} select --models {tiny_qwen2_dir} --suite {suite} "
        "--device cpu --dtype float32 --estimate"
    ).split()
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == (
        "estimate for `make select` here (Test CPU, avx2; float32 at 100 GFLOP/s, measured by "
        "`make machine`):"
    )
    entries = [line.strip().split(":")[0] for line in lines if line.startswith("    ")]
    assert entries == ["fewclue_bustm-dev gen", "fewclue_bustm-dev ppl"]
    assert "at most" in lines[2] and "at most" not in lines[3] and lines[4].startswith("  total: at most ")
    assert not (runs / "selection.json").exists()
    # scored, then asked again: nothing is left, and the estimate says so
    assert main([*args[:-1]]) == 0
    capsys.readouterr()
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "  nothing to score: every item is in the results store"
    ]


def test_select_estimate_says_when_it_cannot_estimate(tmp_path, tiny_qwen2_dir, capsys):
    """On the Ray executor (or a GPU) the CPU cost model does not apply: one line says so."""
    from selectune.cli import main

    assert (
        main(
            (
                f"--runs-dir {tmp_path / 'runs'} --cache-dir {tmp_path / 'cache'} --data-dir "
                f"{public_data(FIXTURE_DATA)} select --models {tiny_qwen2_dir} --executor ray "
                "--estimate"
            ).split()
        )
        == 0
    )
    assert capsys.readouterr().out.splitlines() == [
        "select: no estimate: the cost model is for scoring on this machine's CPU with the local executor "
        "(docs/machine.md)"
    ]
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("engine, modes", [("vllm", ["gen", "ppl"]), ("transformers", ["gen"])])
def test_rescore_estimate_prints_both_sides_and_starts_no_server(
    tmp_path, tiny_qwen2_dir, monkeypatch, capsys, engine, modes
):
    """Through vLLM each suite entry keeps its mode (prompt logprobs), through `transformers serve`
    every task is re-scored in `gen`; the local side is counted as select counts it."""
    from eval.estimate import FORWARD_EFFICIENCY, Shape
    from models import machine
    from models.card import find_card
    from selectune.cli import main

    monkeypatch.setattr(machine, "calibration", lambda cache_dir, again=False: FIXED)
    monkeypatch.setenv("VLLM_PYTHON", str(tmp_path / "no-vllm" / "python"))
    runs = tmp_path / "runs"
    assert (
        main(
            (
                f"--runs-dir {runs} --cache-dir {tmp_path / 'cache'} --data-dir "
                f"{public_data(FIXTURE_DATA)} rescore --checkpoint {tiny_qwen2_dir} --model "
                f"qwen2.5-coder-0.5b-instruct --engine {engine} --tasks fewclue_bustm --estimate"
            ).split()
        )
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("estimate for `make rescore` here (Test CPU, avx2; float32 at 100 GFLOP/s")
    assert lines[1] == f"  served ({engine}): load {'2 min' if engine == 'vllm' else '20 s'}"
    assert f"  note: {engine}'s start {lines[1].split('load ')[1]}, a constant" in "\n".join(lines)
    entries = [line.strip().split(":")[0] for line in lines if line.startswith("    ")]
    assert entries == [
        *(f"fewclue_bustm-dev {m}" for m in modes),
        "serving figures",
        *(f"fewclue_bustm-dev {m}" for m in modes),
    ]
    if engine == "vllm":  # a request a choice, the head at every position
        import json

        (ppl,) = [line for line in lines if "logprobs at every position" in line]
        tokens = int(ppl.split(" items, ")[1].split(" tokens")[0])
        config = json.loads((tiny_qwen2_dir / "config.json").read_text())
        shape = Shape.of(find_card("qwen2.5-coder-0.5b-instruct").parameters, config)
        seconds = 2 * (shape.body + shape.head) * tokens / (100e9 * FORWARD_EFFICIENCY)
        assert ppl.endswith(f": {fmt_duration(seconds)}")
    assert not runs.exists() or not any(runs.rglob("*.json"))


def test_a_servers_start_is_counted_as_its_last_start_here(tmp_path):
    """The engine's constant until a start of that engine and model was timed on this machine,
    then that start; another model or engine keeps its own; an unreadable record is no record."""
    from models.machine import last_server_start, record_server_start
    from serve.estimate import SERVER_START_SECONDS, server_start

    cache = tmp_path / "cache"
    assert last_server_start(cache, "vllm", "m") is None
    seconds, source = server_start(cache, "vllm", "m")
    assert seconds == SERVER_START_SECONDS["vllm"] and "a constant: no start of m timed here yet" in source
    record_server_start(cache, "vllm", "m", 236.44)
    record_server_start(cache, "transformers", "m", 9.0)
    cases = [
        (("vllm", "m"), 236.4, "as its last start of m here took"),
        (("vllm", "other"), SERVER_START_SECONDS["vllm"], "a constant"),
        (("transformers", "m"), 9.0, "as its last start"),
        (("lmdeploy", "m"), 0.0, "a constant"),
    ]
    for (engine, model), expected, said in cases:
        seconds, source = server_start(cache, engine, model)
        assert seconds == expected and said in source, (engine, model, source)
    record_server_start(cache, "vllm", "m", 100.0)  # the last start counts
    assert server_start(cache, "vllm", "m")[0] == 100.0
    (path,) = (cache / "machine").glob("*.measured.json")
    path.write_text("{not json")
    assert server_start(cache, "vllm", "m")[0] == SERVER_START_SECONDS["vllm"]


@pytest.mark.parametrize(
    "max_calls, calls",
    [
        (
            None,
            {"expand": 6, "answer": 48, "follow-up": 28},
        ),  # 6 rounds of 8 items; 30% get a follow-up and its answer
        (150, {"expand": 6, "answer": 48, "follow-up": 28}),  # the shipped budget is not reached
        (20, {"expand": 6, "answer": 14, "follow-up": 0}),  # the budget stops the run in the answer stage
    ],
)
def test_data_synth_counts_the_calls_each_stage_can_make(max_calls, calls):
    from synth.estimate import stage_calls
    from synth.recipe import load_synth_recipe
    from tests.conftest import REPO

    assert stage_calls(load_synth_recipe(REPO / "synth" / "riddles.yaml"), max_calls) == calls


def test_data_synth_estimate_prints_every_stage_and_asks_nothing(
    tmp_path, tiny_qwen2_dir, monkeypatch, capsys, shared_data
):
    from models import machine
    from models.card import find_card
    from models.store import provision
    from selectune.cli import main
    from tests.conftest import REPO

    monkeypatch.setattr(machine, "calibration", lambda cache_dir, again=False: FIXED)
    provision(find_card("qwen2.5-1.5b-instruct"), tmp_path / "cache" / "models", weights=tiny_qwen2_dir)
    args = (
        f"--runs-dir {tmp_path / 'runs'} --cache-dir {tmp_path / 'cache'} --data-dir "
        f"{shared_data} data-synth --recipe {REPO / 'synth' / 'riddles.yaml'} --estimate"
    ).split()
    assert (
        main([*args, "--teacher", "qwen2.5-1.5b-instruct"]) == 0
    )  # a hub card's weights are a tiny model here
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("estimate for `make data-synth` (riddles.yaml) here (Test CPU, avx2; float32")
    stages = [line.strip().split(" calls")[0] for line in lines if line.startswith("    ")]
    assert stages == ["expand: 6", "answer: 48", "follow-up: 28"]
    assert "at most 700 reply tokens" in lines[2] and lines[-3].startswith("  total: at most ")
    assert not (tmp_path / "runs" / "synth").exists()
    # a teacher elsewhere: its time is its own, said in one note
    assert main([*args, "--base-url", "http://127.0.0.1:9", "--teacher-model", "t"]) == 0
    assert capsys.readouterr().out.splitlines()[1] == (
        "  note: the teacher is a server elsewhere: its time is its own (at most 82 calls: expand 6, answer 48, "
        "follow-up 28)"
    )


def test_data_synth_estimate_counts_the_answer_prompt_with_the_context_the_run_sends(
    tmp_path, tiny_qwen2_dir, monkeypatch, capsys, shared_data
):
    """With `answer.context_top_k` the run sends a question's k closest statements, not the whole
    context (a quarter of the prompt on fact.yaml): the estimate renders the prompt the same way."""
    from transformers import AutoTokenizer

    from eval.estimate import prompt_tokens
    from models import machine
    from models.card import find_card
    from models.store import provision
    from selectune.cli import main
    from synth.inputs import context_for, load_context, load_seeds, prompt_env
    from synth.recipe import load_synth_recipe
    from tests.conftest import REPO

    monkeypatch.setattr(machine, "calibration", lambda cache_dir, again=False: FIXED)
    provision(find_card("qwen2.5-1.5b-instruct"), tmp_path / "cache" / "models", weights=tiny_qwen2_dir)
    recipe = load_synth_recipe(REPO / "synth" / "fact.yaml")
    args = (
        f"--runs-dir {tmp_path / 'runs'} --cache-dir {tmp_path / 'cache'} --data-dir {shared_data} "
        f"data-synth --recipe {recipe.path} --teacher qwen2.5-1.5b-instruct --estimate"
    ).split()
    assert main(args) == 0
    answer = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("answer:"))
    counted = int(answer.split("calls of about ")[1].split()[0])

    tokenizer, env = AutoTokenizer.from_pretrained(tiny_qwen2_dir), prompt_env()
    seed, context = load_seeds(recipe, shared_data)[0], load_context(recipe)

    def tokens(context_sent):
        text = env.get_template(recipe.answer.template).render(
            examples=load_seeds(recipe, shared_data)[: recipe.answer.shots],
            question=seed["question"],
            context=context_sent,
            style=seed.get("style"),
            step_by_step=recipe.answer.step_by_step,
            solution=seed.get("answer"),
        )
        return prompt_tokens(tokenizer, [{"role": "user", "content": text.strip()}])

    assert recipe.answer.context_top_k is not None
    assert counted == tokens(context_for(recipe, context, seed["question"])) < tokens(context) / 2


def test_bench_eval_estimates_both_sides_before_it_runs(tmp_path, tiny_qwen2_dir, monkeypatch):
    """`make bench-eval` prints its cost first: our `ppl` side as select counts it, lm-eval's as the
    work it must do, a pass a choice with the head at every position, which costs more."""
    import json

    from bench.eval_speed import bench_estimate
    from core.settings import load_settings
    from eval.task import find_task, load_items
    from models import machine
    from models.card import find_card
    from models.store import provision

    monkeypatch.setattr(machine, "calibration", lambda cache_dir, again=False: FIXED)
    card, task = find_card("qwen2.5-1.5b-instruct"), find_task("fewclue_bustm")
    provision(card, tmp_path / "cache" / "models", weights=tiny_qwen2_dir)  # a hub card: the tiny weights
    settings = load_settings(cache_dir=str(tmp_path / "cache"), data_dir=str(public_data(FIXTURE_DATA)))
    items = load_items(task, "dev", settings.resolved_data_dir)[:8]
    estimate = bench_estimate(settings, card, task, "dev", items, 4, tiny_qwen2_dir)
    ours, theirs = estimate.costs
    assert (ours.model, theirs.model) == ("selectune", "lm-eval") and ours.items == 8
    tokens = int(theirs.detail.split(" items, ")[1].split(" tokens")[0])
    shape = Shape.of(card.parameters, json.loads((tiny_qwen2_dir / "config.json").read_text()))
    assert theirs.seconds == pytest.approx(
        2 * (shape.body + shape.head) * tokens / (100e9 * FORWARD_EFFICIENCY)
    )
    assert theirs.seconds > ours.seconds
    assert estimate.lines()[0].startswith("estimate for `make bench-eval` here (Test CPU, avx2")


def test_prompt_tokens_counts_the_rendered_chat_as_sent(tiny_qwen2_dir):
    """A chat's tokens as the template renders it, with the assistant's turn opened (transformers'
    tokenising `apply_chat_template` returns a mapping, whose len is its 2 keys)."""
    from transformers import AutoTokenizer

    from eval.estimate import prompt_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen2_dir)
    messages = [{"role": "user", "content": "问题" * 20}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    assert prompt_tokens(tokenizer, messages) == len(tokenizer(text, add_special_tokens=False).input_ids) > 40


def test_bench_train_estimates_each_run_before_it_runs(tmp_path, tiny_qwen2_dir, monkeypatch):
    """`make bench-train` prints each run's cost first: its training tokens at the share of the
    rate `make train`'s estimate uses, trl's at the share measured for it (slower), `compact` at
    the slowdown measured for it; every run loads the model in its own process."""
    import json

    from bench.train_speed import COMPACT_SLOWDOWN, TRL_EFFICIENCY, bench_estimate, bench_recipe, runs
    from core.settings import load_settings
    from models import machine
    from models.card import find_card
    from train.data import Conversation
    from train.estimate import train_efficiency
    from train.trainer import compute_dtype

    monkeypatch.setattr(machine, "calibration", lambda cache_dir, again=False: FIXED)
    settings = load_settings(cache_dir=str(tmp_path / "cache"))
    card = find_card("qwen2.5-coder-0.5b-instruct")

    class Args:
        batch_size = grad_accum = cpu_allocator = compute_dtype = None

    recipe = bench_recipe(tmp_path / "unused.jsonl", Args)
    convs = [
        Conversation(
            [{"role": "user", "content": "问题" * n}, {"role": "assistant", "content": "答" * n}], "t:1"
        )
        for n in (3, 7)
    ]
    plan = runs(["compact", "glibc"])
    estimate = bench_estimate(settings, card, tiny_qwen2_dir, recipe, convs, plan, 2)
    assert [(c.model, c.entry) for c in estimate.costs] == [
        (label, f"round {n}") for n in (1, 2) for label, _, _ in plan
    ]
    tokens = int(estimate.costs[0].detail.split(" tokens")[0])
    assert 40 < tokens < 300  # the two conversations in the chat template
    shape = Shape.of(card.parameters, json.loads((tiny_qwen2_dir / "config.json").read_text()))
    dtype = str(compute_dtype(recipe)).removeprefix("torch.")  # bf16 where the CPU has it: the fp32 rate
    share, trl_share = train_efficiency(dtype), TRL_EFFICIENCY[dtype]
    assert share > trl_share
    glibc = 4 * shape.body * tokens / (FIXED["matmul_gflops"]["float32"] * 1e9 * share)
    compact, ours, trl = (c.seconds for c in estimate.costs[:3])
    assert ours == pytest.approx(glibc) and compact == pytest.approx(glibc * COMPACT_SLOWDOWN)
    assert trl == pytest.approx(glibc * share / trl_share)
    load = estimate.loads["trl"]
    assert load > 0 and estimate.costs[5].seconds == pytest.approx(trl + load)  # round 2 loads again
    assert estimate.lines()[0].startswith("estimate for `make bench-train` here (Test CPU, avx2; ")


@pytest.mark.parametrize(
    "learned, factor",
    [
        ({}, 1.0),  # nothing measured here
        ({"ppl float32": {"factor": 0.69, "runs": 4, "date": "d"}}, 0.69),
        ({"ppl bfloat16": {"factor": 0.69, "runs": 4, "date": "d"}}, 1.0),  # another dtype's
        ({"gen float32": {"factor": 0.5, "runs": 4, "date": "d"}}, 1.0),  # another mode's
        (
            {"ppl float32": {"factor": 10.0, "runs": 2, "date": "d"}},
            3.0,
        ),  # clipped: something else was measured
        ({"ppl float32": {"factor": 0.01, "runs": 2, "date": "d"}}, 1 / 3),
        ({"ppl float32": {"factor": "x"}}, 1.0),  # unreadable: none
    ],
)
def test_what_whole_runs_measured_here_scales_the_cost_model(tiny_backend, learned, factor):
    from eval.estimate import LEARNED_BOUNDS, scoring_factor
    from eval.task import find_task, load_items

    assert LEARNED_BOUNDS == (1 / 3, 3.0)
    assert scoring_factor({**FIXED, "learned": learned}, "ppl", "float32") == pytest.approx(factor)
    task = find_task("fewclue_bustm")
    items = load_items(task, "dev", public_data(FIXTURE_DATA))[:6]
    plain, corrected = (
        entry_cost(tiny_backend, SHAPE, task, "dev", "ppl", items, calibration, "float32", chunk_size=4)
        for calibration in (FIXED, {**FIXED, "learned": learned})
    )
    assert corrected.seconds == pytest.approx(plain.seconds * factor)
    from eval.learned import learned_note

    note = learned_note({**FIXED, "learned": learned}, {"ppl float32"})
    assert bool(note) == (factor != 1.0)  # a note only where a factor was used
    if note:
        assert f"ppl float32 x{factor:.2f} (" in note[0]


def test_select_keeps_what_its_whole_runs_measured_and_the_next_estimate_uses_it(
    tmp_path, tiny_qwen2_dir, capsys, monkeypatch
):
    """After scoring, measured over estimated per mode and dtype is kept beside the calibration
    (each model's first run, which loaded it, left out; two runs at least); the next estimate of
    that mode says it used it."""
    from eval.learned import MIN_RUNS
    from models import machine
    from selectune.cli import main

    monkeypatch.setattr(
        machine, "calibration_path", lambda cache_dir, identity: tmp_path / "calibration.json"
    )
    monkeypatch.setattr(
        machine, "measure", lambda cache_dir: {**FIXED, "measured": "2026-12-07", "seconds": 1.0}
    )
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: suite\ndescription: d\nentries:\n  - {task: fewclue_bustm, split: dev, mode: gen}\n"
        "  - {task: fewclue_bustm, split: dev, mode: ppl}\n  - {task: fewclue_ocnli_fc, split: dev, mode: ppl}\n",
        encoding="utf-8",
    )
    cache = tmp_path / "cache"
    args = (
        f"--runs-dir {tmp_path / 'runs'} --cache-dir {cache} --data-dir {public_data(FIXTURE_DATA)} select "
        f"--models {tiny_qwen2_dir} --suite {suite} --device cpu --dtype float32"
    ).split()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "corrected by what whole runs measured" not in printed  # nothing measured before
    (kept,) = [line for line in printed.splitlines() if line.startswith("select: measured over")]
    scoring = machine.measured_here(cache)["factors"]
    assert list(scoring) == ["ppl float32"] and scoring["ppl float32"]["runs"] == MIN_RUNS == 2
    assert kept.endswith(f"ppl float32 x{scoring['ppl float32']['factor']:.2f}")
    assert machine.calibration(cache)["learned"] == scoring
    other = [a if not a.startswith(str(tmp_path / "runs")) else str(tmp_path / "runs2") for a in args]
    assert main([*other, "--estimate"]) == 0
    (note,) = [
        line
        for line in capsys.readouterr().out.splitlines()
        if "corrected by what whole runs measured" in line
    ]
    assert "ppl float32 x" in note and "(2 runs, " in note and "gen float32" not in note


def test_the_whole_commands_bar_stops_at_its_total():
    """More work than estimated (a run's follow-ups drawn above their fraction) leaves the bar at
    100%, where tqdm past its total would draw 0% and no time left."""
    from eval.estimate import Estimate, StageCost
    from eval.progress import OverallBar

    estimate = Estimate(
        "job", "cpu", [StageCost("m", "answer", "2 calls", 10.0, items=2)], {"m": 5.0}, [], []
    )
    bar = OverallBar(estimate)
    for seconds, n in [(5.0, 5.0), (5.0, 10.0), (5.0, 15.0), (5.0, 15.0), (0.0, 15.0)]:
        bar.update(seconds)
        assert bar.n == n
    assert "100% of the estimated work" in str(bar.bar)
    bar.close()
