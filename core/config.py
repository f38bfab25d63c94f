"""Every config file (task, model card, recipe, synthesis recipe, settings) is one strict pydantic
model read by `load_yaml`; any problem is one line: the file, the key, what was expected."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationError

from core.errors import UserError


class Strict(BaseModel):
    """Unknown keys are errors; values never change after loading."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NamedConfig(Strict):
    """A config whose `name` is its file name; `path` is the file it was read from."""

    home: ClassVar[Path]
    """The folder a config of this kind lives in when it was built in code, not read."""

    name: str
    _path: Path | None = PrivateAttr(default=None)

    @property
    def path(self) -> Path:
        return self._path if self._path is not None else self.home / f"{self.name}.yaml"


M = TypeVar("M", bound=BaseModel)
N = TypeVar("N", bound=NamedConfig)


def _key_of(raw: object, loc: tuple) -> str:
    """The dotted key of an error location, without the tags pydantic adds for a discriminated
    union ("source.hub.repo" is "source.repo" in the file): a tag is a location part that is not
    a key of the mapping at that point but one of its values."""
    parts, node = [], raw
    for part in loc:
        if isinstance(node, dict) and part not in node and part in node.values():
            continue
        parts.append(str(part))
        node = (
            node.get(part)
            if isinstance(node, dict)
            else (
                node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node) else None
            )
        )
    return ".".join(parts) or "(top level)"


def _fields_at(model: type[BaseModel], raw: object, loc: tuple) -> list[str] | None:
    """The keys `model` allows at the mapping that `loc` (a parent's location) points to."""
    import typing

    cls, node = model, raw
    for part in loc:
        if isinstance(node, dict) and part not in node and part in node.values():
            continue
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        node = node.get(part) if isinstance(node, dict) else None
        if field is None:
            return None
        options = [
            a
            for a in (field.annotation, *typing.get_args(field.annotation))
            if isinstance(a, type) and issubclass(a, BaseModel)
        ]
        options += [
            b
            for a in typing.get_args(field.annotation)
            for b in typing.get_args(a)
            if isinstance(b, type) and issubclass(b, BaseModel)
        ]
        # a discriminated union: the member whose literal tag the mapping carries
        fitting = [
            o
            for o in options
            if not isinstance(node, dict)
            or all(k in node or not f.is_required() for k, f in o.model_fields.items())
        ]
        if len(fitting or options) != 1:
            return None
        cls = (fitting or options)[0]
    return sorted(cls.model_fields)


def format_validation_error(
    path: Path | str, exc: ValidationError, raw: object = None, model: type[BaseModel] | None = None
) -> str:
    err = exc.errors()[0]
    key = _key_of(raw, err["loc"])
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(model, raw, err["loc"][:-1]) if model is not None else None
        return f"{path}: unknown key '{key}'" + (f" (expected one of {allowed})" if allowed else "")
    if err["type"] == "missing":
        return f"{path}: missing key '{key}'"
    return f"{path}: key '{key}': {err['msg']}"


def validate(model: type[M], raw: dict[str, Any], where: Path | str) -> M:
    """`raw` as `model`, or a UserError naming `where` and the key at fault."""
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise UserError(format_validation_error(where, exc, raw, model)) from None


def read_yaml_mapping(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise UserError(f"{path}: cannot read {what}: {' '.join(str(exc).split())}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of {what} fields, got {type(raw).__name__}")
    return raw


def load_yaml(path: Path, model: type[M], what: str, **overrides: Any) -> M:
    """Validate the YAML file `path` as `model`, with non-None `overrides` on top."""
    raw = {**read_yaml_mapping(path, what), **{k: v for k, v in overrides.items() if v is not None}}
    return validate(model, raw, path)


def load_named_yaml(path: Path, model: type[N], what: str) -> N:
    """`load_yaml` for a named config; its `name` must equal the file name without `.yaml`."""
    raw = read_yaml_mapping(path, what)
    if not raw:
        raise UserError(f"{path}: expected a mapping of {what} fields, got an empty file")
    obj = validate(model, raw, path)
    if obj.name != path.stem:
        raise UserError(f"{path}: key 'name' is '{obj.name}' but must equal the file name '{path.stem}'")
    obj._path = path
    return obj
