"""What a synthesis run starts from: the recipe's seeds (from a task's split or a file, filtered,
deduplicated and shuffled by the recipe's seed), the answer context, and the prompt templates."""

from __future__ import annotations

import random
from pathlib import Path

from core.errors import UserError
from core.rows import BadLine, read_rows
from synth.recipe import SynthRecipe, resolve


_FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv"}


def _seed_rows(recipe: SynthRecipe, data_dir: Path | None) -> tuple[str, list[tuple[int, object]]]:
    spec = recipe.seeds
    if spec.task is not None:
        from eval.task import load_items, resolve_task

        task = resolve_task(spec.task, recipe.path.parent)
        if data_dir is None:
            raise UserError(f"{recipe.path}: seeds from task '{task.name}' need the data directory")
        return f"task {task.name} split {spec.split}", [
            (k, i.fields) for k, i in enumerate(load_items(task, spec.split, data_dir), start=1)
        ]
    path = resolve(spec.path)
    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: seeds come from .jsonl, .json or .csv")
    return str(path), read_rows(path, fmt)


def load_seeds(recipe: SynthRecipe, data_dir: Path | None = None) -> list[dict]:
    spec = recipe.seeds
    path, rows = _seed_rows(recipe, data_dir)
    seeds, seen = [], set()
    for n, row in rows:
        if isinstance(row, BadLine) or not isinstance(row, dict):
            raise UserError(f"{path}:{n}: {row.problem if isinstance(row, BadLine) else 'not an object'}")
        if any(str(row.get(k)) != v for k, v in spec.where.items()):
            continue
        for key in (spec.question, spec.answer, *([spec.style] if spec.style else [])):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise UserError(f"{path}:{n}: field '{key}' must be non-empty text")
        if spec.distinct:
            if row.get(spec.distinct) in seen:
                continue
            seen.add(row.get(spec.distinct))
        seeds.append(
            {
                "question": row[spec.question].strip(),
                "answer": row[spec.answer].strip(),
                **({"style": row[spec.style]} if spec.style else {}),
            }
        )
    random.Random(recipe.seed).shuffle(seeds)
    if not seeds:
        raise UserError(f"{path}: no seed rows match {spec.where}")
    return seeds[: spec.count]


def load_context(recipe: SynthRecipe) -> str | None:
    spec = recipe.answer
    if spec.context is None:
        return None
    path = resolve(spec.context)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the answer context: {exc}") from exc
    if spec.context_pattern:
        import re

        pattern = re.compile(spec.context_pattern)
        text = "\n".join(m.group(1).strip() for line in text.splitlines() if (m := pattern.search(line)))
        if not text:
            raise UserError(f"{recipe.path}: answer.context_pattern matches no line of {path}")
    return text


def context_for(recipe: SynthRecipe, context: str | None, question: str) -> str | None:
    """The part of the answer context a question's prompt carries: all of it, or with
    `answer.context_top_k` the k statements most like the question, in their order."""
    k = recipe.answer.context_top_k
    if context is None or k is None:
        return context
    from synth.clean import similarities

    lines = [line for line in context.splitlines() if line.strip()]
    sims = similarities([question], lines)[0]
    best = sorted(sorted(range(len(lines)), key=lambda j: -sims[j])[:k])
    return "\n".join(lines[j] for j in best)


def prompt_env():
    import jinja2

    # Prompts are plain text for a model: nothing to escape, but a missing variable is an error.
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(resolve("."))),
        autoescape=False,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=False,
    )
