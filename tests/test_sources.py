"""A task's data from anywhere: next to the task file or at an absolute path, csv, json, jsonl
or parquet, the columns renamed to the task's fields, or a pinned hub dataset (offline: one line)."""

from __future__ import annotations

import json

import pytest
import yaml

from core.errors import UserError
from eval.task import load_items, load_task, resolve_task

QA = [
    {"问题": "云栈盘免费版有多大？", "答案": "15GB", "编号": "q1"},
    {"问题": "支持退款吗？", "答案": "7天内可以", "编号": "q2"},
]


def write_task(folder, data: dict, name: str = "faq"):
    spec = {
        "name": name,
        "version": 1,
        "description": "The user's own FAQ.",
        "default_split": "test",
        "data": data,
        "prompt": {"user": "{{ question }}"},
        "modes": ["gen"],
        "reference_field": "answer",
        "metrics": ["contains", "char_f1"],
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True), encoding="utf-8")
    return path


COLUMNS = {"问题": "question", "答案": "answer", "编号": "id"}


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "json", "parquet"])
def test_a_users_file_next_to_the_task_with_its_own_column_names(tmp_path, fmt):
    import pandas as pd

    data = tmp_path / f"qa.{fmt}"
    frame = pd.DataFrame(QA)
    {
        "csv": lambda: frame.to_csv(data, index=False),
        "jsonl": lambda: frame.to_json(data, orient="records", lines=True, force_ascii=False),
        "json": lambda: data.write_text(json.dumps(QA, ensure_ascii=False)),
        "parquet": lambda: frame.to_parquet(data),
    }[fmt]()
    task = load_task(
        write_task(
            tmp_path,
            {
                "root": "file",
                "format": fmt,
                "splits": {"test": data.name},
                "columns": COLUMNS,
                "id_field": "id",
            },
        )
    )
    items = load_items(task, "test", tmp_path / "unused")
    assert [(i.id, i.user, i.gold) for i in items] == [
        ("q1", "云栈盘免费版有多大？", "15GB"),
        ("q2", "支持退款吗？", "7天内可以"),
    ]


def test_an_absolute_data_path_and_a_task_given_by_its_path(tmp_path):
    data = tmp_path / "elsewhere" / "qa.jsonl"
    data.parent.mkdir()
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in QA), encoding="utf-8")
    folder = tmp_path / "tasks"
    folder.mkdir()
    write_task(folder, {"splits": {"test": str(data)}, "columns": COLUMNS})
    task = resolve_task("tasks/faq.yaml", tmp_path)
    assert len(load_items(task, "test", tmp_path / "unused")) == 2
    with pytest.raises(UserError, match=r"task file .*/nope.yaml does not exist"):
        resolve_task("nope.yaml", tmp_path)


def test_a_column_that_is_not_in_the_data_is_one_line(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps(QA[0], ensure_ascii=False) + "\n", encoding="utf-8")
    task = load_task(
        write_task(
            tmp_path,
            {"root": "file", "splits": {"test": "qa.jsonl"}, "columns": {**COLUMNS, "回答": "answer"}},
        )
    )
    with pytest.raises(UserError) as err:
        load_items(task, "test", tmp_path)
    assert str(err.value) == (
        f"{data}: column '回答' named in `columns` is not in the data (columns: 答案, 编号, 问题)"
    )


def test_a_hub_dataset_must_be_pinned_and_offline_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="a hub dataset needs its revision"):
        load_task(write_task(tmp_path, {"hub": "org/faq", "splits": {"test": "validation"}}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    task = load_task(
        write_task(tmp_path, {"hub": "org/faq", "revision": "a" * 40, "splits": {"test": "validation"}})
    )
    with pytest.raises(UserError) as err:
        load_items(task, "test", tmp_path)
    text = str(err.value)
    assert text.startswith(f"hub dataset org/faq@{'a' * 40}: cannot be loaded (") and "\n" not in text
    assert text.endswith("offline, download it and point `splits` at the local files")
