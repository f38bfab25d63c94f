"""A data-synthesis recipe: one strict YAML file under synth/ (unknown key -> one clear line)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from core.config import NamedConfig, Strict, load_named_yaml
from synth.clean import CleanSpec

REPO = Path(__file__).resolve().parents[1]


class SeedSpec(Strict):
    path: str | None = None
    """A .jsonl/.json/.csv file, relative to the repository root or absolute."""
    task: str | None = None
    """Or a task (name, or path relative to the recipe): the rows of its `split`, read as the task
    reads them (data directory, `columns`, holdout), so seeds never come from the test split."""
    split: str = "train"
    question: str = "question"
    answer: str = "answer"
    style: str | None = None
    """The field naming a row's reply style (style data), if any."""
    where: dict[str, str] = Field(default_factory=dict)
    """Keep rows whose fields equal these values, e.g. {split: train}."""
    distinct: str | None = None
    """At most one seed per value of this field (e.g. fact_id: one paraphrase per fact)."""
    count: int = Field(default=30, gt=0)


class SamplingSpec(Strict):
    temperature: float = Field(ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(gt=0)


class TeacherSpec(Strict):
    card: str = "qwen2.5-coder-0.5b-instruct"
    """The offline model served on this machine when no base_url is given."""
    base_url: str | None = None
    model: str | None = None
    api_key_env: str = "SELECTUNE_TEACHER_API_KEY"


class ExpandSpec(Strict):
    template: str = "synth/prompts/expand.jinja"
    what: str
    """What the examples are, in the prompt's words (e.g. 用户向客服提出的问题)."""
    with_context: bool = False
    """Show the answer context too, so new items can ask about what the seeds do not."""
    rounds: int = Field(default=4, gt=0)
    shots: int = Field(default=10, gt=0)
    per_round: int = Field(default=10, gt=0)
    sampling: SamplingSpec = SamplingSpec(temperature=0.9, top_p=0.95, max_tokens=600)


class AnswerSpec(Strict):
    template: str
    context: str | None = None
    """A file given to the teacher with every question (the facts answers must come from)."""
    context_pattern: str | None = None
    """A regular expression: only its first group in each matching line of the context is kept."""
    context_top_k: int | None = Field(default=None, gt=0)
    """Give each question only the k context lines most like it (character n-gram cosine), in
    their order: a short prompt instead of the whole document on every call."""
    shots: int = Field(default=3, ge=0)
    styles: list[str] = Field(default_factory=list)
    """Reply styles drawn per item (style data); the shots then come from seeds of that style."""
    step_by_step: bool = False
    """Ask the teacher to reason briefly first and end with a line starting with `final_marker`;
    a reply without it is dropped. Only what follows the marker is kept, unless `keep_reasoning`.
    An item whose answer the expand step already wrote (a riddle's solution) is answered with that
    solution given, and dropped when the final answer does not contain it."""
    final_marker: str = "最终答案："
    keep_reasoning: bool = False
    """Keep the reasoning and the final line (step-by-step answers to train on)."""
    sampling: SamplingSpec = SamplingSpec(temperature=0.3, top_p=1.0, max_tokens=160)


class ConverseSpec(Strict):
    fraction: float = Field(default=0.0, ge=0, le=1)
    """Share of items that get a follow-up question and its answer (two-turn conversations)."""
    persona: str = "一个好奇的十岁孩子"
    template: str = "synth/prompts/followup.jinja"
    sampling: SamplingSpec = SamplingSpec(temperature=0.8, top_p=0.95, max_tokens=60)


class CleanRecipe(Strict):
    """The recipe's `clean:` keys; their defaults are synth.clean.CleanSpec's, written there only."""

    min_chars: int = CleanSpec.min_chars
    max_question_chars: int = CleanSpec.max_question_chars
    max_answer_chars: int = CleanSpec.max_answer_chars
    min_cjk_ratio: float = Field(default=CleanSpec.min_cjk_ratio, ge=0, le=1)
    near_duplicate: float = Field(default=CleanSpec.near_duplicate, gt=0, le=1)
    leak_fraction: float = Field(default=CleanSpec.leak_fraction, gt=0, le=1)
    leak_min_chars: int = Field(default=CleanSpec.leak_min_chars, ge=1)
    similarity: Literal["chars", "words"] = CleanSpec.similarity
    """Near duplicates by character 1-2-grams (Chinese) or word 1-2-grams (English)."""
    require_question: bool = CleanSpec.require_question
    """New items must end in a question mark."""
    check_numbers: bool = False
    """Every number in an answer must appear in the answer context."""


class BudgetSpec(Strict):
    max_calls: int | None = Field(default=300, gt=0)
    max_tokens: int | None = Field(default=None, gt=0)


class SynthRecipe(NamedConfig):
    home: ClassVar[Path] = REPO / "synth"
    name: str
    description: str
    seeds: SeedSpec
    teacher: TeacherSpec = TeacherSpec()
    expand: ExpandSpec
    answer: AnswerSpec
    converse: ConverseSpec = ConverseSpec()
    clean: CleanRecipe = CleanRecipe()
    budget: BudgetSpec = BudgetSpec()
    format: Literal["messages", "alpaca", "style"] = "messages"
    """The trainer's formats: messages (ChatML-style role/content turns), Alpaca (with history),
    or the style-dialogue shape."""
    system: str | None = None
    """A system turn opening every conversation (messages format only)."""
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> SynthRecipe:
        if self.format == "style" and (not self.answer.styles or self.converse.fraction):
            raise ValueError("format 'style' needs answer.styles and single-turn items (converse.fraction 0)")
        if self.system is not None and self.format != "messages":
            raise ValueError("system needs format 'messages'")
        if (self.seeds.path is None) == (self.seeds.task is None):
            raise ValueError("seeds name exactly one of 'path' or 'task'")
        return self


def load_synth_recipe(path: Path) -> SynthRecipe:
    return load_named_yaml(path, SynthRecipe, "synthesis recipe")


def resolve(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else REPO / p
