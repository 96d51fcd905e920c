"""Old import paths and names (``proponent.build.*``, ``proponent.client.schemas``, ...) work for one release, warning.

Each alias is the new module itself (so monkeypatching and isinstance checks see one object), and
importing it raises a DeprecationWarning that names the new path.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys

import pytest

MOVED = [
    ("proponent.build.data", "proponent.indexer.data", "load_dataset"),
    ("proponent.build.job", "proponent.indexer.job", "build_index"),
    ("proponent.build.training", "proponent.indexer.training", "train"),
    ("proponent.build.synthetic", "proponent.indexer.synthetic", "synthetic_index"),
    ("proponent.build.ray_engine", "proponent.indexer.ray_engine", "ray_engine"),
    ("proponent.client.schemas", "proponent.api.schemas", "InfluenceParams"),
    ("proponent.query.search", "proponent.query.scan", "scan"),
    ("proponent.analysis.scorings", "proponent.analysis.scoring_comparison", "compare_scorings"),
]


@pytest.mark.parametrize(("old", "new", "name"), MOVED)
def test_old_path_is_the_new_module_with_a_warning(old: str, new: str, name: str, monkeypatch) -> None:
    for cached in [m for m in sys.modules if m == old or m.startswith("proponent.build")]:
        monkeypatch.delitem(sys.modules, cached)
    with pytest.warns(DeprecationWarning) as warned:
        module = importlib.import_module(old)
    assert any(re.search(rf"{old} is deprecated.*import {new} instead", str(w.message)) for w in warned)
    assert module is importlib.import_module(new)
    assert module.__spec__.name == new  # the alias did not rename the real module
    assert getattr(module, name) is getattr(importlib.import_module(new), name)


def test_the_old_package_warns_too(monkeypatch) -> None:
    for cached in [m for m in sys.modules if m.startswith("proponent.build")]:
        monkeypatch.delitem(sys.modules, cached)
    with pytest.warns(DeprecationWarning, match=r"proponent\.build is deprecated.*import proponent\.indexer instead"):
        importlib.import_module("proponent.build")


def test_old_from_import_gives_the_same_objects(monkeypatch) -> None:
    for cached in [m for m in sys.modules if m.startswith("proponent.build")]:
        monkeypatch.delitem(sys.modules, cached)
    with pytest.warns(DeprecationWarning):
        from proponent.build.data import DataError, load_image_bytes, parse_spec
    from proponent.format.images import DataError as new_error
    from proponent.format.images import load_image_bytes as new_decode
    from proponent.indexer.spec import parse_spec as new_parse

    assert (DataError, load_image_bytes, parse_spec) == (new_error, new_decode, new_parse)


def test_a_fresh_interpreter_warns_and_finds_the_new_module() -> None:
    code = (
        "import warnings; warnings.simplefilter('always');\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    from proponent.build.job import build_index\n"
        "import proponent.indexer.job as new, sys\n"
        "assert build_index is new.build_index and sys.modules['proponent.build.job'] is new\n"
        "print(sorted({str(x.message) for x in w if x.category is DeprecationWarning}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "proponent.build.job is deprecated" in out.stdout and "import proponent.indexer.job instead" in out.stdout
    strict = subprocess.run(
        [sys.executable, "-W", "error::DeprecationWarning", "-c", "import proponent.build.data"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert strict.returncode != 0 and "proponent.build is deprecated" in strict.stderr


@pytest.mark.parametrize(
    ("module", "old", "new"),
    [
        ("proponent.query.index", "IndexError_", "IndexOpenError"),
        ("proponent.model.runtime", "RuntimeError_", "ModelRuntimeError"),
    ],
)
def test_renamed_classes_keep_their_old_names_with_a_warning(module: str, old: str, new: str) -> None:
    mod = importlib.import_module(module)
    with pytest.warns(DeprecationWarning, match=rf"{module}\.{old} is deprecated.*use {module}\.{new}"):
        cls = getattr(mod, old)
    assert cls is getattr(mod, new)
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        mod.Nothing  # noqa: B018
