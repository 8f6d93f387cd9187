"""Modules imported on their first use, so that commands whose output needs neither polars nor
numpy (``rlmask diff --format json``, the totals) do not pay for importing them (0.3-0.4 s)."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule(ModuleType):
    """Stands for module ``name`` and imports it when an attribute is first read."""

    def __getattr__(self, attr: str) -> Any:
        return getattr(importlib.import_module(self.__name__), attr)
