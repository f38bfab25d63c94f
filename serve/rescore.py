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

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from eval.backends.base import DEFAULT_BATCH_SIZE
from core.errors import UserError
from serve.launcher import Target
from serve.stream import SAMPLING, stream_chat



def sampling_sha256() -> str:
    from eval.backends.openai_http import sampling_sha256 as sha

    return sha(SAMPLING)


def local_card(target: Target):
    """The card the local backend uses: the served directory always renders with its own template."""
    return target.card.model_copy(update={"name": target.label, "chat_template": "tokenizer"})


def rescore_entries(tasks: list[str] | None, suite: Path | None = None,
                    logprobs: bool = False) -> list[tuple[object, str, str]]:
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
            raise UserError(f"--tasks: not in the selection suite: {', '.join(sorted(unknown))} "
                            f"(suite: {', '.join(dict.fromkeys(t.name for t, _ in entries))})")
    return seen


def run_key(task_name: str, mode: str) -> str:
    """The key of a served run in the record: the task's name for `gen`, `name:ppl` for `ppl`."""
    return task_name if mode == "gen" else f"{task_name}:{mode}"


def selection_suite(settings) -> Path | None:
    """The suite `make select` scored (its file, where it still is); None: the default suite."""
    selection = settings.workspace.read_selection()
    return selection.suite_file() if selection else None


def served_backend(base_url: str, model_name: str, target: Target, engine: str, concurrency: int,
                   local_identity: dict, max_retries: int = 5, split_ids=None):
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
    return make_backend("openai", base_url, model_name, concurrency=concurrency, sampling=SAMPLING, identity=identity,
                         max_retries=max_retries, split_ids=split_ids)


def same_reply(served: str, local: str) -> bool:
    """Whole replies equal up to surrounding space and a character cut at max_new_tokens: a
    streaming detokenizer (vLLM's) holds back the incomplete bytes of the last character, a
    whole-sequence decode (ours) writes U+FFFD for them."""
    import re

    def norm(text: str) -> str:
        return re.sub(r"[\s\ufffd]+$", "", text.strip())

    return norm(served) == norm(local)


def parity(pairs: list[tuple[object, object]], min_agreement: float) -> dict:
    """pairs: (served RunSummary, local RunSummary) per task, items in the same order."""
    from eval import metrics as M
    from eval.stats import compare
    from eval.summary import metrics_of

    agree = total = 0
    tasks, failures, disagreements = [], [], []
    for served, local in pairs:
        by_id = {i["item_id"]: i for i in local.items}
        same = 0
        choice = served.task.parser == "choice" or served.mode == "ppl"
        # `ppl`: the largest difference of any choice's log-likelihood between the two sides
        loglik_diff = max((abs(a - b) for s in served.items
                           for a, b in zip(json.loads(s["output"]).values(),
                                           json.loads(by_id[s["item_id"]]["output"]).values())),
                          default=0.0) if served.mode == "ppl" else None
        for s in served.items:
            lo = by_id[s["item_id"]]
            # the parsed choice; a free-text task's answer is its whole reply
            if (s["parsed"] == lo["parsed"]) if choice else same_reply(s["output"], lo["output"]):
                same += 1
            else:
                disagreements.append({"task": served.task.name, "mode": served.mode, "item_id": s["item_id"],
                                      "served": s["output"], "local": lo["output"],
                                      "served_parsed": s["parsed"], "local_parsed": lo["parsed"]})
        agree, total = agree + same, total + len(served.items)
        metrics = []
        for metric in metrics_of(served):
            a = [i["scores"][metric] for i in served.items]
            b = [by_id[i["item_id"]]["scores"][metric] for i in served.items]
            c = compare(a, b, binary=metric in M.BINARY)
            inside = c.low <= 0 <= c.high
            metrics.append({"served": sum(a) / len(a), "local": sum(b) / len(b), **c.record(metric),
                            "inside_ci": inside})
            if not inside:
                failures.append(f"{served.task.name} {metric}: served - local = {c.diff:+.4f}, "
                                f"95% CI [{c.low:+.4f}, {c.high:+.4f}] excludes 0")
        tasks.append({"task": served.task.name, "split": served.split, "mode": served.mode,
                      "items": len(served.items), "agreement": same / len(served.items), "metrics": metrics,
                      "max_abs_loglik_diff": loglik_diff,
                      "served_run": served.run_id, "local_run": local.run_id})
    agreement = agree / total if total else 1.0
    if agreement < min_agreement:
        failures.insert(0, f"parsed answers agree on {agree}/{total} = {agreement:.1%} < {min_agreement:.0%}")
    return {"passed": not failures, "agreement": agreement, "min_agreement": min_agreement, "items": total,
            "failures": failures, "tasks": tasks, "disagreements": disagreements}


# ---------------------------------------------------------------------------------------------
# Serving figures


def _stream_one(client, model: str, messages: list[dict], max_tokens: int, usage_option: bool) -> dict:
    started = time.perf_counter()
    first, chunks, usage = None, 0, None
    for kind, value in stream_chat(client, model, messages, max_tokens=max_tokens, usage_option=usage_option):
        if kind == "usage":
            usage = value
        else:
            chunks += 1
            first = first if first is not None else time.perf_counter()
    ended = time.perf_counter()
    tokens = usage["completion_tokens"] if usage and usage.get("completion_tokens") is not None else chunks
    return {"ttft_s": (first or ended) - started, "latency_s": ended - started, "output_tokens": tokens}


def serving_figures(base_url: str, model: str, conversations: list[list[dict]], *, max_tokens: int,
                    concurrency: int, usage_option: bool = False) -> dict:
    import httpx
    import numpy as np

    out = {}
    with httpx.Client(base_url=base_url, timeout=600.0) as client:
        _stream_one(client, model, conversations[0], 4, usage_option)  # warm-up, not counted
        for level in sorted({1, concurrency}):
            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=level) as pool:
                rows = list(pool.map(lambda m: _stream_one(client, model, m, max_tokens, usage_option),
                                     conversations))
            wall = time.perf_counter() - started
            lat = np.array([r["latency_s"] for r in rows])
            ttft = np.array([r["ttft_s"] for r in rows])
            tokens = sum(r["output_tokens"] for r in rows)
            decode = [r["output_tokens"] / (r["latency_s"] - r["ttft_s"]) for r in rows
                      if r["output_tokens"] > 1 and r["latency_s"] > r["ttft_s"]]
            out[str(level)] = {
                "requests": len(rows), "wall_s": round(wall, 3),
                "ttft_p50_s": round(float(np.percentile(ttft, 50)), 4),
                "latency_p50_s": round(float(np.percentile(lat, 50)), 4),
                "latency_p95_s": round(float(np.percentile(lat, 95)), 4),
                "output_tokens": tokens,
                "output_tokens_per_s_per_request": round(float(np.median(decode)), 2) if decode else None,
                "throughput_output_tokens_per_s": round(tokens / wall, 2),
                "throughput_requests_per_s": round(len(rows) / wall, 3),
            }
    return out


# ---------------------------------------------------------------------------------------------
# The command


def rescore_work(settings, tasks: list[str] | None, limit: int | None, engine: str) -> list:
    """(task, split, mode, items) of every entry re-scored through `engine`."""
    from eval.task import load_items
    from serve.launcher import LOGPROB_ENGINES

    work = []
    for task, split, mode in rescore_entries(tasks, selection_suite(settings), logprobs=engine in LOGPROB_ENGINES):
        items = load_items(task, split, settings.resolved_data_dir)
        work.append((task, split, mode, items[:limit] if limit else items))
    return work


def default_concurrency(engine: str) -> int:
    # `transformers serve` runs each request's generate() on the same 2..16 CPU cores: parallel
    # requests only oversubscribe them. lmdeploy and vLLM batch concurrent requests.
    return {"lmdeploy": 8, "vllm": 4}.get(engine, 1)


def rescore(settings, target: Target, *, base_url: str, model_name: str, engine: str,
            tasks: list[str] | None = None, limit: int | None = None, concurrency: int | None = None,
            min_agreement: float = 0.98, figure_requests: int = 8, figure_max_tokens: int = 32,
            figure_concurrency: int = 4,
            batch_size: int = DEFAULT_BATCH_SIZE, max_retries: int = 5, out_dir: Path | None = None) -> dict:
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
    local = make_backend("hf", local_card(target), settings.model_store, batch_size=batch_size,
                         checkpoint=target.model_dir, lazy=True)
    served = served_backend(base_url, model_name, target, engine, concurrency, local.identity, max_retries,
                            split_ids=local.split_ids)
    executor = make_executor(settings, conn)
    try:
        # On Ray the local side runs in an actor (the merged directory at the same path on its node)
        # while the driver sends the served side's requests: the two sides at once.
        executor.open([local.card], settings.model_store, checkpoints={local.card.name: target.model_dir},
                      batch_size=batch_size, device="auto", dtype="auto", scoring=False, make=lambda card: local)
        local_side = executor.backend(local.card)

        def side(which: str) -> list:
            runs = []
            for task, split, mode, items in work:
                with tqdm(total=len(items), desc=f"{which} {task.name}-{split} {mode}", unit="item",
                          leave=False) as bar:
                    if which == "served":  # gen: one request per item; ppl: one per choice, a chunk's at once
                        backend = served
                        chunk = concurrency if mode == "gen" else max(1, concurrency // len(task.choices or [None]))
                    else:
                        backend, chunk = local_side, batch_size
                    runs.append(run_task(backend, task, split, mode, items, executor.connection(), chunk_size=chunk,
                                         data_dir=data_dir, progress=bar.update))
            return runs

        served_runs, local_runs = executor.map(side, ["served", "local"])
    finally:
        executor.close()
    gate = parity(list(zip(served_runs, local_runs)), min_agreement)
    gate["served_identity"] = {k: served.identity.get(k) for k in ("chat_template_sha256", "sampling_sha256",
                                                                   "weights_sha256")}
    gate["local_identity"] = {"chat_template_sha256": local.identity["chat_template_sha256"],
                              "sampling_sha256": sampling_sha256(),  # HFBackend: greedy, as pinned
                              "weights_sha256": local.identity["weights_sha256"]}
    prompts = [i.messages() for _, _, _, items in work for i in items][:figure_requests]
    figures = serving_figures(base_url, model_name, prompts, max_tokens=figure_max_tokens,
                              concurrency=figure_concurrency, usage_option=engine == "lmdeploy")
    record = {"model": target.label, "model_dir": str(target.model_dir), "engine": engine, "concurrency": concurrency,
              "base_url": base_url, "limit": limit, "sampling": SAMPLING, "parity": gate, "serving": figures,
              "served_runs": {run_key(r.task.name, r.mode): r.run_id for r in served_runs}}
    path = settings.workspace.rescore_record(target.label)
    write_artifact(out_dir / path.name if out_dir else path, RescoreRecord, record)
    return record


def print_report(record: dict) -> None:
    from eval.summary import fmt_ci, fmt_diff, fmt_value

    gate = record["parity"]
    print(f"served {record['model']} ({record['engine']}) against the local model:")
    for t in gate["tasks"]:
        cells = ", ".join(f"{m['metric']} {fmt_value(m['metric'], m['served'])} vs "
                          f"{fmt_value(m['metric'], m['local'])} (diff {fmt_diff(m['metric'], m['diff'])} "
                          f"{fmt_ci(m['metric'], *m['ci95'])})" for m in t["metrics"])
        loglik = (f", max |log-likelihood difference| {t['max_abs_loglik_diff']:.2e}"
                  if t.get("max_abs_loglik_diff") is not None else "")
        print(f"  {t['task']}-{t['split']} {t.get('mode', 'gen')}: {t['items']} items, "
              f"agreement {t['agreement']:.1%}{loglik}; {cells}")
    for level, f in record["serving"].items():
        print(f"  concurrency {level}: TTFT p50 {f['ttft_p50_s'] * 1000:.0f} ms, "
              f"latency p50 {f['latency_p50_s']:.2f} s "
              f"p95 {f['latency_p95_s']:.2f} s, {f['output_tokens_per_s_per_request'] or '-'} tokens/s per request, "
              f"throughput {f['throughput_output_tokens_per_s']} tokens/s ({f['throughput_requests_per_s']} req/s)")
    if gate["passed"]:
        print(f"parity gate: passed (agreement {gate['agreement']:.1%} >= {gate['min_agreement']:.0%}, "
              "every metric's difference inside its paired CI)")
        return
    print("parity gate: FAILED")
    for failure in gate["failures"]:
        print(f"  - {failure}")
    print(f"  chat template sha256: served {gate['served_identity']['chat_template_sha256']}, "
          f"local {gate['local_identity']['chat_template_sha256']}")
    print(f"  sampling sha256: served {gate['served_identity']['sampling_sha256']}, "
          f"local {gate['local_identity']['sampling_sha256']}")
    for d in gate["disagreements"][:20]:
        print(f"  {d['task']} {d['item_id']}: served {d['served_parsed']!r} {d['served'][:80]!r} | "
              f"local {d['local_parsed']!r} {d['local'][:80]!r}")
    if len(gate["disagreements"]) > 20:
        print(f"  ... {len(gate['disagreements']) - 20} more in the JSON record")


def rescore_command(settings, *, model: str | None = None, checkpoint: Path | None = None,
                    base_url: str | None = None, served_model: str | None = None, engine: str = "auto",
                    tasks: str | None = None, limit: int | None = None, concurrency: int | None = None,
                    figure_concurrency: int = 4, batch_size: int = DEFAULT_BATCH_SIZE,
                    min_agreement: float = 0.98, estimate: bool = False) -> int:
    """`selectune rescore` (`make rescore`): the server at --base-url, else the one `make serve`
    started, else one started here for the duration (always stopped, on failure and Ctrl-C too).
    What it will cost here is printed first (only that, with `estimate`)."""
    from models.card import find_card
    from serve.launcher import engine_for, launch, resolve_target, running

    kw = dict(tasks=tasks.split(",") if tasks else None, limit=limit, concurrency=concurrency,
              min_agreement=min_agreement, batch_size=batch_size, figure_concurrency=figure_concurrency)
    current = running(settings.workspace.server_state)
    if base_url:
        target = resolve_target(settings, card_name=model, checkpoint=checkpoint)
        chosen = "external" if engine == "auto" else engine
    elif current is not None and not (model or checkpoint):
        server, state = current
        target, chosen = Target(Path(state.model_dir), find_card(state.base_card), state.model), state.engine
    else:
        target = resolve_target(settings, card_name=model, checkpoint=checkpoint)
        chosen = engine_for(target.model_dir, engine)
    if not print_estimate(settings, target, getattr(chosen, "name", chosen), kw, started_here=not (
            base_url or current is not None and not (model or checkpoint)), only=estimate):
        return 0
    if base_url:
        record = rescore(settings, target, base_url=base_url, model_name=served_model or target.label,
                         engine=chosen, **kw)
    elif current is not None and not (model or checkpoint):
        print(f"rescore: using the server `make serve` started ({server.base_url}, {state.model})")
        record = rescore(settings, target, base_url=server.base_url, model_name=server.model_name,
                         engine=state.engine, **kw)
    else:
        with launch(chosen, settings.workspace.server_log(chosen.name)) as server:
            print(f"rescore: started {chosen.name} for {target.label} at {server.base_url}")
            record = rescore(settings, target, base_url=server.base_url, model_name=server.model_name,
                             engine=chosen.name, **kw)
    print_report(record)
    return 0 if record["parity"]["passed"] else 1


def print_estimate(settings, target, engine: str, kw: dict, *, started_here: bool, only: bool) -> bool:
    """Print the cost here (serve/estimate.py); False when only that was asked for."""
    from models.loading import resolve_device

    if settings.executor == "local" and resolve_device("auto") == "cpu":  # the CPU cost model
        from eval.backends import make_backend
        from serve.estimate import rescore_estimate

        concurrency = kw["concurrency"] or default_concurrency(engine)
        local = make_backend("hf", local_card(target), settings.model_store, batch_size=kw["batch_size"],
                             checkpoint=target.model_dir, lazy=True)
        served = served_backend("http://127.0.0.1:0", target.label, target, engine, concurrency, local.identity,
                                split_ids=local.split_ids)  # builds the run identity; sends nothing
        cost = rescore_estimate(settings, local, served, target, engine,
                                rescore_work(settings, kw["tasks"], kw["limit"], engine), concurrency=concurrency,
                                batch_size=kw["batch_size"], started_here=started_here)
        print("\n".join(cost.lines()), flush=True)
    elif only:
        print("rescore: no estimate: the cost model is for re-scoring on this machine's CPU with the local executor "
              "(docs/machine.md)")
    return not only
