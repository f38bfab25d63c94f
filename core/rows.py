"""Rows of a data file (.jsonl, .json array, .csv), each with its number for error messages."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from core.errors import UserError


class BadLine:
    """A JSON Lines line that does not parse, kept in place so the caller can skip or stop."""

    def __init__(self, problem: str):
        self.problem = problem


def read_rows(path: Path, fmt: str, *, missing_hint: str = "") -> list[tuple[int, object]]:
    """(row number, row) pairs: 1-based lines for jsonl and csv (a CSV header is line 1), 0-based
    indexes for a json array. A jsonl line that is not JSON comes back as a BadLine."""
    if not path.is_file():
        raise UserError(f"{path}: data file not found{f' ({missing_hint})' if missing_hint else ''}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    if fmt == "csv":
        return list(enumerate(csv.DictReader(text.splitlines()), start=2))
    if fmt == "json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
        if not isinstance(rows, list):
            raise UserError(f"{path}: expected a JSON array of rows, got {type(rows).__name__}")
        return list(enumerate(rows))
    out: list[tuple[int, object]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                out.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                out.append((n, BadLine(f"invalid JSON ({exc.msg})")))
    return out
