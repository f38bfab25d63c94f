"""Merge a LoRA adapter into a full-precision checkpoint and prove it behaves like base+adapter.

The base is reloaded in fp32 (never merged into the 4-bit model: peft warns that the result
differs by rounding), the adapter applied, `merge_and_unload`, and the result saved as
safetensors with the tokenizer and its chat template, plus `provenance.json`. The parity check
compares base+adapter (unmerged) with the merged model on N validation prompts: greedy replies
must be identical and the largest absolute logit difference under the recipe's tolerance.

The base is loaded once: base+adapter generates its replies and logits first, then the same
model is merged in place and generates again. Both generate the N prompts as one left-padded
batch, so both see exactly the same inputs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from core.errors import UserError


@dataclass
class Parity:
    items: int
    same_replies: int
    max_abs_logit_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.same_replies == self.items and self.max_abs_logit_diff <= self.tolerance


def _prompt_logits(model, tokenizer, conversations: list[list[dict]]) -> list:
    """Each prompt's logits at every position, run alone (no padding)."""
    import torch

    out = []
    with torch.inference_mode():
        for messages in conversations:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
            out.append(model(input_ids=ids).logits.float())
    return out


def merge_adapter(base_checkpoint: str, adapter_dir: Path, out_dir: Path, *, parity_prompts: list[list[dict]],
                  max_new_tokens: int, tolerance: float, provenance: dict,
                  trust_remote_code: bool = False) -> Parity:
    """Write the merged checkpoint to out_dir (atomically: a staging dir renamed on success) and
    return the parity check; a failed check raises, leaving no merged directory behind."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.artifacts import MergeProvenance, write_artifact
    from core.files import staging_dir
    from train.callbacks import generate

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)  # carries the chat template used in training

    base = AutoModelForCausalLM.from_pretrained(base_checkpoint, dtype=torch.float32, use_safetensors=True,
                                                trust_remote_code=trust_remote_code)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    before = generate(model, tokenizer, parity_prompts, max_new_tokens)
    reference = _prompt_logits(model, tokenizer, parity_prompts)
    merged = model.merge_and_unload().eval()
    after = generate(merged, tokenizer, parity_prompts, max_new_tokens)
    worst = max((float((a - b).abs().max()) for a, b in
                 zip(reference, _prompt_logits(merged, tokenizer, parity_prompts))), default=0.0)
    parity = Parity(len(parity_prompts), sum(a == b for a, b in zip(before, after)), worst, tolerance)
    if not parity.passed:
        raise UserError(f"merge parity failed: {parity.same_replies}/{parity.items} identical replies, "
                        f"max logit difference {parity.max_abs_logit_diff:.2e} (tolerance {tolerance:.0e}); "
                        f"{out_dir} not written")
    with staging_dir(out_dir) as stage:
        merged.save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
        write_artifact(stage / "provenance.json", MergeProvenance,
                       {**provenance, "parity": {**asdict(parity), "passed": parity.passed}})
    return parity
