"""Where selectune reads and writes: field defaults, then a YAML file, then command-line flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from core.config import Strict, load_yaml, validate
from core.workspace import Workspace


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "selectune"


class Settings(Strict):
    runs_dir: Path = Path("runs")
    """Every run's output (results store, checkpoints, reports); git-ignored."""

    cache_dir: Path = Field(default_factory=_default_cache_dir)
    """Model store and downloaded data live here, outside the repository."""

    data_dir: Path | None = None
    """An existing directory laid out like the download (fewclue/bustm/..., fewclue/ocnlifc/...).
    None means `cache_dir/data`, filled by `make data`."""

    task_dirs: list[Path] = []
    """Folders searched for `<name>.yaml` task files after tasks/ (lm-eval's `--include_path`)."""

    judge_url: str | None = None
    """Base URL of an OpenAI-compatible endpoint for the optional LLM-judge metrics."""

    judge_model: str | None = None
    """Model name to ask at judge_url."""

    executor: Literal["local", "ray"] = "local"
    """Where models run: `local` (this process, one at a time) or `ray` (a Ray cluster's actors,
    in parallel; docs/scale.md)."""

    ray_address: str | None = None
    """HOST:PORT of the Ray cluster's head (else RAY_ADDRESS, else a one-node Ray started here)."""

    cpus_per_model: int = Field(default=1, gt=0)
    """CPUs each model's Ray actor asks of its node (its torch threads)."""

    @property
    def model_store(self) -> Path:
        return self.cache_dir / "models"

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.runs_dir)

    @property
    def resolved_data_dir(self) -> Path:
        return self.data_dir if self.data_dir is not None else self.cache_dir / "data"

    @field_validator("runs_dir", "cache_dir", "data_dir")
    @classmethod
    def _expand_home(cls, value: Path | None) -> Path | None:
        return value.expanduser() if value is not None else None

    @field_validator("task_dirs")
    @classmethod
    def _folders(cls, value: list[Path]) -> list[Path]:
        for folder in value:
            if not folder.expanduser().is_dir():
                raise ValueError(f"{folder} is not a folder")
        return [folder.expanduser().resolve() for folder in value]


def load_settings(config: Path | None = None, **overrides: str | Path | None) -> Settings:
    """Defaults, then the YAML file `config` (if given), then non-None, non-empty `overrides`."""
    given = {k: v for k, v in overrides.items() if v not in (None, "")}
    if config is not None:
        return load_yaml(config, Settings, "settings", **given)
    return validate(Settings, given, "settings")
