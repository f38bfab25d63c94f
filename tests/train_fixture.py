"""What the trainer's tests share: a tiny memorisable data set, a recipe over it, a tiny Qwen2
checkpoint (the `setup` fixture) and readers of a run's log and adapter."""

from __future__ import annotations

import json

import pytest

from bench.fixtures import build_tiny_qwen2
from train.recipe import Recipe

ROWS = [{"prompt": f"问题{i}", "completion": f"答案是{i * 7}号"} for i in range(8)]


def recipe(data_path, **training) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "t",
            "data": [{"path": str(data_path)}],
            "split": [1.0, 0.0, 0.0],
            "quantization": training.pop("quantization", "nf4"),
            "compute_dtype": training.pop("compute_dtype", "auto"),
            "lora": {"r": 8, "alpha": 16, "dropout": training.pop("lora_dropout", 0.0)},
            "training": {
                "max_steps": 40,
                "batch_size": 4,
                "learning_rate": 1e-2,
                "scheduler": "constant",
                "warmup_ratio": 0.0,
                "gradient_checkpointing": False,
                "logging_steps": 1,
                "eval_steps": 1000,
                "save_steps": 10,
                "sample_steps": 20,
                **training,
            },
            "samples": {"prompts": ["问题1"], "facts": [["7号"]], "max_new_tokens": 6},
        }
    )


def short_recipe(data_path, **training) -> Recipe:
    """Three steps in fp32 without quantisation: the same numbers on any machine; no checkpoints or samples
    unless `training` asks for them."""
    return recipe(
        data_path,
        **{
            "quantization": "none",
            "compute_dtype": "fp32",
            "max_steps": 3,
            "save_steps": 1000,
            "sample_steps": 1000,
        }
        | training,
    )


def provenance(**given) -> dict:
    """What `make train` hands the merge to write beside the merged weights."""
    return {
        "base_card": "tiny",
        "base_weights_sha256": None,
        "adapter_config": {},
        "adapter_sha256": "0" * 64,
        "data_sha256": "1" * 64,
        "recipe": {},
        "recipe_sha256": None,
        "final_train_loss": None,
        "final_val_loss": None,
        "steps": 1,
        **given,
    }


@pytest.fixture
def setup(tmp_path):
    model = build_tiny_qwen2(tmp_path / "model", initializer_range=0.2)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    return model, data


def log_records(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def losses(run_dir):
    return [(r["step"], r["loss"]) for r in log_records(run_dir) if "loss" in r and "sample" not in r]


def prompts(n: int) -> list[list[dict]]:
    """The first `n` of the data's prompts, as chat messages."""
    return [[{"role": "user", "content": f"问题{i}"}] for i in range(n)]


def merge(model, result, out, n_prompts: int = 4, **options):
    """`merge_adapter` of a test run's adapter into `model`, its parity checked on `n_prompts` prompts
    (8 new tokens, tolerance 1e-3, the test provenance, unless `options` say otherwise)."""
    from train.merge import merge_adapter

    options = {"max_new_tokens": 8, "tolerance": 1e-3, "provenance": provenance(), **options}
    return merge_adapter(str(model), result.adapter_dir, out, parity_prompts=prompts(n_prompts), **options)


def adapter_weights(adapter_dir):
    from safetensors.torch import load_file

    return load_file(str(adapter_dir / "adapter_model.safetensors"))
