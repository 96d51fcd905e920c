"""What the app holds while it serves: the index, the engine, the jobs, derived per-row arrays."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from proponent.query.index import InfluenceIndex
from proponent.service.engine import QueryEngine
from proponent.service.jobs import JobManager
from proponent.service.metrics import Metrics
from proponent.service.settings import Settings


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    index: InfluenceIndex | None = None
    engine: QueryEngine | None = None
    jobs: JobManager | None = None
    ready: bool = False
    source_specs: list[str] = field(default_factory=list)
    losses: np.ndarray | None = None
    self_influence: np.ndarray | None = None
    index_info: dict[str, Any] | None = None
    factors: dict[str, Any] | None = None
    factors_lock: threading.Lock = field(default_factory=threading.Lock)

    def hit_meta(self, row: int) -> dict[str, Any]:
        idx = self.index
        assert idx is not None
        label = int(idx.labels[row])
        return {
            "id": int(idx.ids[row]),
            "label": label if label >= 0 else None,
            "source": self.source_specs[int(idx.origin[row])],
            "source_row": int(idx.source_row[row]),
            "injected": bool(idx.injected[row]),
        }
