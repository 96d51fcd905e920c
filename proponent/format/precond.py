"""TRAK's Gram preconditioner over an index's stored features: made once, applied to queries only.

Per checkpoint c, with Φ_c the stored feature rows (dequantised exactly as the scan reads them),

    C_c = Φ_cᵀ Φ_c (float64; at most D² floats in memory: see :func:`_eigenpairs`),
    λ_c = α · tr(C_c) / D (α times the mean eigenvalue),
    P_c = (C_c + λ_c I)⁻¹ = V diag(1/(Λ + λ_c)) Vᵀ + (I − V Vᵀ) / λ_c,

with (Λ, V) the nonzero eigenpairs of C_c -- all of them when there are at most ``rank``, else the top
``rank`` and the rest taken as 0 (``truncated``: an approximation every answer lists). Stored with
them: every row's leverage ℓ_c(i) = f_iᵀ P_c f_i (the preconditioned self-influence, and the row
norm of preconditioned cosine scores).

Files: ``precond/<tag>/ckpt_{c:03d}/{vectors,values,leverage}.npy`` (float64), each hashed in the
manifest's :class:`~proponent.format.manifest.PreconditionRecord` with the settings and a fingerprint
of the features it was computed from (the crc32c of every chunk of the checkpoint's features and
scales). They are written first, under a fresh ``<tag>``, and the manifest last: an interrupted
run leaves the index as it was. Not inside ``store.zarr``: the store's position map and metadata
hashes list exactly the index job's arrays.
"""

from __future__ import annotations

import hashlib
import io
import secrets
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .fsio import IndexDir, sha256_bytes
from .manifest import FileRecord, Manifest, PreconditionCheckpoint, PreconditionRecord, write_manifest
from .store import FeatureStore, ckpt_group

PRECOND_DIR = "precond"
#: α of λ_c = α · mean eigenvalue: the best of the sweep in benchmarks/results/lds_precondition_gram.txt
DEFAULT_ALPHA = 1000.0
DEFAULT_RANK = 2048
_NONZERO = 1e-12  # eigenvalues below this fraction of the largest are zero (roundoff of a rank-deficient Gram)


class PreconditionError(ValueError):
    """No preconditioner, or one that does not match the index: the message names it."""


def features_fingerprint(store: FeatureStore, c: int) -> str:
    """sha256 of the crc32c of every chunk of checkpoint ``c``'s features (and int8 scales), in order."""
    h = hashlib.sha256()
    names = [f"{ckpt_group(c)}/features"] + ([f"{ckpt_group(c)}/scale"] if store.dtype == np.int8 else [])
    for name in names:
        keys = [store.chunk_key(name, idx) for idx in store.chunk_indices(name)]
        for tail in store.where.read_tails(keys, 4):
            h.update(tail)
    return h.hexdigest()


def _rows(store: FeatureStore, c: int):
    """``(first row, float64 rows)`` per chunk: stored values times their scale, as the scan's exact rows."""
    for k in range(store.layout.n_chunks):
        lo, hi = store.layout.chunk_range(k)
        yield lo, store.feature_rows(c, np.arange(lo, hi))


def _eigenpairs(store: FeatureStore, c: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Eigenvalues (descending), eigenvectors ``[D, ·]`` and trace of C_c = Φ_cᵀΦ_c, float64.

    N ≥ D: C_c accumulated over the row chunks (D² floats) and eigendecomposed. N < D: Φ_c itself is
    then smaller than C_c, so it is held and K = Φ_cΦ_cᵀ = U Λ Uᵀ (N x N) eigendecomposed instead, with
    V = Φ_cᵀ U Λ^(-1/2) (the same nonzero eigenpairs, O(N²D) rather than O(D³))."""
    n, dim = store.n, store.dim
    if n >= dim:
        gram = np.zeros((dim, dim))
        for _, f in _rows(store, c):
            gram += f.T @ f
        eig, vec = np.linalg.eigh(gram)
        trace = float(np.trace(gram))
        del gram
    else:
        phi = np.empty((n, dim))
        for lo, f in _rows(store, c):
            phi[lo : lo + len(f)] = f
        k = phi @ phi.T
        trace = float(np.trace(k))
        eig, u = np.linalg.eigh(k)
        del k
        pos = eig > _NONZERO * max(float(eig.max()), 0.0) if n else np.zeros(0, bool)
        eig, u = eig[pos], u[:, pos]
        vec = (phi.T @ u) / np.sqrt(eig)
    order = np.argsort(eig)[::-1]
    return eig[order], vec[:, order], trace


def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


@dataclass
class CheckpointPreconditioner:
    vectors: np.ndarray  # [D, r] orthonormal eigenvectors
    values: np.ndarray  # [r] eigenvalues (descending)
    leverage: np.ndarray  # [N] f_iᵀ P f_i
    lam: float

    def apply(self, q: np.ndarray) -> np.ndarray:
        """``P q`` for ``q [D]`` or ``[m, D]`` (float64)."""
        q = np.asarray(q, np.float64)
        coef = q @ self.vectors
        return (coef * (1 / (self.values + self.lam) - 1 / self.lam)) @ self.vectors.T + q / self.lam

    def quad(self, q: np.ndarray) -> float:
        """``qᵀ P q``."""
        return self.apply_quad(q)[1]

    def apply_quad(self, q: np.ndarray) -> tuple[np.ndarray, float]:
        """``(P q, qᵀ P q)`` of one ``q [D]`` with one pass over the eigenvectors for both."""
        q = np.asarray(q, np.float64)
        coef = q @ self.vectors
        delta = coef * (1 / (self.values + self.lam) - 1 / self.lam)  # P = I/λ + V diag(1/(Λ+λ) − 1/λ) Vᵀ
        return delta @ self.vectors.T + q / self.lam, float(q @ q) / self.lam + float(delta @ coef)


def compute(
    where: IndexDir, man: Manifest, store: FeatureStore, *, alpha: float = DEFAULT_ALPHA, rank: int = DEFAULT_RANK
) -> Manifest:
    """Make and store the Gram preconditioner of every checkpoint; returns the manifest as written."""
    if not man.complete:
        raise PreconditionError(f"{where}: index is incomplete (finish the index job first)")
    if not alpha > 0:
        raise PreconditionError(f"alpha must be > 0, got {alpha}")
    if rank < 1:
        raise PreconditionError(f"rank must be >= 1, got {rank}")
    t0 = time.perf_counter()
    tag = f"gram-{secrets.token_hex(4)}"
    dim = store.dim
    records = []
    for c in range(len(man.checkpoints)):
        eig, vec, trace = _eigenpairs(store, c)
        lam = alpha * trace / dim if trace > 0 else alpha
        nonzero = int((eig > _NONZERO * max(float(eig[0]), 0.0)).sum()) if trace > 0 and len(eig) else 0
        keep = min(nonzero, rank)
        values, vectors = np.ascontiguousarray(eig[:keep]), np.ascontiguousarray(vec[:, :keep])
        del vec
        # ℓ = ||f||²/λ + Σ_j (fᵀv_j)² (1/(Λ_j+λ) − 1/λ): the eigenvectors enter weighted by Λ_j/λ², so the
        # roundoff of those with small Λ_j (the N-dimensional route's) does not reach the leverage
        leverage = np.empty(store.n)
        for lo, f in _rows(store, c):
            coef = f @ vectors
            leverage[lo : lo + len(f)] = (f * f).sum(1) / lam + (coef**2 * (1 / (values + lam) - 1 / lam)).sum(1)
        files = {}
        for name, arr in (("vectors", vectors), ("values", values), ("leverage", leverage)):
            rel = f"{PRECOND_DIR}/{tag}/{ckpt_group(c)}/{name}.npy"
            data = npy(arr)
            where.write_bytes(rel, data)
            files[name] = FileRecord(path=rel, sha256=sha256_bytes(data))
        records.append(
            PreconditionCheckpoint(
                lam=lam,
                trace=trace,
                rank=keep,
                nonzero=nonzero,
                truncated=nonzero > keep,
                fingerprint=features_fingerprint(store, c),
                **files,
            )
        )
    old = man.precondition
    record = PreconditionRecord(
        kind="gram", alpha=alpha, max_rank=rank, seconds=time.perf_counter() - t0, checkpoints=records
    )
    written = write_manifest(where, man.model_copy(update={"precondition": record}))
    if old is not None:  # the manifest no longer names them: remove their directories
        for d in sorted({"/".join(f.path.split("/")[:2]) for ck in old.checkpoints for f in (ck.vectors,)}):
            if d.startswith(f"{PRECOND_DIR}/") and d != f"{PRECOND_DIR}/{tag}":
                where.remove(d)
    return written


def load_array(where: IndexDir, f: FileRecord, remake: str = "`proponent precondition --index`") -> Any:
    """A stored ``.npy`` / ``.npz`` checked against its manifest sha256 (:class:`PreconditionError` names the
    file and ``remake``, the command that makes it again)."""
    name = where.describe(f.path)
    if not where.is_file(f.path):
        raise PreconditionError(f"preconditioner {name}: missing; remake it with {remake}")
    data = where.read_bytes(f.path)
    if sha256_bytes(data) != f.sha256:
        raise PreconditionError(
            f"preconditioner {name}: damaged (sha256 differs from the manifest); remake it with {remake}"
        )
    return np.load(io.BytesIO(data), allow_pickle=False)


def coverage_problem(where: IndexDir, man: Manifest, covered: int, what: str, remake: str) -> str:
    """A stored ``what`` that covers ``covered`` checkpoints where the index has others."""
    return (
        f"{where}: the {what} covers {covered} checkpoints, the index has {len(man.checkpoints)}; remake it with "
        f"{remake}"
    )


def fingerprint_problems(
    where: IndexDir, store: FeatureStore, c: int, fingerprint: str, path: str, what: str, remake: str
) -> list[str]:
    """``[problem]`` when checkpoint c's stored ``what`` (file ``path``) was made from other features than the index
    stores, else ``[]``."""
    if features_fingerprint(store, c) == fingerprint:
        return []
    return [
        f"{what} of checkpoint {c} ({where.describe(path)}): made from other features than the index stores; "
        f"remake it with {remake}"
    ]


def _checked(where: IndexDir, man: Manifest, store: FeatureStore):
    """Per checkpoint ``(arrays by name, problems)`` of the stored preconditioner, or one ``(None, [problem])``
    when the record does not cover the index's checkpoints: what :func:`load` and :func:`problems` refuse."""
    rec = man.precondition
    assert rec is not None
    remake = f"`proponent precondition --index {where}`"
    if len(rec.checkpoints) != len(man.checkpoints):
        yield None, [coverage_problem(where, man, len(rec.checkpoints), "preconditioner", remake)]
        return
    for c, ck in enumerate(rec.checkpoints):
        out = fingerprint_problems(where, store, c, ck.fingerprint, ck.vectors.path, "preconditioner", remake)
        shapes = {"vectors": (store.dim, ck.rank), "values": (ck.rank,), "leverage": (store.n,)}
        arrays = {}
        for name, f in (("vectors", ck.vectors), ("values", ck.values), ("leverage", ck.leverage)):
            try:
                arrays[name] = load_array(where, f)
            except PreconditionError as e:
                out.append(str(e))
                continue
            if arrays[name].shape != shapes[name]:
                out.append(
                    f"preconditioner of checkpoint {c} ({where.describe(f.path)}): shape {arrays[name].shape}, "
                    f"the manifest's record needs {shapes[name]}"
                )
        yield arrays, out


def load(where: IndexDir, man: Manifest, store: FeatureStore) -> list[CheckpointPreconditioner]:
    """The stored preconditioner of every checkpoint, checked against its hashes and the features it was made
    from; :class:`PreconditionError` names what is missing or does not match."""
    rec = man.precondition
    if rec is None:
        raise PreconditionError(
            f"{where}: this index has no stored preconditioner; make one with `proponent precondition --index {where}`"
        )
    out = []
    for c, (arrays, found) in enumerate(_checked(where, man, store)):
        if found or arrays is None:
            raise PreconditionError(found[0])
        out.append(
            CheckpointPreconditioner(arrays["vectors"], arrays["values"], arrays["leverage"], rec.checkpoints[c].lam)
        )
    return out


def problems(where: IndexDir, man: Manifest, store: FeatureStore) -> list[str]:
    """Every problem of the stored preconditioner, each named (none stored: none): a file missing or damaged,
    an array of the wrong shape, made from other features than the index stores -- all that :func:`load`
    refuses, listed rather than the first raised (``proponent verify``)."""
    if man.precondition is None:
        return []
    return [p for _, found in _checked(where, man, store) for p in found]


def describe(rec: PreconditionRecord, checkpoints: list[int]) -> list[str]:
    """The approximations an answer with this preconditioner lists."""
    lams = ", ".join(f"{rec.checkpoints[c].lam:.4g}" for c in checkpoints)
    ranks = ", ".join(str(rec.checkpoints[c].rank) for c in checkpoints)
    out = [f"Gram preconditioner (α={rec.alpha:g}, λ_c={lams}, rank {ranks})"]
    cut = [c for c in checkpoints if rec.checkpoints[c].truncated]
    if cut:
        detail = ", ".join(f"{rec.checkpoints[c].rank} of {rec.checkpoints[c].nonzero}" for c in cut)
        out.append(
            f"Gram preconditioner truncated to its top eigenpairs at checkpoints {cut} ({detail}): the other "
            "directions are taken as eigenvalue 0"
        )
    return out
