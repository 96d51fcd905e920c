"""Deprecated import paths kept for one release: importing an old name gives the new module, with a warning.

``proponent.build`` became :mod:`proponent.indexer` and ``proponent.client.schemas`` became
:mod:`proponent.api.schemas`. No file stays at the old paths: a finder placed first on
``sys.meta_path`` (installed by ``import proponent``) answers the old names with the new module
objects themselves (one module, so monkeypatching and ``isinstance`` see the same names) and
raises a DeprecationWarning naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Sequence
from types import ModuleType

__all__ = ["MOVED", "install"]

MOVED = {"proponent.build": "proponent.indexer", "proponent.client.schemas": "proponent.api.schemas"}


def new_name(old: str) -> str | None:
    """The module that ``old`` moved to, or None when ``old`` did not move."""
    for before, after in MOVED.items():
        if old == before or old.startswith(before + "."):
            return after + old[len(before) :]
    return None


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self) -> None:
        self._real_specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if new_name(fullname) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = new_name(spec.name)
        assert new is not None
        warnings.warn(
            f"{spec.name} is deprecated and will be removed in the next release; import {new} instead",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(new)
        self._real_specs[spec.name] = module.__spec__  # the import system overwrites it: put back in exec_module
        return module

    def exec_module(self, module: ModuleType) -> None:
        alias = module.__spec__.name if module.__spec__ is not None else ""
        module.__spec__ = self._real_specs.pop(alias, module.__spec__)


def install() -> None:
    """Answer the old names (first on ``sys.meta_path``, before the path finder could load a second copy)."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
