"""Read a YAML file into a strict pydantic model; any problem is one line naming file and key."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from selectune.errors import UserError

M = TypeVar("M", bound=BaseModel)

# Discriminator tags pydantic puts into error locations ("source.hub.repo" -> "source.repo").
_TAGS = {"pypi-gguf", "hub"}


def format_validation_error(path: Path, exc: ValidationError) -> str:
    err = exc.errors()[0]
    key = ".".join(str(p) for p in err["loc"] if p not in _TAGS) or "(top level)"
    if err["type"] == "extra_forbidden":
        return f"{path}: unknown key '{key}'"
    if err["type"] == "missing":
        return f"{path}: missing key '{key}'"
    return f"{path}: key '{key}': {err['msg']}"


def load_named_yaml(path: Path, model: type[M], what: str) -> M:
    """Validate `path` as `model`; its `name` must equal the file name without `.yaml`."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read {what}: {' '.join(str(exc).split())}") from exc
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of {what} fields, got {type(raw).__name__}")
    try:
        obj = model.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(path, exc)) from None
    if obj.name != path.stem:
        raise UserError(f"{path}: key 'name' is '{obj.name}' but must equal the file name '{path.stem}'")
    obj._path = path
    return obj
