"""The transformers backend on a tiny random qwen2 built in the test: batched scores equal
unbatched ones computed by hand, and greedy replies do not depend on their batch companions."""

from __future__ import annotations

import sys

import pytest
import torch

from eval.backends.base import GenRequest, LoglikelihoodRequest
from eval.backends.hf import HFBackend
from models.card import find_card
from models.store import provision

MSGS = [
    [{"role": "user", "content": t}]
    for t in ["语句一和语句二说的是否是一个意思", "hello world", "阅读文章 回答问题 the answer is", "B"]
]


@pytest.fixture(
    params=[
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
        ),
    ]
)
def backend(request, tmp_path, tiny_qwen2_dir):
    card = find_card("qwen2.5-1.5b-instruct")  # a hub card, supplied with local weights
    provision(card, tmp_path / "store", weights=tiny_qwen2_dir)
    return HFBackend(card, tmp_path / "store", batch_size=3, device=request.param, dtype="float32")


def _by_hand(backend, messages, continuation):
    context = backend.render(messages)
    ctx = backend._encode(context)
    whole = backend._encode(context + continuation)
    with torch.no_grad():
        logprobs = torch.log_softmax(
            backend.model(torch.tensor([whole], device=backend.device)).logits[0].float(), -1
        )
    return sum(logprobs[p - 1, whole[p]].item() for p in range(len(ctx), len(whole)))


def test_render_uses_the_chat_template(backend):
    assert backend.render(MSGS[1]) == "<|im_start|>user\nhello world<|im_end|>\n<|im_start|>assistant\n"
    from bench.fixtures import CHATML

    from core.files import sha256_text

    assert backend.identity["weights_sha256"]
    assert backend.identity["chat_template_sha256"] == sha256_text(CHATML)


def test_loglikelihood_matches_a_manual_unbatched_computation(backend):
    requests = [LoglikelihoodRequest(m, c) for m in MSGS for c in ["A", "B", "hello world"]]
    got = backend.loglikelihood(requests)
    assert backend._prefix_cache is not None  # the contexts' shared "<|im_start|>user\n" ran once
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

    requests = [
        GenRequest(MSGS[0], 6),
        GenRequest(MSGS[1], 6),
        GenRequest(MSGS[0], 6),
        GenRequest(MSGS[0], 3),
        GenRequest(MSGS[0], 6, stop=["o"]),
    ]
    each = [backend.generate([r])[0] for r in requests]
    rows = []
    real = backend.model.generate
    monkeypatch.setattr(
        backend.model, "generate", lambda **kw: rows.append(len(kw["input_ids"])) or real(**kw)
    )
    got = backend.generate(requests)
    assert sum(rows) == 3  # MSGS[0] at 6 new tokens (asked three times), MSGS[1], MSGS[0] at 3
    assert got == each and got[2] == got[0] and got[4] == cut_at_stop(got[0], ["o"])


def _alone(backend, messages, n):
    """Greedy reply of one request at batch 1, without a shared cache."""
    ids = torch.tensor([backend._encode(backend.render(messages))], device=backend.device)
    with torch.no_grad():
        out = backend.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=n,
            pad_token_id=backend.pad_id,
        )
    return backend.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def test_shared_prefix_is_run_once_and_changes_no_reply(tmp_path):
    from bench.fixtures import build_tiny_qwen2

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


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_cpu_fp32_linears_are_prepacked_and_agree_with_torchs_own(tmp_path):
    from bench.fixtures import build_tiny_qwen2

    from models.prepack import KERNEL, PrepackedLinear

    card = find_card("qwen2.5-1.5b-instruct")
    provision(card, tmp_path / "store", weights=build_tiny_qwen2(tmp_path / "wide", initializer_range=1.0))
    packed = HFBackend(card, tmp_path / "store", batch_size=4, dtype="float32")
    plain = HFBackend(card, tmp_path / "store", batch_size=4, dtype="float32", prepack=False)
    assert (packed.identity["linear_kernel"], plain.identity["linear_kernel"]) == (KERNEL, "aten")
    linears = [n for n, m in plain.model.named_modules() if type(m) is torch.nn.Linear]
    assert len(linears) == 15  # 7 per layer (q, k, v with bias), 2 layers, and the LM head
    assert [n for n, m in packed.model.named_modules() if isinstance(m, PrepackedLinear)] == linears
    assert not any(type(m) is torch.nn.Linear for m in packed.model.modules())

    calls = []
    for m in packed.model.modules():
        if isinstance(m, PrepackedLinear):
            m.register_forward_hook(lambda *_: calls.append(1))
    ids = torch.tensor([packed._encode(packed.render(m)) for m in MSGS[1:2] * 3])
    with torch.no_grad():
        got, want = packed.model(ids).logits, plain.model(ids).logits
    assert len(calls) == 15
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)
    requests = [GenRequest(m, 8) for m in MSGS]
    assert packed.generate(requests) == plain.generate(requests)
    scored = [LoglikelihoodRequest(m, c) for m in MSGS for c in ["A", "hello world"]]
    assert packed.loglikelihood(scored) == pytest.approx(plain.loglikelihood(scored), abs=1e-4)


def test_linears_stay_torchs_own_outside_cpu_fp32(tmp_path, tiny_qwen2_dir):
    card = find_card("qwen2.5-1.5b-instruct")
    provision(card, tmp_path / "store", weights=tiny_qwen2_dir)
    backend = HFBackend(card, tmp_path / "store", batch_size=2, dtype="bfloat16")
    assert backend.identity["linear_kernel"] == "aten"
    assert sum(type(m) is torch.nn.Linear for m in backend.model.modules()) == 15


def _mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of `path` (from /proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8") as f:
        for line in f:
            if "-" in line.split(" ", 1)[0] and not line.startswith(("Rss", "Pss")):
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")
def test_a_packed_weights_checkpoint_pages_leave_the_process(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from models.prepack import _drop_pages, _file_mappings

    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(4 << 20, dtype=torch.float32)}, str(path))  # 16 MiB
    with safe_open(str(path), framework="pt") as f:
        weight = f.get_tensor("w")
    assert weight.double().sum().item() == sum(range(4 << 20))  # every page read
    before = _mapped_kib(path)
    if before < 15 << 10:
        pytest.skip("safetensors did not leave this tensor in a file mapping")
    assert _drop_pages(weight, _file_mappings())
    assert _mapped_kib(path) < 1 << 10
    assert torch.equal(weight[-3:], torch.tensor([(4 << 20) - 3, (4 << 20) - 2, (4 << 20) - 1.0]))
    assert not _drop_pages(torch.ones(1 << 20), _file_mappings())  # anonymous memory is left alone


def test_a_lazy_backend_loads_its_weights_only_when_an_item_needs_computing(tmp_path, tiny_qwen2_dir):
    from eval.results import open_results
    from eval.runner import run_task
    from tests.test_runner import make_task

    card = find_card("qwen2.5-1.5b-instruct")
    provision(card, tmp_path / "store", weights=tiny_qwen2_dir)
    task, items = make_task(tmp_path, n=6)
    conn = open_results(tmp_path / "runs")
    eager = HFBackend(card, tmp_path / "store", batch_size=4, dtype="float32")
    first = run_task(eager, task, "dev", "ppl", items, conn, chunk_size=4)

    lazy = HFBackend(card, tmp_path / "store", batch_size=4, dtype="float32", lazy=True)
    assert lazy.identity == eager.identity and lazy._model is None
    again = run_task(lazy, task, "dev", "ppl", items, conn, chunk_size=4)
    assert again.computed == 0 and again.items == first.items
    assert lazy._model is None  # everything was stored: the weights were never read

    def unlatent(run):
        return [{k: v for k, v in i.items() if k != "latency_s"} for i in run.items]

    gen = run_task(lazy, task, "dev", "gen", items, conn, chunk_size=4)
    assert gen.computed == len(items) and lazy._model is not None
    want = run_task(eager, task, "dev", "gen", items, open_results(tmp_path / "other"), chunk_size=4)
    assert unlatent(gen) == unlatent(want)


@pytest.mark.parametrize(
    "cuda, avx512_bf16, amx, asked, device, expected",
    [
        (False, False, False, "auto", "auto", "float32"),  # AVX2 only: bf16 would be emulated
        (False, True, False, "auto", "auto", "bfloat16"),  # AVX512-BF16
        (False, False, True, "auto", "auto", "bfloat16"),  # AMX
        (False, True, True, "float32", "auto", "float32"),  # asked for: kept
        (True, False, False, "auto", "auto", "bfloat16"),  # a GPU with bf16
        (True, False, False, "auto", "cpu", "float32"),  # the CPU asked for, without bf16
        (True, True, False, "auto", "cpu", "bfloat16"),
    ],
)
def test_select_and_eval_score_in_bf16_where_the_machine_multiplies_it(
    monkeypatch, cuda, avx512_bf16, amx, asked, device, expected
):
    import models.loading as loading

    monkeypatch.undo()  # the autouse fixture pins fp32; here the real probe is under test
    for cap in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):  # the flags are under test, not a cap
        monkeypatch.delenv(cap, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: cuda)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert loading.scoring_dtype(asked, device) == expected
    assert loading.resolve_dtype("auto", "cpu") == "float32"  # the backend's own default: fp32 on a CPU
