"""Deprecated import paths kept for one release: importing an old name gives the new module, with a warning.

``proponent.build`` became :mod:`proponent.indexer`, ``proponent.client.schemas``
:mod:`proponent.api.schemas`, ``proponent.query.search`` :mod:`proponent.query.scan` and
``proponent.analysis.scorings`` :mod:`proponent.analysis.scoring_comparison` (:data:`MOVED`). No
file stays at the old paths: a finder placed first on
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

__all__ = ["MOVED", "install", "renamed"]

MOVED = {
    "proponent.build": "proponent.indexer",
    "proponent.client.schemas": "proponent.api.schemas",
    "proponent.query.search": "proponent.query.scan",  # the twin of query/searcher.py
    "proponent.analysis.scorings": "proponent.analysis.scoring_comparison",  # the twin of query/scoring.py
}


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


def renamed(module: str, name: str, names: dict[str, str], namespace: dict[str, object]) -> object:
    """A module ``__getattr__`` body for renamed names: the new object, with a DeprecationWarning naming it."""
    new = names.get(name)
    if new is None:
        raise AttributeError(f"module {module!r} has no attribute {name!r}")
    warnings.warn(
        f"{module}.{name} is deprecated and will be removed in the next release; use {module}.{new}",
        DeprecationWarning,
        stacklevel=3,
    )
    return namespace[new]
