"""The CUDA paths, on a tiny random-weight qwen2: the local backend on the GPU agrees with the
CPU, and QLoRA trains with bitsandbytes' CUDA NF4 kernels in bfloat16 and merges with parity.

Skipped where torch sees no CUDA device (CI machines have none); run on a GPU machine with
`make test PYTEST_ARGS="tests/test_gpu.py"`. The other test files run there too: the trainer
and the backend then take their GPU defaults.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from eval.backends.base import GenRequest, LoglikelihoodRequest  # noqa: E402
from eval.backends.hf import HFBackend  # noqa: E402
from models.card import find_card  # noqa: E402
from models.store import provision  # noqa: E402
from bench.fixtures import build_tiny_qwen2  # noqa: E402
from tests.train_fixture import ROWS, losses, merge, recipe  # noqa: E402

PROMPTS = [
    "语句一和语句二说的是否是一个意思",
    "hello world",
    "阅读文章 回答问题 the answer is",
    "B",
    "the answer",
]


@pytest.fixture
def store(tmp_path):
    card = find_card("qwen2.5-1.5b-instruct")  # a hub card, supplied with local weights
    provision(card, tmp_path / "store", weights=build_tiny_qwen2(tmp_path / "tiny", initializer_range=1.0))
    return card, tmp_path / "store"


def _score(backend):
    ll = backend.loglikelihood(
        [
            LoglikelihoodRequest([{"role": "user", "content": p}], c)
            for p in PROMPTS
            for c in (" A", " B", "world")
        ]
    )
    replies = backend.generate(
        [GenRequest([{"role": "user", "content": p}], max_new_tokens=8) for p in PROMPTS]
    )
    return ll, replies


def test_backend_defaults_to_the_gpu_in_bfloat16_and_agrees_with_the_cpu(store):
    card, path = store
    cpu = HFBackend(card, path, batch_size=2, device="cpu")
    gpu32 = HFBackend(card, path, batch_size=2, dtype="float32")
    gpu = HFBackend(card, path, batch_size=2)
    assert (cpu.identity["device"], cpu.identity["dtype"]) == ("cpu", "float32")
    assert (gpu.identity["device"], gpu.identity["dtype"]) == ("cuda", "bfloat16")
    assert gpu.model.device.type == "cuda" and gpu.model.dtype == torch.bfloat16
    ll_cpu, replies_cpu = _score(cpu)
    ll_32, replies_32 = _score(gpu32)
    ll_16, _ = _score(gpu)
    assert replies_32 == replies_cpu
    assert max(abs(a - b) for a, b in zip(ll_cpu, ll_32)) < 1e-3
    # bfloat16 keeps 8 bits of mantissa: the same scores to within about a percent overall
    drift = sum(abs(a - b) for a, b in zip(ll_cpu, ll_16)) / sum(abs(a) for a in ll_cpu)
    assert drift < 0.02, list(zip(ll_cpu, ll_16))


def test_qlora_trains_on_the_gpu_with_nf4_in_bfloat16_and_merges_with_parity(tmp_path):
    import bitsandbytes as bnb

    from train.trainer import load_for_training, run_training

    model = build_tiny_qwen2(tmp_path / "model", initializer_range=0.2)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    r = recipe(data)
    built = load_for_training(r, str(model), False)
    layers = [m for m in built.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(
        m.weight.device.type == "cuda" and m.compute_dtype == torch.bfloat16 for m in layers
    )
    assert all(m.weight.quant_state.nested for m in layers)  # double quantisation
    del built

    result = run_training(r, str(model), tmp_path / "run", tmp_path)
    curve = [loss for _, loss in losses(tmp_path / "run")]
    assert result.steps == 40 and curve[-1] < 0.5 * curve[0], curve
    parity = merge(model, result, tmp_path / "run" / "merged", provenance={})
    assert parity.passed, parity
