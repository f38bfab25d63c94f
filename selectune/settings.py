"""Where selectune reads and writes: dataclass defaults, then a YAML file, then command-line flags."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from selectune.errors import UserError


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "selectune"


@dataclass(frozen=True)
class Settings:
    runs_dir: Path = Path("runs")
    """Every run's output (results store, checkpoints, reports); git-ignored."""

    cache_dir: Path = field(default_factory=_default_cache_dir)
    """Model store and downloaded data live here, outside the repository."""

    data_dir: Path | None = None
    """An existing directory laid out like the download (fewclue/bustm/..., fewclue/ocnlifc/...).
    None means `cache_dir/data`, filled by `make data`."""

    judge_url: str | None = None
    """Base URL of an OpenAI-compatible endpoint for the optional LLM-judge metrics."""

    judge_model: str | None = None
    """Model name to ask at judge_url."""

    @property
    def model_store(self) -> Path:
        return self.cache_dir / "models"

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else self.cache_dir / "data"


_FIELDS = {f.name for f in dataclasses.fields(Settings)}
_PATHS = {"runs_dir", "cache_dir", "data_dir"}


def load_settings(config: Path | None = None, **overrides: str | Path | None) -> Settings:
    """Defaults, then the YAML file `config` (if given), then non-None `overrides`."""
    values: dict[str, object] = {}
    if config is not None:
        try:
            loaded = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise UserError(f"{config}: cannot read settings: {exc}") from exc
        if not isinstance(loaded, dict):
            raise UserError(f"{config}: expected a mapping of settings, got {type(loaded).__name__}")
        values.update(loaded)
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - _FIELDS)
    if unknown:
        where = config if config is not None else "settings"
        raise UserError(f"{where}: unknown key '{unknown[0]}' (expected one of {sorted(_FIELDS)})")
    typed = {k: (Path(v).expanduser() if k in _PATHS else str(v)) if v not in (None, "") else None
             for k, v in values.items()}
    return Settings(**{k: v for k, v in typed.items() if v is not None})
