"""The package layers (README "Layout") hold: import-linter's contracts, and every import inside a function
says why it is there (only for start-up time or an optional dependency)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "proponent"
REASON = re.compile(r"#\s*(lazy|optional):\s*\S")


def test_import_linter_contracts_are_kept() -> None:
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout


def _function_level_import_blocks(path: Path) -> list[int]:
    """Line numbers of the first import of each run of imports inside a function body."""
    tree = ast.parse(path.read_text())
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import | ast.ImportFrom):
                    found.add(sub.lineno)
    firsts = []
    lines = path.read_text().splitlines()
    for ln in sorted(found):
        previous = lines[ln - 2].strip()
        if not (ln - 1 in found and previous.startswith(("import ", "from "))):
            firsts.append(ln)
    return firsts


def test_every_function_level_import_gives_its_reason() -> None:
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for ln in _function_level_import_blocks(path):
            if not REASON.search(lines[ln - 1]):
                missing.append(f"{path.relative_to(REPO)}:{ln}: {lines[ln - 1].strip()}")
    assert not missing, "function-level imports without a '# lazy: ...' or '# optional: ...' reason:\n" + "\n".join(
        missing
    )
