"""The thin trainer on a tiny random-weight model (train/trainer.py): loss falls, the quantised
layers are the ones named, the compute dtype, accumulation, the epoch schedule, the recipes, and
`make train` end to end."""

from __future__ import annotations

import json
import textwrap

import pytest

from core.errors import UserError
from tests.conftest import REPO
from tests.train_fixture import adapter_weights, log_records, losses, recipe, short_recipe


@pytest.mark.parametrize("quantization", ["nf4", "int8", "none"])
def test_loss_falls_on_a_memorisable_set(tmp_path, setup, quantization):
    from train.trainer import run_training

    model, data = setup
    result = run_training(recipe(data, quantization=quantization), str(model), tmp_path / "run", tmp_path)
    curve = [loss for _, loss in losses(tmp_path / "run")]
    assert result.steps == 40 and len(curve) == 40
    assert curve[-1] < 0.5 * curve[0], curve
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    samples = [r for r in log if "sample" in r]
    assert [s["step"] for s in samples] == [20, 40] and all("learning_rate" in r for r in log if "loss" in r)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize(
    "quantization,layer", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt"), ("none", None)]
)
def test_quantization_builds_the_layers_it_names(setup, quantization, layer):
    from train.trainer import load_for_training

    model, data = setup
    m = load_for_training(recipe(data, quantization=quantization), str(model), False)
    kinds = {type(mod).__name__ for mod in m.modules()}
    assert (layer in kinds) if layer else not kinds & {"Linear4bit", "Linear8bitLt"}, kinds


@pytest.mark.parametrize(
    "avx512_bf16,amx,explicit,expected",
    [
        (True, False, "auto", "bfloat16"),
        (False, True, "auto", "bfloat16"),
        (False, False, "auto", "float32"),
        (True, False, "fp32", "float32"),
        (False, False, "bf16", "bfloat16"),
    ],
)
def test_auto_compute_dtype_is_bf16_only_on_cpus_that_multiply_it(
    tmp_path, setup, monkeypatch, avx512_bf16, amx, explicit, expected
):
    import torch

    from train.trainer import compute_dtype, load_for_training

    for cap in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # the flags are under test, not a cap
        monkeypatch.delenv(cap, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    model, data = setup
    r = recipe(data, compute_dtype=explicit)
    assert compute_dtype(r) == getattr(torch, expected)
    if explicit == "auto":
        import bitsandbytes as bnb

        layers = [
            m for m in load_for_training(r, str(model), False).modules() if isinstance(m, bnb.nn.Linear4bit)
        ]
        assert layers and {m.compute_dtype for m in layers} == {getattr(torch, expected)}


def test_accumulation_and_checkpointing_make_the_same_update(tmp_path, setup):
    """Batch 4 in one step, in two accumulated micro-batches of 2, and with every layer or every
    second layer recomputed: the same examples, so the same gradients and the same adapter."""
    import torch

    from train.trainer import run_training

    model, data = setup
    runs = {
        "plain": {},
        "accum": {"batch_size": 2, "grad_accum": 2},
        "ckpt": {"gradient_checkpointing": True},
        "ckpt2": {"gradient_checkpointing": True, "checkpoint_every_n_layers": 2},
    }
    weights = {}
    for name, training in runs.items():
        # fp32 on a GPU too (its default is bf16), where accumulation order changes the last bits
        r = short_recipe(data, **training)
        weights[name] = adapter_weights(run_training(r, str(model), tmp_path / name, tmp_path).adapter_dir)
    from train.trainer import load_for_training

    for every, expected in ((1, [True] * 2), (2, [True, False])):  # the tiny model has 2 layers
        m = load_for_training(
            recipe(data, quantization="none", gradient_checkpointing=True, checkpoint_every_n_layers=every),
            str(model),
            False,
        )
        assert [layer.gradient_checkpointing for layer in m.base_model.model.model.layers] == expected
    # cuBLAS picks other kernels for other batch shapes: on a GPU one element in 256 was 5e-5 off
    tol = {"rtol": 1e-3, "atol": 1e-4} if torch.cuda.is_available() else {"rtol": 1e-4, "atol": 1e-5}
    for name in ("accum", "ckpt", "ckpt2"):
        assert weights[name].keys() == weights["plain"].keys()
        for key, value in weights["plain"].items():
            torch.testing.assert_close(
                weights[name][key], value, **tol, msg=lambda m, name=name, key=key: f"{name}: {key}: {m}"
            )
    # the test can fail: a different learning rate gives another adapter
    other = run_training(
        short_recipe(data, learning_rate=2e-2),
        str(model),
        tmp_path / "other",
        tmp_path,
    )
    assert any(
        not torch.allclose(adapter_weights(other.adapter_dir)[k], v, **tol)
        for k, v in weights["plain"].items()
    )


def test_shipped_recipes_load_and_bad_keys_are_one_line(tmp_path):
    from train.recipe import TRAIN_DIR, load_recipe

    recipes = sorted(TRAIN_DIR.glob("*.yaml"))
    assert {p.stem for p in recipes} >= {"default", "quick"}
    for path in recipes:
        assert load_recipe(path).name == path.stem
        assert path.read_text().startswith("#") and "selectune train" in path.read_text().split("\n\n")[0]
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ndata: [{task: fact}]\ntraining: {epochs: 1, lr: 0.1}\n")
    with pytest.raises(UserError) as err:
        load_recipe(bad)
    assert str(err.value).startswith(f"{bad}: unknown key 'training.lr' (expected one of ['batch_size', ")
    bad.write_text("name: bad\ndata: [{task: fact, path: x.jsonl}]\n")
    with pytest.raises(UserError, match="exactly one of 'task', 'path' or 'synth'"):
        load_recipe(bad)
    for value in ("weekly", "0"):
        bad.write_text(f"name: bad\ndata: [{{task: fact}}]\ntraining: {{eval_steps: {value}}}\n")
        with pytest.raises(UserError, match="training.eval_steps"):
            load_recipe(bad)


def test_epoch_schedule_evaluates_and_samples_once_an_epoch(tmp_path, setup):
    """`epoch` puts val loss and samples at each epoch's end; the final val loss is the one
    Trainer logged at the last step, not a second evaluation of the same weights."""
    from train.trainer import run_training

    model, data = setup
    r = recipe(
        data,
        quantization="none",
        max_steps=None,
        epochs=2,
        batch_size=2,
        eval_steps="epoch",
        sample_steps="epoch",
        save_steps=1000,
        cpu_allocator="glibc",
    )
    r = r.model_copy(update={"split": (0.75, 0.25, 0.0)})
    result = run_training(r, str(model), tmp_path / "run", tmp_path)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    evals = [rec for rec in log if "eval_loss" in rec]
    assert result.steps == 6 and [rec["step"] for rec in evals] == [3, 6]
    assert result.final_val_loss == evals[-1]["eval_loss"]
    assert [rec["step"] for rec in log if "sample" in rec] == [3, 6]


def test_train_command_end_to_end(tmp_path, setup, capsys):
    """`selectune train` on a hub card given a tiny checkpoint: trains, merges with parity, scores
    the fact task on base and merged, and writes summary.json last."""
    from models.card import find_card
    from models.store import provision
    from selectune.cli import main

    model, _ = setup
    provision(find_card("qwen2.5-1.5b-instruct"), tmp_path / "cache" / "models", weights=model)
    recipe_path = tmp_path / "e2e.yaml"
    recipe_path.write_text(
        textwrap.dedent("""\
        # python -m selectune train --recipe e2e.yaml
        name: e2e
        data: [{task: fact, split: train}]
        max_length: 1024
        lora: {r: 4, alpha: 8, dropout: 0.0}
        training: {max_steps: 4, batch_size: 8, eval_steps: 2, save_steps: 2, sample_steps: 2,
                   gradient_checkpointing: false}
        samples: {tasks: [{task: fact, split: test, count: 1}], max_new_tokens: 4}
        parity: {items: 2, max_new_tokens: 4, task_items: 3}
        checkpoint_selection: {max_items: 40}
        checks: [{task: fact, split: test}, {task: style, split: test, metric: chrf}]
    """)
    )
    args = ["--runs-dir", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    assert main([*args, "train", "--recipe", str(recipe_path)]) == 2  # no selection.json, no model
    assert "run `make select` first" in capsys.readouterr().err
    assert main([*args, "train", "--recipe", str(recipe_path), "--model", "qwen2.5-1.5b-instruct"]) == 0
    run = tmp_path / "runs" / "train" / "e2e-qwen2.5-1.5b-instruct"
    summary = json.loads((run / "summary.json").read_text())
    fact, style = summary["checks"]
    assert summary["steps"] == 4 and summary["parity"]["passed"] and summary["schema_version"] == 3
    assert (fact["task"], fact["metric"], fact["items"]) == ("fact", "fact_recall", 60)
    assert (style["task"], style["metric"], style["items"]) == ("style", "chrf", 36)
    assert {"diff", "ci95", "p_value", "verdict", "base", "merged"} <= set(fact)
    assert {p.name for p in (run / "data").iterdir()} == {"train.jsonl", "val.jsonl", "test.jsonl"}
    written = json.loads((run / "merged" / "provenance.json").read_text())
    assert written["base_card"] == "qwen2.5-1.5b-instruct" and len(written["data_sha256"]) == 64
    samples = [
        json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines() if '"sample"' in line
    ]
    assert [s["step"] for s in samples] == [2, 4]
    assert summary["resumed_from"] is None and summary["contamination"]["duplicates"] == 0
    # the checks scored at both evaluations (6 of each split, seeded), the final step then chosen
    choice = summary["checkpoint"]
    assert choice["final_step"] == 4 and choice["chosen_step"] in (2, 4) and choice["reason"]
    assert sorted(choice["curves"]) == ["fact-test-gen", "style-test-gen"]
    assert [p["step"] for p in choice["curves"]["fact-test-gen"]] == [2, 4]
    assert {c["step"] for c in choice["comparisons"]} == {2}
    assert [r["step"] for r in log_records(run) if "checkpoint_eval" in r] == [2, 4]
    scores = json.loads((run / "checkpoint_evals" / "step-2" / "scores.json").read_text())
    assert [len(scores["entries"][k]["scores"]) for k in ("fact-test-gen", "style-test-gen")] == [40, 36]
    assert written["checkpoint_step"] == choice["chosen_step"]
    # the style check's 36 items were all scored at the merged step's evaluation, so the merged
    # side is read from there; scoring the written merged checkpoint gives the same
    assert [c["merged_scored_at"] for c in (fact, style)] == [
        "merged checkpoint",
        f"checkpoint evaluation of step {choice['chosen_step']}",
    ]
    from core.settings import load_settings
    from eval.results import open_results
    from train.checks import check_comparison
    from train.recipe import CheckSpec

    settings = load_settings(runs_dir=str(tmp_path / "runs"), cache_dir=str(tmp_path / "cache"))
    card = find_card("qwen2.5-1.5b-instruct")
    merged_card = card.model_copy(
        update={"name": summary["merged_model"], "chat_template": "tokenizer", "add_bos": False}
    )
    # the reused side is stored as the merged model's run (`make rescore` finds it there)
    from eval.results import newest_model_run, run_items

    conn = open_results(tmp_path / "runs")
    stored = run_items(conn, newest_model_run(conn, summary["merged_model"], "style", "gen"))
    chosen = json.loads(
        (run / "checkpoint_evals" / f"step-{choice['chosen_step']}" / "scores.json").read_text()
    )
    by_id = dict(
        zip(chosen["entries"]["style-test-gen"]["ids"], chosen["entries"]["style-test-gen"]["outputs"])
    )
    assert {r["item_id"]: r["output"] for r in stored} == by_id
    # a store without it scores the written merged checkpoint: the same
    recomputed = check_comparison(
        CheckSpec(task="style", metric="chrf"),
        REPO / "tasks",
        card,
        merged_card,
        run / "merged",
        settings,
        open_results(tmp_path / "fresh-store"),
    )
    assert recomputed["merged_scored_at"] == "merged checkpoint"
    assert (recomputed["merged"], recomputed["diff"]) == (style["merged"], style["diff"])
    # three-way parity on the checks: fp32 base + adapter and its merge give the same outputs
    tasks = summary["parity"]["three_way"]["tasks"]
    assert set(tasks) == {"trained_vs_fp32_adapter", "trained_vs_merged_fp32", "fp32_adapter_vs_merged_fp32"}
    assert [(r["entry"], r["items"], r["same_outputs"]) for r in tasks["fp32_adapter_vs_merged_fp32"]] == [
        ("fact-test-gen", 3, 3),
        ("style-test-gen", 3, 3),
    ]
    # run again (as after a kill once training had finished): it resumes from the last checkpoint,
    # trains no further step (Trainer alone would run a fifth) and writes the same adapter
    first = adapter_weights(run / "adapter")
    assert main([*args, "train", "--recipe", str(recipe_path), "--model", "qwen2.5-1.5b-instruct"]) == 0
    again = json.loads((run / "summary.json").read_text())
    assert again["resumed_from"].endswith("checkpoint-4") and again["steps"] == 4
    assert again["checkpoint"] == summary["checkpoint"]  # the evaluations were kept, not repeated
    assert adapter_weights(run / "adapter").keys() == first.keys()
    assert all(bool((adapter_weights(run / "adapter")[k] == v).all()) for k, v in first.items())
