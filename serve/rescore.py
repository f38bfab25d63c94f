"""Re-score a served model on the selection run's items, check it against the local model, and
measure the server.

    make serve && make rescore          # the last merged model, served on 127.0.0.1
    python -m selectune rescore --tasks fact --limit 20

Every entry of the selection suite is scored through the server on the same items, into the same
results store (an interrupted rescore resumes item by item): in its own mode through vLLM, which
returns prompt logprobs (the prompt is sent as the local tokenizer's ids, as lm-eval does), and in
`gen` mode through lmdeploy and `transformers serve`, which return none. The local model (the same checkpoint, our
HF backend) is scored on the same items, and the parity gate compares the two:
- agreement of answers >= min_agreement (default 98%): the parsed choice on choice tasks and
  `ppl` entries (whose largest log-likelihood difference is recorded too), the whole reply on
  free-text tasks (style, fact), and
- for every metric, the paired 95% CI of served - local contains 0.
A failure exits non-zero and lists the disagreeing items with both outputs and, on each side,
the chat template and sampling hashes (template drift between training and serving is the
usual cause). Serving figures: time to first token, output tokens/s, p50/p95 request latency,
and throughput at concurrency 1 and N (streamed requests on the first prompts of the suite).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from eval.backends.base import DEFAULT_BATCH_SIZE
from core.errors import UserError
from serve.launcher import Target
from serve.figures import serving_figures
from serve.parity import parity
from serve.stream import SAMPLING


def sampling_sha256() -> str:
    from eval.backends.openai_http import sampling_sha256 as sha

    return sha(SAMPLING)


def local_card(target: Target):
    """The card the local backend uses: the served directory always renders with its own template."""
    return target.card.model_copy(update={"name": target.label, "chat_template": "tokenizer"})


def rescore_entries(
    tasks: list[str] | None, suite: Path | None = None, logprobs: bool = False
) -> list[tuple[object, str, str]]:
    """(task, split, mode) of every suite entry, once each; `suite`: the selection's, else the
    default. Through a server without prompt logprobs every task is scored once, in `gen`; through
    one with them (vLLM) each entry keeps its mode."""
    from eval.suite import DEFAULT_SUITE, load_suite

    _, entries = load_suite(suite or DEFAULT_SUITE)
    seen: list[tuple[object, str, str]] = []
    for task, entry in entries:
        mode = entry.mode if logprobs else "gen"
        key = (task.name, entry.split, mode)
        if key not in [(t.name, s, m) for t, s, m in seen] and (tasks is None or task.name in tasks):
            seen.append((task, entry.split, mode))
    if tasks:
        unknown = set(tasks) - {t.name for t, _, _ in seen}
        if unknown:
            raise UserError(
                f"--tasks: not in the selection suite: {', '.join(sorted(unknown))} "
                f"(suite: {', '.join(dict.fromkeys(t.name for t, _ in entries))})"
            )
    return seen


def run_key(task_name: str, mode: str) -> str:
    """The key of a served run in the record: the task's name for `gen`, `name:ppl` for `ppl`."""
    return task_name if mode == "gen" else f"{task_name}:{mode}"


def selection_suite(settings) -> Path | None:
    """The suite `make select` scored (its file, where it still is); None: the default suite."""
    selection = settings.workspace.read_selection()
    return selection.suite_file() if selection else None


def served_backend(
    base_url: str,
    model_name: str,
    target: Target,
    engine: str,
    concurrency: int,
    local_identity: dict,
    max_retries: int = 5,
    split_ids=None,
):
    """The server as a backend. What it serves is the directory the local backend loaded: the
    weights and chat-template hashes are that directory's (hashed once, by the local backend)."""
    from eval.backends import make_backend

    identity = {
        "model": target.label,
        # the port changes from server to server; what is served does not
        "base_url": f"served:{engine}",
        "weights_sha256": local_identity["weights_sha256"],
        "chat_template_sha256": local_identity["chat_template_sha256"],
    }  # the backend adds the hash of the sampling parameters its requests send
    return make_backend(
        "openai",
        base_url,
        model_name,
        concurrency=concurrency,
        sampling=SAMPLING,
        identity=identity,
        max_retries=max_retries,
        split_ids=split_ids,
    )


def rescore_work(settings, tasks: list[str] | None, limit: int | None, engine: str) -> list:
    """(task, split, mode, items) of every entry re-scored through `engine`."""
    from eval.task import load_items
    from serve.engines import LOGPROB_ENGINES

    work = []
    for task, split, mode in rescore_entries(
        tasks, selection_suite(settings), logprobs=engine in LOGPROB_ENGINES
    ):
        items = load_items(task, split, settings.resolved_data_dir)
        work.append((task, split, mode, items[:limit] if limit else items))
    return work


def default_concurrency(engine: str) -> int:
    # `transformers serve` runs each request's generate() on the same 2..16 CPU cores: parallel
    # requests only oversubscribe them. lmdeploy and vLLM batch concurrent requests.
    return {"lmdeploy": 8, "vllm": 4}.get(engine, 1)


def rescore(
    settings,
    target: Target,
    *,
    base_url: str,
    model_name: str,
    engine: str,
    tasks: list[str] | None = None,
    limit: int | None = None,
    concurrency: int | None = None,
    min_agreement: float = 0.98,
    figure_requests: int = 8,
    figure_max_tokens: int = 32,
    figure_concurrency: int = 4,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_retries: int = 5,
    out_dir: Path | None = None,
    overall=None,
) -> dict:
    """`overall` (eval/progress.py `OverallBar`): the whole command's bar, advanced by each item's
    share of its entry's estimate, the local model's load and the serving figures."""
    from tqdm import tqdm

    from eval.backends import make_backend
    from eval.executor import make_executor
    from eval.results import open_results
    from eval.runner import run_task
    from core.artifacts import RescoreRecord, write_artifact

    conn = open_results(settings.runs_dir)
    data_dir = settings.resolved_data_dir
    work = rescore_work(settings, tasks, limit, engine)
    concurrency = concurrency or default_concurrency(engine)
    # Here the tokenizer alone (identity, token ids for the server); the weights load on first use.
    local = make_backend(
        "hf",
        local_card(target),
        settings.model_store,
        batch_size=batch_size,
        checkpoint=target.model_dir,
        lazy=True,
    )
    served = served_backend(
        base_url,
        model_name,
        target,
        engine,
        concurrency,
        local.identity,
        max_retries,
        split_ids=local.split_ids,
    )
    executor = make_executor(settings, conn)
    try:
        # On Ray the local side runs in an actor (the merged directory at the same path on its node)
        # while the driver sends the served side's requests: the two sides at once.
        executor.open(
            [local.card],
            settings.model_store,
            checkpoints={local.card.name: target.model_dir},
            batch_size=batch_size,
            device="auto",
            dtype="auto",
            scoring=False,
            make=lambda card: local,
        )
        local_side = executor.backend(local.card)

        per_item = overall.estimate.per_item() if overall is not None else {}

        def advance(bar, share: float, n: int) -> None:
            bar.update(n)
            if share:
                overall.update(round(n * share, 1))

        def side(which: str) -> list:
            runs = []
            for k, (task, split, mode, items) in enumerate(work):
                with tqdm(
                    total=len(items), desc=f"{which} {task.name}-{split} {mode}", unit="item", leave=False
                ) as bar:
                    if which == "served":  # gen: one request per item; ppl: one per choice, a chunk's at once
                        backend = served
                        chunk = (
                            concurrency
                            if mode == "gen"
                            else max(1, concurrency // len(task.choices or [None]))
                        )
                    else:
                        backend, chunk = local_side, batch_size
                    runs.append(
                        run_task(
                            backend,
                            task,
                            split,
                            mode,
                            items,
                            executor.connection(),
                            chunk_size=chunk,
                            data_dir=data_dir,
                            progress=partial(advance, bar, per_item.get((which, k), 0.0)),
                        )
                    )
            if which == "local" and overall is not None:
                overall.update(overall.estimate.loads.get(local.card.name, 0.0))
            return runs

        served_runs, local_runs = executor.map(side, ["served", "local"])
    finally:
        executor.close()
    gate = parity(list(zip(served_runs, local_runs)), min_agreement)
    gate["served_identity"] = {
        k: served.identity.get(k) for k in ("chat_template_sha256", "sampling_sha256", "weights_sha256")
    }
    gate["local_identity"] = {
        "chat_template_sha256": local.identity["chat_template_sha256"],
        "sampling_sha256": sampling_sha256(),  # HFBackend: greedy, as pinned
        "weights_sha256": local.identity["weights_sha256"],
    }
    prompts = [i.messages() for _, _, _, items in work for i in items][:figure_requests]
    figures = serving_figures(
        base_url,
        model_name,
        prompts,
        max_tokens=figure_max_tokens,
        concurrency=figure_concurrency,
        usage_option=engine == "lmdeploy",
    )
    if overall is not None:
        overall.update(overall.estimate.stage_seconds("serving figures"))
    record = {
        "model": target.label,
        "model_dir": str(target.model_dir),
        "engine": engine,
        "concurrency": concurrency,
        "base_url": base_url,
        "limit": limit,
        "sampling": SAMPLING,
        "parity": gate,
        "serving": figures,
        "served_runs": {run_key(r.task.name, r.mode): r.run_id for r in served_runs},
    }
    path = settings.workspace.rescore_record(target.label)
    write_artifact(out_dir / path.name if out_dir else path, RescoreRecord, record)
    return record
