"""The merge (train/merge.py): the merged model matches base + adapter, the parity check catches
a merge that drops the adapter, a trained head merges, and three-way parity."""

from __future__ import annotations

import json

import pytest

from core.errors import UserError
from tests.train_fixture import adapter_weights, losses, merge, provenance, recipe


def test_merge_matches_base_plus_adapter_and_loads(tmp_path, setup):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from train.trainer import run_training

    model, data = setup
    result = run_training(recipe(data, max_steps=10), str(model), tmp_path / "run", tmp_path)
    parity = merge(model, result, tmp_path / "run" / "merged", provenance=provenance(base_card="tiny"))
    assert parity.passed and parity.same_replies == 4 and parity.max_abs_logit_diff < 1e-4
    merged = tmp_path / "run" / "merged"
    written = json.loads((merged / "provenance.json").read_text())
    assert (
        written["base_card"] == "tiny"
        and written["parity"]["passed"] is True
        and written["schema_version"] == 1
    )
    assert list(merged.glob("*.safetensors")) and not list(merged.glob("*.bin"))
    AutoModelForCausalLM.from_pretrained(merged)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), result.adapter_dir)
    # A tolerance nothing can meet (negative) fails the check and leaves no merged directory behind.
    with pytest.raises(UserError, match="merge parity failed"):
        merge(model, result, tmp_path / "run" / "merged2", tolerance=-1.0)
    assert not (tmp_path / "run" / "merged2").exists()


def test_merge_parity_catches_a_merge_that_drops_the_adapter(tmp_path, setup, monkeypatch):
    """The check compares base+adapter with what merging made of the same model: a "merge" that
    only unloads the adapter changes the replies' logits and is refused."""
    from peft.tuners.tuners_utils import BaseTuner

    from train.trainer import run_training

    model, data = setup
    result = run_training(recipe(data, max_steps=10), str(model), tmp_path / "run", tmp_path)
    monkeypatch.setattr(BaseTuner, "merge_and_unload", BaseTuner.unload)
    with pytest.raises(UserError, match="merge parity failed"):
        merge(model, result, tmp_path / "run" / "merged", 1, max_new_tokens=4)
    assert not (tmp_path / "run" / "merged").exists()


def test_modules_to_save_trains_the_head_and_merges(tmp_path, setup):
    from train.trainer import run_training

    model, data = setup
    r = recipe(data, quantization="none", max_steps=10)
    r = r.model_copy(update={"lora": r.lora.model_copy(update={"modules_to_save": ["lm_head"]})})
    result = run_training(r, str(model), tmp_path / "run", tmp_path)
    saved = adapter_weights(result.adapter_dir)
    assert any("lm_head" in k for k in saved), sorted(saved)[:5]
    curve = [loss for _, loss in losses(tmp_path / "run")]
    assert curve[-1] < 0.5 * curve[0]
    parity = merge(model, result, tmp_path / "run" / "merged", 3, max_new_tokens=6)
    assert parity.passed and parity.same_replies == 3


def test_three_way_parity_measures_what_training_optimised_against_both_merges(tmp_path, setup):
    """NF4 base + adapter (what training optimised) against fp32 base + adapter and the merged
    model, and the merge into the dequantised NF4 base, which is nearer to it than the fp32 merge."""
    import torch

    from train.trainer import run_training

    model, data = setup
    r = recipe(data, max_steps=10, compute_dtype="fp32")
    result = run_training(r, str(model), tmp_path / "run", tmp_path)
    parity = merge(
        model, result, tmp_path / "run" / "merged", quantization="nf4", compute_dtype=torch.float32
    )
    three = parity.three_way
    assert parity.passed and three["merge_base"] == "fp32" and "trained_vs_merged_dequantized" not in three
    nf4_vs_fp32 = three["trained_vs_fp32_adapter"]
    assert (
        nf4_vs_fp32["items"] == 4 and 0 < nf4_vs_fp32["max_abs_logit_diff"]
    )  # the quantisation shift, measured
    assert three["trained_vs_merged_fp32"]["max_abs_logit_diff"] == pytest.approx(
        nf4_vs_fp32["max_abs_logit_diff"], abs=1e-3
    )
    dq = merge(
        model,
        result,
        tmp_path / "run" / "merged-dq",
        quantization="nf4",
        compute_dtype=torch.float32,
        merge_base="dequantized",
    )
    assert dq.passed
    to_dq = dq.three_way["trained_vs_merged_dequantized"]
    assert to_dq["max_abs_logit_diff"] < 0.1 * dq.three_way["trained_vs_merged_fp32"]["max_abs_logit_diff"]
    assert to_dq["same_replies"] == 4
    with pytest.raises(UserError, match="merge_base: dequantized needs a quantised base"):
        merge(model, result, tmp_path / "run" / "m3", merge_base="dequantized")
