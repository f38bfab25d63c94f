"""The transformers backend on a tiny random qwen2 built in the test: batched scores equal
unbatched ones computed by hand, and greedy replies do not depend on their batch companions."""

from __future__ import annotations

import pytest
import torch

from eval.backends.base import GenRequest, LoglikelihoodRequest
from eval.backends.hf import HFBackend
from models.card import find_card
from models.store import provision

MSGS = [[{"role": "user", "content": t}] for t in
        ["语句一和语句二说的是否是一个意思", "hello world", "阅读文章 回答问题 the answer is", "B"]]


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def backend(request, tmp_path, tiny_qwen2_dir):
    card = find_card("qwen2.5-1.5b-instruct")  # a hub card, supplied with local weights
    provision(card, tmp_path / "store", weights=tiny_qwen2_dir)
    return HFBackend(card, tmp_path / "store", batch_size=3, device=request.param, dtype="float32")


def _by_hand(backend, messages, continuation):
    context = backend.render(messages)
    ctx = backend._encode(context)
    whole = backend._encode(context + continuation)
    with torch.no_grad():
        logprobs = torch.log_softmax(backend.model(torch.tensor([whole], device=backend.device)).logits[0].float(), -1)
    return sum(logprobs[p - 1, whole[p]].item() for p in range(len(ctx), len(whole)))


def test_render_uses_the_chat_template(backend):
    assert backend.render(MSGS[1]) == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    from tests.conftest import CHATML

    from selectune.files import sha256_text

    assert backend.identity["weights_sha256"]
    assert backend.identity["chat_template_sha256"] == sha256_text(CHATML)


def test_loglikelihood_matches_a_manual_unbatched_computation(backend):
    requests = [LoglikelihoodRequest(m, c) for m in MSGS for c in ["A", "B", "hello world"]]
    got = backend.loglikelihood(requests)
    want = [_by_hand(backend, r.messages, r.continuation) for r in requests]
    assert got == pytest.approx(want, abs=1e-4)
    assert all(v < 0 for v in got)


def test_greedy_reply_does_not_depend_on_batch_companions(backend):
    alone = backend.generate([GenRequest(MSGS[0], 6)])
    together = backend.generate([GenRequest(m, 6) for m in MSGS])
    assert together[0] == alone[0]
    assert backend.generate([GenRequest(m, 6) for m in MSGS]) == together


def test_a_prompt_asked_twice_is_generated_once(backend, monkeypatch):
    from eval.backends.base import cut_at_stop

    requests = [GenRequest(MSGS[0], 6), GenRequest(MSGS[1], 6), GenRequest(MSGS[0], 6),
                GenRequest(MSGS[0], 3), GenRequest(MSGS[0], 6, stop=["o"])]
    each = [backend.generate([r])[0] for r in requests]
    rows = []
    real = backend.model.generate
    monkeypatch.setattr(backend.model, "generate", lambda **kw: rows.append(len(kw["input_ids"])) or real(**kw))
    got = backend.generate(requests)
    assert sum(rows) == 3  # MSGS[0] at 6 new tokens (asked three times), MSGS[1], MSGS[0] at 3
    assert got == each and got[2] == got[0] and got[4] == cut_at_stop(got[0], ["o"])


def _alone(backend, messages, n):
    """Greedy reply of one request at batch 1, without a shared cache."""
    ids = torch.tensor([backend._encode(backend.render(messages))], device=backend.device)
    with torch.no_grad():
        out = backend.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=n, pad_token_id=backend.pad_id)
    return backend.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_shared_prefix_is_run_once_and_changes_no_reply(tmp_path):
    from tests.conftest import build_tiny_qwen2

    card = find_card("qwen2.5-1.5b-instruct")
    provision(card, tmp_path / "store", weights=build_tiny_qwen2(tmp_path / "wide", initializer_range=1.0))
    backend = HFBackend(card, tmp_path / "store", batch_size=4, dtype="float32")
    system = {"role": "system", "content": "你是一个评测助手。 You answer with one letter."}
    msgs = [[system, *m] for m in MSGS]
    got = backend.generate([GenRequest(m, 8) for m in msgs])
    prefix = backend._prefix_cache[0]
    assert backend.tokenizer.decode(prefix).startswith("<|im_start|>system\n你是一个评测助手")
    assert got == [_alone(backend, m, 8) for m in msgs]
    assert len(set(got)) == len(got)  # replies that depend on the prompt, or the check is empty
    # Rows that share fewer than two tokens are padded as before, with no cache.
    ids, mask, cache = backend._prefixed_batch([[5, 6, 7], [8, 6, 7, 9]])
    assert cache is None and mask.tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]
