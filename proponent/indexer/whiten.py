"""``proponent index --whiten kfac|adam``: the whitening factors of every checkpoint, made before featurizing.

``kfac``: one pass over the training set per checkpoint (a float32 copy of the model, each batch's products summed
in float64; the index's objective and its own draws ``NOISE_INDEX``: the rows the features are made from)
accumulating each layer's ``A = E[a aᵀ]`` and ``S = E[δ δᵀ]`` (:class:`~proponent.model.curvature.LayerGradients`,
the code ``proponent precondition --kind kfac`` uses), then ``L = (S + λ_S)^{-1/2}``, ``R = (A + λ_A)^{-1/2}``;
``adam``: the checkpoint's optimizer state, no pass. :mod:`proponent.format.whiten` says why and how the index
stores and checks them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from proponent.format import whiten as wfmt
from proponent.format.precond import PreconditionError
from proponent.indexer.curvature import adam_bias_moments, adam_flat_moments, adam_layer_moments, adam_moments
from proponent.indexer.data import Dataset
from proponent.model.curvature import WHITEN_SUPPORTED, FactorSums, LayerGradients, double_model
from proponent.model.featurizers.dense import DenseFeaturizer
from proponent.model.objectives import NOISE_INDEX, Objective, draw_noise, objective_at
from proponent.model.projection import LayerInfo, ProjectionSpec, Projector

_BATCH = 64


def _batches(model32: nn.Module, obj: Objective, data: Dataset, seed: int, c: int, batch: int):
    """``(x, y, eps)`` of every training batch with the index's draws ``NOISE_INDEX`` at checkpoint ``c``."""
    noise_shape = obj.noise_shape(model32)
    n = len(data.x)
    labels = np.clip(data.labels, 0, None) if data.labels is not None else np.zeros(n, np.int64)
    for lo in range(0, n, batch):
        hi = min(n, lo + batch)
        eps = draw_noise(NOISE_INDEX, seed, c, data.ids[lo:hi], int(obj.m), noise_shape)
        yield torch.from_numpy(data.x[lo:hi]), torch.from_numpy(labels[lo:hi]), eps


def layer_factor_sums(
    model: nn.Module,
    objective: Objective,
    layers: list[LayerInfo],
    data: Dataset,
    seed: int,
    c: int,
    batch: int = _BATCH,
) -> FactorSums:
    """Checkpoint ``c``'s ``Σ a aᵀ``, ``Σ δ δᵀ`` per layer over every training row with the index's draws (and a
    separate bias block's ``Σ δ_b δ_bᵀ`` over rows and output positions)."""
    # float32: the products of each batch in float32 (2-3x faster than float64 on the conv VAE's layers), their sums
    # over batches in float64; a preconditioner, not a score: the float64 pass changes the factors by ~1e-6
    model32 = double_model(model.cpu()).float()
    cap = LayerGradients(model32, objective_at(objective, c), layers, WHITEN_SUPPORTED)
    sums = FactorSums.empty(cap.shapes, cap.bias_dims)
    for x, y, eps in _batches(model32, cap.feat.objective, data, seed, c, batch):
        sums.add(*cap.capture_all(x, y, eps))
    return sums


def diagonal_moments(
    model: nn.Module,
    objective: Objective,
    layers: list[LayerInfo],
    data: Dataset,
    seed: int,
    c: int,
    batch: int = _BATCH,
) -> list[np.ndarray]:
    """Checkpoint ``c``'s ``E[g²]`` of the index's per-sample gradients (the index's draws) of each layer of another
    kind, over its parameters flattened in order: the empirical Fisher's diagonal, by the dense fallback."""
    model32 = double_model(model.cpu()).float()
    obj = objective_at(objective, c)
    feat = DenseFeaturizer(model32, obj, Projector(layers, ProjectionSpec(kind="none")))
    params = dict(model32.named_parameters())
    sums = [np.zeros(sum(params[p].numel() for p in lay.params)) for lay in layers]
    for x, y, eps in _batches(model32, obj, data, seed, c, batch):
        grads, _ = feat.per_sample_gradients(x, y, eps)
        for k, lay in enumerate(layers):
            g = torch.cat([grads[p].reshape(len(x), -1) for p in lay.params], dim=1).double()
            sums[k] += g.square().sum(0).numpy()
    return [v / len(data.x) for v in sums]


def compute(
    kind: str,
    alpha: float,
    models: list[nn.Module],
    checkpoint_files: list[tuple[bytes, str]],
    objective: Objective,
    layers: list[LayerInfo],
    data: Dataset,
    seed: int,
    log: Callable[[str], None] | None = None,
) -> list[tuple[bytes, list[float], list[float], list[float]]]:
    """Per checkpoint: the factors file's bytes and the dampings ``(lams_out, lams_in, lams_bias)`` per layer
    (``lams_bias``: a separate bias block's, 0 for the layers without one; empty when no layer has one).

    ``models[c]`` holds checkpoint c's weights, ``checkpoint_files[c]`` its file's bytes and name (``adam`` reads
    the optimizer state from it). Raises :class:`~proponent.format.whiten.WhitenError` naming what cannot be
    whitened (a checkpoint without Adam state, a vanishing factor). Layers of another kind than nn.Linear /
    nn.Conv2d / nn.ConvTranspose2d (groups = 1) are whitened by diagonal factors (:func:`diagonal_factors`)."""
    if kind not in wfmt.KINDS:
        raise wfmt.WhitenError(f"unknown whitening {kind!r}; choose from none, {', '.join(wfmt.KINDS)}")
    if not alpha > 0:
        raise wfmt.WhitenError(f"--whiten-alpha must be > 0, got {alpha}")
    kron = [lay for lay in layers if lay.kind in WHITEN_SUPPORTED]
    diag = [lay for lay in layers if lay.kind not in WHITEN_SUPPORTED]
    any_bias = any(lay.bias_dim for lay in kron)
    out = []
    for c, (model, (raw, name)) in enumerate(zip(models, checkpoint_files, strict=True)):
        t0 = time.perf_counter()
        if kind == "kfac":
            factors, biases = [], []
            if kron:
                sums = layer_factor_sums(model, objective, kron, data, seed, c)
                factors = [wfmt.kfac_factors(a, s, alpha) for a, s in sums.factors()]
                biases = [None if s is None else wfmt.kfac_bias_factor(s, alpha) for s in sums.bias_factors()]
            moments = diagonal_moments(model, objective, diag, data, seed, c) if diag else []
        else:
            try:
                v_hat = adam_moments(raw, name, model)  # the checkpoint file read once
            except PreconditionError as e:
                raise wfmt.WhitenError(f"--whiten adam: {e}") from None
            factors = [wfmt.adam_factors(v, alpha) for v in adam_layer_moments(v_hat, kron, separate_bias=True)]
            biases = [None if v is None else wfmt.adam_bias_factor(v, alpha) for v in adam_bias_moments(v_hat, kron)]
            moments = adam_flat_moments(v_hat, diag)
        made = dict(zip((lay.name for lay in kron), zip(factors, biases, strict=True), strict=True))
        for lay, v in zip(diag, moments, strict=True):
            made[lay.name] = (wfmt.diagonal_factors(v, alpha, f"layer {lay.name} ({lay.kind})"), None)
        mats, lams_out, lams_in, lams_bias = [], [], [], []
        for lay in layers:
            (left, right, lo, li), bias = made[lay.name]
            if not all(np.isfinite(m).all() for m in (left, right, None if bias is None else bias[0]) if m is not None):
                raise wfmt.WhitenError(f"checkpoint {c}, layer {lay.name}: the whitening factors are not finite")
            mats.append((left, right, None if bias is None else bias[0]))
            lams_out.append(lo)
            lams_in.append(li)
            lams_bias.append(0.0 if bias is None else bias[1])
        out.append((wfmt.encode(mats), lams_out, lams_in, lams_bias if any_bias else []))
        if log:
            extra = f"; diagonal: {', '.join(lay.name for lay in diag)}" if diag else ""
            log(f"whiten {kind}: checkpoint {c}, {len(layers)} layers{extra} ({time.perf_counter() - t0:.1f} s)")
    return out
