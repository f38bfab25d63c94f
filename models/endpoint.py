"""A candidate that is an OpenAI-compatible server: `--models mine=http://127.0.0.1:8000/v1`.

Its card says only where it is and which model id to send: the id equal to the name when the
server lists one, else the server's only one. The server is asked for its models before anything
is scored, so an unreachable or ambiguous endpoint is one line and nothing is recorded. Its runs
are identified by the URL and the model id: what the server actually runs behind them is the
user's to keep fixed.
"""

from __future__ import annotations

import os
import re

from core.config import validate
from core.errors import UserError
from models.card import ModelCard

API_KEY_ENV = "SELECTUNE_ENDPOINT_API_KEY"
"""Sent as a bearer token to every endpoint candidate when set."""


def is_endpoint(entry: str) -> bool:
    return "=" in entry


def api_key() -> str | None:
    return os.environ.get(API_KEY_ENV) or None


def base_url(url: str) -> str:
    """The server's root: `http://host:8000/v1` and `http://host:8000` both name the same server."""
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def served_models(url: str, *, timeout_s: float = 10.0) -> list[str]:
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if (key := api_key()) else {}
    try:
        response = httpx.get(f"{base_url(url)}/v1/models", headers=headers, timeout=timeout_s)
        response.raise_for_status()
        return [m["id"] for m in response.json()["data"]]
    except httpx.HTTPStatusError as exc:
        raise UserError(
            f"--models {url}: GET /v1/models answered HTTP {exc.response.status_code}; "
            "expected an OpenAI-compatible server"
        ) from None
    except httpx.HTTPError as exc:
        raise UserError(
            f"--models {url}: unreachable ({type(exc).__name__}: {exc}); "
            "expected an OpenAI-compatible server there"
        ) from None
    except (ValueError, KeyError, TypeError):
        raise UserError(
            f"--models {url}: GET /v1/models is not an OpenAI model list "
            '(expected {"data": [{"id": ...}]})'
        ) from None


def endpoint_card(entry: str) -> ModelCard:
    """The card of `name=URL`, after asking the server which models it serves."""
    name, _, url = entry.partition("=")
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
        raise UserError(
            f"--models {entry}: the name before '=' must be lower-case letters, digits, '.', '_' or '-'"
        )
    if not re.match(r"^https?://", url):
        raise UserError(f"--models {entry}: expected name=http://host:port/v1 after the name")
    ids = served_models(url)
    if name in ids:
        model = name
    elif len(ids) == 1:
        model = ids[0]
    else:
        raise UserError(
            f"--models {entry}: the server lists {len(ids)} models ({', '.join(ids) or 'none'}); "
            "name the candidate after the one to score"
        )
    return validate(
        ModelCard,
        {
            "name": name,
            "description": f"The OpenAI-compatible endpoint {base_url(url)} serving {model}",
            "source": {"kind": "endpoint", "url": base_url(url), "model": model},
            "architecture": "unknown",
            "license": {
                "id": "unknown",
                "provenance": f"served at {base_url(url)}; its licence is its owner's",
            },
            "chat_template": "tokenizer",
            "add_bos": False,
        },
        entry,
    )
