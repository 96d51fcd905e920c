"""Featurizers: per-sample projected gradients of an objective, plus exact squared norms.

``dense``: per-sample gradients with torch.func, then projected (the reference).
``kron``: Kronecker-factored, from one batched forward/backward pass (the fast path).
Both share the feature layout defined by :class:`proponent.model.projection.Projector`.
"""

from __future__ import annotations

from torch import nn

from proponent.model.featurizers.base import FeatureBatch, Featurizer
from proponent.model.featurizers.dense import DenseFeaturizer
from proponent.model.featurizers.kronecker import KroneckerFeaturizer
from proponent.model.objectives import Objective
from proponent.model.projection import Projector

__all__ = ["DenseFeaturizer", "FeatureBatch", "Featurizer", "KroneckerFeaturizer", "make_featurizer"]


def make_featurizer(
    method: str, model: nn.Module, objective: Objective, projector: Projector, **kwargs: object
) -> Featurizer:
    """The featurizer ``method`` (``kron`` or ``dense``) of ``objective`` on ``model``, projected by ``projector``."""
    if method == "dense":
        return DenseFeaturizer(model, objective, projector, **kwargs)  # type: ignore[arg-type]
    if method == "kron":
        return KroneckerFeaturizer(model, objective, projector, **kwargs)  # type: ignore[arg-type]
    raise ValueError(f"featurizer must be 'kron' or 'dense', got {method!r}")
