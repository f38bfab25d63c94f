"""Backends share one small protocol (eval.backends.base.Backend); registered here lazily, and
built through `make_backend` only, so a backend module is imported when one is made."""

from __future__ import annotations

import importlib

REGISTRY = {
    "hf": "eval.backends.hf:HFBackend",
    "fake": "eval.backends.fake:FakeBackend",
    "openai": "eval.backends.openai_http:OpenAIBackend",
}


def backend_class(name: str):
    module, _, obj = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), obj)


def make_backend(name: str, *args, **kwargs):
    """A backend of the registered kind `name` ("hf", "openai", "fake")."""
    return backend_class(name)(*args, **kwargs)
