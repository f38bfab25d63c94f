"""Public benchmark data: FewCLUE bustm and ocnli_fc (and, on request, the riddles), downloaded
from upstream and checksum-verified.

    python -m selectune data                      # download into <cache>/data, or verify
    python -m selectune --data-dir DIR data       # verify an existing directory, write nothing
    python -m selectune data --dataset riddles    # the riddle workflow's data

The local layout is `fewclue/bustm/<file>` and `fewclue/ocnlifc/<file>`, the upstream file names
kept. Only the files OpenCompass evaluates on are fetched (dev_few_all, test_public), plus
train_few_all for few-shot examples and training.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.errors import UserError
from core.files import sha256_file

FEWCLUE_REPO = "CLUEbenchmark/FewCLUE"
FEWCLUE_COMMIT = "62a02c6f31cf32814cfe522f78ef088228840f8d"
FEWCLUE_BASE_URL = f"https://raw.githubusercontent.com/{FEWCLUE_REPO}/{FEWCLUE_COMMIT}/datasets"


@dataclass(frozen=True)
class DataFile:
    local: str
    """Path under the data directory."""
    upstream: str
    """Path under the upstream repository's datasets/ folder."""
    sha256: str


FEWCLUE_FILES = [
    DataFile(
        "fewclue/bustm/train_few_all.json",
        "bustm/train_few_all.json",
        "2afb8f94aed370d07b2e69ae63af1592f224ea2e093a7ff8fa7aff2ec860192e",
    ),
    DataFile(
        "fewclue/bustm/dev_few_all.json",
        "bustm/dev_few_all.json",
        "64969aad594d5222f0e0e1a53ceeb1b2c473ac3d7349a999c3e06e7c601aa860",
    ),
    DataFile(
        "fewclue/bustm/test_public.json",
        "bustm/test_public.json",
        "85329a99b1854da74ef9a42dd343e6819e015832c1d91726bcfc6046e042def5",
    ),
    DataFile(
        "fewclue/ocnlifc/train_few_all.json",
        "ocnli/train_few_all.json",
        "8101ebe3004bd7a3d3755e774f59c85676a54092145926a4429b064da9059bb4",
    ),
    DataFile(
        "fewclue/ocnlifc/dev_few_all.json",
        "ocnli/dev_few_all.json",
        "a2aa50aae711ebc6453c9c034eeb3cd67c1e6f2074abd52a9fa7d0c1f91f2c7a",
    ),
    DataFile(
        "fewclue/ocnlifc/test_public.json",
        "ocnli/test_public.json",
        "c495116fec5f9fca429e280d62d080367837dda4346736498daa97ac549fac57",
    ),
]


RIDDLES_REPO = "crawsome/riddles"
RIDDLES_COMMIT = "9991af18658e7ad1407bf9471de1a7cace9c1c1f"
RIDDLES_FILES = [
    DataFile(
        "riddles/riddles.csv",
        "riddles.csv",
        "d95019877f1dffb6bbcf7be854c9ef8a52f6f4d10d5d051ba7c76871591c6dd1",
    )
]

DATASETS = {
    "fewclue": (FEWCLUE_FILES, FEWCLUE_BASE_URL),
    "riddles": (RIDDLES_FILES, f"https://raw.githubusercontent.com/{RIDDLES_REPO}/{RIDDLES_COMMIT}"),
}
"""What `selectune data --dataset NAME` fetches: the files and the pinned upstream they come from.
riddles: 386 English riddles with one-word answers (The Unlicense), for the riddle workflow."""


def verify_data(data_dir: Path, files: list[DataFile] = FEWCLUE_FILES) -> None:
    """Raise on the first missing file or checksum mismatch, naming the file."""
    for f in files:
        path = data_dir / f.local
        if not path.is_file():
            raise UserError(
                f"{path}: missing; run `make data` to download it, or set DATA_DIR to a directory "
                f"holding {', '.join(sorted({str(Path(x.local).parent) for x in files}))}/"
            )
        digest = sha256_file(path)
        if digest != f.sha256:
            raise UserError(f"{path}: sha256 is {digest}, expected {f.sha256} (upstream file {f.upstream})")


def fetch_data(
    data_dir: Path, files: list[DataFile] = FEWCLUE_FILES, base_url: str = FEWCLUE_BASE_URL
) -> list[str]:
    """Download every file that is missing or corrupt; returns the local paths fetched."""
    import httpx

    fetched = []
    with httpx.Client(timeout=60.0, follow_redirects=True) as client:
        for f in files:
            path = data_dir / f.local
            if path.is_file() and sha256_file(path) == f.sha256:
                continue
            _download(client, f"{base_url}/{f.upstream}", path, f.sha256, f.local)
            fetched.append(f.local)
    return fetched


def _download(client, url: str, path: Path, sha256: str, local: str) -> None:
    import httpx

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.download")
    try:
        with client.stream("GET", url) as response:
            response.raise_for_status()
            with open(tmp, "wb") as sink:
                for chunk in response.iter_bytes():
                    sink.write(chunk)
    except httpx.HTTPError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(
            f"{url}: download failed ({type(exc).__name__}: {' '.join(str(exc).split()[:12])}); "
            f"offline? set DATA_DIR to a directory that already holds {local}"
        ) from exc
    digest = sha256_file(tmp)
    if digest != sha256:
        tmp.unlink()
        raise UserError(f"{url}: downloaded file has sha256 {digest}, expected {sha256}; nothing was kept")
    os.replace(tmp, path)


def data_command(settings, *, check: bool = False, dataset: list[str] | None = None) -> int:
    """`selectune data`: download a dataset (default FewCLUE) into the cache and verify it, or
    verify DATA_DIR."""
    data_dir = settings.resolved_data_dir
    for name in dataset or ["fewclue"]:
        files, base_url = DATASETS[name]
        fetched = [] if settings.data_dir is not None or check else fetch_data(data_dir, files, base_url)
        verify_data(data_dir, files)
        downloaded = f"{len(fetched)} downloaded, " if fetched else ""
        print(f"data: {name}: {downloaded}{len(files)} file{'s' * (len(files) != 1)} verified in {data_dir}")
    return 0
