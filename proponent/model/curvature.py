"""K-FAC / EK-FAC per layer (kronfluence's definitions): the captured ``(a, δ)``, the factors, the per-layer math.

For an ``nn.Linear`` / ``nn.Conv2d`` layer the per-sample gradient is ``G_i = Σ_t δ_t a_tᵀ`` ``[out, in]`` (``a_t``
the layer input, for a convolution the unfolded patch, with a constant-1 bias column appended; ``δ_t`` the
gradient of the sample's loss with respect to the layer output; ``t`` over the sample's forward rows -- one for
an encoder layer, the m draws for a decoder layer -- and a convolution's output positions). Its factors are

    A = E[a aᵀ],  S = E[δ δᵀ]  (over every forward row of the layer: samples x draws x positions),

with eigenbases ``A = Q_A diag(e_A) Q_Aᵀ``, ``S = Q_S diag(e_S) Q_Sᵀ``; a gradient's rotation is
``G̃ = Q_Sᵀ G Q_A`` and the preconditioned inner product is ``<G̃_q / (Λ + λ), G̃_i>`` with

* K-FAC:  ``Λ = e_S e_Aᵀ`` (then P = (S ⊗ A + λI)⁻¹ on the row-major vec(G)),
* EK-FAC: ``Λ_jk = mean_i (G̃_i)_jk²`` over the training rows (the eigenvalue correction),

and ``λ = α · mean(Λ)`` per layer (kronfluence's damping heuristic). Conv2d is KFC (Grosse & Martens 2016)
in kronfluence's form: A and S over samples and positions.

:class:`LayerGradients` captures ``(a, δ)`` with :class:`~proponent.model.featurizers.kronecker.KroneckerFeaturizer`'s
hooks on a float64 copy of the model (exact gradients: the featurizer with the identity layout); ``proponent
precondition --kind kfac|ekfac`` (:mod:`proponent.indexer.curvature`), the query path
(:mod:`proponent.query.curvature`) and ``benchmarks/lds_kfac.py`` all use it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from proponent.model.featurizers.kronecker import KroneckerFeaturizer
from proponent.model.objectives import Objective
from proponent.model.projection import LayerInfo, ProjectionSpec, Projector

SUPPORTED = ("linear", "conv2d")
#: whitening (index time) also covers nn.ConvTranspose2d: its weight as the swapped Conv2d's (rows of the unfolded
#: output gradient and the input), its separate bias block with its own factor (``proponent.format.whiten``)
WHITEN_SUPPORTED = (*SUPPORTED, "convt2d")


class CurvatureError(ValueError):
    """A model or layer K-FAC does not cover here (the message names it)."""


def check_layers(layers: list[LayerInfo], supported: tuple[str, ...] = SUPPORTED) -> None:
    """Refuse layers of a kind other than ``supported`` (nn.Linear / nn.Conv2d, groups=1), naming them."""
    bad = [f"{l.name} ({l.kind})" for l in layers if l.kind not in supported]
    if bad:
        covered = "nn.Linear, nn.Conv2d and nn.ConvTranspose2d" if "convt2d" in supported else "nn.Linear and nn.Conv2d"
        raise CurvatureError(
            f"K-FAC / EK-FAC cover {covered} (groups=1) layers only; this index featurizes " + ", ".join(bad)
        )


def double_model(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model`` (eval mode as given) for exact per-layer gradients."""
    out = copy.deepcopy(model).double()
    for p in out.parameters():
        p.requires_grad_(True)
    return out


class LayerGradients:
    """Captured ``(a, δ)`` rows and exact per-sample gradients of the selected layers of a float64 model."""

    def __init__(
        self, model64: nn.Module, objective: Objective, layers: list[LayerInfo], supported: tuple[str, ...] = SUPPORTED
    ):
        check_layers(layers, supported)
        self.layers = layers
        first = next(model64.parameters())
        self.device = first.device
        self.dtype = first.dtype  # float64 (exact gradients); whitening's factor pass runs the float32 model
        self.projector = Projector(layers, ProjectionSpec(kind="none"), self.device)
        self.feat = KroneckerFeaturizer(model64, objective, self.projector)
        self.shapes = [(info.out_dim, info.in_dim) for info in layers]
        self.bias_dims = [info.bias_dim for info in layers]

    def capture(
        self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor
    ) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
        """Per layer, per call: ``(a [b, T, in] with the bias column, δ [b, T, out])`` in the model's dtype
        (ConvTranspose2d: the swapped pair, the unfolded output gradient as ``a`` and the input as ``δ``)."""
        return self.capture_all(x, y, eps)[0]

    def capture_all(
        self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor
    ) -> tuple[list[list[tuple[torch.Tensor, torch.Tensor]]], list[torch.Tensor | None]]:
        """:meth:`capture`'s pairs and, per layer with a separate bias block (ConvTranspose2d), the output gradient
        at every forward row and output position ``[rows · positions, C_out]`` (None for the other layers)."""
        b = x.shape[0]
        x = x.to(self.device, self.dtype)
        eps = eps.to(self.device, self.dtype)
        calls, deltas, _ = self.feat._capture(x, y.to(self.device), eps)
        out, biases = [], []
        for i, lay in enumerate(self.feat.layers):
            pairs, brows = [], []
            for a_call, d_call in zip(calls[i].inputs, deltas[i], strict=True):
                a3, d3 = self.feat._factors(lay, a_call, d_call, b)
                if lay.bias:
                    a3 = torch.cat([a3, torch.ones_like(a3[..., :1])], dim=2)
                pairs.append((a3.to(self.dtype), d3.to(self.dtype)))
                if lay.bias_sep:  # d_call: the output gradient [rows, C_out, H, W]
                    brows.append(d_call.transpose(1, -1).reshape(-1, d_call.shape[1]).to(self.dtype))
            out.append(pairs)
            biases.append(torch.cat(brows) if brows else None)
        return out, biases

    @staticmethod
    def gradients(captured: list[list[tuple[torch.Tensor, torch.Tensor]]], b: int, shapes) -> list[np.ndarray]:
        """Per layer the exact per-sample gradients ``G [b, out, in]`` (float64) of captured rows."""
        out = []
        for pairs, (o, i) in zip(captured, shapes, strict=True):
            g = torch.zeros(b, o, i, dtype=torch.float64)
            for a3, d3 in pairs:
                g += torch.einsum("bto,bti->boi", d3, a3).cpu()
            out.append(g.numpy())
        return out

    def grads(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> list[np.ndarray]:
        """Per layer the exact per-sample gradients ``G [b, out, in]`` (float64)."""
        return self.gradients(self.capture(x, y, eps), x.shape[0], self.shapes)


@dataclass
class FactorSums:
    """Running sums of ``a aᵀ`` and ``δ δᵀ`` over forward rows, per layer, and of a separate bias block's output
    gradients ``δ_b δ_bᵀ`` over rows and output positions (ConvTranspose2d; None for the other layers)."""

    aa: list[np.ndarray]
    dd: list[np.ndarray]
    rows: list[int]
    bb: list[np.ndarray | None]
    bias_rows: list[int]

    @classmethod
    def empty(cls, shapes, bias_dims: list[int] | None = None) -> FactorSums:
        bias_dims = bias_dims or [0] * len(shapes)
        return cls(
            [np.zeros((i, i)) for _, i in shapes],
            [np.zeros((o, o)) for o, _ in shapes],
            [0] * len(shapes),
            [np.zeros((k, k)) if k else None for k in bias_dims],
            [0] * len(shapes),
        )

    def add(
        self, captured: list[list[tuple[torch.Tensor, torch.Tensor]]], biases: list[torch.Tensor | None] | None = None
    ) -> None:
        for k, pairs in enumerate(captured):
            for a3, d3 in pairs:
                a2 = a3.reshape(-1, a3.shape[-1])
                d2 = d3.reshape(-1, d3.shape[-1])
                self.aa[k] += (a2.T @ a2).double().cpu().numpy()  # a float32 batch's products, summed in float64
                self.dd[k] += (d2.T @ d2).double().cpu().numpy()
                self.rows[k] += a2.shape[0]
        for k, rows in enumerate(biases or []):
            acc = self.bb[k]
            if rows is not None and acc is not None:
                acc += (rows.T @ rows).double().cpu().numpy()
                self.bias_rows[k] += rows.shape[0]

    def factors(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """``(A, S)`` per layer: the means."""
        return [(a / max(n, 1), d / max(n, 1)) for a, d, n in zip(self.aa, self.dd, self.rows, strict=True)]

    def bias_factors(self) -> list[np.ndarray | None]:
        """``S_b = E[δ_b δ_bᵀ]`` per layer with a separate bias block (over rows and output positions), else None."""
        return [None if b is None else b / max(n, 1) for b, n in zip(self.bb, self.bias_rows, strict=True)]
