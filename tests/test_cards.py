"""Every shipped card validates, and each kind of bad card fails with one line naming file and key."""

from __future__ import annotations

import pytest

from models.card import CARDS_DIR, HubSource, load_card, load_cards
from core.errors import UserError
from tests.conftest import DELETE, edited, pypi_card, write_card

GIB = 2**30


def test_every_card_file_in_the_tree_validates():
    paths = sorted(CARDS_DIR.rglob("*.yaml"))
    cards = {load_card(p).name: p for p in paths}
    assert len(cards) == len(paths)  # no two files claim one name
    assert set(cards) == {
        "smollm2-135m-instruct",
        "gemma3-270m",
        "qwen2.5-coder-0.5b-instruct",
        "qwen2.5-coder-1.5b-instruct",
        "qwen2.5-1.5b-instruct",
        "internlm2.5-1.8b-chat",
        "phi-2",
        "phi-3-mini-4k-instruct",
    }
    assert {n for n, c in load_cards().items() if c.default} == {
        "smollm2-135m-instruct",
        "gemma3-270m",
        "qwen2.5-coder-0.5b-instruct",
    }


@pytest.mark.parametrize("card", load_cards().values(), ids=lambda c: c.name)
def test_memory_estimates_follow_the_parameter_count(card):
    mem = card.memory_gib
    weights_fp32 = card.parameters * 4 / GIB
    assert weights_fp32 <= mem.fp32 <= 1.5 * weights_fp32
    assert mem.bf16 == pytest.approx(mem.fp32 / 2, rel=0.05)
    assert mem.nf4 < mem.bf16
    assert mem.qlora_train > mem.nf4


def test_remote_code_only_on_pinned_hub_cards():
    for card in load_cards().values():
        if card.trust_remote_code:
            assert isinstance(card.source, HubSource) and len(card.source.revision) == 40


GOOD = pypi_card("good", ["pkg==1.0"], ["pkg/model.gguf"], "0" * 64)
HUB = {**GOOD, "source": {"kind": "hub", "repo": "org/model", "revision": "a" * 40}}


BAD_CARDS = [
    (edited(GOOD, colour="red"), "unknown key 'colour'"),
    (edited(GOOD, source__mirror="x"), "unknown key 'source.mirror'"),
    (edited(GOOD, memory_gib__fp16=1.0), "unknown key 'memory_gib.fp16'"),
    (edited(GOOD, license=DELETE), "missing key 'license'"),
    (edited(GOOD, source__sha256="abc"), "key 'source.sha256'"),
    (edited(GOOD, source__packages=["pkg>=1.0"]), "key 'source.packages.0'"),
    (edited(GOOD, trust_remote_code=True), "trust_remote_code is only allowed"),
    (edited(HUB, source__revision="main"), "key 'source.revision'"),
    (edited(GOOD, chat_template="chatml"), "key 'chat_template'"),
    (edited(GOOD, parameters=-5), "key 'parameters'"),
]


@pytest.mark.parametrize(("card", "expected"), BAD_CARDS, ids=[e for _, e in BAD_CARDS])
def test_bad_card_is_one_line_naming_file_and_key(tmp_path, card, expected):
    path = write_card(tmp_path, card)
    with pytest.raises(UserError) as info:
        load_card(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and expected in message


def test_card_name_must_match_its_file(tmp_path):
    path = write_card(tmp_path, GOOD).rename(tmp_path / "other.yaml")
    with pytest.raises(UserError, match="must equal the file name 'other'"):
        load_card(path)


def test_two_files_with_one_name_are_refused(tmp_path):
    write_card(tmp_path / "a", GOOD)
    write_card(tmp_path / "b", GOOD)
    with pytest.raises(UserError, match="already used"):
        load_cards(tmp_path)
