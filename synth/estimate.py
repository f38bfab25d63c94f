"""What `make data-synth` will cost on this machine, before it starts: the teacher calls each stage
can make (bounded by the recipe's rounds, items and call budget), each a prompt rendered from the
recipe's own templates and seeds (the answer's context cut as the run cuts it) and a reply counted
to its stage's `max_tokens`, decoded one request at a time by the teacher served here. The cost
model: docs/machine.md.
"""

from __future__ import annotations

from pathlib import Path


def stage_calls(recipe, max_calls: int | None) -> dict[str, int]:
    """The most calls each stage makes, in the order the run makes them, within `max_calls`."""
    expanded = recipe.expand.rounds * recipe.expand.per_round  # items the teacher may write, each answered
    calls = {
        "expand": recipe.expand.rounds,
        "answer": expanded,
        "follow-up": 2 * round(recipe.converse.fraction * expanded),
    }
    left = max_calls if max_calls is not None else sum(calls.values())
    out = {}
    for stage, n in calls.items():
        out[stage] = min(n, left)
        left -= out[stage]
    return out


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
    new_tokens = {
        "expand": recipe.expand.sampling.max_tokens,
        "answer": recipe.answer.sampling.max_tokens,
        "follow-up": (recipe.converse.sampling.max_tokens + recipe.answer.sampling.max_tokens) // 2,
    }
    rates = (
        calibration["matmul_gflops"]["float32"],
        calibration["decode_gflops"]["float32"],
        calibration["bandwidth_gbs"],
    )
    costs = [
        StageCost(
            card.name,
            stage,
            f"{n} calls of about {prompts[stage]} prompt tokens and at most {new_tokens[stage]} reply tokens",
            n * decode_seconds(prompts[stage], new_tokens[stage], shape, rates, 4),
            upper_bound=True,
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
    return estimate
