"""Score one model on one task split in one mode, into the results store, resumably.

    python -m selectune eval --task fewclue_bustm --mode ppl --model smollm2-135m-instruct

Items are sorted by prompt length and cut into fixed chunks over the *whole* split; a chunk is
the unit of work and of commit. A rerun skips chunks already stored and recomputes a half-stored
chunk with exactly the same companions, so a killed run resumes to the same final results.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from eval import metrics as M
from eval import results
from eval.backends.base import DEFAULT_BATCH_SIZE, GenRequest, LoglikelihoodRequest
from eval.parsers import first_capital, option_texts, parse_choice
from eval.summary import RunSummary
from eval.task import Item, Mode, TaskSpec
from core.files import sha256_text

REPO = Path(__file__).resolve().parents[1]


def git_revision() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    except OSError:  # no git on this machine
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def load_scorer(task: TaskSpec, data_dir: Path) -> Callable[[Item, str], dict] | None:
    """The task's extra scorer, `module:function(task, data_dir) -> (item, reply) -> metrics`."""
    if task.scorer is None:
        return None
    module, _, name = task.scorer.partition(":")
    return getattr(importlib.import_module(module), name)(task, data_dir)


def score_output(
    task: TaskSpec, mode: Mode, item: Item, output: str, scorer: Callable | None
) -> tuple[str | None, dict]:
    """(parsed answer, per-item metrics) from a stored output: no model needed, so re-scoring
    after a parser or metric change costs nothing."""
    if mode == "ppl":
        lls = json.loads(output)
        pred = max(task.choices, key=lambda c: lls[c])
        return pred, {M.ACCURACY: float(pred == item.gold)}
    scores: dict[str, float] = {}
    parsed = None
    if task.parser == "choice":
        parsed = parse_choice(output, task.choices, option_texts(item.user, task.choices))
        scores[M.ACCURACY] = float(parsed == item.gold)
        scores[M.ACCURACY_OPENCOMPASS] = float(first_capital(output) == item.gold)
        scores[M.UNPARSABLE] = float(parsed is None)
    generic = [m for m in task.metrics if m in M.GENERIC_TEXT]
    if generic:
        from eval.scorers.text import text_scores

        scores.update(
            text_scores(
                generic,
                output,
                list(item.references) or [item.gold or ""],
                steps=task.normalize,
                pattern=task.regex,
            )
        )
    if scorer is not None:  # a task's own scorer has the last word on the metrics it computes
        scores.update(scorer(item, output))
    # Keep the task's metrics, and detail entries no metric list names (e.g. "fact:15GB").
    return parsed, {k: v for k, v in scores.items() if k in task.metrics or k not in M.KNOWN}


def run_meta(
    task: TaskSpec, split: str, mode: Mode, identity: dict, seed: int, chunk_size: int, data_sha256: str
) -> dict:
    """What determines a run's outputs; its hash is the run id."""
    sampling = {"do_sample": False, "max_new_tokens": task.gen.max_new_tokens, "stop": task.gen.stop}
    return {
        "task": task.name,
        "task_version": task.version,
        "task_sha256": task.sha256,
        "data_sha256": data_sha256,
        "split": split,
        "mode": mode,
        "limit": task.limit,
        "model": identity["model"],
        "identity": identity,
        "prompt_sha256": sha256_text(
            json.dumps([task.prompt.system, task.prompt.user, task.prompt.chat_turn_end])
        ),
        "sampling": sampling if mode == "gen" else None,
        "seed": seed,
        # Items padded together can differ in the last bit, so the grouping is part of the run.
        "chunk_size": chunk_size,
    }


def _versions() -> dict:
    import torch

    return {"python": sys.version.split()[0], "torch": torch.__version__}


def run_identity(
    backend,
    task: TaskSpec,
    split: str,
    mode: Mode,
    items: list[Item],
    *,
    chunk_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    sequential: tuple[int, int] | None = None,
) -> tuple[str, dict]:
    """(run id, meta): the id is the hash of what determines the outputs."""
    # few-shot examples count only where a task has them, so runs of tasks without keep their ids
    data_sha = sha256_text(
        json.dumps(
            [[i.id, i.user, i.system, i.gold, *([i.shots] if i.shots else [])] for i in items],
            ensure_ascii=False,
        )
    )
    meta = run_meta(task, split, mode, backend.identity, seed, chunk_size, data_sha)
    if sequential is not None:  # another grouping into chunks: never the fixed design's run
        meta["order"] = {"seed": sequential[0], "round": sequential[1]}
    # versions and the git revision are recorded beside, outside the id
    return sha256_text(json.dumps(meta, sort_keys=True))[:16], meta


def run_task(
    backend,
    task: TaskSpec,
    split: str,
    mode: Mode,
    items: list[Item],
    conn,
    *,
    chunk_size: int = DEFAULT_BATCH_SIZE,
    seed: int = 0,
    data_dir: Path | None = None,
    progress: Callable[[int], None] | None = None,
    judge=None,
    sequential: tuple[int, int] | None = None,
    upto: int | None = None,
    known: dict[str, str] | None = None,
) -> RunSummary:
    """`judge`: an optional backend that scores replies for the task's `judge` metric.
    `known`: item id -> the output already computed for this backend's identity elsewhere (the
    merged step's checkpoint evaluation: the same weights, prompts and chunks); a chunk whose
    outputs are all known is stored from them (latency 0: not timed here), and the backend is not
    called.
    `sequential` = (order seed, round size): items are taken in that seeded order, a round at a time
    (each round's items length-sorted into chunks), and only the first `upto` are scored and
    returned (eval/sequential.py); the run is finished once every item is stored."""
    run_id, meta = run_identity(
        backend, task, split, mode, items, chunk_size=chunk_size, seed=seed, sequential=sequential
    )
    results.ensure_run(
        conn,
        run_id,
        {
            **meta,
            "versions": _versions(),
            "git_revision": git_revision(),
            **({"known_outputs": True} if known else {}),
        },
        len(items),
        task.path,
    )
    done = results.done_item_ids(conn, run_id)
    by_id = {i.id: i for i in items}
    scorer = load_scorer(task, data_dir) if data_dir is not None else None
    chunks = (
        fixed_chunks(items, chunk_size)
        if sequential is None
        else _sequential_chunks(items, chunk_size, *sequential, upto or len(items))
    )
    started, computed, fresh = time.monotonic(), 0, {}
    for chunk in chunks:
        todo = [i for i in chunk if i.id not in done]
        if todo:
            if known is not None and all(i.id in known for i in chunk):
                outputs, latency = [known[i.id] for i in chunk], 0.0  # not timed here
            else:
                t0 = time.monotonic()
                outputs = compute_outputs(backend, task, mode, chunk)
                latency = (time.monotonic() - t0) / len(chunk)
            rows = []
            for item, out in zip(chunk, outputs):
                if item.id in done:
                    continue
                parsed, scores = score_output(task, mode, item, out, scorer)
                rows.append(
                    {
                        "item_id": item.id,
                        "prompt": item.user,
                        "output": out,
                        "gold": item.gold,
                        "parsed": parsed,
                        "scores": scores,
                        "latency_s": latency,
                        "request": request_record(task, mode, item),
                    }
                )
            results.add_items(conn, run_id, rows)
            fresh.update((r["item_id"], r) for r in rows)
            computed += len(rows)
        if progress:
            progress(len(chunk))
    stored = results.run_items(conn, run_id)
    if sequential is not None:
        wanted = {i.id for chunk in chunks for i in chunk}
        stored = [row for row in stored if row["item_id"] in wanted]
    rescored = []
    for (
        row
    ) in stored:  # items stored by an earlier run are scored again by this code; new ones were just scored
        new = fresh.get(row["item_id"])
        parsed, scores = (
            (new["parsed"], new["scores"])
            if new
            else score_output(task, mode, by_id[row["item_id"]], row["output"], scorer)
        )
        rescored.append({**row, "parsed": parsed, "scores": scores})
    if judge is not None and task.judge is not None and mode == "gen":
        from eval.judge import judge_scores

        verdicts = judge_scores(conn, judge, task, [(by_id[r["item_id"]], r["output"]) for r in rescored])
        for row, verdict in zip(rescored, verdicts):
            row["scores"][task.judge.metric] = verdict
    results.update_scores(conn, run_id, rescored)
    if len(rescored) == len(items):
        results.finish_run(conn, run_id)
    return RunSummary(
        run_id, task, split, mode, backend.identity["model"], rescored, time.monotonic() - started, computed
    )


def fixed_chunks(items: list[Item], size: int) -> list[list[Item]]:
    order = sorted(items, key=lambda i: (len(i.user), i.id))
    return [order[k : k + size] for k in range(0, len(order), size)]


def sequential_order(items: list[Item], seed: int) -> list[Item]:
    """The items in the seeded random order a sequential design scores them in."""
    import random

    order = sorted(items, key=lambda i: i.id)
    random.Random(seed).shuffle(order)
    return order


def _sequential_chunks(
    items: list[Item], size: int, seed: int, round_size: int, upto: int
) -> list[list[Item]]:
    order = sequential_order(items, seed)
    out = []
    for start in range(0, min(upto, len(order)), round_size):
        block = sorted(order[start : start + round_size], key=lambda i: (len(i.user), i.id))
        out += [block[k : k + size] for k in range(0, len(block), size)]
    return out


def score_in_memory(
    backend,
    task: TaskSpec,
    mode: Mode,
    items: list[Item],
    scorer: Callable | None,
    *,
    chunk_size: int = DEFAULT_BATCH_SIZE,
) -> list[tuple[str, dict]]:
    """(output, metrics) per item, in the items' order, chunked as run_task chunks them, with
    nothing stored: for weights that exist only in memory (checkpoints evaluated while training)."""
    out: dict[str, tuple[str, dict]] = {}
    for chunk in fixed_chunks(items, chunk_size):
        for item, output in zip(chunk, compute_outputs(backend, task, mode, chunk)):
            out[item.id] = (output, score_output(task, mode, item, output, scorer)[1])
    return [out[i.id] for i in items]


def request_record(task: TaskSpec, mode: Mode, item: Item) -> dict:
    """What the backend receives for `item`, as stored beside its output: the chat messages, and
    the generation limits (`gen`) or the continuations scored (`ppl`). compute_outputs sends these."""
    if mode == "gen":
        return {
            "messages": item.messages(),
            "max_new_tokens": task.gen.max_new_tokens,
            "stop": list(task.gen.stop),
        }
    return {"messages": item.messages(), "continuations": list(task.choices)}


def backend_requests(
    task: TaskSpec, mode: Mode, chunk: list[Item]
) -> list[GenRequest] | list[LoglikelihoodRequest]:
    """What compute_outputs sends the backend for one chunk (built from request_record)."""
    sent = [request_record(task, mode, i) for i in chunk]
    if mode == "gen":
        return [
            GenRequest(r["messages"], r["max_new_tokens"], r["stop"], i.raw()) for r, i in zip(sent, chunk)
        ]
    return [
        LoglikelihoodRequest(r["messages"], c, i.raw())
        for r, i in zip(sent, chunk)
        for c in r["continuations"]
    ]


def compute_outputs(backend, task: TaskSpec, mode: Mode, chunk: list[Item]) -> list[str]:
    """The raw outputs of one chunk: replies (`gen`) or each choice's log-likelihood as JSON (`ppl`)."""
    requests = backend_requests(task, mode, chunk)
    if mode == "gen":
        return backend.generate(requests)
    lls = backend.loglikelihood(requests)
    k = len(task.choices)
    return [json.dumps(dict(zip(task.choices, lls[n * k : (n + 1) * k]))) for n in range(len(chunk))]
