"""A training recipe: one strictly validated YAML file under train/ (unknown key -> one-line error).

python -m selectune train --recipe train/quick.yaml
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import Field, model_validator

from core.errors import UserError
from core.config import NamedConfig, Strict, load_named_yaml

TRAIN_DIR = Path(__file__).resolve().parent


class SourceSpec(Strict):
    """Either a task's split (its prompts with the reference answers as replies, so training
    teaches exactly what is scored) or a data file in one of the formats of train/data.py."""

    task: str | None = None
    split: str = "train"
    path: str | None = None
    """Absolute, relative to the recipe file, or relative to the repository root (runs/...)."""
    synth: str | None = None
    """Or what `make data-synth` wrote for the synthesis recipe of this name (RUNS_DIR/synth/<name>/
    data.jsonl, in the format its provenance records); refused while that run is incomplete."""
    format: str | None = None
    """alpaca, messages, xtuner, style or prompt_completion; None: detected from the first row."""
    columns: dict[str, str] = {}
    """The file's column names -> the format's field names (e.g. {问题: prompt, 答案: completion})."""
    prompt_task: str | None = None
    """For the style-dialogue shape (user, assistant, style): the task whose user prompt wraps
    each message, so training teaches what that task scores (e.g. style)."""

    @model_validator(mode="after")
    def _one_kind(self) -> SourceSpec:
        if sum(x is not None for x in (self.task, self.path, self.synth)) != 1:
            raise ValueError("a data source names exactly one of 'task', 'path' or 'synth'")
        return self


class LoraSpec(Strict):
    r: int = Field(default=16, gt=0)
    alpha: int = Field(default=32, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] | None = None
    """None: the architecture's attention projections plus MLP (train/trainer.py)."""
    modules_to_save: list[str] = []
    """Trained in full and saved with the adapter, e.g. [lm_head, embed_tokens]."""


class TrainingSpec(Strict):
    epochs: float = Field(default=3.0, gt=0)
    max_steps: int | None = Field(default=None, gt=0)
    """When set, overrides epochs."""
    batch_size: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=1, gt=0)
    learning_rate: float = Field(default=2e-4, gt=0)
    scheduler: Literal["cosine", "constant"] = "cosine"
    """Either after a linear warm-up."""
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    gradient_checkpointing: bool = True
    checkpoint_every_n_layers: int = Field(default=1, gt=0)
    """With gradient_checkpointing: recompute every n-th decoder layer only (1: all of them);
    trades part of the memory saving back for speed."""
    group_by_length: bool = True
    """Batches of similar lengths: far less padding than a random order."""
    logging_steps: int = Field(default=5, gt=0)
    eval_steps: Annotated[int, Field(gt=0)] | Literal["epoch"] = 20
    """Val loss every this many steps, or at the end of every epoch (`epoch`); always at the end."""
    save_steps: int = Field(default=20, gt=0)
    sample_steps: Annotated[int, Field(gt=0)] | Literal["epoch"] = 20
    """Generate the recipe's sample prompts every this many steps, or every epoch (`epoch`);
    always at the end."""
    cpu_allocator: Literal["compact", "glibc"] = "compact"
    """On a CPU, both load the model with glibc's mmap threshold at 2 MB and trim the heap after
    every pass (`CpuAllocator`). `compact` keeps the 2 MB threshold while training (with huge
    pages), so freed activations go back to the system: less peak memory than `glibc`, and
    slower (docs/training.md). `glibc` serves blocks up to 32 MB from the
    heap, where glibc's adaptive threshold ends up. No effect on a GPU's memory."""
    divergence_factor: float = Field(default=4.0, gt=1)
    """Stop when the training loss exceeds this many times its first logged value."""
    collapse_logs: int = Field(default=3, ge=1)
    """Stop when the gradient norm is 0 at this many logs in a row (a collapsed run)."""


class SampleTaskSpec(Strict):
    task: str
    split: str = "test"
    count: int = Field(default=2, gt=0)
    """The first `count` items of the split, with their system prompt and, for the fact task,
    their required facts (the under-fitting check)."""


class SamplesSpec(Strict):
    """Fixed prompts generated every training.sample_steps steps (XTuner's evaluation_inputs)."""

    prompts: list[str] = []
    """Single user turns."""
    facts: list[list[str]] = []
    """Per prompt, the facts a trained reply must contain (under-fitting check); may be empty."""
    tasks: list[SampleTaskSpec] = []
    max_new_tokens: int = Field(default=48, gt=0)

    @model_validator(mode="after")
    def _aligned(self) -> SamplesSpec:
        if self.facts and len(self.facts) != len(self.prompts):
            raise ValueError("samples.facts needs one list per prompt")
        return self


class CheckSpec(Strict):
    """A task scored on the base and the merged model after training, compared item by item."""

    task: str
    """A task name, or the path of a task file relative to the recipe."""
    split: str = "test"
    mode: Literal["gen", "ppl"] = "gen"
    metric: str | None = None
    """The metric compared; default the task's first (`accuracy` in ppl mode)."""


class ContaminationSpec(Strict):
    """The contamination gate (train/contamination.py): shares of an evaluation field's n-grams
    found in a training conversation (containment) and TF-IDF cosine; at `duplicate_*` the run
    stops unless `allow`, at `overlap_*` the pair is reported and its item left out of the clean
    subset."""

    allow: bool = False
    duplicate_containment: float = Field(default=0.8, gt=0, le=1)
    duplicate_cosine: float = Field(default=0.9, gt=0, le=1)
    overlap_containment: float = Field(default=0.5, gt=0, le=1)
    overlap_cosine: float = Field(default=0.7, gt=0, le=1)


class ParitySpec(Strict):
    items: int = Field(default=8, gt=0)
    """Validation prompts on which base+adapter and the merged model are compared."""
    max_new_tokens: int = Field(default=32, gt=0)
    tolerance: float = Field(default=1e-3, gt=0)
    """Largest allowed absolute difference between their logits (fp32)."""
    task_items: int = Field(default=8, ge=0)
    """With a quantised base, the first this many items of each `check` probe entry are also
    scored by the quantised base + adapter, fp32 base + adapter and the merge (three-way parity on
    tasks: identical outputs, paired metric differences); 0: not."""


class CheckpointSelectionSpec(Strict):
    """Checkpoints chosen by evidence (train/checkpoints.py): the probe entries scored at every
    evaluation, and the merged checkpoint chosen by a paired test against the final one."""

    enabled: bool = True
    max_items: int | None = Field(default=60, gt=0)
    """Items per probe entry at each evaluation (a seeded sample of larger splits); None: all."""


class Recipe(NamedConfig):
    home: ClassVar[Path] = TRAIN_DIR
    name: str
    description: str = ""
    model: str | None = None
    """Card name; None: the winner in runs/selection.json."""
    data: list[SourceSpec] = Field(min_length=1)
    skip_bad_rows: bool = False
    max_length: int = Field(default=512, gt=8)
    overlong: Literal["truncate", "drop"] = "truncate"
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    quantization: Literal["nf4", "int8", "none"] = "nf4"
    """nf4: QLoRA (NF4, double quantisation); int8: 8-bit loading; none: plain LoRA."""
    compute_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 on a GPU or CPU that computes it natively (CUDA bf16; AVX512-BF16 or AMX), else
    fp32 (where bf16 is emulated it is slower than fp32)."""
    lora: LoraSpec = LoraSpec()
    training: TrainingSpec = TrainingSpec()
    samples: SamplesSpec = SamplesSpec()
    parity: ParitySpec = ParitySpec()
    merge_base: Literal["fp32", "dequantized"] = "fp32"
    """What the adapter is merged into: the checkpoint's fp32 weights, or the quantised training
    base's weights dequantised to fp32 (train/merge.py; both are compared with what training
    optimised either way)."""
    contamination: ContaminationSpec = ContaminationSpec()
    checkpoint_selection: CheckpointSelectionSpec = CheckpointSelectionSpec()
    checks: list[CheckSpec] = []
    """Tasks measured on the base and the merged model after the merge (`gen` mode), each a paired
    comparison in the summary and the report."""


def load_recipe(path: Path) -> Recipe:
    return load_named_yaml(path, Recipe, "recipe")


def data_path(given: str, recipe_file: Path) -> Path:
    """A recipe's data file: absolute, next to the recipe, or relative to the repository root
    (where `make data-synth` writes under runs/)."""
    path = Path(given)
    if path.is_absolute():
        return path
    beside = recipe_file.parent / path
    return beside if beside.exists() else TRAIN_DIR.parent / path


def synth_output(name: str, synth_root: Path | None, recipe_file: Path) -> tuple[Path, str]:
    """The data file and format a complete `make data-synth` run of that recipe name wrote."""
    from core.artifacts import SynthProvenance, read_artifact

    if synth_root is None:
        raise UserError(
            f"{recipe_file}: data source synth '{name}' is read from the runs directory: train "
            "through `selectune train`, which names it"
        )
    from core.workspace import SynthOutput

    output = SynthOutput(synth_root / name)
    provenance = output.provenance
    if not provenance.is_file():
        raise UserError(
            f"{recipe_file}: data source synth '{name}': {provenance} not found; run "
            f"`make data-synth SYNTH_RECIPE=...` for the recipe named {name} first"
        )
    record = read_artifact(provenance, SynthProvenance)
    if not record.complete:
        raise UserError(
            f"{recipe_file}: data source synth '{name}': that run stopped early ({record.stopped}); "
            "rerun make data-synth to finish it"
        )
    return output.data, record.format


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
        raise UserError(
            f"{recipe.path}: no default LoRA target modules for model_type '{model_type}'; "
            f"set lora.target_modules (known: {', '.join(sorted(TARGET_MODULES))})"
        )
    return TARGET_MODULES[model_type]
