"""What this machine can do, measured: the matrix-product rate in each dtype it multiplies
natively, memory bandwidth and the rate weights load at, plus the dtype each stage uses here and
why. `python -m selectune machine` prints it; the cost estimates (eval/estimate.py) read it.

A calibration takes a few seconds and is cached under the cache directory, one file per CPU
model, CPU flags that matter, torch version and thread count: a change to any of them (another
machine, a torch upgrade) measures again.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")
"""The CPU flags that decide how fast the stages run (`lscpu` names them the same way)."""
MATMUL_SHAPE = (512, 1024, 4096)
"""rows x in x out of the linear layer measured: a prompt batch through a 0.5B-1.5B model's
projection, large enough for oneDNN's blocked kernels, measured in well under a second."""
DECODE_ROWS = 16
"""A decoding step's rows: the default batch size."""
TRIALS, SECONDS_PER_TRIAL = 3, 0.15
"""The best of a few short trials: a busy moment of the machine lowers one trial, not the figure."""


def cpu_identity() -> dict:
    """CPU model, the flags of FLAGS it has, the torch version and threads: the calibration's key."""
    import torch

    model, flags = platform.processor() or "unknown CPU", set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    from models.loading import onednn_isa_cap

    return {
        "cpu": model,
        "flags": [f for f in FLAGS if f in flags],
        "torch": torch.__version__.split("+")[0],
        "threads": torch.get_num_threads(),
        # the kernels torch and oneDNN may use (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA cap them)
        "kernels": torch.backends.cpu.get_cpu_capability(),
        "onednn_max_isa": onednn_isa_cap(),
    }


def _digest(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def calibration_path(cache_dir: Path, identity: dict) -> Path:
    return cache_dir / "machine" / f"{_digest(identity)}.json"


def _measured_path(cache_dir: Path) -> Path:
    return cache_dir / "machine" / f"{_digest(cpu_identity())}.measured.json"


def measured_here(cache_dir: Path) -> dict:
    """What commands measured on this machine (the calibration's identity), for the next
    estimates: `starts` ("engine model" -> seconds a server's start took) and `factors` ("mode
    dtype", mode `gen`, `ppl` or `train` -> {factor, runs, date}: measured time over the cost
    model's, eval/learned.py). An unreadable file is nothing measured."""
    try:
        record = json.loads(_measured_path(cache_dir).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    # files written before `factors` was named so kept scoring's factors under `scoring`
    legacy = record.pop("scoring", None)
    if isinstance(legacy, dict):
        factors = record["factors"] if isinstance(record.get("factors"), dict) else {}
        record["factors"] = {**legacy, **factors}
    return record


def record_measured(cache_dir: Path, section: str, key: str, value) -> None:
    """Keep one measurement in `measured_here`'s `section`, replacing the last one under `key`."""
    record = measured_here(cache_dir)
    if not isinstance(record.get(section), dict):
        record[section] = {}
    record[section][key] = value
    path = _measured_path(cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    tmp.replace(path)


def last_server_start(cache_dir: Path, engine: str, model: str) -> float | None:
    """Seconds the last start of `engine` serving `model` (a card's name) took on this machine,
    None when none was recorded."""
    try:
        return float(measured_here(cache_dir)["starts"][f"{engine} {model}"])
    except (KeyError, TypeError, ValueError):
        return None


def record_server_start(cache_dir: Path, engine: str, model: str, seconds: float) -> None:
    """Keep how long a server's start took here, for the next estimate (`last_server_start`)."""
    record_measured(cache_dir, "starts", f"{engine} {model}", round(seconds, 1))


def _rate(work: float, step) -> float:
    """work units per second of `step()`: run once to warm up, then the best of TRIALS trials."""
    step()
    best = 0.0
    for _ in range(TRIALS):
        count, started = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - started) < SECONDS_PER_TRIAL or count < 2:
            step()
            count += 1
        best = max(best, work * count / elapsed)
    return best


def matmul_gflops(dtype_name: str, rows: int = MATMUL_SHAPE[0]) -> float:
    """GFLOP/s of a linear layer as the stages run it: fp32 through oneDNN with its weight packed
    where torch has it (models/prepack.py), bf16 through torch's linear. `rows`: 16 measures a
    decoding step of a batch (DECODE_ROWS), where the two dtypes' kernels differ most."""
    import torch

    from models import prepack

    _, n_in, n_out = MATMUL_SHAPE
    dtype = getattr(torch, dtype_name)
    x, linear = torch.randn(rows, n_in).to(dtype), torch.nn.Linear(n_in, n_out, bias=False).to(dtype)
    if dtype == torch.float32 and prepack.available():
        linear = prepack.PrepackedLinear(linear, 16)
    with torch.inference_mode():
        return _rate(2 * rows * n_in * n_out / 1e9, lambda: linear(x))


def bandwidth_gbs(mib: int = 256) -> float:
    """GB/s of reading a large tensor once (its sum), as a decoding step reads the weights."""
    import torch

    src = torch.ones(mib * 2**20 // 4)
    return _rate(src.numel() * 4 / 1e9, lambda: src.sum())


def load_gbs(folder: Path, mib: int = 128) -> float:
    """GB/s at which a safetensors file is read into tensors (from the page cache: a model file
    read a second time, as every stage after provisioning reads it)."""
    import torch
    from safetensors.torch import load_file, save_file

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        path = Path(tmp) / "probe.safetensors"
        save_file({"w": torch.ones(mib * 2**20 // 2, dtype=torch.bfloat16)}, str(path))
        return _rate(
            mib * 2**20 / 1e9, lambda: load_file(str(path))["w"].clone()
        )  # the file is mapped lazily


def measure(cache_dir: Path) -> dict:
    from models.loading import cpu_has_bf16

    started = time.perf_counter()
    dtypes = ["float32"] + (["bfloat16"] if cpu_has_bf16() else [])
    record = {
        "identity": cpu_identity(),
        "matmul_gflops": {d: round(matmul_gflops(d), 1) for d in dtypes},
        "decode_gflops": {d: round(matmul_gflops(d, DECODE_ROWS), 1) for d in dtypes},
        "bandwidth_gbs": round(bandwidth_gbs(), 2),
        "load_gbs": round(load_gbs(cache_dir / "machine"), 2),
        "measured": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return {**record, "seconds": round(time.perf_counter() - started, 2)}


def calibration(cache_dir: Path, *, again: bool = False) -> dict:
    """This machine's calibration: the cached one for its identity, else measured now and cached;
    with `learned`, what the cost model's corrections measured here are (eval/learned.py)."""
    from core.artifacts import MachineCalibration, read_artifact, write_artifact

    path = calibration_path(cache_dir, cpu_identity())
    if path.is_file() and not again:
        record = read_artifact(path, MachineCalibration).model_dump()
    else:
        record = write_artifact(path, MachineCalibration, measure(cache_dir)).model_dump()
    # what whole runs measured here against the cost model, per mode and dtype (eval/learned.py)
    factors = measured_here(cache_dir).get("factors")
    return {**record, "learned": factors if isinstance(factors, dict) else {}}


def stage_dtypes(flags: list[str], cuda: bool = False, onednn_cap: str = "") -> list[tuple[str, str, str]]:
    """(stage, dtype, why) for each stage on this machine, by the rules the stages apply
    (models.loading.scoring_dtype, train.trainer.compute_dtype)."""
    from models.loading import ONEDNN_BF16_ISAS

    if cuda:
        native = ("bfloat16", "the GPU multiplies bf16")
    elif (
        onednn_cap and onednn_cap not in ONEDNN_BF16_ISAS and ("avx512_bf16" in flags or "amx_tile" in flags)
    ):
        native = (
            "float32",
            f"ONEDNN_MAX_CPU_ISA={onednn_cap} leaves oneDNN no native bf16: emulated, slower than fp32",
        )
    elif "avx512_bf16" in flags or "amx_tile" in flags:
        native = (
            "bfloat16",
            "the CPU multiplies bf16 natively: "
            + ", ".join(f for f in ("avx512_bf16", "amx_tile") if f in flags),
        )
    else:
        native = ("float32", "no native bf16 on this CPU: emulated bf16 multiplies slower than fp32")
    return [
        ("select scoring", *native),
        ("train (QLoRA compute)", native[0], f"{native[1]}; the NF4 weights are dequantised to it"),
        (
            "merge, parity and train's checks",
            "float32",
            "compared against the served model, which runs in fp32",
        ),
        ("re-score (local side), cross-checks", "float32", "as the reference tools and the server run"),
    ]


def describe(record: dict) -> list[str]:
    ident = record["identity"]
    lines = [
        f"CPU: {ident['cpu']}; flags {' '.join(ident['flags']) or '(none of ' + ', '.join(FLAGS) + ')'}; "
        f"torch {ident['torch']}, {ident['threads']} threads"
        + (f", kernels {ident['kernels']}" if "kernels" in ident else "")
        + (f", ONEDNN_MAX_CPU_ISA={ident['onednn_max_isa']}" if ident.get("onednn_max_isa") else ""),
        f"measured {record['measured']} in {record['seconds']} s",
    ]
    lines += [
        f"  matmul {dtype}: {rate:.0f} GFLOP/s; at a decoding step's {DECODE_ROWS} rows "
        f"{record['decode_gflops'][dtype]:.0f} GFLOP/s"
        for dtype, rate in record["matmul_gflops"].items()
    ]
    if "bfloat16" not in record["matmul_gflops"]:
        lines.append("  matmul bfloat16: not native here, not used")
    lines += [
        f"  memory bandwidth: {record['bandwidth_gbs']:.1f} GB/s (reading)",
        f"  weights load: {record['load_gbs']:.1f} GB/s (safetensors, from the page cache)",
        "dtypes:",
    ]
    cuda = False
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        pass
    lines += [
        f"  {stage}: {dtype}; {why}"
        for stage, dtype, why in stage_dtypes(ident["flags"], cuda, ident.get("onednn_max_isa", ""))
    ]
    return lines


def machine_command(settings, *, again: bool = False, json_output: bool = False) -> int:
    """`selectune machine`: this machine's calibration (measured once per CPU, flags and torch)."""
    path = calibration_path(settings.cache_dir, cpu_identity())
    fresh = again or not path.is_file()
    record = calibration(settings.cache_dir, again=again)
    if json_output:
        print(json.dumps(record, ensure_ascii=False, indent=2))
        return 0
    print("\n".join(describe(record)))
    print(f"{'measured now' if fresh else 'cached'}: {path} (`--again` measures again)")
    if os.environ.get("OMP_NUM_THREADS"):
        print(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} sets the threads measured")
    return 0
