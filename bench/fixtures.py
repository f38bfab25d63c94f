"""Things the tests and the benchmark harnesses both build: a tiny Qwen2 checkpoint with its
tokenizer, docs/byo.md's files as a user copies them, and a scripted synthesis teacher with its
recipe. They live here because bench/ imports no test module."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
BYO_PAGE = REPO / "docs" / "byo.md"


def build_tiny_qwen2(
    out: Path, initializer_range: float = 0.02, rope_theta: float = 10000.0, hidden_size: int = 32
) -> Path:
    """At the default initialisation greedy replies are the same token over and over; a wider
    one (e.g. 1.0) makes them depend on the prompt, for tests that compare replies. vLLM's CPU
    attention needs a head size of 32 or more: hidden_size=128 gives it one."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = tiny_tokenizer(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        initializer_range=initializer_range,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
    )
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
    raw.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=300,
            special_tokens=["<unk>", *special_tokens.values()],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", **special_tokens)


CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def page_files() -> dict[str, str]:
    """Every block of the page announced by `<!-- file: PATH -->`, by its path."""
    return dict(
        re.findall(r"<!-- file: (\S+) -->\n```\w*\n(.*?)```", BYO_PAGE.read_text(encoding="utf-8"), re.S)
    )


SYNTH_SEEDS = [
    {"question": "云栈盘免费版有多少存储空间？", "answer": "云栈盘免费版为每个账号提供15GB存储空间。"},
    {"question": "会员每月多少钱？", "answer": "会员每月29元。"},
    {"question": "工作日客服几点上班？", "answer": "客服工作日早上9点上班。"},
]


EXPAND_PROMPTS: dict[str, int] = {}


def teacher_reply(request) -> str:
    """A scripted teacher: lists (the first distinct expand prompt gets none), answers (one with
    an invented number), follow-up questions in a persona, and second-turn answers. The same
    prompt always gets the same reply."""
    text = request.messages[-1]["content"]
    if "请再写" in text:
        kind = EXPAND_PROMPTS.setdefault(text, len(EXPAND_PROMPTS)) % 3
        if kind == 0:
            return "抱歉，我想不出来。"  # no list: malformed
        if kind == 1:
            return json.dumps(
                [
                    "周末客服几点下班？",
                    "周末客服几点下班呢？",
                    "注销账号后数据会保留多久？",
                    "团队版最多几个人？",
                ],
                ensure_ascii=False,
            )
        return (
            "好的：\n1. 文件最大能上传多大？\n2. 团队版最多几个人？\n3. 会员可以退款吗？\n"
            "4. Is there a student discount?"
        )
    if text.startswith("你现在扮演"):
        return "孩子：那要是忘了怎么办呀？"
    if "请只根据上面的资料" in text:
        q = text.rsplit("问：", 1)[1]
        if "退款" in q:
            return "会员可在7天内全额退款，之后按剩余天数退99元。"  # 99 is not in the context
        return f"答：关于“{q.split('？')[0][:6]}”，请以公司资料为准，一般在24小时内处理。"
    return "别担心，联系客服就好。"  # a second turn


def write_synth_recipe(tmp_path: Path, **changes) -> Path:
    context = tmp_path / "company.md"
    context.write_text("客服24小时内回复。会员每月29元，7天内可全额退款。", encoding="utf-8")
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(
        "".join(
            json.dumps(
                {"question": s["question"], "answer": s["answer"], "split": "train"}, ensure_ascii=False
            )
            + "\n"
            for s in SYNTH_SEEDS
        ),
        encoding="utf-8",
    )
    recipe = {
        "name": "mini",
        "description": "test",
        "seeds": {"path": str(seeds), "where": {"split": "train"}, "count": 3},
        "expand": {"what": "客服问题", "rounds": 6, "shots": 2, "per_round": 4},
        "answer": {"template": "synth/prompts/answer_fact.jinja", "context": str(context), "shots": 1},
        "converse": {"fraction": 0.5},
        "clean": {"check_numbers": True},
        "budget": {"max_calls": 100},
        "seed": 1,  # its rounds show at least three different pairs of seeds
        **changes,
    }
    path = tmp_path / "mini.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path
