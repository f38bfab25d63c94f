"""BOS handling at conversion: a card that needs BOS gets a tokenizer that adds it, saved with it."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from models.convert import _require_bos
from core.errors import UserError
from bench.fixtures import tiny_tokenizer


def test_bos_is_switched_on_and_survives_saving(tmp_path):
    tok = tiny_tokenizer(bos_token="<bos>")
    assert tok("语句").input_ids[0] != tok.bos_token_id
    _require_bos(tok, "card.yaml")
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded("语句").input_ids[0] == reloaded.bos_token_id == tok.bos_token_id


def test_card_needing_bos_with_a_tokenizer_without_one(tmp_path):
    with pytest.raises(UserError, match="card.yaml: card says add_bos: true but the tokenizer has no BOS"):
        _require_bos(tiny_tokenizer(), "card.yaml")
