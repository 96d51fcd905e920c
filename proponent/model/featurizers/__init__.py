"""Featurizers: per-sample projected gradients of an objective, plus exact squared norms.

``dense``: per-sample gradients with torch.func, then projected (the reference).
``kron``: Kronecker-factored, from one batched forward/backward pass (the fast path).
Both share the feature layout defined by :class:`proponent.model.projection.Projector`.
"""

from __future__ import annotations

from proponent.model.featurizers.base import FeatureBatch, Featurizer, make_featurizer

__all__ = ["FeatureBatch", "Featurizer", "make_featurizer"]
