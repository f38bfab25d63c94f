"""A task: one strictly validated YAML file under tasks/, and the items it yields.

python -m selectune eval --task fewclue_bustm --model smollm2-135m-instruct --limit 8
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Literal

import jinja2
from pydantic import Field, model_validator

from core.config import NamedConfig, Strict, load_named_yaml
from core.errors import UserError
from core.files import sha256_file
from eval import metrics as M
from eval.metrics import KNOWN as KNOWN_METRICS
from eval.sources import read_split

TASKS_DIR = Path(__file__).resolve().parents[1] / "tasks"

Mode = Literal["gen", "ppl"]


class HoldoutSpec(Strict):
    """A split carved out of a file that has none: a seeded share of its rows, by item id."""

    split: str
    """The split that gets the share; every other split naming the same file gets the rest."""
    fraction: float = Field(gt=0, lt=1)
    seed: int = 0


class DataSpec(Strict):
    """Where the rows come from (eval/sources.py reads them)."""

    root: Literal["data", "tasks", "file"] = "data"
    """`data`: the data directory (DATA_DIR or the download); `tasks`: files shipped in tasks/data;
    `file`: next to the task file. An absolute path in `splits` is taken as it is."""
    format: Literal["jsonl", "json", "csv", "parquet"] = "jsonl"
    """`jsonl` one object a line (FewCLUE's *.json files are this), `json` a top-level array."""
    splits: dict[str, str] = Field(min_length=1)
    """Split name -> file path under the root; with `hub`, split name -> the hub dataset's split."""
    hub: str | None = None
    """A dataset on the Hugging Face hub (`org/name`), read with `datasets` at `revision`."""
    revision: str | None = Field(default=None, pattern=r"^[0-9a-f]{40}$")
    """The hub dataset's commit: a hub source must be pinned."""
    columns: dict[str, str] = {}
    """The data's column name -> the field name the prompt, label and ids use."""
    split_field: str | None = None
    """When set, a split keeps only the rows whose field equals the split name."""
    id_field: str | None = None
    """Field holding a unique item id; default: the row number in its file."""
    holdout: HoldoutSpec | None = None
    """e.g. {split: test, fraction: 0.25}: test gets a quarter of the file's rows, train the rest."""

    @model_validator(mode="after")
    def _pinned(self) -> DataSpec:
        if self.hub is not None and self.revision is None:
            raise ValueError("a hub dataset needs its revision (a 40-hex commit)")
        if self.holdout is not None:
            if self.holdout.split not in self.splits:
                raise ValueError(
                    f"holdout split '{self.holdout.split}' is not one of the splits "
                    f"({', '.join(self.splits)})"
                )
            if len([s for s in self.splits.values() if s == self.splits[self.holdout.split]]) < 2:
                raise ValueError(f"holdout split '{self.holdout.split}' shares its file with no other split")
        return self

    def keeps(self, split: str, item_id: str) -> bool:
        """Whether the holdout puts the item of this id into `split` (always, without one)."""
        h = self.holdout
        if h is None or self.splits[split] != self.splits[h.split]:
            return True
        digest = hashlib.sha256(f"{h.seed}:{item_id}".encode()).digest()
        held = int.from_bytes(digest[:8], "big") / 2**64 < h.fraction
        return held == (split == h.split)


class PromptSpec(Strict):
    user: str
    """Jinja template of the one user turn; row fields are its variables."""
    system: str | None = None
    chat_turn_end: str = ""
    """Appended to the user turn when it reaches a chat template or a chat API, never to a raw
    prompt: OpenCompass's chat wrappers (HuggingFacewithChatTemplate, its API models) end the
    HUMAN turn with "\\n", its base-model wrapper does not. FewCLUE sets "\\n" to match."""


class LabelSpec(Strict):
    field: str
    map: dict[str, str] | None = None
    """Raw label value -> choice; without it the raw value must be a choice."""
    skip: list[str] = []
    """Raw label values whose rows are dropped (OpenCompass drops ocnli's "-")."""


class GenSpec(Strict):
    max_new_tokens: int = Field(default=32, gt=0)
    stop: list[str] = []


class JudgeSpec(Strict):
    """An LLM judge through an OpenAI-compatible endpoint, used only when one is configured
    (settings judge_url / judge_model). It reads the model's reply and answers with one of
    `labels`; the item scores 1 when that label equals the item's `expected_field`."""

    metric: str
    prompt: str
    """Jinja template of the judge's user turn; `reply` and the row's fields are its variables."""
    labels: list[str] = Field(min_length=2)
    expected_field: str
    max_tokens: int = Field(default=16, gt=0)


class FewShotSpec(Strict):
    """Examples shown before every item as earlier turns: `n` items of `split` (their prompt, and
    the gold choice or first reference as the reply), drawn once with `seed`."""

    split: str
    n: int = Field(gt=0)
    seed: int = 0


class TaskSpec(NamedConfig):
    home: ClassVar[Path] = TASKS_DIR
    name: str
    version: int = Field(ge=1)
    """Bumped whenever the prompt, data or scoring changes meaning; shown in tables."""
    description: str
    data: DataSpec
    prompt: PromptSpec
    modes: list[Mode] = Field(min_length=1)
    choices: list[str] | None = None
    """Answer options for classification tasks (needed by `ppl` and the choice parser)."""
    label: LabelSpec | None = None
    reference_field: str | None = None
    """Field holding the reference answer for open-ended tasks: a string, or a list of them
    (several references: each metric takes the best)."""
    normalize: list[Literal["nfkc", "case", "punctuation", "articles", "whitespace", "numerals"]] = []
    """Applied to reply and references before exact_match, contains, F1, ROUGE-L, BLEU and chrF:
    NFKC, lower case, punctuation removed, whitespace collapsed, Chinese numerals before a unit
    to digits (cn2an)."""
    regex: str | None = None
    """The pattern `regex_match` looks for in the reply (Python `re`)."""
    fewshot: FewShotSpec | None = None
    gen: GenSpec = GenSpec()
    parser: Literal["choice", "text"] = "text"
    metrics: list[str] = Field(min_length=1)
    scorer: str | None = None
    """`module:function` returning extra per-item metrics, for task-specific scoring."""
    judge: JudgeSpec | None = None
    contamination: list[str] | None = None
    """The item fields the contamination gate compares with training data (train/contamination.py);
    None: the fields the prompt reads and the reference. A task whose reference material overlaps
    training by design (the fact task's answers) names only what must not (its questions)."""
    default_split: str
    limit: int | None = Field(default=None, gt=0)
    """Score only the first N items of a split (for quick looks; results record it)."""

    @property
    def sha256(self) -> str:
        return sha256_file(self.path)

    @model_validator(mode="after")
    def _consistent(self) -> TaskSpec:
        if self.default_split not in self.data.splits:
            raise ValueError(f"default_split '{self.default_split}' is not in data.splits")
        if self.fewshot and self.fewshot.split not in self.data.splits:
            raise ValueError(f"fewshot.split '{self.fewshot.split}' is not in data.splits")
        if ("ppl" in self.modes or self.parser == "choice") and not (self.choices and self.label):
            raise ValueError("ppl mode and the choice parser need both choices and label")
        if self.label and self.label.map and not set(self.label.map.values()) <= set(self.choices or []):
            raise ValueError("label.map values must all be choices")
        unknown = [
            m for m in self.metrics + ([self.judge.metric] if self.judge else []) if m not in KNOWN_METRICS
        ]
        if unknown:
            raise ValueError(f"unknown metric '{unknown[0]}' (known: {', '.join(sorted(KNOWN_METRICS))})")
        for metric in self.metrics:
            if why := self._cannot_compute(metric):
                raise ValueError(f"task '{self.name}' cannot compute metric '{metric}': {why}")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex is not a valid pattern: {exc}") from None
        return self

    def _cannot_compute(self, metric: str) -> str | None:
        if metric in M.CHOICE and self.parser != "choice":
            return "it needs `parser: choice` with choices and a label"
        if metric in M.REFERENCE and self.reference_field is None:
            return "it compares the reply with a reference: set reference_field"
        if metric == M.REGEX_MATCH and self.regex is None:
            return "it needs the pattern: set regex"
        if metric in M.CIRCULAR:
            return "it is computed for a suite entry with `circular: true`, not named by a task"
        if metric in M.SCORER_ONLY and self.scorer is None:
            return "it is computed by a task's own scorer (eval/scorers/): set scorer"
        return None


@dataclass(frozen=True)
class Item:
    id: str
    fields: dict
    user: str
    system: str | None
    gold: str | None
    """The correct choice (classification) or the (first) reference answer (open-ended)."""
    chat_turn_end: str = ""
    references: tuple[str, ...] = ()
    """Every reference answer of an open-ended item (`gold` is the first)."""
    shots: tuple[tuple[str, str], ...] = ()
    """Few-shot examples, (prompt, reply) each, shown before the item."""

    def messages(self) -> list[dict]:
        """The turns a chat model reads (its template or a chat API adds the rest)."""
        turns = [{"role": "system", "content": self.system}] if self.system else []
        for user, reply in self.shots:
            turns += [
                {"role": "user", "content": user + self.chat_turn_end},
                {"role": "assistant", "content": reply},
            ]
        return turns + [{"role": "user", "content": self.user + self.chat_turn_end}]

    def raw(self) -> str:
        """The text a base model without a chat template reads."""
        shots = [f"{user}{reply}" for user, reply in self.shots]
        return "\n\n".join(t for t in (self.system, *shots, self.user) if t)


def load_task(path: Path) -> TaskSpec:
    return load_named_yaml(path, TaskSpec, "task")


_EXTRA_TASK_DIRS: list[Path] = []
"""Folders searched after tasks/: the settings' `task_dirs` (`--include-path`)."""


def include_task_dirs(folders: list[Path]) -> None:
    _EXTRA_TASK_DIRS[:] = [Path(f) for f in folders]


def load_tasks(tasks_dir: Path | None = None) -> dict[str, TaskSpec]:
    """Every task by name: those of `tasks_dir`, or of tasks/ and the included folders. A name
    found in two files is one line naming both."""
    tasks: dict[str, TaskSpec] = {}
    for folder in [tasks_dir] if tasks_dir else [TASKS_DIR, *_EXTRA_TASK_DIRS]:
        for task in map(load_task, sorted(folder.glob("*.yaml"))):
            if task.name in tasks:
                raise UserError(
                    f"{task.path}: task name '{task.name}' is already used by {tasks[task.name].path}"
                )
            tasks[task.name] = task
    return tasks


def find_task(name: str, tasks_dir: Path | None = None) -> TaskSpec:
    tasks = load_tasks(tasks_dir)
    if name not in tasks:
        raise UserError(f"unknown task '{name}' (known: {', '.join(sorted(tasks))})")
    return tasks[name]


def load_items(task: TaskSpec, split: str, data_dir: Path) -> list[Item]:
    """The task's items for `split`, prompts rendered; every bad row stops with file and row."""
    if split not in task.data.splits:
        raise UserError(f"{task.path}: no split '{split}' (splits: {', '.join(task.data.splits)})")
    env = jinja2.Environment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
    )  # prompts are plain text for a model, not HTML
    try:
        user_t = env.from_string(task.prompt.user)
        system_t = env.from_string(task.prompt.system) if task.prompt.system else None
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(f"{task.path}: key 'prompt': bad Jinja template ({exc.message})") from None
    items = []
    path, rows = read_split(task.data, split, data_dir, task.path)
    for n, row in rows:
        if not isinstance(row, dict):
            raise UserError(f"{path}:{n}: expected an object with fields, got {type(row).__name__}")
        if task.data.split_field and row.get(task.data.split_field) != split:
            continue
        if task.data.id_field and task.data.id_field not in row:
            raise UserError(f"{path}:{n}: missing id field '{task.data.id_field}'")
        item_id = str(row[task.data.id_field]) if task.data.id_field else str(n)
        if not task.data.keeps(split, item_id):
            continue
        gold = _gold(task, row, path, n)
        if gold is _SKIP:
            continue
        references = tuple(gold) if isinstance(gold, list) else (gold,) if task.reference_field else ()
        gold = references[0] if isinstance(gold, list) else gold
        try:
            user = user_t.render(**row)
            system = system_t.render(**row) if system_t else None
        except jinja2.UndefinedError as exc:
            raise UserError(f"{path}:{n}: prompt needs a field the row lacks ({exc.message})") from None
        items.append(Item(item_id, row, user, system, gold, task.prompt.chat_turn_end, references))
        if task.limit and len(items) >= task.limit:
            break
    if not items:
        raise UserError(f"{path}: split '{split}' of task {task.name} has no items")
    if len({i.id for i in items}) != len(items):
        raise UserError(f"{path}: item ids in field '{task.data.id_field}' are not unique")
    if task.fewshot is None:
        return items
    return [replace(item, shots=fewshot_examples(task, split, data_dir)) for item in items]


def fewshot_examples(task: TaskSpec, split: str, data_dir: Path) -> tuple[tuple[str, str], ...]:
    """The task's few-shot examples, the same for every item, drawn from another split."""
    import random

    spec = task.fewshot
    if spec.split == split:
        raise UserError(
            f"{task.path}: key 'fewshot.split': the examples come from the split '{split}' being "
            "scored; draw them from another split"
        )
    pool = load_items(task.model_copy(update={"fewshot": None, "limit": None}), spec.split, data_dir)
    if len(pool) < spec.n:
        raise UserError(
            f"{task.path}: key 'fewshot.n': {spec.n} examples asked, split '{spec.split}' has {len(pool)}"
        )
    return tuple((i.user, i.gold or "") for i in random.Random(spec.seed).sample(pool, spec.n))


_SKIP = object()


def resolve_task(spec: str, relative_to: Path) -> TaskSpec:
    """A task named by name (tasks/<name>.yaml), or by the path of its file: absolute, or relative
    to `relative_to` (the suite file's folder; the working directory on the command line)."""
    if spec.endswith((".yaml", ".yml")) or "/" in spec:
        path = Path(spec) if Path(spec).is_absolute() else relative_to / spec
        if not path.is_file():
            raise UserError(f"task file {path} does not exist")
        return load_task(path)
    return find_task(spec)


def _gold(task: TaskSpec, row: dict, path: Path, n: int):
    if task.label is not None:
        if task.label.field not in row:
            raise UserError(f"{path}:{n}: missing label field '{task.label.field}'")
        raw = str(row[task.label.field])
        if raw in task.label.skip:
            return _SKIP
        choice = task.label.map.get(raw) if task.label.map else raw
        if choice not in (task.choices or []):
            known = sorted(task.label.map) if task.label.map else task.choices
            raise UserError(f"{path}:{n}: label '{raw}' is not one of {known}")
        return choice
    if task.reference_field is not None:
        if task.reference_field not in row:
            raise UserError(f"{path}:{n}: missing reference field '{task.reference_field}'")
        value = row[task.reference_field]
        if isinstance(value, list):
            if not value or not all(isinstance(v, str) for v in value):
                raise UserError(
                    f"{path}:{n}: reference field '{task.reference_field}' must be a string or "
                    "a non-empty list of strings"
                )
            return list(value)
        return str(value)
    return None
