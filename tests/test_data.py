"""FewCLUE data: checksum verification in place, and download through a real loopback HTTP server."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest

from eval.data import fetch_data, verify_data
from core.errors import UserError
from tests.conftest import is_fixture, manifests


@pytest.fixture
def fewclue(shared_data):
    return manifests(shared_data)["fewclue"]


def test_shared_data_verifies_in_place(shared_data):
    files = manifests(shared_data)
    assert [len(files["fewclue"]), len(files["riddles"])] == ([2, 1] if is_fixture(shared_data) else [6, 1])
    verify_data(shared_data, files["fewclue"])
    verify_data(shared_data, files["riddles"])


def test_the_data_command_verifies_each_dataset_asked_for(shared_data, capsys):
    from selectune.cli import main

    n = len(manifests(shared_data)["fewclue"])
    assert main(["--data-dir", str(shared_data), "data", "--dataset", "fewclue", "--dataset", "riddles"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"data: fewclue: {n} files verified in {shared_data}",
        f"data: riddles: 1 file verified in {shared_data}",
    ]


def test_tampered_file_is_named(tmp_path, shared_data, fewclue):
    data = tmp_path / "data"
    for f in fewclue:
        (data / f.local).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_data / f.local, data / f.local)
    target = data / "fewclue/ocnlifc/dev_few_all.json"
    target.write_bytes(target.read_bytes() + b"\n")
    (expected,) = (f.sha256 for f in fewclue if f.local == "fewclue/ocnlifc/dev_few_all.json")
    with pytest.raises(
        UserError,
        match=rf"fewclue/ocnlifc/dev_few_all.json: sha256 is [0-9a-f]{{64}}, "
        rf"expected {expected}",
    ):
        verify_data(data, fewclue)


def test_missing_file_says_how_to_provide_it(tmp_path):
    with pytest.raises(UserError, match=r"bustm/train_few_all.json: missing; run `make data`.*DATA_DIR"):
        verify_data(tmp_path)


@pytest.fixture
def upstream(tmp_path, shared_data, fewclue):
    """A loopback HTTP server laid out like FewCLUE's datasets/ folder (bustm/, ocnli/)."""
    root = tmp_path / "upstream"
    for f in fewclue:
        (root / f.upstream).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared_data / f.local, root / f.upstream)
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_fetch_downloads_verifies_and_then_does_nothing(tmp_path, upstream, fewclue):
    _, url = upstream
    data = tmp_path / "data"
    assert sorted(fetch_data(data, fewclue, base_url=url)) == sorted(f.local for f in fewclue)
    verify_data(data, fewclue)
    assert fetch_data(data, fewclue, base_url=url) == []


def test_fetch_rejects_a_corrupt_download_and_keeps_nothing(tmp_path, upstream, fewclue):
    root, url = upstream
    (root / "bustm/dev_few_all.json").write_bytes(b'{"id": 0}\n')
    data = tmp_path / "data"
    with pytest.raises(
        UserError, match=r"bustm/dev_few_all.json: downloaded file has sha256 .* nothing was kept"
    ):
        fetch_data(data, fewclue, base_url=url)
    assert not (data / "fewclue/bustm/dev_few_all.json").exists()
    assert not list(Path(data).rglob(".*.download"))


def test_fetch_offline_is_one_clear_line(tmp_path):
    with pytest.raises(UserError) as info:
        fetch_data(tmp_path / "data", base_url="http://127.0.0.1:9")
    assert (
        "\n" not in str(info.value) and "download failed" in str(info.value) and "DATA_DIR" in str(info.value)
    )
