"""What the app holds while it serves: the index, the engine, the jobs, derived per-row arrays."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from proponent.query.index import InfluenceIndex

from .engine import QueryEngine
from .jobs import JobManager
from .metrics import Metrics
from .settings import Settings


@dataclass
class ServiceState:
    settings: Settings
    metrics: Metrics
    index: InfluenceIndex | None = None
    engine: QueryEngine | None = None
    jobs: JobManager | None = None
    ready: bool = False
    losses: np.ndarray | None = None
    self_influence: np.ndarray | None = None
    index_info: dict[str, Any] | None = None
    factors: dict[str, Any] | None = None
    factors_lock: threading.Lock = field(default_factory=threading.Lock)
    damaged: str | None = None  # set when a read found damaged index data: the server stops answering
