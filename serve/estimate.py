"""What `make rescore` will cost on this machine, before it starts: the local side counted as
`make select` counts it (eval/estimate.py), the served side as the same work through the server's
engine on the same CPU. The cost model and how it was checked: docs/machine.md.
"""

from __future__ import annotations

ESTIMATED = {"vllm": ("gen", "ppl"), "transformers": ("gen",)}
"""The engines and modes whose served side is estimated: as our fp32 backend's cost model on the same
work, `gen` as batches of the requests in flight, `ppl` as one forward pass a choice with the head
at every prompt position, as prompt logprobs need (docs/machine.md; checked against a `make
rescore` through vLLM, docs/benchmarks.md)."""
SERVER_START_SECONDS = {"vllm": 120.0, "transformers": 20.0}
"""Starting a server for the duration of the command (none when `make serve` runs one), until
one start of the same engine and model has been timed here (`server_start`)."""
FIGURES_SECONDS = 60.0
"""The serving figures: eight streamed requests at two concurrency levels."""


def server_start(cache_dir, engine: str, model: str) -> tuple[float, str]:
    """(seconds, where they come from) of starting `engine` serving `model` (a card's name) here:
    its last start on this machine, timed by the command that started it, else the engine's
    constant."""
    from eval.estimate import fmt_duration
    from models.machine import last_server_start

    seconds = last_server_start(cache_dir, engine, model)
    if seconds is not None:
        return seconds, f"{engine}'s start {fmt_duration(seconds)}, as its last start of {model} here took"
    seconds = SERVER_START_SECONDS.get(engine, 0.0)
    return (
        seconds,
        f"{engine}'s start {fmt_duration(seconds)}, a constant: no start of {model} timed here yet",
    )


def served_ppl_seconds(local, shape, task, items: list, calibration: dict) -> tuple[int, float]:
    """(tokens, seconds) of `ppl` through a server: each choice a request over the prompt and the
    continuation, with the head at every position."""
    from eval.estimate import FORWARD_EFFICIENCY
    from eval.runner import backend_requests

    tokens = sum(
        len(c) + len(x) for r in backend_requests(task, "ppl", items) for c, x in [local.split_ids(r)]
    )
    flops = 2 * (shape.body + shape.head) * tokens
    return tokens, flops / (calibration["matmul_gflops"]["float32"] * 1e9 * FORWARD_EFFICIENCY)


def rescore_estimate(
    settings,
    local,
    served,
    target,
    engine: str,
    work: list,
    *,
    concurrency: int,
    batch_size: int,
    started_here: bool,
):
    """The cost of re-scoring `work` ((task, split, mode, items) per entry) through `engine` (`served`,
    a backend built as the command builds it) and locally (`local`, lazy: its tokenizer only), less
    what the results store holds for either side."""
    import dataclasses

    from core.store import open_read_only
    from eval.estimate import (
        Estimate,
        StageCost,
        checkpoint_shape,
        entry_cost,
        load_seconds,
        machine_line,
        pending,
    )
    from models.machine import calibration as machine_calibration

    calibration = machine_calibration(settings.cache_dir)
    shape = checkpoint_shape(target.card, target.model_dir)
    db = settings.workspace.results_db
    conn = open_read_only(db) if db.is_file() else None
    modes, side = ESTIMATED.get(engine, ()), f"served ({engine})"
    costs, notes = [], []

    def cost_of(todo, rates, chunk):  # the current entry's task, split and mode
        return entry_cost(
            local, shape, task, split, mode, todo, rates, "float32", chunk_size=chunk, conn=conn
        )

    try:
        for k, (task, split, mode, items) in enumerate(work):
            name = f"{task.name}-{split} {mode}"
            chunk = concurrency if mode == "gen" else max(1, concurrency // len(task.choices or [None]))
            todo = pending(conn, served, task, split, mode, items, chunk)
            if not todo:
                pass
            elif mode not in modes:
                notes.append(f"served {name}: {engine}'s time is its own (not estimated)")
            elif mode == "gen":
                # the engine's own speed: what our backend measured here is not its
                cost = cost_of(todo, {**calibration, "learned": {}}, chunk)
                costs.append(dataclasses.replace(cost, model=side, key=("served", k)))
            else:
                tokens, seconds = served_ppl_seconds(local, shape, task, todo, calibration)
                costs.append(
                    StageCost(
                        side,
                        name,
                        f"{len(todo)} items, {tokens} tokens with logprobs at every position",
                        seconds,
                        key=("served", k),
                        items=len(todo),
                    )
                )
            todo = pending(conn, local, task, split, mode, items, batch_size)
            if todo:
                cost = cost_of(todo, calibration, batch_size)
                costs.append(dataclasses.replace(cost, key=("local", k)))
    finally:
        if conn is not None:
            conn.close()
    costs.append(
        StageCost(side, "serving figures", "8 streamed requests at concurrency 1 and 4", FIGURES_SECONDS)
    )
    start = 0.0
    if started_here:
        start, source = server_start(settings.cache_dir, engine, target.card.name)
        notes.append(source)
    loads = {
        side: start,
        local.card.name: load_seconds(shape, calibration["load_gbs"], 4),
    }
    from eval.learned import learned_note

    notes += learned_note(calibration, {f"{mode} float32" for _, _, mode, _ in work})
    faster = ['RESCORE_ARGS="--tasks fact --limit 20" re-scores a sample first'] if len(work) > 1 else []
    return Estimate("`make rescore`", machine_line(calibration, "float32"), costs, loads, notes, faster)
