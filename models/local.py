"""A candidate that is a checkpoint directory rather than a card: `--models ./my-model,gemma3-270m`.

Its card is built from its own files: the name from the folder, the architecture from
config.json, the parameter count from the safetensors headers, the memory estimates from that
count by the formula the shipped cards use (docs/models.md), and the chat template from its
tokenizer. Its identity in the results store is the hash of its weights (the HF backend's, as for
a merged model), so a changed checkpoint is never mixed with an earlier one.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from core.config import validate
from core.errors import UserError
from models.card import ModelCard

GIB = 1 << 30


def is_checkpoint(entry: str) -> bool:
    return Path(entry).is_dir() or "/" in entry or entry.startswith(".")


def parameter_count(folder: Path) -> int:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors weights (models load from safetensors only)")
    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                numel = 1
                for size in f.get_slice(name).get_shape():
                    numel *= size
                total += numel
    return total


def memory_gib(parameters: int, vocab: int, hidden: int) -> dict[str, float]:
    """Peak GiB: 1.2 x the weight bytes for inference (NF4 at 0.52 B a parameter, the embedding in
    16 bits); QLoRA adds three fp32 copies of a 512-token sequence's logits and about 0.5 GiB of
    LoRA weights, optimiser state and activations."""
    embed = vocab * hidden
    nf4 = 1.2 * (0.52 * (parameters - embed) + 2 * embed) / GIB
    estimates = {
        "fp32": 1.2 * 4 * parameters / GIB,
        "bf16": 1.2 * 2 * parameters / GIB,
        "nf4": nf4,
        "qlora_train": nf4 + 3 * 512 * vocab * 4 / GIB + 0.5,
    }
    return {k: max(round(v, 2), 0.01) for k, v in estimates.items()}


def checkpoint_card(folder: Path) -> ModelCard:
    """The card of a local checkpoint directory; a folder that is not one is one line saying why."""
    folder = folder.resolve()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(
            f"{folder}: not a checkpoint directory (no config.json); --models takes card names "
            "and checkpoint directories"
        )
    config = json.loads(config_path.read_text(encoding="utf-8"))
    text = config.get("text_config", config)
    parameters = parameter_count(folder)
    tokenizer_config = folder / "tokenizer_config.json"
    has_template = (folder / "chat_template.jinja").is_file() or (
        tokenizer_config.is_file()
        and "chat_template" in json.loads(tokenizer_config.read_text(encoding="utf-8"))
    )
    name = re.sub(r"[^a-z0-9._-]+", "-", folder.name.lower()).strip("-.") or "local"
    return validate(
        ModelCard,
        {
            "name": name if name[0].isalnum() else f"m{name}",
            "description": f"The local checkpoint {folder}",
            "source": {"kind": "local", "path": str(folder)},
            "architecture": config.get("model_type", "unknown"),
            "parameters": parameters,
            "license": {
                "id": "unknown",
                "provenance": f"a local checkpoint ({folder}); its licence is its owner's",
            },
            "chat_template": "tokenizer" if has_template else "none",
            "add_bos": str(config.get("model_type", "")).startswith("gemma"),
            "memory_gib": memory_gib(
                parameters, int(text.get("vocab_size", 0)), int(text.get("hidden_size", 0))
            ),
        },
        folder,
    )


def resolve_candidates(names: list[str]) -> list[tuple[ModelCard, Path | None]]:
    """(card, checkpoint directory or None) for each --models entry: a card name, a directory or
    `name=URL` (an OpenAI-compatible endpoint)."""
    from models.card import find_card
    from models.endpoint import endpoint_card, is_endpoint

    out = []
    for entry in names:
        if is_endpoint(entry):
            out.append((endpoint_card(entry), None))
        elif is_checkpoint(entry):
            card = checkpoint_card(Path(entry))
            out.append((card, Path(card.source.path)))
        else:
            out.append((find_card(entry), None))
    names_seen = [c.name for c, _ in out]
    if len(set(names_seen)) != len(names_seen):
        raise UserError(
            f"--models: two candidates have the same name ({', '.join(names_seen)}); rename a folder"
        )
    return out
