"""Where a task's rows come from: a local file (jsonl, json, csv through our row reader, which
names the line of a bad row; parquet through Hugging Face `datasets`) or a dataset on the Hugging
Face hub pinned to a revision, with the file's column names mapped to the task's fields.

    data: {root: file, format: csv, splits: {test: questions.csv}, columns: {问题: question, 答案: answer}}
    data: {hub: org/name, revision: <40-hex commit>, splits: {test: validation}}
"""

from __future__ import annotations

from pathlib import Path

from core.errors import UserError
from core.rows import BadLine, read_rows

TASK_DATA_DIR = Path(__file__).resolve().parents[1] / "tasks" / "data"


def split_path(data, split: str, data_dir: Path, task_file: Path) -> Path:
    """The file of `split`: under the data directory (`root: data`), tasks/data (`root: tasks`) or
    the task file's folder (`root: file`); an absolute path is taken as it is."""
    root = {"data": data_dir, "tasks": TASK_DATA_DIR, "file": task_file.parent}[data.root]
    return root / data.splits[split]


def read_split(data, split: str, data_dir: Path, task_file: Path) -> tuple[str, list[tuple[int, dict]]]:
    """(where, [(row number, row)]) of one split, columns renamed; `where` names the source in
    messages about its rows."""
    if data.hub is not None:
        where, rows = f"{data.hub}@{data.revision[:12]}:{data.splits[split]}", _hub_rows(data, split)
    else:
        path = split_path(data, split, data_dir, task_file)
        where, rows = str(path), _file_rows(path, data.format)
    return where, rename_columns(rows, data.columns, where)


def _file_rows(path: Path, fmt: str) -> list[tuple[int, object]]:
    if fmt == "parquet":
        return read_parquet(path)
    hint = (
        "it ships with the repository"
        if TASK_DATA_DIR in path.parents
        else "run `make data`, or set DATA_DIR"
    )
    rows = read_rows(path, fmt, missing_hint=hint)
    for n, row in rows:
        if isinstance(row, BadLine):
            raise UserError(f"{path}:{n}: {row.problem}")
    return rows


def read_parquet(path: Path) -> list[tuple[int, object]]:
    """(row number from 1, row) of a parquet file, read with `datasets`."""
    if not path.is_file():
        raise UserError(f"{path}: data file not found")
    from datasets import load_dataset

    return list(enumerate(load_dataset("parquet", data_files=str(path), split="train"), start=1))


def _hub_rows(data, split: str) -> list[tuple[int, object]]:
    from datasets import load_dataset

    try:
        rows = load_dataset(data.hub, revision=data.revision, split=data.splits[split])
    except Exception as exc:  # offline, unknown dataset or revision: the library's many error types
        raise UserError(
            f"hub dataset {data.hub}@{data.revision}: cannot be loaded ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:160]}); offline, download it and point `splits` at "
            "the local files"
        ) from None
    return list(enumerate(rows))


def rename_columns(
    rows: list[tuple[int, object]], columns: dict[str, str], where: str
) -> list[tuple[int, object]]:
    """Rows with the file's column names replaced by the task's field names (`columns`)."""
    if not columns:
        return rows
    present = set().union(*(row.keys() for _, row in rows if isinstance(row, dict)))
    missing = sorted(set(columns) - present)
    if missing:
        raise UserError(
            f"{where}: column '{missing[0]}' named in `columns` is not in the data "
            f"(columns: {', '.join(sorted(present))})"
        )
    return [
        (n, {columns.get(k, k): v for k, v in row.items()} if isinstance(row, dict) else row)
        for n, row in rows
    ]
