"""The training step on a Ray cluster: the same trainer under Ray Train's TorchTrainer.

    python -m selectune train --executor ray --ray-address HEAD:6379 --workers 2

Each of the N workers runs `train.trainer.run_training` as it runs alone; Ray Train starts the
process group (gloo on CPUs, NCCL on GPUs) and sets the variables transformers' Trainer reads
(RANK, WORLD_SIZE, LOCAL_RANK), so the Trainer runs DDP exactly as under `accelerate launch`:
each process takes its share of every global batch, the main process alone writes the log,
checkpoints, the adapter and the checkpoint evaluations. The recipe's batch size is per worker,
as per process under accelerate. The run directory must be one path every worker's node sees (a
shared filesystem), as Ray Train's storage (run_dir/ray) must be. The worker of rank 0 hands its
result back in the Ray Train checkpoint it reports; the merge, parity and checks then run on the
driver.
"""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path

from core.errors import UserError
from core.workspace import TrainRun

GIB = 1 << 30
RESULT = "train_result.pkl"
"""The worker of rank 0's TrainResult, in the Ray Train checkpoint it reports last."""


def _train_loop(config: dict) -> None:
    """One worker: the trainer, then its result (rank 0) or nothing, reported to the driver."""
    import ray.train
    import torch

    from train.trainer import run_training

    torch.set_num_threads(config["threads"])
    result = run_training(
        config["recipe"],
        config["checkpoint"],
        Path(config["run_dir"]),
        Path(config["data_dir"]),
        **config["options"],
    )
    if ray.train.get_context().get_world_rank() != 0:
        ray.train.report({"steps": result.steps})
        return
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / RESULT).write_bytes(pickle.dumps(result))
        ray.train.report({"steps": result.steps}, checkpoint=ray.train.Checkpoint.from_directory(folder))


def train_on_ray(
    settings,
    recipe,
    checkpoint: str,
    run_dir: Path,
    data_dir: Path,
    *,
    workers: int,
    memory_gib: float,
    **options,
):
    """run_training's TrainResult, from `workers` Ray Train workers (DDP) on the cluster the
    settings name. A GPU per worker where the cluster has GPUs; else `cpus_per_model` CPUs each."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from eval.actors import Placement
    from eval.executor import connect, fits

    address = connect(settings.ray_address)
    use_gpu = ray.cluster_resources().get("GPU", 0) >= workers
    need = Placement(settings.cpus_per_model, memory_gib, 1 if use_gpu else 0)
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    room = sum(
        min(int(r.get("CPU", 0) // need.cpus), int(r.get("memory", 0) // max(need.memory_gib * GIB, 1)))
        for r in nodes
        if fits(need, r)
    )
    if room < workers:
        raise UserError(
            f"the Ray cluster at {address} has room for {room} of {workers} training workers "
            f"(each needs {need.text()})"
        )
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "recipe": recipe,
            "checkpoint": checkpoint,
            "run_dir": str(run_dir.resolve()),
            "data_dir": str(data_dir.resolve()),
            "options": options,
            "threads": need.cpus,
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": need.cpus, "memory": int(need.memory_gib * GIB)},
        ),
        run_config=RunConfig(name=run_dir.name, storage_path=str(TrainRun(run_dir).ray_storage.resolve())),
    )
    print(f"train: {workers} Ray Train worker(s) on {address} ({'NCCL, GPU' if use_gpu else 'gloo, CPU'})")
    try:
        outcome = trainer.fit()
    except Exception as exc:  # Ray Train wraps the worker's own error; its message names it
        cause = getattr(exc, "__cause__", None) or exc
        if isinstance(cause, UserError):
            raise cause from None
        raise UserError(f"training on the Ray cluster failed: {type(cause).__name__}: {cause}") from None
    with outcome.checkpoint.as_directory() as folder:
        return pickle.loads((Path(folder) / RESULT).read_bytes())
