"""proponent: training-data attribution for generative models (VAE-TracIn as an indexed service).

The package is laid out by role:

* :mod:`proponent.indexer` -- offline: data sources, training with TracIn checkpoints, the index job;
* :mod:`proponent.model` -- models and featurization: architectures, checkpoints, objectives and
  their noise, projections, featurizers (shared by the index job and the query side);
* :mod:`proponent.format` -- the index format: manifest, Zarr store, FAISS files, integrity;
* :mod:`proponent.query` -- answering: the query use case, exact search, self-influence, cross-loss;
* :mod:`proponent.analysis` -- the seed papers' analyses and the HTML report;
* :mod:`proponent.api` -- the wire schemas shared by the server and the client;
* :mod:`proponent.service` -- the FastAPI server; :mod:`proponent.client` -- the Python client;
* :mod:`proponent.cli` -- the ``proponent`` command.

The Python API mirrors the CLI::

    import proponent
    data = proponent.load_dataset("digits")
    run = proponent.train(data, proponent.default_config_for(data.shape), "runs/digits", proponent.TrainConfig())
    specs, _ = proponent.checkpoints_from_run(run)
    idx = proponent.open_index(proponent.build_index(data, specs, "idx/digits", proponent.IndexOptions()))

Names are imported lazily so that ``import proponent.client`` stays light (httpx and pydantic only).
"""

from __future__ import annotations

import importlib
from typing import Any

from proponent import _moved

_moved.install()  # proponent.build.* and proponent.client.schemas: deprecated aliases for one release

_EXPORTS = {
    "load_dataset": "proponent.indexer.data",
    "Dataset": "proponent.indexer.data",
    "ModelConfig": "proponent.model.architectures",
    "default_config_for": "proponent.model.architectures",
    "TrainConfig": "proponent.indexer.training",
    "train": "proponent.indexer.training",
    "IndexOptions": "proponent.indexer.job",
    "build_index": "proponent.indexer.job",
    "checkpoints_from_run": "proponent.indexer.job",
    "checkpoints_from_runs": "proponent.indexer.job",
    "CheckpointSpec": "proponent.model.checkpoints",
    "ProjectionSpec": "proponent.model.projection",
    "open_index": "proponent.query.index",
    "verify_index": "proponent.query.index",
    "InfluenceIndex": "proponent.query.index",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'proponent' has no attribute {name!r}")
