"""Load a provisioned card: safetensors only, remote code only where the card opts in."""

from __future__ import annotations

from pathlib import Path

from models.card import ModelCard
from models.store import read_manifest
from selectune.errors import UserError


def load_model(card: ModelCard, store: Path, *, dtype: str = "float32", checkpoint: Path | None = None):
    """(model, tokenizer) from the store, or from `checkpoint` (e.g. a merged fine-tune of the
    card's model); fails with the command that provisions the card."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if checkpoint is None:
        manifest = read_manifest(card, store)
        if manifest is None:
            raise UserError(f"{card.path}: card {card.name} is not provisioned; run "
                            f"`make models CARD={card.name}`")
        checkpoint = manifest["checkpoint"]
    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=card.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=getattr(torch, dtype), use_safetensors=True,
        trust_remote_code=card.trust_remote_code)
    model.eval()
    return model, tokenizer
