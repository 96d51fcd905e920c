"""Progress bars (tqdm: items/s and ETA), silenced when asked or when not a TTY in CI."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm.auto import tqdm


def progress(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True, **kw: Any) -> tqdm:
    disable = not enabled or (os.environ.get("CI") == "true" and not sys.stderr.isatty())
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, smoothing=0.1, **kw)
