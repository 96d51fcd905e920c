"""``proponent serve`` hands the server its settings as an object: the flags override the environment, and
the command writes nothing into ``os.environ``."""

from __future__ import annotations

import os
from pathlib import Path

from proponent.cli import build_parser
from proponent.cli.query import serve_settings


def test_flags_override_the_environment_without_writing_it(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PROPONENT_INDEX", "/somewhere/else")
    monkeypatch.setenv("PROPONENT_MAX_K", "77")
    before = dict(os.environ)
    a = build_parser().parse_args(
        ["serve", "--index", str(tmp_path / "idx"), "--state-dir", str(tmp_path / "state"), "--memory-budget", "1G"]
    )
    s = serve_settings(a)
    assert str(s.index) == str(tmp_path / "idx") and s.state_dir == tmp_path / "state" and s.memory_budget == "1G"
    assert s.max_k == 77  # what no flag gives still comes from the environment
    assert dict(os.environ) == before


def test_without_flags_the_environment_decides(monkeypatch) -> None:
    monkeypatch.setenv("PROPONENT_INDEX", "/from/env")
    s = serve_settings(build_parser().parse_args(["serve"]))
    assert str(s.index) == "/from/env"
