"""Backends by name, imported on first use: nixl (default) and ucx. A backend whose package is
missing raises BackendUnavailable with the pip command that fixes it."""

from __future__ import annotations

import importlib
from typing import Any

from engine.kv_cache import KVCache
from kv_transfer.base import KVSink, KVSource

DEFAULT_BACKEND = "nixl"
_MODULES = {"nixl": "kv_transfer.nixl", "ucx": "kv_transfer.ucx"}


def names() -> list[str]:
    return sorted(_MODULES)


def _module(backend: str) -> Any:
    if backend not in _MODULES:
        raise ValueError(f"unknown KV transfer backend {backend!r}; known: {names()}")
    return importlib.import_module(_MODULES[backend])  # may raise BackendUnavailable


def make_sink(backend: str, kv: KVCache, **options: Any) -> KVSink:
    """A sink on `kv`'s pool; options are the backend's make_sink keywords (host, port, ...)."""
    sink: KVSink = _module(backend).make_sink(kv, **options)
    return sink


def make_source(backend: str, kv: KVCache, **options: Any) -> KVSource:
    source: KVSource = _module(backend).make_source(kv, **options)
    return source
