"""Merge a LoRA adapter into a full-precision checkpoint and prove it behaves like base+adapter.

The base is reloaded in fp32 (never merged into the 4-bit model: peft warns that the result
differs by rounding), the adapter applied, `merge_and_unload`, and the result saved as
safetensors with the tokenizer and its chat template, plus `provenance.json`. The parity check
compares base+adapter (unmerged) with the merged model on N validation prompts: greedy replies
must be identical and the largest absolute logit difference under the recipe's tolerance.

The base is loaded once: base+adapter generates its replies and logits first, then the same
model is merged in place and generates again. Both generate the N prompts as one left-padded
batch, so both see exactly the same inputs.

Three-way parity: when training ran on a quantised base (NF4 or int8), the adapter was optimised
against that base, not the fp32 one it is merged into. The quantised base + adapter (what
training optimised) is then loaded too and compared with fp32 base + adapter and with the merged
model: identical greedy replies, the share of prompt positions with the same top token, and the
largest logit difference. Those are recorded, not gated: the quantisation shift is real, and
this is where it is measured. With `merge_base: dequantized` the adapter is merged into the
quantised base's dequantised weights instead; both merges are compared with what training
optimised, and the dequantised one is written.
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
    three_way: dict | None = None
    """With a quantised training base: `agreement` records of what training optimised (the
    quantised base + adapter) against fp32 base + adapter and against each merge."""

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


def agreement(replies_a: list[str], logits_a: list, replies_b: list[str], logits_b: list) -> dict:
    """How far two models' greedy replies and prompt logits on the same prompts agree."""
    positions = same = 0
    worst = 0.0
    for a, b in zip(logits_a, logits_b):
        positions += a.shape[1]
        same += int((a.argmax(-1) == b.argmax(-1)).sum())
        worst = max(worst, float((a - b).abs().max()))
    return {
        "items": len(replies_a),
        "same_replies": sum(x == y for x, y in zip(replies_a, replies_b)),
        "top1_agreement": same / positions if positions else 1.0,
        "max_abs_logit_diff": worst,
    }


def load_base(checkpoint: str, quantization: str, compute_dtype, trust_remote_code: bool):
    """The base model as training loads it: NF4 with double quantisation, 8-bit or as it is
    (`quantization` "nf4", "int8", "none"), its 4-bit weights kept in the layout training used."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = None
    if quantization == "nf4":
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    elif quantization == "int8":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint,
        dtype=compute_dtype,
        quantization_config=quant,
        use_safetensors=True,
        device_map="auto" if torch.cuda.is_available() else "cpu",
        trust_remote_code=trust_remote_code,
    )
    # bitsandbytes repacks a 4-bit weight for a faster CPU kernel the first time it runs in eval
    # mode without grad (our periodic samples, Trainer's evaluation); the packed weight then goes
    # through a kernel with no backward when training resumes. Keep the training layout.
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def load_merge_base(
    base_checkpoint: str, merge_base: str, quantization: str, trust_remote_code: bool = False
):
    """The fp32 weights an adapter is merged into: the checkpoint's, or the quantised base's dequantised."""
    import torch
    from transformers import AutoModelForCausalLM

    if merge_base == "dequantized":
        if quantization == "none":
            raise UserError("merge_base: dequantized needs a quantised base (quantization: nf4 or int8)")
        return (
            load_base(base_checkpoint, quantization, torch.float32, trust_remote_code)
            .dequantize()
            .to(torch.float32)
        )
    return AutoModelForCausalLM.from_pretrained(
        base_checkpoint, dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )


def task_agreement(a: dict, b: dict, metrics: dict[str, str]) -> list[dict]:
    """Per probe entry, how two models' outputs on the same items agree: the share of identical
    outputs and the paired difference in the entry's metric (a minus b)."""
    from eval import metrics as M
    from eval.stats import compare

    out = []
    for key, rows_a in a.items():
        rows_b, metric = b[key], metrics[key]
        comp = compare(
            [s[metric] for _, s in rows_a], [s[metric] for _, s in rows_b], binary=metric in M.BINARY
        )
        out.append(
            {
                "entry": key,
                "items": len(rows_a),
                "same_outputs": sum(x == y for (x, _), (y, _) in zip(rows_a, rows_b)),
                "mean_a": sum(s[metric] for _, s in rows_a) / max(1, len(rows_a)),
                "mean_b": sum(s[metric] for _, s in rows_b) / max(1, len(rows_b)),
                **comp.record(metric),
            }
        )
    return out


def merge_adapter(
    base_checkpoint: str,
    adapter_dir: Path,
    out_dir: Path,
    *,
    parity_prompts: list[list[dict]],
    max_new_tokens: int,
    tolerance: float,
    provenance: dict,
    trust_remote_code: bool = False,
    quantization: str = "none",
    compute_dtype=None,
    merge_base: str = "fp32",
    task_scorer=None,
    task_metrics: dict | None = None,
) -> Parity:
    """Write the merged checkpoint to out_dir (atomically: a staging dir renamed on success) and
    return the parity check; a failed check raises, leaving no merged directory behind.
    `quantization` and `compute_dtype`: how training loaded the base (three-way parity);
    `merge_base`: fp32 (the checkpoint's weights) or dequantized (the quantised base's).
    `task_scorer(model, tokenizer)`: (output, metrics) per item of each probe entry (`task_metrics`:
    entry -> metric), run on the three models for the three-way comparison on tasks."""
    import gc

    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    from core.artifacts import MergeProvenance, write_artifact
    from core.files import staging_dir
    from core.workspace import provenance as provenance_of
    from train.callbacks import generate

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir)  # carries the chat template used in training

    tasks: dict[str, dict] = {}

    def run(model, label: str | None = None) -> tuple[list[str], list]:
        if label and task_scorer is not None:
            tasks[label] = task_scorer(model, tokenizer)
        return generate(model, tokenizer, parity_prompts, max_new_tokens), _prompt_logits(
            model, tokenizer, parity_prompts
        )

    trained = None
    if quantization != "none":
        qbase = load_base(base_checkpoint, quantization, compute_dtype or torch.float32, trust_remote_code)
        trained = run(PeftModel.from_pretrained(qbase, adapter_dir).eval(), "trained")
        del qbase
        gc.collect()
    if merge_base == "dequantized" and quantization == "none":
        raise UserError("merge_base: dequantized needs a quantised base (quantization: nf4 or int8)")

    def merge(base, label: str) -> tuple:
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
        unmerged = run(model, f"{label}_adapter" if label == "fp32" else None)
        merged = model.merge_and_unload().eval()
        return unmerged, merged, run(merged, f"merged_{label}")

    unmerged, merged, after = merge(
        load_merge_base(base_checkpoint, "fp32", quantization, trust_remote_code), "fp32"
    )
    three_way = None
    if trained is not None:
        three_way = {
            "quantization": quantization,
            "merge_base": merge_base,
            "trained_vs_fp32_adapter": agreement(*trained, *unmerged),
            "trained_vs_merged_fp32": agreement(*trained, *after),
        }
    if merge_base == "dequantized":
        unmerged, merged, after = merge(
            load_merge_base(base_checkpoint, merge_base, quantization, trust_remote_code), "dequantized"
        )
        three_way["trained_vs_merged_dequantized"] = agreement(*trained, *after)
    if three_way is not None and tasks:
        pairs = [("trained", "fp32_adapter"), ("trained", "merged_fp32"), ("fp32_adapter", "merged_fp32")]
        if "merged_dequantized" in tasks:
            pairs += [("trained", "merged_dequantized"), ("merged_dequantized", "merged_fp32")]
        three_way["tasks"] = {
            f"{a}_vs_{b}": task_agreement(tasks[a], tasks[b], task_metrics or {}) for a, b in pairs
        }
    before, reference = unmerged
    worst = max((float((a - b).abs().max()) for a, b in zip(reference, after[1])), default=0.0)
    parity = Parity(
        len(parity_prompts), sum(a == b for a, b in zip(before, after[0])), worst, tolerance, three_way
    )
    if not parity.passed:
        raise UserError(
            f"merge parity failed: {parity.same_replies}/{parity.items} identical replies, "
            f"max logit difference {parity.max_abs_logit_diff:.2e} (tolerance {tolerance:.0e}); "
            f"{out_dir} not written"
        )
    with staging_dir(out_dir) as stage:
        merged.save_pretrained(stage, safe_serialization=True)
        tokenizer.save_pretrained(stage)
        write_artifact(
            provenance_of(stage),
            MergeProvenance,
            {**provenance, "parity": {**asdict(parity), "passed": parity.passed}},
        )
    return parity
