"""Cross-check against OpenCompass: its own FewCLUE gen configs, run by its own CLI on the same
model and items, must give the predictions and the accuracy of our `accuracy_opencompass` column.

    make crosscheck-opencompass CARD=qwen2.5-coder-0.5b-instruct LIMIT=32

OpenCompass 0.5.4 needs transformers < 5, so it lives in its own venv (`make opencompass-venv`,
pinned by bench/opencompass-constraints.txt) and is driven as a subprocess; nothing of it is
imported here. What it needs is laid out in a work directory:
- `data/FewCLUE/{bustm,ocnli}/<file>` links to our data (its configs read those relative paths);
- the model directory, linked file by file, with two files rewritten for transformers 4: the
  tokenizer config names a class (`TokenizersBackend`) that transformers 4 does not have, and the
  model config keeps RoPE settings under `rope_parameters`, which transformers 4 ignores, silently
  falling back to rope_theta=10000 (Qwen2.5 uses 1e6: the replies come out different);
- `config.py` importing the exact dataset configs FewCLUE_bustm_gen_634f41 and
  FewCLUE_ocnli_fc_gen_f97a97 from the installed package, with HuggingFacewithChatTemplate in
  fp32 on the CPU, greedy, `max_out_len` equal to our task's `max_new_tokens`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from eval.parsers import first_capital
from core.errors import UserError

REPO = Path(__file__).resolve().parents[1]
OC_VENV = REPO / ".venv-opencompass"

# our task -> (config module, its list, OpenCompass data folder, our data folder, abbr prefix)
DATASETS = {
    "fewclue_bustm": ("FewCLUE_bustm.FewCLUE_bustm_gen_634f41", "bustm_datasets", "bustm", "bustm", "bustm"),
    "fewclue_ocnli_fc": (
        "FewCLUE_ocnli_fc.FewCLUE_ocnli_fc_gen_f97a97",
        "ocnli_fc_datasets",
        "ocnli",
        "ocnlifc",
        "ocnli_fc",
    ),
}
SPLIT_FILES = {"dev": "dev_few_all.json", "test": "test_public.json"}
MODEL_ABBR = "selectune-crosscheck"


def opencompass_bin(venv: Path = OC_VENV) -> Path:
    exe = venv / "bin" / "opencompass"
    if not exe.is_file():
        raise UserError(f"{exe}: not found; run `make opencompass-venv` first")
    return exe


def transformers4_model_dir(model_dir: Path, out: Path) -> Path:
    """A view of a transformers-5 checkpoint that transformers 4 loads: every file linked, the
    tokenizer config copied with a class name both versions know."""
    out.mkdir(parents=True, exist_ok=True)
    rewritten = {"tokenizer_config.json", "config.json"}
    for f in model_dir.iterdir():
        if f.name not in rewritten and f.is_file():
            (out / f.name).symlink_to(f.resolve())
    model_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    rope = model_config.get("rope_parameters")
    if rope:
        model_config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            model_config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    (out / "config.json").write_text(json.dumps(model_config, indent=2), encoding="utf-8")
    config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    # The generic class would also return token_type_ids, which causal LMs refuse in generate().
    config["model_input_names"] = ["input_ids", "attention_mask"]
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8"
    )
    return out


CONFIG = """\
from mmengine.config import read_base
from opencompass.models import HuggingFacewithChatTemplate

with read_base():
{imports}

datasets = []
for _d in {lists}:
    if _d['abbr'] in {abbrs!r}:
        _d['reader_cfg'] = dict(_d['reader_cfg'], test_range={test_range!r})
        datasets.append(_d)

models = [dict(
    type=HuggingFacewithChatTemplate,
    abbr={abbr!r},
    path={path!r},
    model_kwargs=dict(torch_dtype='torch.float32', device_map='cpu'),
    max_out_len={max_out_len},
    batch_size={batch_size},
    run_cfg=dict(num_gpus=0),
)]
"""


def write_workdir(
    workdir: Path,
    data_dir: Path,
    model_dir: Path,
    task: str,
    split: str,
    *,
    limit: int | None,
    batch_size: int,
    max_out_len: int,
) -> str:
    """Lay out data links, the transformers-4 model view and config.py; returns the dataset abbr."""
    module, listname, oc_folder, our_folder, prefix = DATASETS[task]
    src = data_dir / "fewclue" / our_folder / SPLIT_FILES[split]
    if not src.is_file():
        raise UserError(f"{src}: data file not found (run `make data`, or set DATA_DIR)")
    link = workdir / "data" / "FewCLUE" / oc_folder / SPLIT_FILES[split]
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(src.resolve())
    view = transformers4_model_dir(model_dir, workdir / "model")
    abbr = f"{prefix}-{split}"
    imports = f"    from opencompass.configs.datasets.{module} import {listname}"
    (workdir / "config.py").write_text(
        CONFIG.format(
            imports=imports,
            lists=listname,
            abbrs=[abbr],
            test_range=f"[0:{limit}]" if limit else "",
            abbr=MODEL_ABBR,
            path=str(view),
            max_out_len=max_out_len,
            batch_size=batch_size,
        ),
        encoding="utf-8",
    )
    return abbr


@dataclass
class OpenCompassRun:
    predictions: list[str]
    """Raw generations in dataset order (after OpenCompass's own stop-word cut)."""
    golds: list[str]
    accuracy: float
    """OpenCompass's own score (AccEvaluator on first-capital), as a fraction."""
    seconds: float
    """The CLI end to end: start-up, dataset and model loading, inference, evaluation."""
    infer_seconds: float
    """Inference alone: from its "Starting inference process" log line to the predictions file."""


def _inference_seconds(log: str, predictions: Path) -> float:
    import datetime

    match = re.search(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\][^\n]*Starting inference process", log)
    if match is None:
        raise UserError("opencompass log has no 'Starting inference process' line")
    started = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return predictions.stat().st_mtime - started


def run_opencompass(
    workdir: Path, abbr: str, venv: Path = OC_VENV, timeout_s: float = 3600
) -> OpenCompassRun:
    """Run the CLI in-process (`--debug`: no task runner subprocesses) and read its outputs."""
    exe = opencompass_bin(venv)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COMPASS_DATA_CACHE": ""}
    started = time.monotonic()
    done = subprocess.run(
        [str(exe), "config.py", "-w", "outputs", "--debug"],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    seconds = time.monotonic() - started
    (workdir / "opencompass.log").write_text(done.stdout + done.stderr, encoding="utf-8")
    stamps = sorted((workdir / "outputs").glob("*/predictions"))
    if done.returncode != 0 or not stamps:
        tail = " | ".join((done.stdout + done.stderr).strip().splitlines()[-3:])
        raise UserError(
            f"opencompass failed (exit {done.returncode}); log: {workdir / 'opencompass.log'}: {tail}"
        )
    run_dir = stamps[-1].parent
    pred_file = run_dir / "predictions" / MODEL_ABBR / f"{abbr}.json"
    preds = json.loads(pred_file.read_text(encoding="utf-8"))
    rows = [preds[k] for k in sorted(preds, key=int)]
    result = json.loads((run_dir / "results" / MODEL_ABBR / f"{abbr}.json").read_text(encoding="utf-8"))
    return OpenCompassRun(
        [r["prediction"] for r in rows],
        [r["gold"] for r in rows],
        result["accuracy"] / 100.0,
        seconds,
        _inference_seconds(done.stdout + done.stderr, pred_file),
    )


def compare(ours: list[dict], theirs: OpenCompassRun) -> dict:
    """Item-by-item agreement between our stored gen items (dataset order) and OpenCompass's."""
    if len(ours) != len(theirs.predictions):
        raise UserError(f"item counts differ: selectune {len(ours)}, OpenCompass {len(theirs.predictions)}")
    gold_mismatch = sum(o["gold"] != g for o, g in zip(ours, theirs.golds))
    ours_pred = [first_capital(o["output"]) for o in ours]
    theirs_pred = [first_capital(p) for p in theirs.predictions]
    ours_acc = sum(o["scores"]["accuracy_opencompass"] for o in ours) / len(ours)
    return {
        "items": len(ours),
        "gold_mismatches": gold_mismatch,
        "selectune_accuracy_opencompass": ours_acc,
        "opencompass_accuracy": theirs.accuracy,
        "differing_first_capital": sum(a != b for a, b in zip(ours_pred, theirs_pred)),
        "differing_text": sum(o["output"].strip() != p.strip() for o, p in zip(ours, theirs.predictions)),
    }
