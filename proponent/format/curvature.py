"""K-FAC / EK-FAC / Adam preconditioners of an index (per layer): made once, applied to queries.

Per checkpoint c and featurized layer l (nn.Linear / nn.Conv2d), over every training row with the index's
objective and its own draws (``NOISE_INDEX``, m per sample: the draws the stored features were made with),
``proponent precondition --kind kfac|ekfac`` computes (:mod:`proponent.model.curvature`)

* pass 1: ``A_l = E[a aᵀ]``, ``S_l = E[δ δᵀ]`` over the layer's forward rows, their eigenbases;
* pass 2 (EK-FAC): ``Λ_l = mean_i (Q_Sᵀ G_l(i) Q_A)²`` from every row's exact gradient (K-FAC: ``e_S e_Aᵀ``);
* the last pass: every row's leverage ``ℓ_c(i) = Σ_l vec(G_l(i))ᵀ P_l vec(G_l(i))`` with
  ``P_l = Q (Λ_l + λ_l)⁻¹ Qᵀ`` and ``λ_l = α · mean(Λ_l)``, and the check that ``Σ_l ||G_l(i)||²`` equals the
  exact norm the index stored for the row (the draws and the objective are the index's; recorded as
  ``norm_error``, refused above 1e-3).

``adam`` (TrackStar's idea: the optimizer's own curvature estimate) takes ``Λ_l`` = Adam's bias-corrected second
moments ``v̂`` of the layer's weight and bias (laid out as ``G [out, in]``, bias column last) from each checkpoint's
optimizer state, in the parameter basis (no rotation): ``P_l = diag(1 / (v̂_l + λ_l))``; no factor pass.

Files: ``precond/<kind>-<tag>/ckpt_{c:03d}/{factors.npz,leverage.npy}`` (float64), each hashed in the manifest's
:class:`~proponent.format.manifest.CurvatureRecord` (``manifest.curvature[kind]``) with α, the layers and the
fingerprint of the features of the index it was made for; refused when damaged, missing or made for other
features. Written first, the manifest last: an interrupted run leaves the index as it was. A K-FAC and an
EK-FAC preconditioner and the Gram one (:mod:`proponent.format.precond`) can be stored side by side.

At query time (:mod:`proponent.query.curvature`) the query's exact per-layer gradient is preconditioned
(rotate, divide by Λ + λ, rotate back) and mapped into the index's feature space by the index's own projection,
so the stored rows and the exact scan answer unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .fsio import IndexDir
from .manifest import Manifest
from .precond import PreconditionError, coverage_problem, fingerprint_problems, load_array
from .store import FeatureStore

KINDS = ("kfac", "ekfac", "adam")
#: α of λ_l = α · mean(Λ_l): the best LDS on paired digits (K-FAC 0.502, EK-FAC 0.514) and EK-FAC's on the conv VAE
#: (benchmarks/results/lds_grid_{digits_paired,conv}.txt); minibatch-trained digits and 28x28 want 100-1000
DEFAULT_ALPHA = 0.01
NORM_TOLERANCE = 1e-3
NAMES = {"kfac": "K-FAC", "ekfac": "EK-FAC", "adam": "Adam"}


def remake_hint(kind: str, where: IndexDir | str = "DIR") -> str:
    return f"`proponent precondition --index {where} --kind {kind}`"


def eigenbases(a_cov: np.ndarray, s_cov: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(e_A, Q_A, e_S, Q_S)`` of the symmetric factors (eigenvalues ascending, negatives of roundoff kept)."""
    ea, qa = np.linalg.eigh(np.asarray(a_cov, np.float64))
    es, qs = np.linalg.eigh(np.asarray(s_cov, np.float64))
    return ea, qa, es, qs


def kfac_eigenvalues(ea: np.ndarray, es: np.ndarray) -> np.ndarray:
    """K-FAC's ``Λ = e_S e_Aᵀ`` ``[out, in]`` (the factors' roundoff negatives taken as 0)."""
    return np.outer(np.clip(es, 0, None), np.clip(ea, 0, None))


def rotate(g: np.ndarray, qa: np.ndarray | None, qs: np.ndarray | None) -> np.ndarray:
    """``G̃ = Q_Sᵀ G Q_A`` for ``g [..., out, in]`` (``G`` itself when the bases are None: the parameter basis)."""
    if qa is None or qs is None:
        return np.asarray(g, np.float64)
    return np.einsum("so,...si,ij->...oj", qs, np.asarray(g, np.float64), qa, optimize=True)


@dataclass
class KfacLayer:
    """One layer's stored preconditioner: eigenbases, Λ (K-FAC or EK-FAC) and the damping λ."""

    qa: np.ndarray | None  # [in, in]; None: the parameter basis (adam)
    qs: np.ndarray | None  # [out, out]
    eig: np.ndarray  # Λ [out, in]
    lam: float

    def apply(self, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(P G, vec(G)ᵀ P vec(G))`` for ``g [..., out, in]``: rotate, divide by Λ + λ, rotate back."""
        gr = rotate(g, self.qa, self.qs)
        h = gr / (self.eig + self.lam)
        if self.qa is None or self.qs is None:
            return h, (gr * h).sum(axis=(-2, -1))
        pg = np.einsum("so,...oj,ij->...si", self.qs, h, self.qa, optimize=True)
        return pg, (gr * h).sum(axis=(-2, -1))

    def quad(self, g: np.ndarray) -> np.ndarray:
        """``vec(G)ᵀ P vec(G)`` for ``g [..., out, in]``."""
        gr = rotate(g, self.qa, self.qs)
        return (gr * gr / (self.eig + self.lam)).sum(axis=(-2, -1))


class CheckpointCurvature:
    """One checkpoint's K-FAC / EK-FAC preconditioner: per layer :class:`KfacLayer`, every row's leverage."""

    def __init__(self, layers: list[KfacLayer], leverage: np.ndarray):
        self.layers = layers
        self.leverage = leverage

    def apply(self, grads: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        """``([P_l G_l], Σ_l vec(G_l)ᵀ P_l vec(G_l))`` for per-layer gradients ``G_l [..., out, in]``."""
        out, quads = [], []
        for lay, g in zip(self.layers, grads, strict=True):
            pg, q = lay.apply(g)
            out.append(pg)
            quads.append(q)
        return out, np.sum(quads, axis=0)


def _checked(where: IndexDir, man: Manifest, store: FeatureStore, kind: str):
    """Per checkpoint ``(CheckpointCurvature or None, problems)``: what :func:`load` and :func:`problems` refuse."""
    rec = man.curvature[kind]
    remake = remake_hint(kind, where)
    if len(rec.checkpoints) != len(man.checkpoints):
        yield None, [coverage_problem(where, man, len(rec.checkpoints), f"{NAMES[kind]} preconditioner", remake)]
        return
    layers = man.projection.layers
    if rec.layers != [l.name for l in layers]:
        what = f"{where}: the {NAMES[kind]} preconditioner covers layers {rec.layers}, the index others"
        yield None, [f"{what}; remake it with {remake}"]
        return
    for c, ck in enumerate(rec.checkpoints):
        what = f"{NAMES[kind]} preconditioner"
        out = fingerprint_problems(where, store, c, ck.fingerprint, ck.factors.path, what, remake)
        try:
            z = load_array(where, ck.factors, remake)
            lev = load_array(where, ck.leverage, remake)
        except PreconditionError as e:
            yield None, [*out, str(e)]
            continue
        pre = []
        for k, l in enumerate(layers):
            want = {"qa": (l.in_dim, l.in_dim), "qs": (l.out_dim, l.out_dim), "eig": (l.out_dim, l.in_dim)}
            if kind == "adam":  # the parameter basis: no eigenbases stored
                want = {"eig": want["eig"]}
            arrs = {n: np.asarray(z[f"{n}_{k}"]) for n in want if f"{n}_{k}" in z}
            bad = [n for n in want if n not in arrs or arrs[n].shape != want[n]]
            if bad:
                out.append(
                    f"{NAMES[kind]} preconditioner of checkpoint {c} ({where.describe(ck.factors.path)}): layer "
                    f"{l.name}'s {', '.join(bad)} missing or of the wrong shape; remake it with {remake}"
                )
                continue
            pre.append(KfacLayer(arrs.get("qa"), arrs.get("qs"), arrs["eig"], ck.lams[k]))
        if lev.shape != (store.n,):
            out.append(
                f"{NAMES[kind]} preconditioner of checkpoint {c} ({where.describe(ck.leverage.path)}): shape "
                f"{lev.shape}, the index has {store.n} rows"
            )
        yield (None if out else CheckpointCurvature(pre, lev)), out


def load(where: IndexDir, man: Manifest, store: FeatureStore, kind: str) -> list[CheckpointCurvature]:
    """The stored ``kind`` preconditioner of every checkpoint, checked; :class:`PreconditionError` names what is
    missing or does not match."""
    if kind not in man.curvature:
        raise PreconditionError(
            f"{where}: this index has no stored {NAMES.get(kind, kind)} preconditioner; make one with "
            f"{remake_hint(kind, where)}"
        )
    out = []
    for got, found in _checked(where, man, store, kind):
        if found or got is None:
            raise PreconditionError(found[0])
        out.append(got)
    return out


def problems(where: IndexDir, man: Manifest, store: FeatureStore) -> list[str]:
    """Every problem of every stored K-FAC / EK-FAC preconditioner, each named (``proponent verify``)."""
    return [p for kind in sorted(man.curvature) for _, found in _checked(where, man, store, kind) for p in found]


def describe(man: Manifest, kind: str, checkpoints: list[int]) -> list[str]:
    """The approximations an answer with this preconditioner lists."""
    rec = man.curvature[kind]
    lams = "; ".join(f"c{c}: " + ", ".join(f"{v:.3g}" for v in rec.checkpoints[c].lams) for c in checkpoints)
    what = {
        "kfac": "kronfluence's; Λ = e_S e_Aᵀ",
        "ekfac": "kronfluence's; Λ fitted to the rotated training gradients",
        "adam": "diagonal; Λ = the checkpoint's Adam second moments v̂",
    }[kind]
    out = [
        f"{NAMES[kind]} preconditioner per layer ({what}; α={rec.alpha:g}, λ_l = α·mean Λ_l: {lams}) "
        "applied to the query's exact gradient"
    ]
    return out
