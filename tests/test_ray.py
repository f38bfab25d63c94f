"""The Ray executor on a real three-node Ray cluster (tests/ray_cluster.py, one CPU a node, each
cluster in a loopback-only network namespace), tiny checkpoints built here as the candidates: the
same rows and the same selection as the local executor, a node lost mid-run, a candidate no node
can hold, an address nobody answers."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from eval.executor import GIB, Placement, fits
from tests.pairs_fixture import pairs_rows, pairs_task
from tests.ray_cluster import run_scenario

TASK = pairs_task({"dev": "dev.jsonl", "test": "test.jsonl"}, max_new_tokens=3)
# dev: the fixed design in both modes; test (520 items): scored sequentially, a round at a time
SUITE = """name: suite
entries:
  - {task: pairs.yaml, split: dev, mode: gen}
  - {task: pairs.yaml, split: dev, mode: ppl}
  - {task: pairs.yaml, split: test, mode: ppl}
"""


def _rows(n: int, offset: int) -> str:
    return pairs_rows(range(offset, offset + n), 7, lambda k: "AB"[k % 3 == 0])


@pytest.fixture(scope="module")
def user(tmp_path_factory) -> Path:
    from bench.fixtures import build_tiny_qwen2

    folder = tmp_path_factory.mktemp("ray-select")
    (folder / "dev.jsonl").write_text(_rows(48, 0), encoding="utf-8")
    (folder / "test.jsonl").write_text(_rows(520, 1000), encoding="utf-8")
    (folder / "pairs.yaml").write_text(TASK, encoding="utf-8")
    (folder / "suite.yaml").write_text(SUITE, encoding="utf-8")
    build_tiny_qwen2(folder / "a", initializer_range=0.2)
    build_tiny_qwen2(folder / "b", initializer_range=1.0)
    return folder


def select_args(folder: Path, runs: str, *extra: str) -> list[str]:
    return [
        *f"--runs-dir {folder / runs} --cache-dir {folder / 'cache'} select --suite {folder / 'suite.yaml'}".split(),
        *f"--models {folder / 'a'},{folder / 'b'} --dtype float32 --batch-size 8".split(),
        *extra,
    ]


@pytest.fixture(scope="module")
def local(user) -> Path:
    """The local executor's run, on one thread as each actor runs (a one-CPU node): a product's
    sums split over another number of threads can differ in the last bit."""
    import torch

    from selectune.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(select_args(user, "local")) == 0
    finally:
        torch.set_num_threads(threads)
    return user / "local"


def stored(runs: Path) -> list[tuple]:
    with sqlite3.connect(runs / "results.sqlite") as conn:
        return conn.execute(
            "SELECT run_id, item_id, prompt, output, gold, parsed, scores_json FROM items"
            " ORDER BY run_id, item_id"
        ).fetchall()


TIMINGS = {"seconds", "items_per_s"}


def decision(runs: Path) -> dict:
    """selection.json less what depends on the clock and on where the models ran."""
    record = json.loads((runs / "selection.json").read_text(encoding="utf-8"))
    for key in ("created", "executor"):
        record.pop(key)
    record["candidates"] = [{k: v for k, v in c.items() if k not in TIMINGS} for c in record["candidates"]]
    return record


def test_selection_on_three_nodes_equals_the_local_executor_row_for_row(user, local):
    result = run_scenario("command", user, select_args(user, "ray"))
    assert result["code"] == 0, json.dumps(result)
    assert stored(user / "ray") == stored(local)
    assert decision(user / "ray") == decision(local)
    assert decision(local)["sequential"], "the suite must exercise the sequential rounds too"
    executor = json.loads((user / "ray" / "selection.json").read_text(encoding="utf-8"))["executor"]
    assert executor["name"] == "ray" and set(executor["nodes"]) == {"a", "b"}
    assert executor["address"].startswith("127.0.0.1:")


def test_a_node_lost_mid_run_restarts_its_candidate_elsewhere_and_changes_nothing(user, local):
    total = len(stored(local))
    result = run_scenario("node-lost", user, select_args(user, "lost"), remove_after=40)
    assert result["code"] == 0, json.dumps(result)
    assert result["removed"], f"no worker node held an actor: {result}"
    assert 40 <= result["stored_at_removal"] < total, result  # removed mid-run, not after it
    assert stored(user / "lost") == stored(local)  # every item once, none lost
    assert decision(user / "lost") == decision(local)


def test_more_candidates_than_the_cluster_holds_at_once_take_turns(user, local):
    """One node of one CPU, two candidates: each actor is ended when its turn or round ends, so
    the other can be placed (kept alive, the second would wait for the first for ever)."""
    result = run_scenario("command", user, select_args(user, "turns"), nodes=1)
    assert result["code"] == 0, json.dumps(result)
    assert stored(user / "turns") == stored(local)
    assert decision(user / "turns") == decision(local)


def test_a_candidate_no_node_can_hold_is_one_line_before_anything_is_scored(user):
    result = run_scenario("command", user, select_args(user, "nogpu", "--device", "cuda"))
    assert result["code"] == 2
    assert result["stderr_last"].startswith("selectune: error: the Ray cluster at 127.0.0.1:")
    assert "cannot hold a needs 1 CPU, 0.01 GiB memory, 1 GPU; b needs 1 CPU" in result["stderr_last"]
    assert result["stderr_last"].endswith("0 GPU")
    runs = user / "nogpu"
    assert not (runs / "selection.json").exists()
    assert not (runs / "results.sqlite").exists() or stored(runs) == []


def test_an_unreachable_address_is_one_line(user, capsys):
    from selectune.cli import main

    code = main([*select_args(user, "unreachable"), "--executor", "ray", "--ray-address", "127.0.0.1:9"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "selectune: error: cannot reach the Ray cluster at 127.0.0.1:9: Connection refused"
    ]


def test_a_malformed_address_is_one_line(user, capsys):
    from selectune.cli import main

    code = main([*select_args(user, "malformed"), "--executor", "ray", "--ray-address", "head-node"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "selectune: error: --ray-address head-node: expected HOST:PORT "
        "of the cluster's head (ray start --head prints it)"
    )


@pytest.mark.parametrize(
    "need, node, expected",
    [
        (Placement(1, 0.5), {"CPU": 1, "memory": GIB}, True),
        (Placement(2, 0.5), {"CPU": 1, "memory": GIB}, False),
        (Placement(1, 2.0), {"CPU": 4, "memory": GIB}, False),
        (Placement(1, 0.5, 1), {"CPU": 4, "memory": 8 * GIB}, False),
        (Placement(1, 0.5, 1), {"CPU": 4, "memory": 8 * GIB, "GPU": 1}, True),
        (Placement(1, 1.0), {"CPU": 1, "memory": GIB}, True),
    ],
)
def test_a_node_fits_a_model_only_with_every_resource_it_asks(need, node, expected):
    assert fits(need, node) is expected


def test_the_local_executor_is_the_default_and_imports_no_ray(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO

    code = (
        "import sys; from core.settings import load_settings; from eval.executor import make_executor; "
        "e = make_executor(load_settings(), None); print(e.name, 'ray' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.stdout.split() == ["local", "False"], done.stderr


def test_one_model_on_two_servers_is_one_run_with_each_item_stored_once(user):
    runs = user / "servers"
    args = (
        f"--runs-dir {runs} --cache-dir {user / 'cache'} eval --task {user / 'pairs.yaml'} "
        "--model m --mode gen --limit 6"
    ).split()
    result = run_scenario("servers", user, args, servers=2)
    assert (result["code"], result["rerun_code"]) == (0, 0), json.dumps(result)
    assert result["requests"] == [3, 3]  # 6 items dealt out between the two servers' actors
    assert result["requests_after_rerun"] == [3, 3]  # stored: nothing asked again
    with sqlite3.connect(runs / "results.sqlite") as db:
        ((n_runs,),), ((n_items,),) = (
            db.execute("SELECT COUNT(*) FROM runs"),
            db.execute("SELECT COUNT(*) FROM items"),
        )
    assert (n_runs, n_items) == (1, 6)


def test_rescore_on_the_cluster_stores_what_the_local_executor_stores(user, local):
    """The local side in an actor on the cluster, the served side from the driver, both at once."""
    import shutil

    import torch

    from selectune.cli import main
    from bench.openai_stub import serve
    from tests.ray_cluster import stub_state

    def args(runs: str) -> list[str]:
        (user / runs).mkdir()
        shutil.copy(local / "selection.json", user / runs / "selection.json")  # the suite rescore reads
        return (
            f"--runs-dir {user / runs} --cache-dir {user / 'cache'} rescore --checkpoint "
            f"{user / 'a'} --model smollm2-135m-instruct --served-model served-model --tasks "
            "pairs --limit 6 --concurrency 1 --figure-concurrency 1"
        ).split()

    server, url = serve(stub_state(str(user / "a")))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([*args("rescore-local"), "--base-url", url]) == 0
    finally:
        torch.set_num_threads(threads)
        server.shutdown()
    result = run_scenario("servers", user, args("rescore-ray"), servers=1, serve_checkpoint=user / "a")
    assert (result["code"], result["rerun_code"]) == (0, 0), json.dumps(result)
    assert stored(user / "rescore-ray") == stored(user / "rescore-local")
    assert len(stored(user / "rescore-ray")) == 2 * 2 * 6  # served and local, dev and test, 6 items each
    (record,) = (user / "rescore-ray" / "serve").glob("rescore-*.json")
    assert json.loads(record.read_text(encoding="utf-8"))["parity"]["passed"]


def train_on_cluster(address: str, model: str, data: str, out: str, batch: int, workers: int) -> int:
    """Run in the cluster's namespace (tests/ray_cluster.py `call`): the trainer under Ray Train."""
    from core.settings import load_settings
    from tests.train_fixture import short_recipe
    from train.cluster import train_on_ray

    r = short_recipe(Path(data), sample_steps=2, batch_size=batch)
    settings = load_settings(executor="ray", ray_address=address)
    result = train_on_ray(settings, r, model, Path(out), Path(data).parent, workers=workers, memory_gib=0.5)
    return result.steps


def test_two_ray_train_workers_make_the_adapter_one_process_makes(tmp_path):
    """As tests/test_train_ddp.py checks `accelerate launch`: 2 workers x 2 rows against one process
    with the global batch of 4, within the tolerance that test explains."""
    import torch

    from bench.fixtures import build_tiny_qwen2
    from tests.train_fixture import ROWS, adapter_weights, short_recipe
    from train.trainer import run_training

    model = build_tiny_qwen2(tmp_path / "model", initializer_range=0.2)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ROWS), encoding="utf-8")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_training(
            short_recipe(data, sample_steps=2, batch_size=4),
            str(model),
            tmp_path / "one",
            tmp_path,
        )
    finally:
        torch.set_num_threads(threads)
    result = run_scenario(
        "call",
        tmp_path,
        [],
        call="tests.test_ray:train_on_cluster",
        kwargs={
            "model": str(model),
            "data": str(data),
            "out": str(tmp_path / "two"),
            "batch": 2,
            "workers": 2,
        },
    )
    assert result["value"] == 3
    one, two = adapter_weights(tmp_path / "one" / "adapter"), adapter_weights(tmp_path / "two" / "adapter")
    assert two.keys() == one.keys()
    for key, value in one.items():
        torch.testing.assert_close(
            two[key], value, rtol=1e-3, atol=5e-4, msg=lambda m, key=key: f"{key}: {m}"
        )
    records = [json.loads(line) for line in (tmp_path / "two" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r and "sample" not in r] == [1, 2, 3]  # one writer


def test_several_training_workers_without_the_ray_executor_are_one_line(tmp_path, capsys):
    from selectune.cli import main

    code = main(
        (
            f"--runs-dir {tmp_path / 'runs'} --cache-dir {tmp_path / 'cache'} train --recipe "
            "train/quick.yaml --model smollm2-135m-instruct --workers 2"
        ).split()
    )
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "selectune: error: --workers 2: several training workers run on the Ray executor (--executor ray; or "
        "`accelerate launch`, docs/training.md)"
    )


def refuse_other_weights(address: str, checkpoint: str) -> str:
    """Run in the cluster's namespace: an actor whose weights are not the driver's pin."""
    from core.errors import UserError
    from eval.actors import Placement, RemoteBackend
    from eval.executor import connect
    from models.local import checkpoint_card

    connect(address)
    card = checkpoint_card(Path(checkpoint))
    backend = RemoteBackend(
        card,
        Path(checkpoint).parent / "store",
        Path(checkpoint),
        {"batch_size": 2, "device": "cpu", "dtype": "float32", "scoring": True},
        Placement(1, 0.01),
        weights="0" * 64,
    )
    try:
        backend.ensure()
    except UserError as exc:
        return str(exc)
    finally:
        backend.stop()
    return "no error"


def test_a_node_whose_weights_differ_from_the_pin_refuses_with_one_line(user):
    result = run_scenario(
        "call",
        user,
        [],
        nodes=1,
        call="tests.test_ray:refuse_other_weights",
        kwargs={"checkpoint": str(user / "a")},
    )
    message = result["value"]
    assert message.startswith("node 127.0.0.1 (") and "\n" not in message, message
    assert "): a's weights (sha256 " in message
    assert message.endswith(f"differ from the pin here ({'0' * 64}); provision it again there")


def test_a_cluster_that_refuses_the_driver_is_one_line(monkeypatch):
    """A head with token authentication refuses a driver without its token: ray.init raises
    after its retries (seen with `ray start --head` and no RAY_AUTH_MODE here); one line."""
    import socket

    import ray

    from core.errors import UserError
    from eval.executor import connect

    def refuse(**kwargs):
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:{port}\nmore")

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    try:
        with pytest.raises(UserError) as caught:
            connect(f"127.0.0.1:{port}")
    finally:
        listener.close()
    assert str(caught.value) == (
        f"cannot join the Ray cluster at 127.0.0.1:{port}: Failed to connect to Ray cluster at 127.0.0.1:{{port}} "
        "(a cluster with token authentication needs RAY_AUTH_MODE=token and its token here: docs/scale.md)"
    )
