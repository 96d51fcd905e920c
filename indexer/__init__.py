"""proponent's offline indexer: data, models, training, featurization, Zarr + FAISS indexes.

The Python API mirrors the CLI::

    import indexer
    data = indexer.load_dataset("digits")
    run = indexer.train(data, indexer.default_config_for(data.shape), "runs/digits", indexer.TrainConfig())
    specs, _ = indexer.checkpoints_from_run(run)
    idx = indexer.open_index(indexer.build_index(data, specs, "idx/digits", indexer.IndexOptions()))

Names are imported lazily so that ``import indexer.data`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_dataset": "indexer.data",
    "Dataset": "indexer.data",
    "ModelConfig": "indexer.models",
    "default_config_for": "indexer.models",
    "TrainConfig": "indexer.training",
    "train": "indexer.training",
    "IndexOptions": "indexer.job",
    "build_index": "indexer.job",
    "checkpoints_from_run": "indexer.job",
    "CheckpointSpec": "indexer.checkpoints",
    "ProjectionSpec": "indexer.projection",
    "open_index": "indexer.influence",
    "verify_index": "indexer.influence",
    "InfluenceIndex": "indexer.influence",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'indexer' has no attribute {name!r}")
