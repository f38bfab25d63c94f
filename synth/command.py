"""`selectune data-synth` (`make data-synth`): the cost here first (synth/estimate.py), then the
run (synth/pipeline.py) against the teacher."""

from __future__ import annotations

import os
from contextlib import closing
from pathlib import Path

from core.errors import UserError
from core.workspace import SynthOutput
from eval.progress import OverallBar
from synth.estimate import STAGES
from synth.pipeline import Run


def synth_command(
    settings,
    *,
    recipe: Path,
    base_url: str | None = None,
    teacher_model: str | None = None,
    teacher: str | None = None,
    max_calls: int | None = None,
    max_tokens: int | None = None,
    out: Path | None = None,
    estimate: bool = False,
) -> int:
    """`selectune data-synth` (`make data-synth`): the teacher at --base-url (or the recipe's), else
    an offline card served here for the duration. What it will cost here is printed first (only
    that, with `estimate`)."""
    from synth.estimate import synth_estimate
    from synth.recipe import load_synth_recipe
    from synth.teacher import Budget

    spec = load_synth_recipe(recipe)
    out_dir = out or settings.workspace.synth_dir(spec.name)
    budget = Budget(max_calls or spec.budget.max_calls, max_tokens or spec.budget.max_tokens)
    url = base_url or spec.teacher.base_url
    teacher_card = None if url else teacher or spec.teacher.card
    cost = synth_estimate(settings, spec, teacher_card, max_calls=budget.max_calls, served_here=not url)
    print("\n".join(cost.lines()), flush=True)
    if estimate:
        return 0
    with closing(OverallBar(cost)) as overall:
        return _run(settings, spec, recipe, out_dir, budget, url, teacher_model, teacher_card, cost, overall)


def _run(settings, spec, recipe, out_dir, budget, url, teacher_model, teacher_card, cost, overall) -> int:
    """The run against the teacher, each call advancing `overall` by its stage's estimate a call."""
    from eval.backends import make_backend
    from eval.results import open_results
    from synth.teacher import Teacher

    conn = open_results(settings.runs_dir)
    api_key = os.environ.get(spec.teacher.api_key_env)

    per_call = {c.entry: c.seconds / c.items for c in cost.costs if c.items}

    made = budget.calls

    def called(stage: str) -> None:
        nonlocal made
        if budget.calls == made:  # answered from the store: the estimate counted it free
            return
        made = budget.calls
        if (seconds := per_call.get(STAGES[stage], 0.0)) > 0:
            overall.update(seconds)

    def run(url: str, model: str, label: str) -> dict:
        backend = make_backend(
            "openai", url, model, api_key=api_key, concurrency=1, timeout_s=600.0, max_retries=3
        )
        return Run(
            spec, Teacher(backend, conn, budget, label), out_dir, settings.resolved_data_dir, called
        ).run()

    if url:
        model = teacher_model or spec.teacher.model
        if not model:
            raise UserError(
                f"{recipe}: a teacher at {url} needs a model name (--teacher-model or teacher.model)"
            )
        provenance = run(url, model, model)
    else:
        from models.machine import record_server_start
        from serve.engines import engine_for
        from serve.launcher import launch, resolve_target

        target = resolve_target(settings, card_name=teacher_card)
        engine = engine_for(target.model_dir, "auto")
        with launch(engine, settings.workspace.server_log(engine.name, role="teacher")) as server:
            record_server_start(settings.cache_dir, engine.name, target.card.name, server.start_seconds)
            print(
                f"data-synth: teacher {target.label} on {engine.name} at {server.base_url}, "
                f"started in {server.start_seconds:.0f} s"
            )
            if cost.costs:  # the teacher's start and load, as estimated
                overall.update(sum(cost.loads.values()))
            provenance = run(server.base_url, server.model_name, target.label)
    print_summary(provenance, SynthOutput(out_dir).report)
    return 0


def print_summary(provenance: dict, report_path: Path) -> None:
    c = provenance["counts"]
    print(
        f"data-synth: {c.get('seeds', 0)} seeds -> {c.get('expanded', 0)} new items -> "
        f"{c.get('after_question_filters', 0)} after question filters -> {c.get('answered', 0)} answered -> "
        f"{c.get('after_answer_filters', 0)} after answer filters -> {c.get('written', 0)} written "
        f"({c.get('conversations', 0)} two-turn)"
    )
    for reason, n in sorted(provenance["removed"].items()):
        print(f"  removed {n:4d}  {reason}")
    malformed = {k[len("malformed_") :]: v for k, v in c.items() if k.startswith("malformed_")}
    if malformed:
        print("  malformed teacher answers skipped: " + ", ".join(f"{k} {v}" for k, v in malformed.items()))
    b = provenance["budget"]
    print(
        f"  teacher calls: {b['calls_made']} made, {b['answers_from_store']} answered from the store; "
        f"{b['tokens_used']} tokens"
    )
    if provenance["stopped"]:
        print(
            f"  stopped early: {provenance['stopped']}; rerun with a larger budget to continue "
            "(stored answers are reused)"
        )
    print(f"  wrote {provenance['data']} ({provenance['format']}); report {report_path}")
