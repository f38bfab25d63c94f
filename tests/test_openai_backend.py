"""The OpenAI-compatible client over real loopback HTTP, answered by a tiny real model."""

from __future__ import annotations

import pytest

from eval.backends.base import GenRequest, LoglikelihoodRequest
from eval.backends.hf import HFBackend
from eval.backends.openai_http import OpenAIBackend
from models.card import find_card
from models.store import provision
from core.errors import UserError
from bench.openai_stub import StubState, serve

MSGS = [[{"role": "user", "content": t}] for t in ["hello world", "语句一和语句二", "阅读文章 the answer is"]]


@pytest.fixture
def local(tmp_path, tiny_qwen2_dir):
    card = find_card("qwen2.5-1.5b-instruct")
    provision(card, tmp_path / "store", weights=tiny_qwen2_dir)
    return HFBackend(card, tmp_path / "store", batch_size=1)


@pytest.fixture
def server(local):
    servers = []

    def start(**kw):
        state = StubState(local, **kw)
        srv, url = serve(state)
        servers.append(srv)
        return state, url

    yield start
    for srv in servers:
        srv.shutdown()


def test_generate_pins_sampling_and_matches_the_local_model(local, server):
    state, url = server()
    client = OpenAIBackend(url, "tiny", concurrency=2)
    got = client.generate([GenRequest(m, 5, stop=["\n\n"]) for m in MSGS])
    assert got == [local.generate([GenRequest(m, 5, stop=["\n\n"])])[0] for m in MSGS]
    for body in state.bodies:
        assert body["temperature"] == 0.0 and body["top_p"] == 1.0 and body["max_tokens"] == 5
        assert body["seed"] == 0 and body["stop"] == ["\n\n"] and body["stream"] is False


def test_retries_with_back_off_after_server_errors(server, capsys):
    state, url = server(fail_first=2)
    assert len(OpenAIBackend(url, "tiny", concurrency=1).generate([GenRequest(MSGS[0], 3)])) == 1
    assert len(state.bodies) == 3
    assert capsys.readouterr().err.count("HTTP 503; retrying") == 2


def test_gives_up_with_one_clear_line(server):
    _, url = server(fail_first=10)
    with pytest.raises(UserError, match=r"gave up after 2 tries \(HTTP 503\)"):
        OpenAIBackend(url, "tiny", max_retries=1).generate([GenRequest(MSGS[0], 3)])


def test_loglikelihood_from_prompt_logprobs_matches_local(local, server):
    _, url = server()
    client = OpenAIBackend(url, "tiny", render=local.render)
    requests = [LoglikelihoodRequest(m, c) for m in MSGS for c in ["A", "hello"]]
    assert client.loglikelihood(requests) == pytest.approx(local.loglikelihood(requests), abs=1e-3)


def test_server_without_logprobs_is_refused(local, server):
    _, url = server(logprobs=False)
    with pytest.raises(UserError, match="returns no prompt logprobs"):
        OpenAIBackend(url, "tiny", render=local.render).loglikelihood([LoglikelihoodRequest(MSGS[0], "A")])


@pytest.mark.parametrize(
    "sampling",
    [None, {"temperature": 0.0, "top_p": 1.0, "seed": 7}, {"temperature": 0.5, "top_p": 0.9, "seed": 0}],
)
def test_the_identity_hashes_the_sampling_the_requests_send(local, server, sampling):
    from eval.backends.openai_http import greedy_sampling, sampling_sha256

    state, url = server()
    client = OpenAIBackend(url, "tiny", sampling=sampling)
    client.generate([GenRequest(MSGS[0], 2)])
    client.render = local.render
    client.loglikelihood([LoglikelihoodRequest(MSGS[0], "A")])
    for body in state.bodies:
        sent = {k: body[k] for k in ("temperature", "top_p", "seed")}
        assert client.identity["sampling_sha256"] == sampling_sha256(sent)
    default = OpenAIBackend(url, "tiny").identity["sampling_sha256"]
    assert (client.identity["sampling_sha256"] == default) == (sampling in (None, greedy_sampling(0)))


def test_the_served_run_identity_changes_with_a_sent_parameter(monkeypatch):
    import serve.rescore as rescore
    from serve.launcher import Target

    target = Target(None, find_card("smollm2-135m-instruct"), "m")
    local_identity = {"weights_sha256": "w", "chat_template_sha256": "c"}
    before = rescore.served_backend("http://127.0.0.1:9", "m", target, "vllm", 1, local_identity)
    assert before.identity["sampling_sha256"] == rescore.sampling_sha256()  # the local side's, as pinned
    monkeypatch.setattr(rescore, "SAMPLING", {**rescore.SAMPLING, "top_p": 0.95})
    after = rescore.served_backend("http://127.0.0.1:9", "m", target, "vllm", 1, local_identity)
    assert after.sampling["top_p"] == 0.95
    assert after.identity["sampling_sha256"] != before.identity["sampling_sha256"]
