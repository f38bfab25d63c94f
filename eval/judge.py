"""An optional LLM judge: the task's `judge` prompt, filled with a model's reply, is sent to an
OpenAI-compatible model, whose answer must name one of the task's labels.

    python -m selectune --judge-url http://127.0.0.1:8000 --judge-model qwen2.5-7b-instruct \
        eval --task style --model smollm2-135m-instruct

Configured by the settings `judge_url` and `judge_model` (an API key, if the endpoint needs one,
comes from the environment variable SELECTUNE_JUDGE_API_KEY, never from a file). Verdicts are
cached in the results store by judge model and filled-in prompt, so re-scoring stored outputs
on every run asks the judge only about replies it has not seen.
"""

from __future__ import annotations

import json
import os

import jinja2

from eval import results
from eval.backends.base import GenRequest
from eval.task import Item, TaskSpec
from core.errors import UserError
from core.files import sha256_text
from core.settings import Settings

API_KEY_ENV = "SELECTUNE_JUDGE_API_KEY"


def make_judge(settings: Settings):
    """An OpenAI-compatible backend for the judge, or None when no judge is configured."""
    if settings.judge_url is None and settings.judge_model is None:
        return None
    if settings.judge_url is None or settings.judge_model is None:
        raise UserError(
            "a judge needs both judge_url and judge_model (settings or --judge-url/--judge-model)"
        )
    from eval.backends import make_backend

    return make_backend(
        "openai", settings.judge_url, settings.judge_model, api_key=os.environ.get(API_KEY_ENV)
    )


def verdict_label(output: str, labels: list[str]) -> str | None:
    """The label named first in the judge's answer, or None when it names none."""
    found = [(output.find(label), label) for label in labels if label in output]
    return min(found)[1] if found else None


def judge_scores(conn, judge, task: TaskSpec, pairs: list[tuple[Item, str]]) -> list[float]:
    """1.0 where the judge's label equals the item's expected field, else 0.0, per (item, reply)."""
    spec = task.judge
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, autoescape=False)  # a prompt, not HTML
    try:
        template = env.from_string(spec.prompt)
        prompts = [template.render(**{**item.fields, "reply": reply.strip()}) for item, reply in pairs]
    except jinja2.TemplateError as exc:
        raise UserError(f"{task.path}: key 'judge.prompt': {exc.message}") from None
    keys = [sha256_text(json.dumps([judge.identity["model"], p], ensure_ascii=False)) for p in prompts]
    cached = results.cached_verdicts(conn, set(keys))
    todo = sorted({k: p for k, p in zip(keys, prompts) if k not in cached}.items())
    if todo:
        outputs = judge.generate(
            [GenRequest([{"role": "user", "content": p}], spec.max_tokens) for _, p in todo]
        )
        fresh = {k: out for (k, _), out in zip(todo, outputs)}
        results.add_verdicts(conn, judge.identity["model"], fresh)
        cached.update(fresh)
    return [
        float(verdict_label(cached[k], spec.labels) == str(item.fields[spec.expected_field]))
        for k, (item, _) in zip(keys, pairs)
    ]
