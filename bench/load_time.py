"""Load time of a store checkpoint (safetensors) against loading the same GGUF with transformers.

    make bench                      # every provisioned card
    .venv/bin/python bench/load_time.py --card smollm2-135m-instruct --repeats 3

Both loads run in this process, one after the other, and the ratio is what to read: absolute
seconds depend on the machine. Median of --repeats runs each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.card import load_cards  # noqa: E402
from models.convert import load_gguf  # noqa: E402
from models.loading import load_model  # noqa: E402
from models.store import model_dir, read_manifest  # noqa: E402
from core.settings import load_settings  # noqa: E402


def _median_seconds(load, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        loaded = load()
        times.append(time.perf_counter() - started)
        del loaded
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", action="append", help="card name (default: every provisioned card)")
    parser.add_argument("--cache-dir", help="selectune cache directory")
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    store = load_settings(cache_dir=args.cache_dir).model_store
    cards = [
        c
        for c in load_cards().values()
        if (args.card is None or c.name in args.card)
        and c.source.kind == "pypi-gguf"
        and read_manifest(c, store) is not None
    ]
    if not cards:
        print("bench: no provisioned GGUF card; run `make models` first", file=sys.stderr)
        return 2
    print(f"{'card':<30} {'gguf s':>8} {'safetensors s':>14} {'speed-up':>9}")
    for card in cards:
        gguf = model_dir(card, store) / card.source.gguf_name
        t_gguf = _median_seconds(lambda: load_gguf(gguf), args.repeats)
        t_st = _median_seconds(lambda: load_model(card, store), args.repeats)
        print(f"{card.name:<30} {t_gguf:>8.1f} {t_st:>14.1f} {t_gguf / t_st:>8.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
