"""Load a provisioned card: safetensors only, remote code only where the card opts in."""

from __future__ import annotations

import os
from pathlib import Path

from models.card import ModelCard
from models.store import read_manifest
from core.errors import UserError


def resolve_device(device: str = "auto") -> str:
    """ "auto": the first CUDA device when there is one, else the CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but torch sees no CUDA device")
    return device


def resolve_dtype(dtype: str, device: str) -> str:
    """ "auto": bfloat16 on a GPU that has it, float32 elsewhere (the reference tools' cross-checks
    run in fp32 on the CPU, and a run's dtype is part of its identity)."""
    import torch

    if dtype != "auto":
        return dtype
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float32"


ONEDNN_BF16_ISAS = frozenset(
    {
        "AVX512_CORE_BF16",
        "AVX512_CORE_FP16",
        "AVX512_CORE_AMX",
        "AVX512_CORE_AMX_FP16",
        "AVX10_1_512",
        "AVX10_1_512_AMX",
        "AVX10_1_512_AMX_FP16",
        "AVX10_2_512",
        "AVX10_2_512_AMX_2",
        "ALL",
        "DEFAULT",
    }
)
"""The values of oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA) that leave it native bf16 instructions."""


def onednn_isa_cap() -> str:
    """oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA, or its old name DNNL_MAX_CPU_ISA), "" when none is set."""
    return (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").upper()


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), and oneDNN may use it (no
    ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16). There oneDNN's bf16 matrix products run several
    times as fast as fp32's (docs/benchmarks.md); without it bf16 is emulated and slower than fp32."""
    import torch

    if onednn_isa_cap() and onednn_isa_cap() not in ONEDNN_BF16_ISAS:
        return False
    return any(
        getattr(torch.cpu, probe, lambda: False)()
        for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    )


def scoring_dtype(dtype: str, device: str) -> str:
    """What `select` and `eval` score in. "auto": bfloat16 on a GPU that has it and on a CPU that
    multiplies it natively, float32 elsewhere. The backend's own "auto" (resolve_dtype) stays
    float32 on every CPU: the cross-checks against the reference tools, the benchmarks, the
    local side of re-scoring (the served model runs in fp32) and training's checks use it."""
    if dtype != "auto":
        return dtype
    device = resolve_device(device)
    if device == "cpu":
        return "bfloat16" if cpu_has_bf16() else "float32"
    return resolve_dtype(dtype, device)


def load_model(
    card: ModelCard, store: Path, *, dtype: str = "auto", device: str = "auto", checkpoint: Path | None = None
):
    """(model, tokenizer) from the store, or from `checkpoint` (e.g. a merged fine-tune of the
    card's model), on `device` in `dtype` (see resolve_device, resolve_dtype); fails with the
    command that provisions the card."""
    return (
        load_weights(card, store, dtype=dtype, device=device, checkpoint=checkpoint),
        load_tokenizer(card, store, checkpoint=checkpoint),
    )


def load_tokenizer(card: ModelCard, store: Path, *, checkpoint: Path | None = None):
    """The tokenizer alone, as load_model loads it (seconds cheaper than the weights)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        _checkpoint(card, store, checkpoint), trust_remote_code=card.trust_remote_code
    )


def load_weights(
    card: ModelCard, store: Path, *, dtype: str = "auto", device: str = "auto", checkpoint: Path | None = None
):
    """The model alone, as load_model loads it, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    checkpoint = _checkpoint(card, store, checkpoint)
    device = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint,
        dtype=getattr(torch, resolve_dtype(dtype, device)),
        use_safetensors=True,
        trust_remote_code=card.trust_remote_code,
        device_map=None if device == "cpu" else device,
    )
    model.eval()
    return model


def _checkpoint(card: ModelCard, store: Path, checkpoint: Path | None):
    if checkpoint is not None:
        return checkpoint
    manifest = read_manifest(card, store)
    if manifest is None:
        raise UserError(
            f"{card.path}: card {card.name} is not provisioned; run `make models CARD={card.name}`"
        )
    return manifest["checkpoint"]
