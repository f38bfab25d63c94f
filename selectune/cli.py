"""The selectune command line: it parses arguments and hands them to one entry per stage.

    python -m selectune models list | models provision [--card NAME ...] [--weights DIR]
    python -m selectune machine [--again] [--json]
    python -m selectune data [--check]
    python -m selectune eval --task NAME --model CARD [--split S --mode gen|ppl --limit N]
    python -m selectune select [--models A,B] [--suite suites/fewclue-test.yaml]
    python -m selectune train [--recipe train/default.yaml] [--model CARD]
    python -m selectune serve [--model CARD | --checkpoint DIR] [--stop]
    python -m selectune rescore [--tasks fact --limit 20]
    python -m selectune chat
    python -m selectune report [--out DIR]
    python -m selectune review [--with-candidates] [--invite A,B] [--export F.csv | --import F.json | --revoke A]
    python -m selectune data-synth [--recipe synth/fact.yaml] [--base-url URL --teacher-model NAME]

Each entry is named as "module:function" and imported only when its command runs, so a command
loads only the libraries it uses.
"""

from __future__ import annotations

import importlib
import logging
import signal
import sys
import threading
import warnings

from core.errors import UserError
from core.settings import load_settings
from selectune.parser import build_parser

GLOBAL_OPTIONS = ("config", "runs_dir", "cache_dir", "data_dir", "task_dirs", "judge_url", "judge_model")
EXECUTOR_OPTIONS = ("executor", "ray_address", "cpus_per_model")
"""Settings keys that the commands which score or train also take as flags."""
QUIET_WARNINGS = [
    # transformers' own deprecation inside peft and Trainer, at every `make train`
    (r".*`is_gradient_checkpointing` is deprecated.*", FutureWarning),
]
QUIET_LOGS = {
    # bitsandbytes looks for the optional `kernels` package on CPUs with AVX512-BF16; its fallback is fine
    "bitsandbytes.backends.cpu.ops": "from kernels-community",
}


def quiet_libraries() -> None:
    """Warnings that say nothing a user can act on; our own messages are never filtered."""
    for message, category in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, text in QUIET_LOGS.items():
        logging.getLogger(name).addFilter(lambda record, text=text: text not in record.getMessage())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    # SIGTERM unwinds like Ctrl-C does, so a server this command started (rescore, data-synth)
    # is stopped by its context manager instead of being left running.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    options = vars(args)
    module, function = options.pop("entry").split(":")
    for key in ("command", "action"):
        options.pop(key, None)
    try:
        settings = load_settings(
            options.pop("config"),
            **{k: options.pop(k) for k in GLOBAL_OPTIONS[1:]},
            **{k: options.pop(k) for k in EXECUTOR_OPTIONS if k in options},
        )
        if settings.task_dirs:
            from eval.task import include_task_dirs

            include_task_dirs(settings.task_dirs)
        return getattr(importlib.import_module(module), function)(settings, **options)
    except UserError as exc:
        print(f"selectune: error: {exc}", file=sys.stderr)
        return 2
