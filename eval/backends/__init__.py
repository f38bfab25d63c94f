"""Backends share one small protocol (eval.backends.base.Backend); registered here lazily."""

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
