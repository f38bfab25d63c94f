"""What `make data-synth` will cost on this machine, before it starts: the teacher calls each stage
can make (bounded by the recipe's rounds, items and call budget), each a prompt rendered from the
recipe's own templates and seeds (the answer's context cut as the run cuts it) and a reply counted
to its stage's `max_tokens`, decoded one request at a time by the teacher served here. Where the
store holds this recipe's earlier answers from the same teacher, the run is replayed from them up
to its first new call: those calls cost nothing, and their replies' mean length stands for the
stage's replies. The cost model: docs/machine.md.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from synth.teacher import Teacher

STAGES = {"expand": "expand", "answer": "answer", "followup": "follow-up", "followup_answer": "follow-up"}
"""The estimate's stage of each kind of teacher call the run makes."""


@dataclass
class Stored:
    """The run replayed from the store up to its first new call."""

    replies: dict[str, list[str]] = field(default_factory=dict)
    """Each estimate stage's stored replies the run reads, in order."""
    counts: dict[str, int] = field(default_factory=dict)
    """The run's own counts where the replay stopped (`after_question_filters` once expand is done)."""
    followups: int | None = None
    """The items that get a follow-up, once the answer stage is replayed."""
    complete: bool = False
    """Every call the run makes is stored: it makes no new one."""

    def hits(self) -> Counter:
        return Counter({stage: len(r) for stage, r in self.replies.items()})


class _Replay(Teacher):
    """The store alone: a call it cannot answer would be new, and the budget of 0 stops the run there."""

    last: str = ""

    def ask(self, messages, **sampling):
        self.last = super().ask(messages, **sampling)
        return self.last


def stage_calls(recipe, max_calls: int | None, stored: Stored | None = None) -> dict[str, int]:
    """The new calls each stage makes, in the order the run makes them, within `max_calls` (the
    budget counts new calls only): the calls `stored` answers cost none, and the items it saw through
    a stage bound the next one's calls. Before the answers are replayed, `converse.fraction` of the
    items are counted for follow-ups (two calls each), the fraction the run draws on average."""
    stored = stored or Stored()
    if stored.complete:
        return {"expand": 0, "answer": 0, "follow-up": 0}
    # items the teacher may write, each answered; those left after the filters once expand is replayed
    expanded = stored.counts.get("after_question_filters", recipe.expand.rounds * recipe.expand.per_round)
    followups = (
        stored.followups if stored.followups is not None else round(recipe.converse.fraction * expanded)
    )
    calls = {"expand": recipe.expand.rounds, "answer": expanded, "follow-up": 2 * followups}
    hits = stored.hits()
    left = max_calls if max_calls is not None else sum(calls.values())
    out = {}
    for stage, n in calls.items():
        out[stage] = min(max(0, n - hits[stage]), left)
        left -= out[stage]
    return out


def stored_run(settings, recipe, label: str) -> Stored:
    """Replay `recipe` from the stored answers of the teacher called `label` (as the run names it in
    the store's keys), stopping at the first call the store cannot answer."""
    from eval.results import open_results
    from synth.pipeline import Run
    from synth.teacher import Budget

    if not settings.workspace.results_db.is_file():
        return Stored()
    stored = Stored()
    conn = open_results(settings.runs_dir)
    try:
        teacher = _Replay(None, conn, Budget(max_calls=0), label)

        def called(stage: str) -> None:  # after each call the store answered
            stored.replies.setdefault(STAGES[stage], []).append(teacher.last)

        run = Run(recipe, teacher, None, settings.resolved_data_dir, called, bars=False)
        run.synthesize()
    finally:
        conn.close()
    stored.counts, stored.complete = dict(run.counts), run.stopped is None
    if run.cleaned is not None:
        stored.followups = sum(map(run.converses, run.cleaned))
    return stored


def synth_estimate(settings, recipe, teacher_card: str | None, *, max_calls: int | None, served_here: bool):
    """The cost of `recipe` with the teacher card served here (None: a teacher elsewhere, whose time
    is its own)."""
    from eval.estimate import (
        Estimate,
        StageCost,
        checkpoint_shape,
        decode_seconds,
        load_seconds,
        machine_line,
        prompt_tokens,
    )
    from models.card import find_card
    from models.machine import calibration as machine_calibration
    from models.store import read_manifest
    from synth.inputs import context_for, load_context, load_seeds, prompt_env

    what = f"`make data-synth` ({recipe.path.name})"
    calls = stage_calls(recipe, max_calls)
    summary = ", ".join(f"{stage} {n}" for stage, n in calls.items())
    if teacher_card is None:  # nothing runs on this machine's matrix units
        return Estimate(
            what,
            "the teacher's server",
            [],
            {},
            [
                f"the teacher is a server elsewhere: its time is its own (at most {sum(calls.values())} calls: "
                f"{summary})"
            ],
            [],
        )
    calibration = machine_calibration(settings.cache_dir)
    card = find_card(teacher_card)
    manifest = read_manifest(card, settings.model_store)
    if manifest is None:
        return Estimate(
            what,
            machine_line(calibration, "float32"),
            [],
            {},
            [f"{card.name}: not provisioned yet (`make models` converts it first); not estimated"],
            [],
        )
    from transformers import AutoTokenizer

    stored = stored_run(settings, recipe, card.name)  # the label the teacher served here stores under
    calls = stage_calls(recipe, max_calls, stored)
    checkpoint = Path(manifest["checkpoint"])
    shape, tokenizer = checkpoint_shape(card, checkpoint), AutoTokenizer.from_pretrained(checkpoint)
    seeds, context, env = load_seeds(recipe, settings.resolved_data_dir), load_context(recipe), prompt_env()
    seed = seeds[0]

    def tokens(template: str, **values) -> int:
        text = env.get_template(template).render(**values).strip()
        return prompt_tokens(tokenizer, [{"role": "user", "content": text}])

    prompts = {
        "expand": tokens(
            recipe.expand.template,
            examples=seeds[: recipe.expand.shots],
            n=recipe.expand.per_round,
            what=recipe.expand.what,
            context=context if recipe.expand.with_context else None,
        ),
        "answer": tokens(
            recipe.answer.template,
            examples=seeds[: recipe.answer.shots],
            question=seed["question"],
            context=context_for(recipe, context, seed["question"]),
            style=seed.get("style"),
            step_by_step=recipe.answer.step_by_step,
            solution=seed.get("answer"),
        ),
        "follow-up": tokens(
            recipe.converse.template,
            persona=recipe.converse.persona,
            question=seed["question"],
            answer=seed["answer"],
        ),
    }
    most = {
        "expand": recipe.expand.sampling.max_tokens,
        "answer": recipe.answer.sampling.max_tokens,
        "follow-up": (recipe.converse.sampling.max_tokens + recipe.answer.sampling.max_tokens) // 2,
    }
    seen = {  # the mean stored reply where the store answered the stage before
        stage: sum(len(tokenizer(r, add_special_tokens=False).input_ids) + 1 for r in replies) / len(replies)
        for stage, replies in stored.replies.items()
    }

    def reply(stage: str) -> str:
        if stage in seen:
            return f"about {seen[stage]:.0f} reply tokens (the mean of {len(stored.replies[stage])} stored)"
        return f"at most {most[stage]} reply tokens"

    rates = (
        calibration["matmul_gflops"]["float32"],
        calibration["decode_gflops"]["float32"],
        calibration["bandwidth_gbs"],
    )
    costs = [
        StageCost(
            card.name,
            stage,
            f"{n} calls of about {prompts[stage]} prompt tokens and {reply(stage)}",
            n * decode_seconds(prompts[stage], round(seen.get(stage, most[stage])), shape, rates, 4),
            upper_bound=stage not in seen,
            items=n,  # calls: the whole command's bar advances a call at a time
        )
        for stage, n in calls.items()
        if n
    ]
    start, source = 0.0, ""
    if served_here:
        from serve.engines import engine_for
        from serve.estimate import server_start

        start, source = server_start(settings.cache_dir, engine_for(checkpoint, "auto").name, card.name)
    faster = (
        [f'SYNTH_ARGS="--max-calls {max(1, sum(calls.values()) // 3)}" spends a third of the calls']
        if sum(calls.values()) > 30
        else []
    )
    estimate = Estimate(
        what,
        machine_line(calibration, "float32"),
        costs,
        {card.name: start + load_seconds(shape, calibration["load_gbs"], 4)},
        [],
        faster,
    )
    if served_here:
        estimate.notes.append(f"the teacher's server starts first: {source}")
    if hits := stored.hits():
        answered = ", ".join(f"{stage} {n}" for stage, n in hits.items())
        estimate.notes.append(
            f"{sum(hits.values())} calls answered from the store cost nothing ({answered})"
            + ("; the run makes no new call" if stored.complete else "")
        )
    return estimate
