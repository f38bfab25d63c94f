"""The trainer's kernels: autograd functions that keep less in memory than autograd's own graph,
with the same values. Each one is tested against the plain computation in tests/test_train.py.

- `label_only_loss` / `ChunkedHeadLoss`: the LM head only where a label is read, in chunks;
- `SiluMul` (`fuse_silu_mlps`): silu(gate) * up saving gate and up only;
- `DropoutLinear` (`fuse_lora_dropout`): LoRA's dropout inside lora_A, saving x and a one-byte mask.

Imported only when training runs (torch at module level is the point of this module).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

LOSS_CHUNK = 256
"""Labelled positions whose logits exist at once in `label_only_loss`: for Qwen2.5's 152k
vocabulary a chunk's fp32 logits take 155 MB, and a micro-batch of the default job fits in one
chunk, so the head reads its weight once (docs/training.md, "Kernels")."""


def label_only_loss(model, inputs: dict, num_items_in_batch=None, chunk: int = LOSS_CHUNK):
    """Causal-LM cross-entropy with the LM head applied only where a label is read, a few
    positions at a time.

    The prompt's positions never need logits (their labels are -100), yet the usual forward
    projects every position onto the vocabulary. Here the decoder runs once, the hidden states at
    labelled positions are gathered, and `ChunkedHeadLoss` scores them `chunk` at a time. Models
    whose logits are more than a linear head's output (soft-capping, logit scaling) or whose head
    is wrapped (a trained copy under `modules_to_save`) go through their own forward with a
    boolean `logits_to_keep` instead. The value equals the model's own loss: the sum over
    labelled tokens divided by their count (or by Trainer's num_items_in_batch under gradient
    accumulation). Returns (loss, number of labelled tokens)."""
    labels = inputs["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    targets = labels[:, 1:][keep[:, :-1]]
    count = num_items_in_batch if num_items_in_batch is not None else targets.numel()
    # Under `accelerate launch` the model comes wrapped in DistributedDataParallel, whose forward
    # must run for its gradients to be all-reduced: the model's own forward, then.
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    inner = model.module if ddp else model
    causal_lm = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    head = causal_lm.get_output_embeddings()
    if ddp or not plain_head(causal_lm.config) or type(head) is not torch.nn.Linear:
        out = model(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            logits_to_keep=keep,
            use_cache=False,
        )
        logits = out.logits.reshape(-1, out.logits.shape[-1])
        return F.cross_entropy(logits.float(), targets, reduction="sum") / count, targets.numel()
    hidden = causal_lm.base_model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False
    ).last_hidden_state[keep]
    return chunked_head_loss(hidden, head.weight, head.bias, targets, chunk) / count, targets.numel()


class ChunkedHeadLoss(torch.autograd.Function):
    """sum(cross_entropy(hidden @ weight.T + bias, targets)), holding the logits of `chunk` rows
    at a time. The gradients are worked out chunk by chunk during the forward pass ((softmax -
    one-hot) times the weight, and its transpose times the rows for a head that trains), so the
    backward pass neither keeps nor recomputes any logits. It runs outside autocast, in the
    weight's dtype: under bf16 autocast every chunk would cast the whole weight to bf16 twice,
    at the memory peak."""

    @staticmethod
    @torch.autocast(device_type="cuda", enabled=False)
    @torch.autocast(device_type="cpu", enabled=False)
    def forward(ctx, hidden, weight, bias, targets, chunk):
        grads = ctx.needs_input_grad
        grad_hidden = torch.zeros_like(hidden) if grads[0] else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if grads[1] else None
        grad_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and grads[2] else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for i in range(0, hidden.shape[0], chunk):
            h, t = hidden[i : i + chunk].to(weight.dtype), targets[i : i + chunk]
            logits = F.linear(h, weight, bias).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if not any(grads[:3]):
                continue
            # d(sum CE)/d logits = softmax - one-hot, the softmax made in the logits' memory
            g = logits.sub_(lse[:, None]).exp_()
            g[torch.arange(len(t), device=g.device), t] -= 1
            if grad_hidden is not None:
                grad_hidden[i : i + chunk] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += g.T @ h.float()
            if grad_bias is not None:
                grad_bias += g.sum(0)
        ctx.save_for_backward(
            *(x if x is not None else torch.empty(0) for x in (grad_hidden, grad_weight, grad_bias))
        )
        ctx.present = (grad_hidden is not None, grad_weight is not None, grad_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else hidden.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grads = tuple(
            (saved * grad_out).to(dtype) if present else None
            for saved, present, dtype in zip(ctx.saved_tensors, ctx.present, ctx.dtypes)
        )
        return (*grads, None, None)


def chunked_head_loss(hidden, weight, bias, targets, chunk: int):
    return ChunkedHeadLoss.apply(hidden, weight, bias, targets, chunk)


def plain_head(config) -> bool:
    """Whether a model's logits are its output embedding's output and nothing more."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return not any(
        getattr(text, key, None) not in (None, 1, 1.0)
        for key in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
    )


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only: the backward recomputes silu(gate), one
    elementwise pass, instead of keeping a third tensor of the MLP's width per layer (as
    Liger-Kernel's SwiGLU does on GPUs, in Triton)."""

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


FUSED_MLPS = {"Qwen2MLP", "Qwen3MLP", "LlamaMLP", "MistralMLP"}
"""transformers' MLP classes whose forward is exactly `down_proj(act_fn(gate_proj(x)) * up_proj(x))`."""


def _fused_mlp_forward(self, x):
    return self.down_proj(SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


def fuse_silu_mlps(model) -> int:
    """Make every MLP of a `FUSED_MLPS` class whose activation is SiLU use `SiluMul`; returns how
    many were changed. Others (Gemma's GELU, Phi-3's fused gate_up_proj, remote code) keep their
    own forward."""
    from transformers.activations import SiLUActivation

    changed = 0
    for module in model.modules():
        if type(module).__name__ in FUSED_MLPS and isinstance(
            getattr(module, "act_fn", None), (SiLUActivation, torch.nn.SiLU)
        ):
            module.forward = types.MethodType(_fused_mlp_forward, module)
            changed += 1
    return changed


class DropoutLinear(torch.autograd.Function):
    """`linear(dropout(x), A)`, LoRA's down-projection, saving x and a one-byte mask instead of
    the dropped-out copy of x. q, k and v read the same x, as do gate and up, so saving x itself
    lets the projections that read it share one tensor. The output (r wide) is scaled by 1/(1-p)
    rather than the input. The mask is drawn with `rand_like(x) >= p` from torch's generator, as
    dropout draws from it."""

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


class DropoutLoraA(torch.nn.Linear):
    """lora_A doing its adapter's dropout in training (`DropoutLinear`); a plain linear in eval."""

    dropout_p = 0.0

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        return DropoutLinear.apply(x, self.weight, self.dropout_p)


def fuse_lora_dropout(model) -> int:
    """Give every plain LoRA adapter with dropout a `DropoutLoraA` (its lora_dropout becomes the
    identity); returns how many were changed. The masks come from torch's generator, whose state
    Trainer's checkpoints save and restore and activation checkpointing replays, so a resumed run
    repeats an uninterrupted one. Parameter names, the saved adapter and merging are unchanged;
    DoRA and other variants are left alone."""
    from peft.tuners.lora import LoraLayer

    changed = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer):
            continue
        for name, dropout in module.lora_dropout.items():
            lora_a = module.lora_A[name]
            if (
                isinstance(dropout, torch.nn.Dropout)
                and dropout.p > 0
                and type(lora_a) is torch.nn.Linear
                and lora_a.bias is None
                and name not in getattr(module, "lora_variant", {})
            ):
                lora_a.__class__ = DropoutLoraA
                lora_a.dropout_p = dropout.p
                module.lora_dropout[name] = torch.nn.Identity()
                changed += 1
    return changed
