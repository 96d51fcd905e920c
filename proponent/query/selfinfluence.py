"""Self-influence ranking of the training set (data cleaning, outlier search).

Self-influence of x is ``Σ_c w_c ||g_c(x)||²`` with the exact, unprojected
gradient norms recorded by the index job. :class:`SelfInfluenceJob` computes it
chunk by chunk, either from those stored norms (``m=None``: a read) or by
recomputing the gradients at every checkpoint with ``m`` fresh draws from
``seed`` (e.g. more draws than the index used, for a lower-variance ranking).
Progress is persisted after every chunk under ``state_dir``, so a job that is
interrupted (server restart, SIGKILL) resumes where it stopped and the result
is the same as an uninterrupted run.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proponent.api.registry import PRECONDITIONS
from proponent.format.fsio import atomic_write_bytes, atomic_write_json
from proponent.model.featurizers.dense import DenseFeaturizer
from proponent.model.objectives import draw_noise
from proponent.model.runtime import objective_from_record
from proponent.query.index import InfluenceIndex

NOISE_SELF = 2  # noise domain of recomputed self-influence draws
NOISE_SELF_PAIR = 3  # the independent second set of draws of the unbiased estimator


@dataclass
class SelfInfluenceParams:
    convention: str = "lr"
    checkpoints: list[int] | None = None
    m: int | None = None  # None: stored exact norms; int: recompute with m fresh draws
    seed: int = 0
    # "norm": ||ḡ||² of the m-draw average (the paper's code; biased up by tr(Var g)/m);
    # "unbiased": <ḡ, ḡ'> with two independent sets of m draws, unbiased for ||E g||²
    # (materialises per-sample gradients with the dense path: slower).
    estimator: str = "norm"
    # "gram": the leverage Σ_c w_c f_c(i)ᵀ P_c f_c(i) of the stored features under the stored Gram
    # preconditioner; "kfac" / "ekfac": Σ_c w_c g_c(i)ᵀ P_c g_c(i) of the exact gradients under the stored
    # K-FAC / EK-FAC one (a read, like m=None; m and estimator do not apply)
    precondition: str = "none"


class SelfInfluenceJob:
    """A resumable self-influence computation whose state lives in ``state_dir``."""

    def __init__(self, index: InfluenceIndex, params: SelfInfluenceParams, state_dir: str | Path):
        self.index = index
        self.params = params
        self.state_dir = Path(state_dir)
        self.cks = index.meta.resolve_checkpoints(params.checkpoints)
        if params.convention not in ("lr", "visits"):
            raise ValueError(f"weight convention must be 'lr' or 'visits', got {params.convention!r}")
        if params.m is not None and params.m < 1:
            raise ValueError(f"m must be >= 1, got {params.m}")
        if params.estimator not in ("norm", "unbiased"):
            raise ValueError(f"estimator must be 'norm' or 'unbiased', got {params.estimator!r}")
        if params.precondition not in PRECONDITIONS:
            raise ValueError(f"precondition must be one of {', '.join(PRECONDITIONS)}, got {params.precondition!r}")
        if params.precondition != "none":
            if params.m is not None or params.estimator != "norm":
                raise ValueError(
                    f"precondition={params.precondition}: the leverage under the stored preconditioner "
                    "(no m, no estimator)"
                )
            index.leverage(
                self.cks[0], params.precondition
            )  # refused now (named) when there is none or it does not match
        if params.estimator == "unbiased" and params.m is None:
            params.m = int(index.runtime.objective.m)  # the unbiased estimator always recomputes
        self.n_chunks = index.store.layout.n_chunks  # a step of the job: one feature chunk's rows

    @property
    def total_units(self) -> int:
        return len(self.cks) * self.n_chunks

    def _partial_path(self, c: int) -> Path:
        return self.state_dir / f"partial_{c:03d}.npy"

    def _progress_path(self) -> Path:
        return self.state_dir / "progress.json"

    def load_progress(self) -> dict[str, Any]:
        p = self._progress_path()
        return json.loads(p.read_text()) if p.exists() else {"done": {}}

    def units_done(self) -> int:
        return sum(len(v) for v in self.load_progress()["done"].values())

    def run(
        self,
        on_progress: Callable[[int, int], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        compute: Callable[[Callable[[], np.ndarray]], np.ndarray] | None = None,
    ) -> np.ndarray | None:
        """Run (or resume) to completion; returns ``[N]`` scores, or None if stopped early. ``compute``
        runs each chunk's gradient work (the server hands it to its query engine's worker, the one
        thread of the process that runs torch with every core; the default runs it here)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        idx, p = self.index, self.params
        w = idx.weights(p.convention)  # type: ignore[arg-type]
        prog = self.load_progress()
        done_units = self.units_done()
        for c in self.cks:
            done = set(prog["done"].get(str(c), []))
            part_path = self._partial_path(c)
            part = np.load(part_path) if part_path.exists() else np.zeros(idx.n, np.float64)
            feat = None
            if p.m is not None and len(done) < self.n_chunks:
                rt = idx.runtime
                obj = objective_from_record(rt.manifest.objective.model_copy(update={"m": p.m}), rt.manifest.model)
                feat = rt.featurizer(c, obj)
                dense = rt.featurizer(c, obj, method="dense")
                noise_shape = obj.noise_shape(rt.model(c))
            for k in range(self.n_chunks):
                if k in done:
                    continue
                if should_stop is not None and should_stop():
                    return None
                lo, hi = idx.store.layout.chunk_range(k)
                if p.precondition != "none":
                    part[lo:hi] = idx.leverage(c, p.precondition)[lo:hi]
                elif feat is None:
                    part[lo:hi] = idx.features.sq_norm[c][lo:hi]
                else:
                    assert p.m is not None
                    x = torch.from_numpy(idx.store.inputs(slice(lo, hi)))
                    y = torch.from_numpy(np.clip(idx.meta.labels[lo:hi], 0, None))
                    eps = draw_noise(NOISE_SELF, p.seed, c, idx.meta.ids[lo:hi], p.m, noise_shape)
                    eps2 = None
                    if p.estimator == "unbiased":
                        eps2 = draw_noise(NOISE_SELF_PAIR, p.seed, c, idx.meta.ids[lo:hi], p.m, noise_shape)

                    def chunk(feat=feat, dense=dense, x=x, y=y, eps=eps, eps2=eps2) -> np.ndarray:
                        with idx.runtime.featurize_lock:
                            if eps2 is not None:
                                assert isinstance(dense, DenseFeaturizer)
                                return _paired_inner_products(dense, x, y, eps, eps2)
                            return feat.featurize(x, y, eps).sq_norm.cpu().numpy()

                    part[lo:hi] = chunk() if compute is None else compute(chunk)
                buf = io.BytesIO()
                np.save(buf, part)
                atomic_write_bytes(part_path, buf.getvalue())
                done.add(k)
                prog["done"][str(c)] = sorted(done)
                atomic_write_json(self._progress_path(), prog)
                done_units += 1
                if on_progress:
                    on_progress(done_units, self.total_units)
        total = np.zeros(idx.n, np.float64)
        for c in self.cks:
            total += w[c] * np.load(self._partial_path(c))
        return total


def _paired_inner_products(
    dense: DenseFeaturizer, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, eps2: torch.Tensor
) -> np.ndarray:
    """<ḡ(ξ), ḡ(ξ')> per sample over the selected (unprojected) parameters, in float64."""
    dev = dense.device
    g1, _ = dense.per_sample_gradients(x.to(dev), y.to(dev), eps.to(dev))
    g2, _ = dense.per_sample_gradients(x.to(dev), y.to(dev), eps2.to(dev))
    out = torch.zeros(x.shape[0], dtype=torch.float64, device=dev)
    for name, a in g1.items():
        out += (a.reshape(a.shape[0], -1).double() * g2[name].reshape(a.shape[0], -1).double()).sum(dim=1)
    return out.cpu().numpy()


def ranking_rows(index: InfluenceIndex, scores: np.ndarray) -> list[dict[str, Any]]:
    """Rows sorted by decreasing self-influence (ties by id)."""
    meta = index.meta
    order = np.lexsort((meta.ids, -scores))
    loss = meta.losses()
    return [
        {
            "rank": r + 1,
            "self_influence": float(scores[i]),
            "loss": float(loss[i]),
            **meta.hit_meta(int(i)),
        }
        for r, i in enumerate(order)
    ]


CSV_FIELDS = ["rank", "id", "self_influence", "loss", "label", "source", "source_row", "injected"]


def rows_to_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r[k] is None else (repr(r[k]) if isinstance(r[k], float) else r[k])) for k in CSV_FIELDS})
    return buf.getvalue()


def params_dict(p: SelfInfluenceParams) -> dict[str, Any]:
    return asdict(p)
