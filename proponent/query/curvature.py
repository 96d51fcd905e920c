"""A query under ``precondition=kfac|ekfac``: its exact per-layer gradient, preconditioned, in the index's space.

The query's exact gradient of every featurized layer (the m-draw average, with the query's draws exactly as
:meth:`~proponent.model.runtime.ModelRuntime.featurize` takes them; ``features="stored"``: the row's own draws
and the index's objective) is preconditioned per layer by the stored K-FAC / EK-FAC factors
(:mod:`proponent.format.curvature`: rotate, divide by Λ + λ, rotate back), then mapped into the index's feature
space by the index's own projection (:meth:`~proponent.model.projection.Projector.project_matrix` and the second
stage, if any). With ``projection=none`` that map is the identity and ``<P q, f_i>`` is the exact preconditioned
inner product over the stored rows; with a sketch, ``<S P q, S g_i>`` estimates ``qᵀ P g_i`` without bias.
The norms the scorings divide by are exact: ``qᵀ P q`` here and each row's stored leverage ``g_iᵀ P g_i``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from proponent.model.curvature import LayerGradients
from proponent.model.featurizers.base import per_draw_rows
from proponent.model.objectives import NOISE_INDEX, NOISE_QUERY, Objective, draw_noise, objective_at

if TYPE_CHECKING:
    from proponent.query.index import InfluenceIndex


def to_features(index: InfluenceIndex, c: int, grads: list[np.ndarray]) -> np.ndarray:
    """Per-layer gradients ``G_l [B, out, in]`` as the index's features ``[B, D]`` (float64): the identity with
    ``projection=none``, else the index's projection of checkpoint c (float32, as the index job computes it)."""
    man = index.manifest
    b = grads[0].shape[0]
    if man.projection.is_exact:
        return np.concatenate([np.asarray(g, np.float64).reshape(b, -1) for g in grads], axis=1)
    proj = index.runtime.projector(c)
    with torch.no_grad():
        parts = [
            proj.project_matrix(blk, torch.from_numpy(np.ascontiguousarray(g, np.float32)).to(proj.device))
            for blk, g in zip(proj.blocks, grads, strict=True)
        ]
        return proj.finish(torch.cat(parts, dim=1)).double().cpu().numpy()


def query_features(
    index: InfluenceIndex,
    kind: str,
    objective: Objective,
    x: np.ndarray,
    label: int | None,
    *,
    seed: int,
    checkpoints: list[int],
    per_draw: bool,
    index_row: int | None = None,
) -> tuple[dict[int, np.ndarray], dict[int, float], dict[int, np.ndarray] | None]:
    """``(P q per checkpoint [D], qᵀ P q, per-draw P q [m, D] or None)`` of one input ``x [*shape]``.

    ``index_row``: take that training row's own draws (``NOISE_INDEX``) instead of the query's."""
    pre = index.curvature(kind)
    rt = index.runtime
    xt = torch.from_numpy(np.asarray(x, np.float32)[None])
    yt = rt.labels_for(1, None if label is None else np.array([label], np.int64))
    vec, sq, draws = {}, {}, {}
    with rt.featurize_lock:
        for c in checkpoints:
            model64 = index.model64(c)
            cap = LayerGradients(model64, objective_at(objective, c), [b.info for b in rt.projector(c).blocks])
            obj = cap.feat.objective
            m = int(obj.m)
            shape = obj.noise_shape(model64)
            if index_row is None:
                eps = draw_noise(NOISE_QUERY, seed, c, np.zeros(1, np.int64), m, shape)
            else:
                ids = index.meta.ids[[index_row]]
                eps = draw_noise(NOISE_INDEX, index.manifest.objective.seed, c, ids, m, shape)
            pg, quad = pre[c].apply(cap.grads(xt, yt, eps))
            vec[c] = to_features(index, c, pg)[0]
            sq[c] = float(quad[0])
            if per_draw and m > 1:
                xr, yr, er = per_draw_rows(xt, yt, eps)
                pgd, _ = pre[c].apply(cap.grads(xr, yr, er))
                draws[c] = to_features(index, c, pgd)
    return vec, sq, (draws or None)
