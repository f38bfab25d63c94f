"""From a recipe's sources to token ids: gather the conversations, clean them with a report, check
them against what will be scored, split them, and turn each into token ids whose labels cover
the assistant's tokens only (train/data.py reads the formats and cleans)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core.errors import UserError
from core.workspace import TrainRun
from train.data import CleaningReport, Conversation, clean, data_sha256, load_conversations, save_split, split
from train.recipe import Recipe, data_path, synth_output


# For models without a chat template (gemma3-270m): Alpaca's layout as a Jinja chat template, so
# that training, the merged checkpoint and serving share one code path (apply_chat_template).
ALPACA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] + '\\n\\n' }}"
    "{% elif m['role'] == 'user' %}{{ '### Instruction:\\n' + m['content'] + '\\n\\n### Response:\\n' }}"
    "{% else %}{{ m['content'] + eos_token + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
)
"""A user turn ends with "### Response:\n", so the generation prompt needs nothing more."""


IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]
    """input_ids where the model must learn the token (assistant replies and their end-of-turn
    marks), IGNORE_INDEX elsewhere."""
    source: str


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template the Alpaca layout; True when it was added."""
    if tokenizer.chat_template:
        return False
    tokenizer.chat_template = ALPACA_CHAT_TEMPLATE
    return True


def _assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of each assistant reply (with the
    template's end-of-turn text), found by rendering growing prefixes of the conversation."""
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise UserError(
                "the chat template does not render a conversation as a growing prefix; "
                "assistant tokens cannot be located"
            )
        spans.append((len(before), len(upto)))
    return full, spans


def tokenize(
    tokenizer,
    conv: Conversation,
    max_length: int,
    overlong: Literal["truncate", "drop"],
    report: CleaningReport,
) -> Example | None:
    text, spans = _assistant_spans(tokenizer, conv.messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    labels = []
    for tok, (start, end) in zip(enc.input_ids, enc.offset_mapping):
        inside = any(s <= start and end <= e and end > start for s, e in spans)
        labels.append(tok if inside else IGNORE_INDEX)
    ids = list(enc.input_ids)
    if len(ids) > max_length:
        if overlong == "drop":
            report.overlong_dropped += 1
            return None
        ids, labels = ids[:max_length], labels[:max_length]
        report.overlong_truncated += 1
    if all(label == IGNORE_INDEX for label in labels):
        report.overlong_dropped += 1  # truncation left no reply to learn from
        return None
    return Example(ids, labels, conv.source)


def source_conversations(
    recipe: Recipe, data_dir: Path, report: CleaningReport, synth_root: Path | None = None
) -> list[Conversation]:
    from eval.task import load_items, resolve_task

    out: list[Conversation] = []
    for src in recipe.data:
        if src.task is not None:
            task = resolve_task(src.task, recipe.path.parent)
            if task.reference_field is None:
                raise UserError(f"{recipe.path}: task '{src.task}' has no reference answers to train on")
            items = load_items(task, src.split, data_dir)
            report.read += len(items)
            out += [
                Conversation([*i.messages(), {"role": "assistant", "content": i.gold}], f"{task.name}:{i.id}")
                for i in items
            ]
        else:
            path, fmt = (
                synth_output(src.synth, synth_root, recipe.path)
                if src.synth is not None
                else (data_path(src.path, recipe.path), src.format)
            )
            out += load_conversations(
                path,
                fmt,
                skip_bad_rows=recipe.skip_bad_rows,
                report=report,
                prompt_task=src.prompt_task,
                columns=src.columns,
            )
    return out


@dataclass
class PreparedData:
    train: list[Example]
    val: list[Example]
    split: dict[str, list[Conversation]]
    report: CleaningReport
    sha256: str
    contamination: dict | None = None
    """The contamination gate's record (train/contamination.py); None when it was not run."""


def prepare_data(
    recipe: Recipe,
    tokenizer,
    data_dir: Path,
    run_dir: Path,
    synth_root: Path | None = None,
    eval_texts: list | None = None,
) -> PreparedData:
    """Read, clean, check against `eval_texts` (the contamination gate, which may stop the run),
    split (saved under run_dir/data) and tokenise; prints the cleaning report."""
    report = CleaningReport()
    conversations = clean(source_conversations(recipe, data_dir, report, synth_root), report)
    contamination = None
    if eval_texts is not None:
        from train.contamination import gate

        contamination = gate(recipe, conversations, eval_texts)
    parts = split(conversations, recipe.split, recipe.seed)
    save_split(parts, TrainRun(run_dir).data)
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
    return PreparedData(
        examples["train"], examples["val"], parts, report, data_sha256(conversations), contamination
    )
