"""The thin trainer: our data path, recipe and checks around transformers' Trainer and peft.

    python -m selectune train --recipe train/default.yaml      # make train

The optimiser loop, checkpointing, resume (same data order: the sampler is seeded and Trainer
skips the batches already seen) and `accelerate launch` on several GPUs are transformers'. Ours:
- the data (train/data.py): read, clean with a report, split, template, assistant-only labels;
- the model: NF4 with double quantisation (or 8-bit, or none), prepare_model_for_kbit_training,
  LoRA on the architecture's attention and MLP projections;
- a padding collator, and length-grouped batches;
- callbacks: JSON-lines log of train/val loss and learning rate; the recipe's sample prompts
  generated every M steps and checked for collapse (empty or repeated-character replies) and
  under-fitting (facts still missing); a NaN or diverging loss stops training with a clear
  message, leaving the last good checkpoint as it was.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from selectune.errors import UserError
from train.data import (CleaningReport, Conversation, Example, clean, data_sha256, ensure_chat_template,
                        load_conversations, save_split, split, tokenize)
from train.recipe import Recipe

REPO = Path(__file__).resolve().parents[1]

# Attention projections plus MLP, by model_type (LoRA's usual "all linear layers but the head").
TARGET_MODULES = {
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gemma3_text": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "internlm2": ["wqkv", "wo", "w1", "w2", "w3"],
}


def target_modules(recipe: Recipe, model_type: str) -> list[str]:
    if recipe.lora.target_modules:
        return list(recipe.lora.target_modules)
    if model_type not in TARGET_MODULES:
        raise UserError(f"{recipe.path}: no default LoRA target modules for model_type '{model_type}'; "
                        f"set lora.target_modules (known: {', '.join(sorted(TARGET_MODULES))})")
    return TARGET_MODULES[model_type]


# ---------------------------------------------------------------------------------------------
# Data


def source_conversations(recipe: Recipe, data_dir: Path, report: CleaningReport) -> list[Conversation]:
    from eval.task import find_task, load_items

    out: list[Conversation] = []
    for src in recipe.data:
        if src.task is not None:
            task = find_task(src.task)
            if task.reference_field is None:
                raise UserError(f"{recipe.path}: task '{src.task}' has no reference answers to train on")
            items = load_items(task, src.split, data_dir)
            report.read += len(items)
            out += [Conversation([*i.messages(), {"role": "assistant", "content": i.gold}],
                                 f"{task.name}:{i.id}") for i in items]
        else:
            path = Path(src.path) if Path(src.path).is_absolute() else REPO / src.path
            out += load_conversations(path, src.format, skip_bad_rows=recipe.skip_bad_rows, report=report)
    return out


@dataclass
class PreparedData:
    train: list[Example]
    val: list[Example]
    split: dict[str, list[Conversation]]
    report: CleaningReport
    sha256: str


def prepare_data(recipe: Recipe, tokenizer, data_dir: Path, run_dir: Path) -> PreparedData:
    """Read, clean, split (saved under run_dir/data) and tokenise; prints the cleaning report."""
    report = CleaningReport()
    conversations = clean(source_conversations(recipe, data_dir, report), report)
    parts = split(conversations, recipe.split, recipe.seed)
    save_split(parts, run_dir / "data")
    examples = {}
    for name in ("train", "val"):
        tokenized = [tokenize(tokenizer, c, recipe.max_length, recipe.overlong, report) for c in parts[name]]
        examples[name] = [e for e in tokenized if e is not None]
    report.kept = sum(len(v) for v in parts.values()) - report.overlong_dropped
    for line in report.lines():
        print(f"data: {line}")
    for problem in report.problems:
        print(f"data: skipped {problem}")
    if not examples["train"]:
        raise UserError(f"{recipe.path}: no training examples left after cleaning")
    return PreparedData(examples["train"], examples["val"], parts, report, data_sha256(conversations))


class PadCollator:
    """Right-pads a batch; padded positions get attention 0 and label -100."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        import torch

        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), width), -100, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class SeededLengthGroupedSampler:
    """transformers' length grouping (megabatches of similar lengths, longest first), with the
    order drawn from (seed, epoch) alone. Its own sampler draws from the global RNG, whose state
    a mid-epoch checkpoint saves after the epoch's order was drawn: a resumed run then reorders
    the rest of the epoch. Trainer calls set_epoch at every epoch start."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        import torch
        from transformers.trainer_pt_utils import get_length_grouped_indices

        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


LOSS_CHUNK = 256
"""Labelled positions whose logits exist at once in `label_only_loss`: 155 MB of fp32 logits for
Qwen2.5's 152k vocabulary. A micro-batch of the default job has about 140, so its head is one
product with the whole weight; in chunks of 64 the 545 MB weight was read three times over, and
the head took 0.65 s a micro-batch against 0.90 s."""


def label_only_loss(model, inputs: dict, num_items_in_batch=None, chunk: int = LOSS_CHUNK):
    """Causal-LM cross-entropy with the LM head applied only where a label is read, a few
    positions at a time.

    The prompt's positions never need logits (their labels are -100), yet the usual forward
    projects every position onto the vocabulary: for Qwen2.5 that is 152k x 896 per token, and
    the fp32 logits of a batch of 8 x 256 tokens alone take 1.2 GB. Here the decoder runs once,
    the hidden states at labelled positions are gathered, and `chunked_head_loss` scores them
    `chunk` at a time. Models whose logits are more than a linear head's output (soft-capping,
    logit scaling) or whose head is wrapped (a trained copy under `modules_to_save`) go through
    their own forward with a boolean `logits_to_keep` instead, which keeps all labelled
    positions' logits at once. The value equals the model's own loss: the sum over labelled
    tokens divided by their count (or by Trainer's num_items_in_batch under gradient
    accumulation). Returns (loss, number of labelled tokens)."""
    import torch
    import torch.nn.functional as F

    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    targets = labels[:, 1:][keep[:, :-1]]
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = causal_lm.get_output_embeddings()
    if not plain_head(causal_lm.config) or type(head) is not torch.nn.Linear:
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    logits_to_keep=keep, use_cache=False)
        logits = out.logits.reshape(-1, out.logits.shape[-1])
        return F.cross_entropy(logits.float(), targets, reduction="sum") / count, targets.numel()
    hidden = causal_lm.base_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                  use_cache=False).last_hidden_state[keep]
    return chunked_head_loss(hidden, head.weight, head.bias, targets, chunk) / count, targets.numel()


def chunked_head_loss(hidden, weight, bias, targets, chunk: int):
    """sum(cross_entropy(hidden @ weight.T + bias, targets)), holding the logits of `chunk`
    rows at a time. The gradients are worked out chunk by chunk during the forward pass
    ((softmax - one-hot) times the weight, and its transpose times the rows for a head that
    trains), so the backward pass neither keeps nor recomputes any logits: the head's FLOPs
    are those of the plain forward and backward. It runs outside autocast, in the weight's dtype
    (fp32 after `prepare_model_for_kbit_training`): under bf16 autocast every chunk would cast
    the whole weight (545 MB for Qwen2.5's tied head) to bf16 twice, at the memory peak."""
    import torch

    class ChunkedHeadLoss(torch.autograd.Function):
        @staticmethod
        @torch.autocast(device_type="cuda", enabled=False)
        @torch.autocast(device_type="cpu", enabled=False)
        def forward(ctx, hidden, weight, bias):
            grads = ctx.needs_input_grad
            grad_hidden = torch.zeros_like(hidden) if grads[0] else None
            grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads[1] else None
            grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and grads[2] else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for i in range(0, hidden.shape[0], chunk):
                h, t = hidden[i:i + chunk].to(weight.dtype), targets[i:i + chunk]
                logits = torch.nn.functional.linear(h, weight, bias).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not any(grads):
                    continue
                # d(sum CE)/d logits = softmax - one-hot, the softmax made in the logits' memory
                g = logits.sub_(lse[:, None]).exp_()
                g[torch.arange(len(t), device=g.device), t] -= 1
                if grad_hidden is not None:
                    grad_hidden[i:i + chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight += g.T @ h.float()
                if grad_bias is not None:
                    grad_bias += g.sum(0)
            ctx.save_for_backward(*(x if x is not None else torch.empty(0)
                                    for x in (grad_hidden, grad_weight, grad_bias)))
            ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
            return total

        @staticmethod
        def backward(ctx, grad_out):
            return tuple((saved * grad_out).to(like.dtype) if present else None for saved, present, like in
                         zip(ctx.saved_tensors, ctx.present, (hidden, weight, bias if bias is not None else hidden)))

    return ChunkedHeadLoss.apply(hidden, weight, bias)


def plain_head(config) -> bool:
    """Whether a model's logits are its output embedding's output and nothing more."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return not any(getattr(text, key, None) not in (None, 1, 1.0) for key in
                   ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"))


def thin_trainer_class():
    from transformers import Trainer

    class ThinTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, _ = label_only_loss(model, inputs, num_items_in_batch)
            # Evaluation reads the loss only (prediction_loss_only): no logits are kept.
            return (loss, {}) if return_outputs else loss

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            if self.args.train_sampling_strategy != "group_by_length":
                return super()._get_train_sampler(train_dataset)
            return SeededLengthGroupedSampler(
                [len(e.input_ids) for e in dataset.examples],
                self.args.train_batch_size * self.args.gradient_accumulation_steps, self.args.seed)

    return ThinTrainer


class ExampleDataset:
    """A map-style dataset of tokenised examples (what Trainer's samplers and collator read)."""

    def __init__(self, examples: list[Example]):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        e = self.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels}


# ---------------------------------------------------------------------------------------------
# Model


def compute_dtype(recipe: Recipe):
    import torch

    if recipe.compute_dtype == "bf16":
        return torch.bfloat16
    if recipe.compute_dtype == "fp32":
        return torch.float32
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). There oneDNN's bf16
    matrix products run about 3x as fast as fp32's (a 368x896 by 896x4864 product: 330 against
    105-180 GFLOP/s on the 2-core AMD EPYC we develop on), and a QLoRA step about 1.5x; without
    it bf16 is emulated and slower than fp32."""
    import torch

    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def load_for_training(recipe: Recipe, checkpoint: str, trust_remote_code: bool):
    """The base model quantised as the recipe says, prepared for k-bit training, with LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = compute_dtype(recipe)
    quant = None
    if recipe.quantization == "nf4":
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                   bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    elif recipe.quantization == "int8":
        quant = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=dtype, quantization_config=quant, use_safetensors=True,
        device_map="auto" if torch.cuda.is_available() else "cpu", trust_remote_code=trust_remote_code)
    if quant is not None:
        # bitsandbytes repacks a 4-bit weight for a faster CPU kernel the first time it runs in
        # eval mode without grad (our periodic samples, Trainer's evaluation); the packed weight
        # then goes through a kernel with no backward when training resumes. Keep the training layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if recipe.training.gradient_checkpointing:
        # transformers' selective checkpointing: every n-th decoder layer recomputes its activations
        model.activation_checkpointing_enable({"use_reentrant": False},
                                              every_n_layers=recipe.training.checkpoint_every_n_layers)
    config = LoraConfig(r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
                        target_modules=target_modules(recipe, model.config.model_type),
                        modules_to_save=list(recipe.lora.modules_to_save) or None,
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def silu_mul_function():
    """An autograd function for silu(gate) * up that saves gate and up only.

    Autograd's own graph keeps three tensors of the MLP's width per layer: gate (for SiLU's
    backward), silu(gate) and up (for the product's). silu(gate) is one elementwise pass away
    from gate, so the backward recomputes it: a third less of the MLP's saved activations, the
    same values. (Liger-Kernel's SwiGLU does this on GPUs, in Triton.)"""
    import torch
    import torch.nn.functional as F

    class SiluMul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, gate, up):
            ctx.save_for_backward(gate, up)
            return F.silu(gate) * up

        @staticmethod
        def backward(ctx, grad):
            gate, up = ctx.saved_tensors
            sigmoid = torch.sigmoid(gate)
            silu = gate * sigmoid
            grad_gate = grad * up * (sigmoid * (1 + gate * (1 - sigmoid)))
            return grad_gate, grad * silu

    return SiluMul


FUSED_MLPS = {"Qwen2MLP", "Qwen3MLP", "LlamaMLP", "MistralMLP"}
"""transformers' MLP classes whose forward is exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))`."""


def fuse_silu_mlps(model) -> int:
    """Make every MLP of a `FUSED_MLPS` class whose activation is SiLU use `silu_mul_function`;
    returns how many were changed. Others (Gemma's GELU, Phi-3's fused gate_up_proj, remote
    code) keep their own forward."""
    import types

    import torch
    from transformers.activations import SiLUActivation

    silu_mul = silu_mul_function()

    def forward(self, x):
        return self.down_proj(silu_mul.apply(self.gate_proj(x), self.up_proj(x)))

    changed = 0
    for module in model.modules():
        if (type(module).__name__ in FUSED_MLPS
                and isinstance(getattr(module, "act_fn", None), (SiLUActivation, torch.nn.SiLU))):
            module.forward = types.MethodType(forward, module)
            changed += 1
    return changed


def lora_dropout_function():
    """An autograd function for `linear(dropout(x), A)`, LoRA's down-projection, that saves x
    and a one-byte mask instead of the dropped-out copy of x.

    peft's LoRA computes `lora_B(lora_A(dropout(x)))`: with dropout on, every adapted projection
    keeps its own dropped-out copy of its input (4 bytes an element) for lora_A's weight
    gradient, besides the mask. q, k and v read the same x, as do gate and up, so a decoder
    layer keeps five copies of inputs that one tensor each would do. Here lora_A saves x itself
    (shared by the projections that read it) and the boolean mask, and scales the r-wide output
    by 1/(1-p) rather than the input. The mask is drawn with `rand_like(x) >= p` from torch's
    generator, as dropout draws from it."""
    import torch
    import torch.nn.functional as F

    class DropoutLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, p):
            keep = torch.rand_like(x) >= p
            ctx.save_for_backward(x, keep, weight)
            ctx.scale = 1 / (1 - p)
            return F.linear(x * keep, weight) * ctx.scale

        @staticmethod
        def backward(ctx, grad):
            x, keep, weight = ctx.saved_tensors
            grad = grad * ctx.scale
            grad_x = (grad @ weight).mul_(keep) if ctx.needs_input_grad[0] else None
            grad_weight = None
            if ctx.needs_input_grad[1]:
                grad_weight = grad.reshape(-1, grad.shape[-1]).T @ (x * keep).reshape(-1, x.shape[-1])
            return grad_x, grad_weight, None

    return DropoutLinear


def fuse_lora_dropout(model) -> int:
    """Give every plain LoRA adapter with dropout `lora_dropout_function` (its lora_A does the
    dropout, its lora_dropout becomes the identity); returns how many were changed. The masks
    come from torch's generator, whose state Trainer's checkpoints save and restore and
    activation checkpointing replays, so a resumed run repeats an uninterrupted one. In eval
    mode lora_A is a plain linear, as with peft's dropout. Parameter names, the saved adapter
    and merging are unchanged; DoRA and other variants are left alone."""
    import torch
    from peft.tuners.lora import LoraLayer

    function = lora_dropout_function()

    class DropoutLoraA(torch.nn.Linear):
        dropout_p = 0.0

        def forward(self, x):
            if not self.training:
                return super().forward(x)
            return function.apply(x, self.weight, self.dropout_p)

    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, dropout in module.lora_dropout.items():
            lora_a = module.lora_A[name]
            if (isinstance(dropout, torch.nn.Dropout) and dropout.p > 0 and type(lora_a) is torch.nn.Linear
                    and lora_a.bias is None and name not in getattr(module, "lora_variant", {})):
                lora_a.__class__ = DropoutLoraA
                lora_a.dropout_p = dropout.p
                module.lora_dropout[name] = torch.nn.Identity()
                changed += 1
    return changed


# ---------------------------------------------------------------------------------------------
# Checks while training


def degenerate(reply: str) -> str | None:
    """Why a reply looks collapsed, or None: empty, one character making up most of it, or a
    phrase looping (few distinct character pairs in a long reply)."""
    text = reply.strip()
    if not text:
        return "empty reply"
    if len(text) >= 8:
        top = max(text.count(c) for c in set(text))
        if top / len(text) > 0.5:
            return f"one character is {top / len(text):.0%} of the reply"
    if len(text) >= 40:
        pairs = [text[k:k + 2] for k in range(len(text) - 1)]
        if len(set(pairs)) / len(pairs) < 0.35:
            return f"a phrase repeats: {len(set(pairs))} distinct character pairs in {len(text)} characters"
    return None


def sample_prompts(recipe: Recipe, data_dir: Path) -> list[tuple[list[dict], list[str]]]:
    """(conversation without the reply, facts it must contain) for every sample prompt."""
    from eval.task import find_task, load_items

    out = [([{"role": "user", "content": p}], recipe.samples.facts[n] if recipe.samples.facts else [])
           for n, p in enumerate(recipe.samples.prompts)]
    for spec in recipe.samples.tasks:
        for item in load_items(find_task(spec.task), spec.split, data_dir)[: spec.count]:
            out.append((item.messages(), list(item.fields.get("facts", []))))
    return out


def make_callbacks(recipe: Recipe, tokenizer, log_path: Path, samples: list[tuple[list[dict], list[str]]]):
    from transformers import TrainerCallback

    from eval.scorers.fact import facts_found

    class JsonlLog(TrainerCallback):
        """Every log event (train loss, learning rate, val loss) as one JSON line."""

        def on_log(self, args, state, control, logs=None, **kwargs):
            record = {"step": state.global_step, "epoch": state.epoch, "time": time.time(), **(logs or {})}
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    class DivergenceGuard(TrainerCallback):
        """Stops on a NaN/inf loss or one far above the first; the message is kept for the caller."""

        def __init__(self):
            self.first: float | None = None
            self.problem: str | None = None

        def on_log(self, args, state, control, logs=None, **kwargs):
            loss, grad_norm = (logs or {}).get("loss"), (logs or {}).get("grad_norm")
            if loss is None:
                return
            if self.first is None and math.isfinite(loss):
                self.first = loss
            if not math.isfinite(loss):
                self.problem = f"training loss became {loss} at step {state.global_step}"
            elif grad_norm is not None and not math.isfinite(grad_norm):
                # the update just applied was made of NaNs: the weights are gone
                self.problem = f"gradient norm became {grad_norm} at step {state.global_step}"
            elif self.first is not None and loss > recipe.training.divergence_factor * self.first:
                self.problem = (f"training loss diverged at step {state.global_step}: {loss:.3f} > "
                                f"{recipe.training.divergence_factor} x the first logged {self.first:.3f}")
            if self.problem:
                control.should_training_stop = True
                control.should_save = False  # the last good checkpoint stays the last one

        def on_step_end(self, args, state, control, **kwargs):
            if self.problem:  # never save a checkpoint after a bad loss
                control.should_save = False
                control.should_training_stop = True

    every = recipe.training.sample_steps

    class Samples(TrainerCallback):
        """The recipe's prompts generated greedily every sample_steps steps, checked and logged."""

        def __init__(self):
            self.last_step: int | None = None

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if every != "epoch" and state.global_step % every == 0:
                self.sample(state.global_step, model)

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            if every == "epoch":
                self.sample(state.global_step, model)

        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.sample(state.global_step, model)

        def sample(self, step: int, model) -> None:
            if not samples or step == self.last_step:
                return
            self.last_step = step
            replies = generate(model, tokenizer, [m for m, _ in samples], recipe.samples.max_new_tokens)
            for n, ((messages, facts), reply) in enumerate(zip(samples, replies)):
                flags = []
                if why := degenerate(reply):
                    flags.append(f"collapse: {why}")
                missing = [f for f, hit in facts_found(reply, facts).items() if not hit]
                if missing:
                    flags.append("under-fitting: facts missing: " + ", ".join(missing))
                record = {"step": step, "sample": n, "prompt": messages[-1]["content"], "reply": reply,
                          "flags": flags}
                with open(log_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                for flag in flags:
                    print(f"train: step {step}, sample {n}: {flag}")

    return JsonlLog(), DivergenceGuard(), Samples()



def generate(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Greedy replies to all conversations as one left-padded batch, model left as it was (a fixed
    set of prompts run the same way by two models gives comparable replies, as the merge parity
    check needs)."""
    import torch

    if not conversations:
        return []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True),
                         add_special_tokens=False).input_ids for m in conversations]
    width = max(map(len, encoded))
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=model.device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=model.device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            new = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad)
    finally:
        model.train(was_training)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in new]


# ---------------------------------------------------------------------------------------------
# Training


@dataclass
class TrainResult:
    run_dir: Path
    adapter_dir: Path
    final_train_loss: float | None
    final_val_loss: float | None
    steps: int
    seconds: float
    data: PreparedData
    resumed_from: str | None


def training_arguments(recipe: Recipe, out_dir: Path, *, evaluate: bool = True):
    import torch
    from transformers import TrainingArguments

    t = recipe.training
    dtype = compute_dtype(recipe)
    return TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.batch_size, gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate, lr_scheduler_type=t.scheduler if t.scheduler == "cosine"
        else "constant_with_warmup", warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay,
        num_train_epochs=t.epochs, max_steps=t.max_steps or -1, logging_steps=t.logging_steps,
        logging_first_step=True, logging_nan_inf_filter=False,
        eval_strategy=("epoch" if t.eval_steps == "epoch" else "steps") if evaluate else "no",
        eval_steps=None if t.eval_steps == "epoch" else t.eval_steps, save_strategy="steps",
        save_steps=t.save_steps, save_total_limit=2, seed=recipe.seed, data_seed=recipe.seed,
        train_sampling_strategy="group_by_length" if t.group_by_length else "random",
        bf16=dtype == torch.bfloat16, use_cpu=not torch.cuda.is_available(), report_to=[],
        prediction_loss_only=True,
        # (gradient checkpointing is set up on the model, by load_for_training)
        remove_unused_columns=False, dataloader_num_workers=0)


def last_complete_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint whose trainer_state.json (Trainer writes it last) parses; newer ones
    are what a kill during a save leaves behind, and are removed."""
    import shutil

    if not folder.is_dir():
        return None
    found = sorted((p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()),
                   key=lambda p: int(p.name[11:]), reverse=True)
    for path in found:
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            return path
        except (OSError, ValueError):
            print(f"train: removing incomplete checkpoint {path}")
            shutil.rmtree(path)
    return None


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop log records past the checkpoint being resumed: those steps run again."""
    if not log_path.exists():
        return
    keep = [line for line in log_path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    from selectune.files import write_text_atomic

    write_text_atomic(log_path, "".join(line + "\n" for line in keep))


class CpuAllocator:
    """glibc's malloc settings for a training process on a CPU (`training.cpu_allocator`).

    A training pass allocates and frees hundreds of activation blocks of a few MB whose sizes
    change with every batch's length. Blocks at or above glibc's mmap threshold get their own
    mapping, returned on free; smaller ones come from the heap, which keeps freed blocks it
    cannot trim. glibc raises that threshold to the size of each mapped block freed (up to 32
    MB), so once anything has freed a block of a few MB, loading the model leaves about 1 GB of
    its temporaries in the heap: bench-train's worker peaked at 4.47–4.80 GiB before its first
    step, against 3.63–3.66 GiB with the threshold held at 2 MB while loading.

    - Both settings load the model with the threshold at 2 MB, and after every pass (and every
      evaluation) `malloc_trim` gives the heap's free pages back, so that one pass's garbage is
      not the next pass's baseline (measured: 3.5–4.2 GiB at the end of a pass, 2.0 after).
    - `compact` keeps the 2 MB threshold while training, with PyTorch's huge-page allocation
      (THP_MEM_ALLOC_ENABLE) so that mapping blocks again costs fewer page faults. The price is
      the kernel zeroing every new mapping: bitsandbytes dequantises each 4-bit weight into a
      fresh buffer (8.7 MB in bf16 for an MLP projection of qwen2.5-0.5b) at every product.
    - `glibc` then sets the threshold to 32 MB, the ceiling glibc's own adaptive threshold
      climbs to, with the trim threshold at twice that, as glibc's adaptation sets it. Blocks
      up to 32 MB are reused from the heap: faster, more memory (README, "Training").

    Thresholds a user exported (MALLOC_MMAP_THRESHOLD_) are kept; with a C library other than
    glibc this does nothing."""

    M_TRIM_THRESHOLD = -1
    M_MMAP_THRESHOLD = -3
    LOAD_THRESHOLD = 2 << 20
    HEAP_THRESHOLD = 32 << 20

    def __init__(self, policy: str):
        import ctypes
        import os

        self.policy = policy
        self.libc = None
        try:
            libc = ctypes.CDLL("libc.so.6")
            if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
                self.libc = libc
        except OSError:
            pass
        self.tune = self.libc is not None and "MALLOC_MMAP_THRESHOLD_" not in os.environ
        if policy == "compact":
            os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read at PyTorch's first large allocation

    def before_load(self) -> None:
        if self.tune:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, self.LOAD_THRESHOLD)

    def after_load(self) -> None:
        if self.tune and self.policy == "glibc":
            self.libc.mallopt(self.M_MMAP_THRESHOLD, self.HEAP_THRESHOLD)
            self.libc.mallopt(self.M_TRIM_THRESHOLD, 2 * self.HEAP_THRESHOLD)
        self.trim()

    def trim(self) -> None:
        if self.libc is not None:
            self.libc.malloc_trim(0)

    def callback(self):
        from transformers import TrainerCallback

        allocator = self

        class TrimHeap(TrainerCallback):
            """The heap's free pages back to the system after every pass and evaluation."""

            def on_substep_end(self, args, state, control, **kwargs):
                allocator.trim()

            def on_step_end(self, args, state, control, **kwargs):
                allocator.trim()

            def on_evaluate(self, args, state, control, **kwargs):
                allocator.trim()

        return TrimHeap()


def final_val_loss(trainer) -> float:
    """The val loss of the final weights: Trainer evaluates at the last step when the eval
    schedule is on (not again here: on the default job that is half a minute), else now."""
    state = trainer.state
    last = [h for h in state.log_history if "eval_loss" in h]
    if last and last[-1].get("step") == state.global_step:
        return last[-1]["eval_loss"]
    return trainer.evaluate()["eval_loss"]


def run_training(recipe: Recipe, checkpoint: str, run_dir: Path, data_dir: Path, *,
                 trust_remote_code: bool = False) -> TrainResult:
    """Train (or resume) the adapter into run_dir/adapter; logs in run_dir/train_log.jsonl."""
    import torch
    from transformers import AutoTokenizer, set_seed

    allocator = None if torch.cuda.is_available() else CpuAllocator(recipe.training.cpu_allocator)

    run_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=trust_remote_code)
    if ensure_chat_template(tokenizer):
        print("train: the base model has no chat template; using the Alpaca layout (saved with the adapter)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = prepare_data(recipe, tokenizer, data_dir, run_dir)
    set_seed(recipe.seed)  # LoRA's A matrices are drawn before Trainer seeds anything
    if allocator:
        allocator.before_load()
    model = load_for_training(recipe, checkpoint, trust_remote_code)
    if allocator:
        allocator.after_load()
    fuse_silu_mlps(model)
    fuse_lora_dropout(model)
    checkpoints = run_dir / "checkpoints"
    last = last_complete_checkpoint(checkpoints)
    log_path = run_dir / "train_log.jsonl"
    if last:
        print(f"train: resuming from {last}")
        _truncate_log(log_path, int(last.name.rsplit("-", 1)[1]))
    elif log_path.exists():
        log_path.unlink()  # no checkpoint to resume from: start the log afresh
    log, guard, sampler = make_callbacks(recipe, tokenizer, log_path, sample_prompts(recipe, data_dir))
    callbacks = [log, guard, sampler] + ([allocator.callback()] if allocator else [])
    trainer = thin_trainer_class()(model=model, args=training_arguments(recipe, checkpoints, evaluate=bool(data.val)),
                      train_dataset=ExampleDataset(data.train),
                      eval_dataset=ExampleDataset(data.val) if data.val else None,
                      data_collator=PadCollator(tokenizer.pad_token_id), callbacks=callbacks)
    started = time.monotonic()
    trainer.train(resume_from_checkpoint=str(last) if last else None)
    seconds = time.monotonic() - started
    if guard.problem:
        kept = last_complete_checkpoint(checkpoints)
        raise UserError(f"{guard.problem}; stopped. Last good checkpoint: {kept or 'none yet'} "
                        f"(lower training.learning_rate in {recipe.path} and rerun)")
    val_loss = final_val_loss(trainer) if data.val else None
    adapter_dir = run_dir / "adapter"
    model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    history = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return TrainResult(run_dir, adapter_dir, history[-1] if history else None, val_loss,
                       trainer.state.global_step, seconds, data, last)
