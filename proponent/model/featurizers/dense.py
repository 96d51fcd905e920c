"""The reference featurizer: exact per-sample gradients with torch.func, then projected.

Works for every layer type; costs one gradient materialisation per sample, so it
is slow and memory-hungry for big models. Tests use it as the reference for the
Kronecker path.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from proponent.model.featurizers.base import FeatureBatch, Featurizer
from proponent.model.objectives import Objective
from proponent.model.projection import Projector


class DenseFeaturizer(Featurizer):
    method = "dense"

    def __init__(self, model: nn.Module, objective: Objective, projector: Projector, chunk_size: int = 32):
        super().__init__(model, objective, projector)
        self.chunk_size = chunk_size
        self.selected = set(projector.param_names)

    def per_sample_gradients(
        self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``{param: [B, *param.shape]}`` for the selected parameters, and the losses."""
        model, objective = self.model, self.objective
        params = {n: p.detach() for n, p in model.named_parameters() if n in self.selected}
        frozen = {n: p.detach() for n, p in model.named_parameters() if n not in self.selected}
        frozen.update({n: b for n, b in model.named_buffers()})

        def loss_one(p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor, ei: torch.Tensor) -> torch.Tensor:
            def forward(*args: torch.Tensor) -> object:
                return functional_call(model, {**p, **frozen}, args)

            return objective.loss(forward, xi.unsqueeze(0), yi.unsqueeze(0), ei.unsqueeze(0))[0]

        grads = vmap(grad(loss_one), in_dims=(None, 0, 0, 0), chunk_size=self.chunk_size)(params, x, y, eps)
        with torch.no_grad():
            losses = objective.loss(model, x, y, eps)
        return grads, losses

    def featurize(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> FeatureBatch:
        x, y, eps = x.to(self.device), y.to(self.device), eps.to(self.device)
        grads, losses = self.per_sample_gradients(x, y, eps)
        sq = torch.zeros(x.shape[0], dtype=torch.float64, device=self.device)
        if self.projector.whitened:  # the norm of the whitened gradient, L G Rᵀ per layer
            for blk in self.projector.blocks:
                g = self.projector.gradient_matrix(blk, grads).double()
                sq += blk.whiten_matrix(g).reshape(g.shape[0], -1).pow(2).sum(dim=1)
                gb = self.projector.bias_gradient(blk, grads)
                if gb is not None:  # a separate bias block (ConvTranspose2d): B g_b
                    sq += blk.whiten_bias(gb.double()).pow(2).sum(dim=1)
        else:
            for g in grads.values():
                sq += g.reshape(g.shape[0], -1).double().pow(2).sum(dim=1)
        with torch.no_grad():
            feats = self.projector.project_gradients(grads)
        return FeatureBatch(feats.float(), sq, losses.detach().float())
