"""GGUF -> transformers safetensors checkpoint, converted once per model at provisioning time.

transformers dequantises a GGUF file into plain fp32 modules but keeps a GGUF quantizer attached,
and `save_pretrained` refuses such a model ("quantized with gguf and is not serializable").
The weights are already dense, so dropping the quantizer is exact: the saved checkpoint gives
the same logits (tests/test_provision_real.py checks it) and loads in seconds instead of a minute.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError


@dataclass(frozen=True)
class ConvertedCheckpoint:
    parameters: int
    architecture: str
    chat_template: str | None
    bos_token_id: int | None


def load_gguf(gguf_path: Path):
    """(model, tokenizer) straight from a GGUF file: slow (dequantises every tensor)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model, tokenizer


def _drop_gguf_quantizer(model) -> None:
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.quantization_method = None


def _require_bos(tokenizer, where: str) -> None:
    if tokenizer.bos_token_id is None:
        raise UserError(f"{where}: card says add_bos: true but the tokenizer has no BOS token")
    if tokenizer("x").input_ids[0] != tokenizer.bos_token_id:
        tokenizer.add_bos_token = True
    if tokenizer("x").input_ids[0] != tokenizer.bos_token_id:
        raise UserError(f"{where}: card says add_bos: true but the tokenizer cannot be made to add BOS")


def convert_gguf(gguf_path: Path, out_dir: Path, *, add_bos: bool, where: str) -> ConvertedCheckpoint:
    """Write a safetensors checkpoint (fp32) and tokenizer for `gguf_path` into `out_dir`."""
    try:
        model, tokenizer = load_gguf(gguf_path)
    except Exception as exc:  # transformers raises many types for a bad GGUF; all mean the same
        raise UserError(f"{where}: cannot load GGUF {gguf_path.name}: {type(exc).__name__}: {exc}") from exc
    if add_bos:
        _require_bos(tokenizer, where)
    _drop_gguf_quantizer(model)
    model.save_pretrained(out_dir)  # safetensors is the only format transformers 5 writes
    tokenizer.save_pretrained(out_dir)
    return ConvertedCheckpoint(
        parameters=sum(p.numel() for p in model.parameters()),
        architecture=model.config.model_type,
        chat_template=tokenizer.chat_template,
        bos_token_id=tokenizer.bos_token_id if add_bos else None,
    )
