"""Checkpoints chosen by evidence: the paired test against the final step (table-driven), and a
planted better checkpoint picked and merged through the real trainer on a tiny model."""

from __future__ import annotations

import json

import pytest

from core.artifacts import CheckpointScores
from train.checkpoints import choose_checkpoint


def entry(
    hits: int, n: int = 40, *, metric: str = "fact_recall", role: str = "check", first: int = 0
) -> dict:
    """n item scores with items first..first+hits-1 scoring 1 (so two entries can share or differ
    in which items they get right, which is what a paired test sees)."""
    return {
        "metric": metric,
        "role": role,
        "scores": [1.0 if first <= i < first + hits else 0.0 for i in range(n)],
    }


def evaluations(**steps) -> dict[int, CheckpointScores]:
    return {
        int(k[1:]): CheckpointScores(schema_version=1, step=int(k[1:]), adapter="", basis={}, entries=v)
        for k, v in steps.items()
    }


CASES = [
    # (why, evaluations, final step, chosen step)
    (
        "a planted better checkpoint is picked",
        evaluations(s10={"fact": entry(30)}, s20={"fact": entry(10)}),
        20,
        10,
    ),
    (
        "no checkpoint is better: the final is kept",
        evaluations(s10={"fact": entry(10)}, s20={"fact": entry(10)}),
        20,
        20,
    ),
    (
        "an earlier checkpoint that is worse: the final is kept",
        evaluations(s10={"fact": entry(5)}, s20={"fact": entry(30)}),
        20,
        20,
    ),
    (
        "a gain too small to be significant: the final is kept",
        evaluations(s10={"fact": entry(13)}, s20={"fact": entry(10)}),
        20,
        20,
    ),
    (
        "better on a check but worse on the forgetting probe: the final is kept",
        evaluations(
            s10={"fact": entry(30), "probe": entry(5, metric="accuracy", role="forgetting")},
            s20={"fact": entry(10), "probe": entry(30, metric="accuracy", role="forgetting")},
        ),
        20,
        20,
    ),
    (
        "better on one check, significantly worse on another: the final is kept",
        evaluations(
            s10={"fact": entry(30), "style": entry(2, metric="style_accuracy")},
            s20={"fact": entry(10), "style": entry(30, metric="style_accuracy")},
        ),
        20,
        20,
    ),
    (
        "two better checkpoints: the larger gain wins",
        evaluations(s10={"fact": entry(25)}, s20={"fact": entry(35)}, s30={"fact": entry(10)}),
        30,
        20,
    ),
    # 7 items gained, none lost: exact McNemar p = 0.0156, but Holm over 2 steps x 2 checks
    # multiplies the smallest p by 4 = 0.0625: not significant after adjustment
    (
        "significant alone, not after Holm's adjustment: the final is kept",
        evaluations(
            s10={"fact": entry(17, metric="style_accuracy"), "style": entry(10, metric="style_accuracy")},
            s20={"fact": entry(10, metric="style_accuracy"), "style": entry(10, metric="style_accuracy")},
            s30={"fact": entry(10, metric="style_accuracy"), "style": entry(10, metric="style_accuracy")},
        ),
        30,
        30,
    ),
    (
        "lower is better: fewer hallucinated numbers is a gain",
        evaluations(
            s10={"h": entry(2, metric="hallucinated_numbers")},
            s20={"h": entry(30, metric="hallucinated_numbers")},
        ),
        20,
        10,
    ),
    ("only the final step evaluated", evaluations(s20={"fact": entry(10)}), 20, 20),
    ("the final step missing: it is merged all the same", evaluations(s10={"fact": entry(30)}), 20, 20),
]


@pytest.mark.parametrize("why, found, final, chosen", CASES, ids=[c[0] for c in CASES])
def test_the_final_checkpoint_unless_another_is_significantly_better(why, found, final, chosen):
    choice = choose_checkpoint(found, final)
    assert choice["chosen_step"] == chosen, choice["reason"]
    assert choice["final_step"] == final and str(chosen) in choice["reason"]
    if chosen != final:
        assert "significantly better" in choice["reason"] and "Holm p=" in choice["reason"]


def test_the_record_has_curves_and_holm_adjusted_comparisons():
    found = evaluations(
        s10={"fact": entry(30), "probe": entry(20, metric="accuracy", role="forgetting")},
        s20={"fact": entry(10), "probe": entry(20, metric="accuracy", role="forgetting")},
    )
    choice = choose_checkpoint(found, 20)
    assert choice["curves"] == {
        "fact": [{"step": 10, "mean": 0.75}, {"step": 20, "mean": 0.25}],
        "probe": [{"step": 10, "mean": 0.5}, {"step": 20, "mean": 0.5}],
    }
    fact, probe = choice["comparisons"]
    assert (fact["step"], fact["entry"], fact["diff"], fact["test"]) == (10, "fact", 0.5, "paired bootstrap")
    assert fact["p_holm"] == fact["p_value"]  # one check comparison: nothing to adjust
    assert probe["role"] == "forgetting" and "p_holm" not in probe and not probe["significant"]


def planted_setup(tmp_path):
    from eval.task import Item
    from bench.fixtures import build_tiny_qwen2
    from tests.train_fixture import ROWS
    from train.checkpoints import ProbeEntry

    model = build_tiny_qwen2(tmp_path / "model", initializer_range=0.2)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    items = [
        Item(id=f"q{i}", fields={}, user=f"问题{i}", system=None, gold=f"答案是{i * 7}号") for i in range(12)
    ]
    return (
        model,
        data,
        [ProbeEntry("planted-test-gen", None, "test", "gen", "fact_recall", "check", items, True)],
    )


def test_evaluating_checkpoints_leaves_training_as_it_was(tmp_path, monkeypatch):
    """Loading the base for each evaluation draws from torch's RNG; with LoRA dropout on, the
    adapter trained with evaluations is still the one trained without them."""
    from safetensors.torch import load_file

    from tests.train_fixture import recipe
    from train import checkpoints
    from train.trainer import run_training

    model, data, probe = planted_setup(tmp_path)
    monkeypatch.setattr(
        checkpoints,
        "score_entries",
        lambda model, tok, card, entries, data_dir, limit=None: {
            "planted-test-gen": [("out", {"fact_recall": 0.0}) for _ in probe[0].items]
        },
    )
    r = recipe(
        data,
        max_steps=8,
        eval_steps=4,
        save_steps=100,
        sample_steps=100,
        quantization="none",
        lora_dropout=0.3,
    ).model_copy(update={"split": (0.75, 0.25, 0.0)})
    plain = run_training(r, str(model), tmp_path / "plain", tmp_path)
    probed = run_training(r, str(model), tmp_path / "probed", tmp_path, probe=probe)
    assert plain.checkpoint_choice is None and probed.checkpoint_choice["chosen_step"] == 8
    a = load_file(plain.adapter_dir / "adapter_model.safetensors")
    b = load_file(probed.adapter_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_a_planted_better_checkpoint_is_the_one_merged(tmp_path, monkeypatch):
    """Through the real trainer: the evaluation at step 4 is made to recall every fact and the
    final one (step 8) none, so step 4's adapter is chosen, and it differs from the final one."""
    from safetensors.torch import load_file

    from tests.train_fixture import recipe
    from train import checkpoints
    from train.trainer import run_training

    model, data, probe = planted_setup(tmp_path)
    items = probe[0].items
    scored_steps = []

    def planted(model, tokenizer, card, entries, data_dir, limit=None):
        step = len(scored_steps) * 4 + 4
        scored_steps.append(step)
        return {"planted-test-gen": [("out", {"fact_recall": 1.0 if step == 4 else 0.0}) for _ in items]}

    monkeypatch.setattr(checkpoints, "score_entries", planted)
    r = recipe(data, max_steps=8, eval_steps=4, save_steps=4, sample_steps=100, quantization="none")
    r = r.model_copy(update={"split": (0.75, 0.25, 0.0)})
    result = run_training(r, str(model), tmp_path / "run", tmp_path, probe=probe, probe_card=None)
    assert scored_steps == [4, 8]
    assert result.checkpoint_choice["chosen_step"] == 4 and result.checkpoint_choice["final_step"] == 8
    assert result.merge_adapter_dir == tmp_path / "run" / "checkpoint_evals" / "step-4" / "adapter"
    chosen = load_file(result.merge_adapter_dir / "adapter_model.safetensors")
    final = load_file(result.adapter_dir / "adapter_model.safetensors")
    assert chosen.keys() == final.keys() and any(not (chosen[k] == final[k]).all() for k in chosen)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [(rec["step"], rec["checkpoint_eval"]) for rec in log if "checkpoint_eval" in rec] == [
        (4, {"planted-test-gen": 1.0}),
        (8, {"planted-test-gen": 0.0}),
    ]


def test_a_rerun_with_another_merge_base_scores_the_saved_checkpoints_again(tmp_path, monkeypatch):
    """Evaluations record how they merged: rerun (training finished) with `merge_base:
    dequantized`, every evaluated step is scored again from its saved adapter, none retrained;
    a third run with the same recipe scores nothing."""
    from tests.train_fixture import recipe
    from train import checkpoints
    from train.checkpoints import evaluated_steps
    from train.trainer import run_training

    model, data, probe = planted_setup(tmp_path)
    calls = []

    def scorer(model, tokenizer, card, entries, data_dir, limit=None):
        calls.append(model.__class__.__name__)
        return {"planted-test-gen": [("out", {"fact_recall": 0.5}) for _ in probe[0].items]}

    monkeypatch.setattr(checkpoints, "score_entries", scorer)
    r = recipe(data, max_steps=8, eval_steps=4, save_steps=4, sample_steps=100, compute_dtype="fp32")
    r = r.model_copy(update={"split": (0.75, 0.25, 0.0)})
    run_training(r, str(model), tmp_path / "run", tmp_path, probe=probe)
    assert len(calls) == 2
    dq = r.model_copy(update={"merge_base": "dequantized"})
    result = run_training(dq, str(model), tmp_path / "run", tmp_path, probe=probe)
    assert len(calls) == 4 and result.checkpoint_choice["chosen_step"] == 8
    assert {s: rec.basis["merge_base"] for s, rec in evaluated_steps(tmp_path / "run").items()} == {
        4: "dequantized",
        8: "dequantized",
    }
    run_training(dq, str(model), tmp_path / "run", tmp_path, probe=probe)
    assert len(calls) == 4
