"""Index-time whitening (``proponent index --whiten kfac|adam``): stored features of ``L G Rᵀ`` per layer.

Why: a preconditioned inner product ``q ᵀ P g`` cannot be served from a sketched index at query time (the sketch's
error is relative to ``||P q|| · ||g||``, far larger than the preconditioned score: measured LDS 0.14 against 0.36
unpreconditioned on paired digits). A preconditioner that factors per layer as ``P = LᵀL ⊗ RᵀR`` can instead be
applied to *both* sides before the sketch: each draw's rank-one gradient ``δ aᵀ`` becomes ``(L δ)(R a)ᵀ``, still
rank-one, so the tensor sketch, the int8 store and the exact scan apply unchanged, and the scan's plain inner
product is ``<L G_q Rᵀ, L G_i Rᵀ> = vec(G_q)ᵀ P vec(G_i)`` with the sketch's usual (relative) error.

Two such forms (``benchmarks/lds_factored.py`` measured them on exact gradients and through the default sketch):

* ``kfac``: K-FAC with factored damping, ``L = (S + λ_S I)^{-1/2}``, ``R = (A + λ_A I)^{-1/2}`` with
  ``A = E[a aᵀ]`` (the layer inputs, bias column 1 appended; a convolution's patches), ``S = E[δ δᵀ]`` over every
  forward row of the layer (samples × draws × positions) with the index's own draws, and
  ``λ = α · mean eigenvalue`` of each factor (K-FAC for optimisation damps each factor; kronfluence damps their
  product, which does not factor). Measured: LDS 0.512 (exact) / 0.473 (default sketch) on paired digits, where
  query-time K-FAC scores 0.502 on an exact index;
* ``adam``: Adam's bias-corrected second moments ``v̂`` of the layer (from the checkpoint's optimizer state),
  factored as Adafactor does (row means ``r``, column means ``c``): ``L = diag(v̄^{1/4} / sqrt(r + α r̄))``,
  ``R = diag(v̄^{1/4} / sqrt(c + α c̄))`` (``v̄`` the mean of ``v̂``), so ``L G Rᵀ = G ⊙ sqrt(v̄ / ((r + α r̄)(c +
  α c̄)ᵀ))``; no factor pass.

The stored exact norms are the whitened gradients' norms (cosine scoring and self-influence use them), so the
self-influence of a whitened index is the factored-K-FAC (or Adam) leverage. Files:
``whiten/ckpt_{c:03d}.npz`` (``left_<l>``, ``right_<l>`` float64 per layer, ``bias_<l>`` for a separate bias
block; a diagonal one, adam's, as its diagonal), each hashed in
:class:`~proponent.format.manifest.WhitenRecord` (``manifest.whiten``); written before the manifest that names
them. Every reader (the unit workers, the fidelity check, the query runtime) loads them through :func:`load`, which
refuses a missing, damaged or misshapen file by name: a whitened index never answers unwhitened.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np

from .fsio import IndexDir, sha256_bytes
from .manifest import FileRecord, Manifest, WhitenCheckpoint, rebuild_hint

WHITEN_DIR = "whiten"
KINDS = ("kfac", "adam")
NAMES = {"kfac": "K-FAC (factored damping)", "adam": "Adam (Adafactor-factored)"}
#: α of λ = α · mean eigenvalue of each factor: paired digits 0.512, conv VAE 0.454 (0.01: 0.475) on exact gradients,
#: 0.473 through the default sketch on paired digits (benchmarks/results/lds_factored_*.txt)
DEFAULT_ALPHA = 0.1


class WhitenError(ValueError):
    """A whitening file that is missing, damaged or does not fit the index (the message names it)."""


def inv_sqrt_psd(m: np.ndarray, lam: float) -> np.ndarray:
    """``(M + λ I)^{-1/2}`` of a symmetric PSD ``M`` (roundoff negatives of its eigenvalues taken as 0)."""
    e, q = np.linalg.eigh(np.asarray(m, np.float64))
    return (q / np.sqrt(np.clip(e, 0, None) + lam)) @ q.T


def kfac_factors(a_cov: np.ndarray, s_cov: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """``(L, R, λ_S, λ_A)``: K-FAC with factored damping from the layer's ``A`` [in, in] and ``S`` [out, out]."""
    lam_a = alpha * float(np.clip(np.linalg.eigvalsh(a_cov), 0, None).mean())
    lam_s = alpha * float(np.clip(np.linalg.eigvalsh(s_cov), 0, None).mean())
    if not (lam_a > 0 and lam_s > 0):
        raise WhitenError("a K-FAC factor is zero (the layer's inputs or output gradients vanish on the training set)")
    return inv_sqrt_psd(s_cov, lam_s), inv_sqrt_psd(a_cov, lam_a), lam_s, lam_a


def adam_factors(v: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray, float, float]:
    """``(L, R, λ_r, λ_c)``: Adafactor's row/column factoring of Adam's ``v̂`` [out, in] as diagonal ``L``, ``R``."""
    v = np.asarray(v, np.float64)
    r, c, mv = v.mean(axis=1), v.mean(axis=0), float(v.mean())
    lam_r, lam_c = alpha * float(r.mean()), alpha * float(c.mean())
    if not (mv > 0 and lam_r > 0 and lam_c > 0):
        raise WhitenError("Adam's second moments of a layer are all zero (the layer was never updated)")
    q = mv**0.25
    return np.diag(q / np.sqrt(r + lam_r)), np.diag(q / np.sqrt(c + lam_c)), lam_r, lam_c


#: (L, R, B) float64: a matrix, or a diagonal one as its 1-D diagonal; B a separate bias block's factor, or None
Factors = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def _inv_sqrt_damped(v: np.ndarray, alpha: float, what: str) -> tuple[np.ndarray, float]:
    """``(1 / sqrt(v + λ), λ)`` elementwise with ``λ = α · mean v`` (a diagonal factor as its diagonal)."""
    v = np.asarray(v, np.float64).reshape(-1)
    lam = alpha * float(v.mean())
    if not lam > 0:
        raise WhitenError(f"the second moments of {what} are all zero (its gradients vanish or it was never updated)")
    return 1.0 / np.sqrt(v + lam), lam


def diagonal_factors(v: np.ndarray, alpha: float, what: str) -> tuple[np.ndarray, np.ndarray, float, float]:
    """``(L, R, 0, λ)`` of a layer of another kind (LayerNorm, a grouped convolution, ...): its parameters as one
    row ``G [1, numel]`` whitened elementwise, ``L = [1]``, ``R = diag(1 / sqrt(v + λ))`` (1-D), ``λ = α · mean v``,
    from the second moments ``v`` of its parameters (K-FAC: of the index's per-sample gradients, the empirical
    Fisher's diagonal; Adam: ``v̂``); ``what`` names them in the error."""
    right, lam = _inv_sqrt_damped(v, alpha, what)
    return np.ones(1), right, 0.0, lam


def kfac_bias_factor(s_cov: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """``(B, λ_b)``: a separate bias block's factor ``B = (S_b + λ_b)^{-1/2}`` from ``S_b = E[δ δᵀ]`` over the
    layer's output positions (its bias's gradient is ``Σ δ``: K-FAC with the constant input 1)."""
    lam = alpha * float(np.clip(np.linalg.eigvalsh(s_cov), 0, None).mean())
    if not lam > 0:
        raise WhitenError("the K-FAC factor of a bias block is zero (the layer's output gradients vanish)")
    return inv_sqrt_psd(s_cov, lam), lam


def adam_bias_factor(v: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """``(B, λ_b)``: a separate bias block's diagonal ``B = 1 / sqrt(v̂ + α mean v̂)`` (1-D; the weight's Adafactor
    form at one row: ``G ⊙ sqrt(v̄ / (r c))`` is ``G / sqrt(v̂)`` where ``v̂`` factors exactly)."""
    return _inv_sqrt_damped(v, alpha, "a bias block (Adam)")


def encode(mats: Sequence[tuple[np.ndarray, ...] | Factors]) -> bytes:
    """``(L, R)`` or ``(L, R, B)`` per layer (``B``: a separate bias block's factor, None when there is none)."""
    buf = io.BytesIO()
    arrays = {}
    for k, m in enumerate(mats):
        arrays[f"left_{k}"] = _compact(m[0])
        arrays[f"right_{k}"] = _compact(m[1])
        if len(m) > 2 and m[2] is not None:
            arrays[f"bias_{k}"] = _compact(m[2])
    np.savez(buf, allow_pickle=False, **arrays)
    return buf.getvalue()


def decode(data: bytes, layers: int | Sequence[object]) -> list[Factors]:
    """:func:`encode`'s ``(L, R, B)`` per layer back from the file's bytes (``layers``: how many, or the layers);
    ``B`` None where the file has none."""
    count = layers if isinstance(layers, int) else len(layers)
    z = np.load(io.BytesIO(data), allow_pickle=False)
    return [
        (
            np.asarray(z[f"left_{k}"]),
            np.asarray(z[f"right_{k}"]),
            np.asarray(z[f"bias_{k}"]) if f"bias_{k}" in z.files else None,
        )
        for k in range(count)
    ]


def _compact(m: np.ndarray) -> np.ndarray:
    """A diagonal matrix (adam's) as its diagonal (1-D, kept so: :func:`as_matrix` expands it), any other as it
    is."""
    m = np.asarray(m, np.float64)
    if m.ndim == 1:
        return np.ascontiguousarray(m)
    d = np.diagonal(m)
    return np.ascontiguousarray(d if np.array_equal(m, np.diag(d)) else m)


def as_matrix(m: np.ndarray) -> np.ndarray:
    """A factor as a matrix (a 1-D diagonal expanded)."""
    return np.diag(m) if m.ndim == 1 else m


def square_shape(m: Any) -> tuple[int, ...]:
    """A factor's shape as a matrix (a 1-D diagonal of n is (n, n)); numpy or torch."""
    return (len(m), len(m)) if m.ndim == 1 else tuple(m.shape)


def file_path(c: int) -> str:
    return f"{WHITEN_DIR}/ckpt_{c:03d}.npz"


def record(
    c: int, data: bytes, lams_out: list[float], lams_in: list[float], lams_bias: list[float] | None = None
) -> WhitenCheckpoint:
    return WhitenCheckpoint(
        lams_out=lams_out,
        lams_in=lams_in,
        lams_bias=lams_bias or [],
        factors=FileRecord(path=file_path(c), sha256=sha256_bytes(data)),
    )


def _load(where: IndexDir, man: Manifest, c: int) -> list[Factors]:
    rec = man.whiten
    assert rec is not None
    if len(rec.checkpoints) != len(man.checkpoints):
        raise WhitenError(
            f"{where}: the whitening covers {len(rec.checkpoints)} checkpoints, the index has "
            f"{len(man.checkpoints)}; {rebuild_hint(where)}"
        )
    layers = man.projection.layers
    if rec.layers != [l.name for l in layers]:
        raise WhitenError(f"{where}: the whitening covers layers {rec.layers}, the index others; {rebuild_hint(where)}")
    f = rec.checkpoints[c].factors
    name = where.describe(f.path)
    if not where.is_file(f.path):
        raise WhitenError(f"whitening {name}: missing; {rebuild_hint(where)}")
    data = where.read_bytes(f.path)
    if sha256_bytes(data) != f.sha256:
        raise WhitenError(f"whitening {name}: damaged (sha256 differs from the manifest); {rebuild_hint(where)}")
    try:
        arrays = decode(data, len(layers))
    except (KeyError, ValueError, OSError) as e:
        raise WhitenError(f"whitening {name}: unreadable ({e}); {rebuild_hint(where)}") from None
    out = []
    for l, (left, right, bias) in zip(layers, arrays, strict=True):
        got = (square_shape(left), square_shape(right), None if bias is None else square_shape(bias))
        want = ((l.out_dim, l.out_dim), (l.in_dim, l.in_dim), (l.bias_dim, l.bias_dim) if l.bias_dim else None)
        if got != want:
            raise WhitenError(
                f"whitening {name}: layer {l.name} has factors {', '.join(map(str, got))}; expected "
                f"{', '.join(map(str, want))}"
            )
        if not all(np.isfinite(m).all() for m in (left, right, bias) if m is not None):
            raise WhitenError(f"whitening {name}: layer {l.name}'s factors are not finite")
        out.append((left, right, bias))
    return out


def load(where: IndexDir, man: Manifest, c: int) -> list[Factors] | None:
    """Checkpoint ``c``'s ``[(L, R, B)]`` per layer of a whitened index (checked; ``B`` None for a layer without a
    separate bias block), None for an unwhitened one."""
    if man.whiten is None:
        return None
    return _load(where, man, c)


def problems(where: IndexDir, man: Manifest) -> list[str]:
    """Every problem of the whitening files (``proponent verify``)."""
    if man.whiten is None:
        return []
    out = []
    for c in range(len(man.checkpoints)):
        try:
            _load(where, man, c)
        except WhitenError as e:
            out.append(str(e))
            if "covers" in str(e):
                break
    return out


def describe(man: Manifest) -> str | None:
    """The line an answer from a whitened index lists among its approximations (None: not whitened)."""
    rec = man.whiten
    if rec is None:
        return None
    diagonal = [l.name for l in man.projection.layers if l.kind == "other"]
    return (
        f"index whitened by {NAMES[rec.kind]} (α={rec.alpha:g}): stored features are L G Rᵀ per layer, so scores are "
        "preconditioned inner products"
        + (f"; layers {', '.join(diagonal)} (not Linear / Conv) whitened by a diagonal only" if diagonal else "")
    )
