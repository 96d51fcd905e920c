"""``proponent precondition --kind kfac|ekfac|adam``: the passes over the training set that make a K-FAC / EK-FAC
(or Adam) preconditioner (:mod:`proponent.format.curvature` describes it and stores it; :mod:`proponent.model.curvature`
captures the layers' ``(a, δ)``)."""

from __future__ import annotations

import io
import secrets
import time
from collections.abc import Callable

import numpy as np
import torch

from proponent.format.curvature import (
    DEFAULT_ALPHA,
    KINDS,
    NORM_TOLERANCE,
    KfacLayer,
    eigenbases,
    kfac_eigenvalues,
    rotate,
)
from proponent.format.fsio import IndexDir, sha256_bytes
from proponent.format.manifest import CurvatureCheckpoint, CurvatureRecord, FileRecord, Manifest, write_manifest
from proponent.format.precond import PRECOND_DIR, PreconditionError, features_fingerprint, npy
from proponent.format.store import FeatureStore, ckpt_group
from proponent.model.checkpoints import OPTIMIZER_KEYS, CheckpointError, adam_second_moments, read_checkpoint
from proponent.model.curvature import FactorSums, LayerGradients, double_model
from proponent.model.objectives import NOISE_INDEX, draw_noise, objective_at
from proponent.model.runtime import ModelRuntime

_BATCH = 64


def adam_eigenvalues(where: IndexDir, man: Manifest, c: int, model, layers) -> list[np.ndarray]:
    """Adam's bias-corrected second moments of each layer's weight and bias at checkpoint c, laid out as the layer's
    ``G [out, in]`` (bias column last), from the optimizer state inside the index's copy of the checkpoint file;
    :class:`PreconditionError` when it carries none (or not an Adam one)."""
    ck = man.checkpoints[c]
    name = f"checkpoint {c} ({ck.name or ck.path}, stored as {where.describe(ck.path)})"
    return adam_layer_moments(adam_moments(where.read_bytes(ck.path), name, model), layers)


def adam_moments(data: bytes, name: str, model) -> dict[str, torch.Tensor]:
    """Adam's ``v̂`` per named parameter from a checkpoint file's bytes ``data`` (``name`` names it in errors);
    :class:`PreconditionError` when the file carries no Adam state."""
    try:
        v = adam_second_moments(read_checkpoint(data, name), model, name)
    except CheckpointError as e:
        raise PreconditionError(str(e)) from None
    if v is None:
        raise PreconditionError(
            f"{name}: the checkpoint carries no optimizer state (looked for {', '.join(OPTIMIZER_KEYS)}), so there "
            "are no Adam second moments to precondition with; save the optimizer's state_dict in the checkpoints "
            "(proponent train does) or use --kind kfac|ekfac"
        )
    return v


def adam_layer_moments(v: dict[str, torch.Tensor], layers, separate_bias: bool = False) -> list[np.ndarray]:
    """:func:`adam_moments`'s ``v̂`` per layer as ``[out, in]`` (bias column last); a layer with a separate bias
    block (ConvTranspose2d) is refused unless ``separate_bias`` (then its weight's only: see
    :func:`adam_bias_moments`)."""
    out = []
    for lay in layers:
        if lay.bias_dim and not separate_bias:
            raise PreconditionError(f"layer {lay.name}: a separate bias block ({lay.kind}) is not covered by adam")
        w = v[lay.params[0]].reshape(lay.out_dim, -1)
        if lay.bias_column:
            w = torch.cat([w, v[lay.params[1]].reshape(lay.out_dim, 1)], dim=1)
        out.append(w.numpy().astype(np.float64))
    return out


def adam_bias_moments(v: dict[str, torch.Tensor], layers) -> list[np.ndarray | None]:
    """``v̂`` of every separate bias block ``[bias_dim]`` (None for the layers without one)."""
    return [v[lay.params[1]].reshape(-1).numpy().astype(np.float64) if lay.bias_dim else None for lay in layers]


def adam_flat_moments(v: dict[str, torch.Tensor], layers) -> list[np.ndarray]:
    """``v̂`` of each layer's parameters, flattened and concatenated in the layer's parameter order (the dense
    fallback's ``G [1, numel]`` of a layer of another kind)."""
    return [torch.cat([v[p].reshape(-1) for p in lay.params]).numpy().astype(np.float64) for lay in layers]


def _kronecker(kind: str, cap, passes, n: int, alpha: float) -> list[KfacLayer]:
    """K-FAC / EK-FAC: the factor pass, the eigenbases and Λ (EK-FAC: one more pass to refit it)."""
    sums = FactorSums.empty(cap.shapes)
    passes(lambda lo, hi, got, sums=sums: sums.add(got))
    bases = [eigenbases(a, s) for a, s in sums.factors()]
    if kind == "kfac":
        eigs = [kfac_eigenvalues(ea, es) for ea, _, es, _ in bases]
    else:
        acc = [np.zeros(shape) for shape in cap.shapes]

        def fit(lo: int, hi: int, got, acc=acc) -> None:
            for k, g in enumerate(cap.gradients(got, hi - lo, cap.shapes)):
                acc[k] += (rotate(g, bases[k][1], bases[k][3]) ** 2).sum(0)

        passes(fit)
        eigs = [a / n for a in acc]
    return [KfacLayer(qa, qs, e, alpha * float(e.mean())) for (_, qa, _, qs), e in zip(bases, eigs, strict=True)]


def compute(
    where: IndexDir,
    man: Manifest,
    store: FeatureStore,
    kind: str,
    *,
    alpha: float = DEFAULT_ALPHA,
    batch: int = _BATCH,
    log: Callable[[str], None] | None = None,
) -> Manifest:
    """Make and store the ``kind`` (kfac | ekfac | adam) preconditioner of every checkpoint; returns the manifest."""
    if kind not in KINDS:
        raise PreconditionError(f"unknown preconditioner kind {kind!r}; choose from gram, {', '.join(KINDS)}")
    if not man.complete:
        raise PreconditionError(f"{where}: index is incomplete (finish the index job first)")
    if man.whiten is not None:
        raise PreconditionError(
            f"{where}: the index is whitened by {man.whiten.kind} at index time (its stored features are already "
            "preconditioned); a query-time K-FAC / EK-FAC / Adam preconditioner applies to unwhitened indexes only"
        )
    if not alpha > 0:
        raise PreconditionError(f"alpha must be > 0, got {alpha}")
    t0 = time.perf_counter()
    rt = ModelRuntime(where, man, device="cpu")
    ids, labels = store.array("ids"), store.array("labels")
    tag = f"{kind}-{secrets.token_hex(4)}"
    records = []
    names: list[str] = []
    for c in range(len(man.checkpoints)):
        model64 = double_model(rt.model(c))
        layers = [b.info for b in rt.projector(c).blocks]
        names = [l.name for l in layers]
        cap = LayerGradients(model64, objective_at(rt.objective, c), layers)
        noise_shape = cap.feat.objective.noise_shape(model64)
        stored_sq = store.sq_norm(c).astype(np.float64)

        def passes(fn, c=c, cap=cap, noise_shape=noise_shape) -> None:
            for lo in range(0, store.n, batch):
                hi = min(store.n, lo + batch)
                x = torch.from_numpy(store.inputs(slice(lo, hi)))
                y = torch.from_numpy(np.clip(labels[lo:hi], 0, None))
                eps = draw_noise(NOISE_INDEX, man.objective.seed, c, ids[lo:hi], man.objective.m, noise_shape)
                fn(lo, hi, cap.capture(x, y, eps))

        if kind == "adam":  # the checkpoint's own second moments, in the parameter basis: no factor pass
            eigs = adam_eigenvalues(where, man, c, rt.model(c), layers)
            pre = [KfacLayer(None, None, e, alpha * float(e.mean())) for e in eigs]
        else:
            pre = _kronecker(kind, cap, passes, store.n, alpha)
        leverage = np.zeros(store.n)
        sq = np.zeros(store.n)

        def lev(lo: int, hi: int, got, pre=pre, cap=cap, leverage=leverage, sq=sq) -> None:
            for k, g in enumerate(cap.gradients(got, hi - lo, cap.shapes)):
                leverage[lo:hi] += pre[k].quad(g)
                sq[lo:hi] += (g * g).sum(axis=(1, 2))

        passes(lev)
        norm_error = float((np.abs(sq - stored_sq) / np.maximum(np.abs(stored_sq), 1e-300)).max()) if store.n else 0.0
        if norm_error > NORM_TOLERANCE:
            raise PreconditionError(
                f"checkpoint {c}: the exact gradients recomputed with the index's draws differ from its stored exact "
                f"norms by up to {norm_error:.3g} (relative; > {NORM_TOLERANCE:g}): the models, objective or draws "
                "are not the index's"
            )
        buf = io.BytesIO()
        arrays = {}
        for k, p in enumerate(pre):
            arrays[f"eig_{k}"] = p.eig
            if p.qa is not None and p.qs is not None:  # adam: the parameter basis, nothing to store
                arrays.update({f"qa_{k}": p.qa, f"qs_{k}": p.qs})
        np.savez(buf, allow_pickle=False, **arrays)
        files = {}
        for name, data in (("factors", buf.getvalue()), ("leverage", npy(leverage))):
            rel = f"{PRECOND_DIR}/{tag}/{ckpt_group(c)}/{name}.{'npz' if name == 'factors' else 'npy'}"
            where.write_bytes(rel, data)
            files[name] = FileRecord(path=rel, sha256=sha256_bytes(data))
        records.append(
            CurvatureCheckpoint(
                lams=[p.lam for p in pre],
                norm_error=norm_error,
                fingerprint=features_fingerprint(store, c),
                **files,
            )
        )
        if log:
            log(f"checkpoint {c}: {len(pre)} layers, exact norms within {norm_error:.2g} of the stored ones")
    record = CurvatureRecord(
        kind=kind,  # type: ignore[arg-type]
        alpha=alpha,
        layers=names,
        seconds=time.perf_counter() - t0,
        checkpoints=records,
    )
    old = man.curvature.get(kind)
    written = write_manifest(where, man.model_copy(update={"curvature": {**man.curvature, kind: record}}))
    if old is not None:  # the manifest no longer names them: remove their directories
        for d in sorted({"/".join(ck.factors.path.split("/")[:2]) for ck in old.checkpoints}):
            if d.startswith(f"{PRECOND_DIR}/") and d != f"{PRECOND_DIR}/{tag}":
                where.remove(d)
    return written
