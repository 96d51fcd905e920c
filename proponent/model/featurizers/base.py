"""The featurizer interface."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from proponent.model.objectives import Objective
from proponent.model.projection import Projector


@dataclass
class FeatureBatch:
    features: torch.Tensor  # [B, D] float32, unweighted projected gradients
    sq_norm: torch.Tensor  # [B] float64, exact ||g||^2 of the unprojected gradient
    loss: torch.Tensor  # [B] float32, per-sample objective value (mean over draws)


class Featurizer(ABC):
    """Per-sample projected gradients of ``objective`` w.r.t. the projector's layers."""

    method: str = "base"

    def __init__(self, model: nn.Module, objective: Objective, projector: Projector):
        self.model = model
        self.objective = objective
        self.projector = projector
        self.device = projector.device

    @abstractmethod
    def featurize(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> FeatureBatch:
        """The per-layer (first-stage) features ``[B, projector.stage1_dim]``, exact norms and losses:
        ``x [B, *shape]``, ``y [B]`` (int64; ignored by unsupervised objectives), ``eps [B, m, *noise]``."""

    def features(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> FeatureBatch:
        """The stored features ``[B, projector.dim]``: first stage, then the projector's sketch (if any)."""
        fb = self.featurize(x, y, eps)
        return FeatureBatch(self.projector.finish(fb.features), fb.sq_norm, fb.loss)

    def draw_features(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> tuple[FeatureBatch, torch.Tensor]:
        """The stored features of the mean over each sample's m draws (as :meth:`features`: exact
        norms of the mean gradients) and each draw's features ``[B, m, D]`` (the query's
        uncertainty, paper Theorem 1). The objective averages its draws, so the draws' gradients
        average to the mean's. Here: two passes, the mean and the draws as rows of their own;
        :class:`~proponent.model.featurizers.kronecker.KroneckerFeaturizer` does it in one."""
        b, m = eps.shape[:2]
        mean = self.features(x, y, eps)
        xr, yr, er = per_draw_rows(x, y, eps)
        return mean, self.features(xr, yr, er).features.reshape(b, m, -1)


def per_draw_rows(x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each of a sample's m draws as a row of its own (sample-major): ``x``, ``y`` repeated m
    times, ``eps [B, m, ...] -> [B·m, 1, ...]`` (the same draws)."""
    m = eps.shape[1]
    return x.repeat_interleave(m, dim=0), y.repeat_interleave(m, dim=0), eps.reshape(-1, 1, *eps.shape[2:])
