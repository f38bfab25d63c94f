"""`selectune eval`: one model on one task split, in each of its modes, into the results store
(eval/runner.py scores it, resumably), with the table of each mode printed.

    python -m selectune eval --task fewclue_bustm --mode ppl --model smollm2-135m-instruct
"""

from __future__ import annotations

from pathlib import Path

from eval import results
from eval.backends.base import DEFAULT_BATCH_SIZE
from eval.runner import run_task


def eval_command(
    settings,
    *,
    task: str,
    model: str,
    split: str | None = None,
    mode: list[str] | None = None,
    limit: int | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    base_url: list[str] | None = None,
    device: str = "auto",
    dtype: str = "auto",
) -> int:
    """`selectune eval`: one model on one task, resumable; prints the table of each mode. On the
    Ray executor the model runs in an actor, or each `base_url` server is sent its share by one."""
    from eval.executor import make_executor
    from eval.task import load_items, resolve_task

    spec = resolve_task(task, Path.cwd())
    if limit:
        spec = spec.model_copy(update={"limit": limit})  # keeps the file path (a private attr)
    split = split or spec.default_split
    items = load_items(spec, split, settings.resolved_data_dir)
    conn = results.open_results(settings.runs_dir)
    executor = make_executor(settings, conn)
    try:
        return _eval(
            settings,
            executor,
            spec,
            split,
            items,
            model=model,
            mode=mode,
            batch_size=batch_size,
            base_url=base_url,
            device=device,
            dtype=dtype,
        )
    finally:
        executor.close()


def _eval(settings, executor, spec, split, items, *, model, mode, batch_size, base_url, device, dtype) -> int:
    from tqdm import tqdm

    from eval.judge import make_judge
    from eval.summary import cells_of, render_table

    if base_url:
        backend = executor.servers(base_url, model, concurrency=batch_size)
    else:
        from eval.backends import make_backend
        from models.card import find_card
        from models.loading import scoring_dtype

        card = find_card(model)
        executor.open(
            [card],
            settings.model_store,
            batch_size=batch_size,
            device=device,
            dtype=dtype if executor.name == "ray" else scoring_dtype(dtype, device),
            make=lambda c: make_backend(
                "hf",
                c,
                settings.model_store,
                batch_size=batch_size,
                device=device,
                dtype=scoring_dtype(dtype, device),
                lazy=True,
            ),
        )
        backend = executor.backend(card)
    conn = executor.connection()
    judge = make_judge(settings)
    for one in mode or spec.modes:
        with tqdm(total=len(items), desc=f"{spec.name}-{split} {one}", unit="item") as bar:
            run = run_task(
                backend,
                spec,
                split,
                one,
                items,
                conn,
                chunk_size=batch_size,
                data_dir=settings.resolved_data_dir,
                progress=bar.update,
                judge=judge,
            )
        print(render_table(cells_of(run), [run.model]))
        print(f"run {run.run_id}: {len(run.items)} items, {run.computed} computed in {run.seconds:.1f} s")
    return 0
