"""`selectune rescore` (`make rescore`): which server and model, the cost printed first, the
report printed last (serve/rescore.py does the work)."""

from __future__ import annotations

from contextlib import ExitStack, closing
from pathlib import Path

from eval.backends.base import DEFAULT_BATCH_SIZE
from eval.progress import OverallBar
from serve.launcher import Target
from serve.rescore import default_concurrency, local_card, rescore, rescore_work, served_backend


def print_report(record: dict) -> None:
    from eval.summary import fmt_ci, fmt_diff, fmt_value

    gate = record["parity"]
    print(f"served {record['model']} ({record['engine']}) against the local model:")
    for t in gate["tasks"]:
        cells = ", ".join(
            f"{m['metric']} {fmt_value(m['metric'], m['served'])} vs "
            f"{fmt_value(m['metric'], m['local'])} (diff {fmt_diff(m['metric'], m['diff'])} "
            f"{fmt_ci(m['metric'], *m['ci95'])})"
            for m in t["metrics"]
        )
        loglik = (
            f", max |log-likelihood difference| {t['max_abs_loglik_diff']:.2e}"
            if t.get("max_abs_loglik_diff") is not None
            else ""
        )
        print(
            f"  {t['task']}-{t['split']} {t.get('mode', 'gen')}: {t['items']} items, "
            f"agreement {t['agreement']:.1%}{loglik}; {cells}"
        )
    for level, f in record["serving"].items():
        print(
            f"  concurrency {level}: TTFT p50 {f['ttft_p50_s'] * 1000:.0f} ms, "
            f"latency p50 {f['latency_p50_s']:.2f} s "
            f"p95 {f['latency_p95_s']:.2f} s, {f['output_tokens_per_s_per_request'] or '-'} tokens/s per request, "
            f"throughput {f['throughput_output_tokens_per_s']} tokens/s ({f['throughput_requests_per_s']} req/s)"
        )
    if gate["passed"]:
        print(
            f"parity gate: passed (agreement {gate['agreement']:.1%} >= {gate['min_agreement']:.0%}, "
            "every metric's difference inside its paired CI)"
        )
        return
    print("parity gate: FAILED")
    for failure in gate["failures"]:
        print(f"  - {failure}")
    print(
        f"  chat template sha256: served {gate['served_identity']['chat_template_sha256']}, "
        f"local {gate['local_identity']['chat_template_sha256']}"
    )
    print(
        f"  sampling sha256: served {gate['served_identity']['sampling_sha256']}, "
        f"local {gate['local_identity']['sampling_sha256']}"
    )
    for d in gate["disagreements"][:20]:
        print(
            f"  {d['task']} {d['item_id']}: served {d['served_parsed']!r} {d['served'][:80]!r} | "
            f"local {d['local_parsed']!r} {d['local'][:80]!r}"
        )
    if len(gate["disagreements"]) > 20:
        print(f"  ... {len(gate['disagreements']) - 20} more in the JSON record")


def rescore_command(
    settings,
    *,
    model: str | None = None,
    checkpoint: Path | None = None,
    base_url: str | None = None,
    served_model: str | None = None,
    engine: str = "auto",
    tasks: str | None = None,
    limit: int | None = None,
    concurrency: int | None = None,
    figure_concurrency: int = 4,
    batch_size: int = DEFAULT_BATCH_SIZE,
    min_agreement: float = 0.98,
    estimate: bool = False,
) -> int:
    """`selectune rescore` (`make rescore`): the server at --base-url, else the one `make serve`
    started, else one started here for the duration (always stopped, on failure and Ctrl-C too).
    What it will cost here is printed first (only that, with `estimate`)."""
    from models.card import find_card
    from models.machine import record_server_start
    from serve.engines import engine_for
    from serve.launcher import launch, resolve_target, running

    kw = dict(
        tasks=tasks.split(",") if tasks else None,
        limit=limit,
        concurrency=concurrency,
        min_agreement=min_agreement,
        batch_size=batch_size,
        figure_concurrency=figure_concurrency,
    )
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
    started_here = not (base_url or current is not None and not (model or checkpoint))
    name = getattr(chosen, "name", chosen)
    cost = print_estimate(settings, target, name, kw, started_here=started_here, only=estimate)
    if estimate:
        return 0
    with ExitStack() as stack:
        overall = stack.enter_context(closing(OverallBar(cost))) if cost is not None and cost.costs else None
        if base_url:
            url, served, engine_name = base_url, served_model or target.label, chosen
        elif current is not None and not (model or checkpoint):
            print(f"rescore: using the server `make serve` started ({server.base_url}, {state.model})")
            url, served, engine_name = server.base_url, server.model_name, state.engine
        else:
            server = stack.enter_context(launch(chosen, settings.workspace.server_log(chosen.name)))
            record_server_start(settings.cache_dir, chosen.name, target.card.name, server.start_seconds)
            print(
                f"rescore: started {chosen.name} for {target.label} at {server.base_url} "
                f"in {server.start_seconds:.0f} s"
            )
            url, served, engine_name = server.base_url, server.model_name, chosen.name
            if overall is not None:
                overall.update(cost.loads[f"served ({name})"])
        record = rescore(
            settings, target, base_url=url, model_name=served, engine=engine_name, overall=overall, **kw
        )
    print_report(record)
    return 0 if record["parity"]["passed"] else 1


def print_estimate(settings, target, engine: str, kw: dict, *, started_here: bool, only: bool):
    """Print the cost here (serve/estimate.py) and return it; None where the CPU cost model does not
    apply (said in one line when `only` the cost was asked for)."""
    from models.loading import resolve_device

    if settings.executor == "local" and resolve_device("auto") == "cpu":  # the CPU cost model
        from eval.backends import make_backend
        from serve.estimate import rescore_estimate

        concurrency = kw["concurrency"] or default_concurrency(engine)
        local = make_backend(
            "hf",
            local_card(target),
            settings.model_store,
            batch_size=kw["batch_size"],
            checkpoint=target.model_dir,
            lazy=True,
        )
        served = served_backend(
            "http://127.0.0.1:0",
            target.label,
            target,
            engine,
            concurrency,
            local.identity,
            split_ids=local.split_ids,
        )  # builds the run identity; sends nothing
        cost = rescore_estimate(
            settings,
            local,
            served,
            target,
            engine,
            rescore_work(settings, kw["tasks"], kw["limit"], engine),
            concurrency=concurrency,
            batch_size=kw["batch_size"],
            started_here=started_here,
        )
        print("\n".join(cost.lines()), flush=True)
        return cost
    if only:
        print(
            "rescore: no estimate: the cost model is for re-scoring on this machine's CPU with the local executor "
            "(docs/machine.md)"
        )
    return None
