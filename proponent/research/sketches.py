"""Research code: the sketch layouts measured on the way to the product's, kept for ``benchmarks/``.

The product never imports this package (an import-linter contract in ``pyproject.toml``); the
benchmarks ``projection_fidelity.py`` and ``index_throughput.py`` and ``tests/research`` do.

* :class:`LayerTensorSketch`: per-layer blocks (tensor sketches, exact blocks or Kronecker
  blocks) concatenated, computed from the factors the Kronecker featurizer captures;
  :func:`allocate_hybrid` puts tensor sketches on layers with one row per sample and Kronecker
  blocks on layers with m rows.
* Kronecker allocations: :func:`allocate_kron` (per-layer k ∝ energy^(2/3)),
  :func:`kron_variance` / :func:`calibrate_kron` / :func:`allocate_kron_variance` (per-side k
  from the measured variance coefficients, :class:`KronVariance`), :func:`kron_projector` (a
  :class:`~proponent.model.projection.Projector` with per-layer ``k_in`` / ``k_out``, seeded
  exactly like the uniform one).
* :func:`quantize_rows` / :func:`dequantize_rows`: rows as a store of each dtype keeps them
  (float16, or int8 through the store's own :func:`~proponent.format.store.quantize_int8`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from proponent.format.store import quantize_int8
from proponent.model.featurizers.kronecker import KroneckerFeaturizer
from proponent.model.projection import LayerBlock, LayerInfo, ProjectionSpec, Projector, _gaussian, _seed_for
from proponent.model.sketch import StorageDtype, TensorSketch, allocate_tensor

__all__ = [
    "KronVariance",
    "LayerBlockSpec",
    "LayerTensorSketch",
    "allocate_hybrid",
    "allocate_kron",
    "allocate_kron_variance",
    "calibrate_kron",
    "dequantize_rows",
    "kron_projector",
    "kron_variance",
    "quantize_rows",
]


LayerBlockSpec = int | tuple[int, int]  # a tensor-sketch dimension, or Kronecker (k_in, k_out)


class LayerTensorSketch:
    """Per-layer blocks computed from each layer's factors, concatenated.

    ``dims[l]`` is either an int (a :class:`TensorSketch` of that dimension; at ``in · out`` the
    exact block) or ``(k_in, k_out)`` (a Kronecker block ``P_outᵀ G P_in``, seeded exactly like
    :class:`Projector`'s). With ``allocate_dims(energy, total_dim, max_dims=[in·out])``
    (``d_l ∝ E_l``, the mean squared gradient norm of the layer: the split that minimises the
    summed error variance ``Σ_l E_l² / d_l``) the concatenation has the error of one global sketch
    of the whole gradient and each layer's FFTs are only as long as its share.
    :func:`allocate_hybrid` mixes the two: tensor sketches where a sample has one row (encoder
    layers: 2 FFTs per sample) and Kronecker blocks where it has m (decoder layers: a tensor
    sketch there costs 2m FFTs per sample, more than the forward and backward pass on a CPU).
    """

    def __init__(self, layers: Sequence[LayerInfo], dims: Sequence[LayerBlockSpec], seed: int = 0):
        if len(dims) != len(layers):
            raise ValueError(f"{len(layers)} layers but {len(dims)} dims")
        self.layers = list(layers)
        self.specs: list[LayerBlockSpec] = [d if isinstance(d, int) else (int(d[0]), int(d[1])) for d in dims]
        self.dims = [d if isinstance(d, int) else d[0] * d[1] for d in self.specs]
        self.offsets = [sum(self.dims[:i]) for i in range(len(self.dims))]
        self.dim = sum(self.dims)
        self.seed = seed
        self.sketches: list[TensorSketch | None] = []
        self.kron: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        for i, (info, d) in enumerate(zip(self.layers, self.specs, strict=True)):
            if info.kind == "other":
                raise ValueError(f"layer {info.name}: no factors for a {info.kind!r} layer")
            exact = info.in_dim * info.out_dim
            if isinstance(d, tuple):
                k_in, k_out = d
                if not (1 <= k_in <= info.in_dim and 1 <= k_out <= info.out_dim):
                    raise ValueError(f"layer {info.name}: Kronecker ({k_in}, {k_out}) outside its dims")
                p_in = None if k_in == info.in_dim else _gaussian(info.in_dim, k_in, _seed_for(seed, info.name, "in"))
                p_out = (
                    None if k_out == info.out_dim else _gaussian(info.out_dim, k_out, _seed_for(seed, info.name, "out"))
                )
                self.kron[i] = (p_in, p_out)
                self.sketches.append(None)
                continue
            if d < 1 or d > exact:
                raise ValueError(f"layer {info.name}: dim {d} outside 1..{exact}")
            self.sketches.append(None if d == exact else TensorSketch(info.in_dim, info.out_dim, d, seed, info.name))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "layer-tensor",
            "seed": self.seed,
            "dims": [d if isinstance(d, int) else list(d) for d in self.specs],
            "layers": [li.name for li in self.layers],
        }

    def block(self, i: int, a: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Layer i's block ``[B, dims[i]]`` from its factors ``a [B, t, in]`` (bias column included), ``d``."""
        if i in self.kron:
            p_in, p_out = self.kron[i]
            ap = a if p_in is None else a @ p_in.to(device=a.device, dtype=a.dtype)
            dp = d if p_out is None else d @ p_out.to(device=d.device, dtype=d.dtype)
            return torch.bmm(dp.transpose(1, 2), ap).reshape(a.shape[0], -1)
        sk = self.sketches[i]
        if sk is None:
            return torch.bmm(d.transpose(1, 2), a).reshape(a.shape[0], -1)
        return sk.apply_factors(a, d)

    def project_exact(self, g: torch.Tensor) -> torch.Tensor:
        """From exact features ``[B, Σ in·out]`` in the Projector's ``kind="none"`` layout."""
        out, pos = [], 0
        for i, (info, sk) in enumerate(zip(self.layers, self.sketches, strict=True)):
            n = info.in_dim * info.out_dim
            blk = g[:, pos : pos + n].reshape(-1, info.out_dim, info.in_dim)
            if i in self.kron:
                p_in, p_out = self.kron[i]
                if p_in is not None:
                    blk = blk @ p_in.to(device=blk.device, dtype=blk.dtype)
                if p_out is not None:
                    blk = p_out.to(device=blk.device, dtype=blk.dtype).T @ blk
                out.append(blk.reshape(blk.shape[0], -1))
            else:
                out.append(blk.reshape(blk.shape[0], -1) if sk is None else sk.apply_matrix(blk))
            pos += n
        return torch.cat(out, dim=1)


def allocate_hybrid(
    layers: Sequence[LayerInfo],
    layer_energy: Sequence[float],
    terms: Sequence[KronVariance],
    rows_per_sample: Sequence[int],
    total_dim: int,
    max_fft_work: int = 0,
) -> list[LayerBlockSpec]:
    """Tensor sketches where they are cheap, Kronecker blocks elsewhere, within ``total_dim``.

    ``total_dim`` is split by energy (:func:`allocate_tensor`, FFT-friendly sizes). A layer keeps
    its tensor sketch when it has one row per sample or when ``rows · d_l <= max_fft_work`` (the
    FFT work per sample; 0: one-row layers only); the other layers pool their shares and split the
    pool by :func:`allocate_kron_variance`.
    """
    n = len(layers)
    if not (len(layer_energy) == len(terms) == len(rows_per_sample) == n):
        raise ValueError("layers, layer_energy, terms and rows_per_sample must have the same length")
    exact = [li.in_dim * li.out_dim for li in layers]
    share = allocate_tensor(layer_energy, total_dim, exact)
    out: list[LayerBlockSpec | None] = [None] * n
    pool = total_dim - sum(share)
    kron = []
    for i in range(n):
        if rows_per_sample[i] == 1 or rows_per_sample[i] * share[i] <= max_fft_work:
            out[i] = share[i]
        else:
            kron.append(i)
            pool += share[i]
    if kron:
        lay = allocate_kron_variance(
            [terms[i] for i in kron], [layers[i].in_dim for i in kron], [layers[i].out_dim for i in kron], pool
        )
        for i, k in zip(kron, lay, strict=True):
            out[i] = k
    return [o for o in out if o is not None]


# ------------------------------------------------------------------------- dimension allocation


def allocate_kron(
    layer_energy: Sequence[float],
    in_dims: Sequence[int],
    out_dims: Sequence[int],
    total_dim: int,
    power: float = 2.0 / 3.0,
    min_k: int = 1,
) -> list[tuple[int, int]]:
    """Per-layer Kronecker sizes ``(k_in, k_out)`` with ``Σ k_in · k_out <= total_dim``.

    A Kronecker block's inner-product error variance is ``~ E_l² (c_in / k_in + c_out / k_out)``
    (each side is a JL sketch of the layer inputs / output gradients), so under a budget on
    ``Σ k_l²`` the variance is minimised by ``k_l ∝ E_l^(2/3)`` (``power``). Each side is capped
    at its dimension (a side at its dimension is exact, identity); the scale is found by
    bisection so that the total fits ``total_dim``.
    """
    n = len(layer_energy)
    if not (len(in_dims) == len(out_dims) == n):
        raise ValueError("layer_energy, in_dims and out_dims must have the same length")
    weight = [float(e) ** power if e > 0 else 0.0 for e in layer_energy]
    top = max(weight) or 1.0
    weight = [w / top for w in weight]

    def layout(scale: float) -> list[tuple[int, int]]:
        out = []
        for w, i, o in zip(weight, in_dims, out_dims, strict=True):
            k = max(min_k, int(round(scale * w)))
            out.append((min(i, k), min(o, k)))
        return out

    def size(lay: list[tuple[int, int]]) -> int:
        return sum(a * b for a, b in lay)

    if size(layout(0.0)) > total_dim:
        raise ValueError(f"total_dim={total_dim} is below the minimum layout {size(layout(0.0))}")
    # at `hi` every layer with energy reaches both caps
    lo, hi = 0.0, float(max(max(in_dims), max(out_dims))) / min([w for w in weight if w > 0] or [1.0])
    if size(layout(hi)) <= total_dim:
        return layout(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        if size(layout(mid)) <= total_dim:
            lo = mid
        else:
            hi = mid
    return layout(lo)


@dataclass
class KronVariance:
    """Coefficients of a layer's Kronecker inner-product error variance, averaged over sample pairs.

    For Gaussian ``P_out [out, k_out]``, ``P_in [in, k_in]`` (entries ``N(0, 1/k)``) and per-sample
    gradients ``G, G'``, ``Var <P_outᵀ G P_in, P_outᵀ G' P_in> ≈ a / k_in + b / k_out + c / (k_in k_out)``
    with ``a = ||G'ᵀG||² + tr((G'ᵀG)²)`` (exact when only the input side is projected),
    ``b = ||G G'ᵀ||² + tr((G G'ᵀ)²)`` (exact when only the output side is) and
    ``c ≈ ||G||² ||G'||² + <G, G'>²``; a side at its full dimension is the identity and drops its
    terms. ``a`` is small when the layer inputs of different samples are orthogonal and close to
    ``c`` when they are aligned (post-ReLU inputs): then the error falls like ``1/k_out`` only, not
    like ``1 / (k_in k_out)`` -- which is why a uniform k per side wastes dimensions.
    """

    a: float
    b: float
    c: float
    energy: float  # mean ||G||²

    def variance(self, k_in: int, k_out: int, in_dim: int, out_dim: int) -> float:
        p_in, p_out = k_in < in_dim, k_out < out_dim
        return (
            (self.a / k_in if p_in else 0.0)
            + (self.b / k_out if p_out else 0.0)
            + (self.c / (k_in * k_out) if p_in and p_out else 0.0)
        )


def kron_variance(a: torch.Tensor, d: torch.Tensor) -> KronVariance:
    """:class:`KronVariance` of one layer from its factors on a calibration sample.

    ``a [n, t, in]`` (layer inputs, bias column included) and ``d [n, t, out]`` (output gradients),
    ``G_i = d_iᵀ a_i``; everything is computed from ``t x t`` Gram matrices (``G`` is never formed),
    averaged over the ``n (n - 1)`` ordered pairs of distinct samples (``n >= 2``).
    """
    n, t, _ = a.shape
    if n < 2:
        raise ValueError("kron_variance needs at least 2 samples")
    a, d = a.double(), d.double()
    fa, fd = a.reshape(n * t, -1), d.reshape(n * t, -1)
    ga = (fa @ fa.T).reshape(n, t, n, t).permute(0, 2, 1, 3)  # ga[i, j] = a_i a_jᵀ  [t, t]
    gd = (fd @ fd.T).reshape(n, t, n, t).permute(0, 2, 1, 3)
    ii = torch.arange(n)
    ga_ii, gd_ii = ga[ii, ii], gd[ii, ii]  # [n, t, t]
    # <G_i, G_j> = tr(a_i a_jᵀ (d_i d_jᵀ)ᵀ) = Σ ga[i,j] * gd[i,j]
    inner = (ga * gd).sum(dim=(2, 3))  # [n, n]
    sq = inner.diagonal()
    off = ~torch.eye(n, dtype=torch.bool)
    # ||G_jᵀ G_i||² = tr(gd_ij ga_jj gd_ji ga_ii); tr((G_jᵀ G_i)²) = tr(gd_ji ga_ij gd_ji ga_ij)
    gd_t = gd.transpose(0, 1)  # gd_t[i, j] = gd[j, i] = d_j d_iᵀ
    ga_t = ga.transpose(0, 1)
    a1 = torch.einsum("ijpq,jqr,ijrs,isp->ij", gd, ga_ii, gd_t, ga_ii)
    a2 = torch.einsum("ijpq,ijqr,ijrs,ijsp->ij", gd_t, ga, gd_t, ga)
    # ||G_i G_jᵀ||² = tr(ga_ij gd_jj ga_ji gd_ii); tr((G_i G_jᵀ)²) = tr(ga_ij gd_ji ga_ij gd_ji)
    b1 = torch.einsum("ijpq,jqr,ijrs,isp->ij", ga, gd_ii, ga_t, gd_ii)
    b2 = torch.einsum("ijpq,ijqr,ijrs,ijsp->ij", ga, gd_t, ga, gd_t)
    c = sq[:, None] * sq[None, :] + inner**2
    return KronVariance(
        a=float((a1 + a2)[off].mean()),
        b=float((b1 + b2)[off].mean()),
        c=float(c[off].mean()),
        energy=float(sq.mean()),
    )


def allocate_kron_variance(
    terms: Sequence[KronVariance],
    in_dims: Sequence[int],
    out_dims: Sequence[int],
    total_dim: int,
    growth: float = 1.1,
) -> list[tuple[int, int]]:
    """Per-layer ``(k_in, k_out)`` with ``Σ k_in k_out <= total_dim`` minimising the summed variance
    ``Σ_l terms[l].variance(k_in, k_out)`` (the score is a sum over layers with independent
    projections): greedy from ``(1, 1)``, each step grows one side of one layer by ``growth``
    (at least +1; to the full dimension when that is within reach) where the variance falls the
    most per added dimension."""
    n = len(terms)
    if not (len(in_dims) == len(out_dims) == n):
        raise ValueError("terms, in_dims and out_dims must have the same length")
    if total_dim < n:
        raise ValueError(f"total_dim={total_dim} is below the minimum layout {n} (1 x 1 per layer)")
    ks = [[1, 1] for _ in range(n)]
    used = n
    while True:
        best: tuple[float, int, int, int] | None = None  # (gain per dim, layer, side, new k)
        for l in range(n):
            dims = (in_dims[l], out_dims[l])
            cur = terms[l].variance(ks[l][0], ks[l][1], *dims)
            for side in (0, 1):
                k = ks[l][side]
                if k >= dims[side]:
                    continue
                new = min(dims[side], max(k + 1, int(math.ceil(k * growth))))
                if new * growth >= dims[side]:
                    new = dims[side]
                other = ks[l][1 - side]
                add = (new - k) * other
                if used + add > total_dim:
                    new = k + (total_dim - used) // other
                    if new <= k:
                        continue
                    add = (new - k) * other
                trial = [ks[l][0], ks[l][1]]
                trial[side] = new
                gain = (cur - terms[l].variance(trial[0], trial[1], *dims)) / add
                if best is None or gain > best[0]:
                    best = (gain, l, side, new)
        if best is None or best[0] <= 0:
            break
        _, l, side, new = best
        used += (new - ks[l][side]) * ks[l][1 - side]
        ks[l][side] = new
    return [(k[0], k[1]) for k in ks]


def calibrate_kron(
    model: torch.nn.Module,
    objective: Any,
    layers: Sequence[LayerInfo],
    x: torch.Tensor,
    y: torch.Tensor,
    eps: torch.Tensor,
) -> list[KronVariance]:
    """:class:`KronVariance` of every Linear layer of ``layers`` on the calibration batch
    ``(x, y, eps)`` (one hooked forward + backward of the Kronecker featurizer, exact factors).
    Conv2d and other layers get a conservative stand-in ``a = b = c = E²`` (aligned both ways)."""

    proj = Projector(list(layers), ProjectionSpec(kind="none"))
    feat = KroneckerFeaturizer(model, objective, proj)
    calls, deltas, _ = feat._capture(x, y, eps)
    b = x.shape[0]
    by_name: dict[str, KronVariance] = {}
    with torch.no_grad():
        for i, lay in enumerate(feat.layers):
            ins, ds = calls[i].inputs, deltas[i]
            if lay.is_conv or len(ins) != 1:
                g = feat._matrix_route(lay, ins, ds, b)[1].double()
                e = float(g.mean())
                by_name[lay.info.name] = KronVariance(e * e, e * e, 2 * e * e, e)
                continue
            a, d = feat._factors(lay, ins[0], ds[0], b)
            if lay.bias:
                a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
            by_name[lay.info.name] = kron_variance(a, d)
    out = []
    for info in layers:
        if info.name not in by_name:  # a non-Linear/Conv2d layer: no factors
            out.append(KronVariance(1.0, 1.0, 2.0, 1.0))
        else:
            out.append(by_name[info.name])
    return out


def kron_projector(
    layers: Sequence[LayerInfo],
    dims: Sequence[tuple[int, int]],
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> Projector:
    """A :class:`Projector` with per-layer ``(k_in, k_out)`` (Linear/Conv2d; ``k_in`` only for other
    layers), seeded exactly like ``Projector(layers, ProjectionSpec(kind="kron", k, seed))``: with
    ``dims = [(k, k)] * len(layers)`` (other layers ``(k*k, 1)``) the matrices are identical.

    ``projector.spec.k`` is the largest ``k``; the per-layer sizes are in ``projector.blocks`` (and
    its manifest). For trying allocations; the lead wires per-layer sizes into ProjectionSpec.
    """
    if len(dims) != len(layers):
        raise ValueError(f"{len(layers)} layers but {len(dims)} dims")
    proj = Projector([], ProjectionSpec(kind="kron", k=max(1, max((max(d) for d in dims), default=1)), seed=seed))
    proj.device = torch.device(device)
    offset = 0
    for info, (k_in, k_out) in zip(layers, dims, strict=True):
        k_in, k_out = min(int(k_in), info.in_dim), min(int(k_out), info.out_dim)
        if k_in < 1 or k_out < 1:
            raise ValueError(f"layer {info.name}: k_in and k_out must be >= 1")
        if info.kind == "other":
            p_in = None if k_in == info.in_dim else _gaussian(info.in_dim, k_in, _seed_for(seed, info.name, "flat"))
            p_out = None
            k_out = 1
        else:
            p_in = None if k_in == info.in_dim else _gaussian(info.in_dim, k_in, _seed_for(seed, info.name, "in"))
            p_out = None if k_out == info.out_dim else _gaussian(info.out_dim, k_out, _seed_for(seed, info.name, "out"))
        p_in = None if p_in is None else p_in.to(proj.device)
        p_out = None if p_out is None else p_out.to(proj.device)
        proj.blocks.append(LayerBlock(info, k_in, k_out, offset, p_in, p_out))
        offset += k_in * k_out
    proj.dim = proj.stage1_dim = offset
    return proj


# --------------------------------------------------------------------------------- quantization


def quantize_rows(x: np.ndarray | torch.Tensor, dtype: StorageDtype | str) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows ``[..., D]`` as a store of ``dtype`` keeps them: ``(values, scale)``.

    int8 is the store's quantizer (:func:`~proponent.format.store.quantize_int8`: per row
    ``scale = max|x| / 127``, ``value = round(x / scale)``; an all-zero row has scale 0 and codes
    0); float16 / float32 are a cast with scale None.
    """
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if dtype == "float32":
        return a.astype(np.float32), None
    if dtype == "float16":
        return a.astype(np.float16), None
    if dtype != "int8":
        raise ValueError(f"storage dtype must be float32, float16 or int8, got {dtype!r}")
    codes, scale = quantize_int8(a.reshape(-1, a.shape[-1]))
    return codes.reshape(a.shape), scale.reshape(a.shape[:-1])


def dequantize_rows(values: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """float32 rows from :func:`quantize_rows` output."""
    out = values.astype(np.float32)
    return out if scale is None else out * scale[..., None].astype(np.float32)
