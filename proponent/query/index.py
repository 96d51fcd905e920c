"""Open a built index and answer influence questions from it.

:func:`open_index` verifies the index (manifest, checkpoint hashes, Zarr shapes,
FAISS files) and returns an :class:`InfluenceIndex`, which featurizes queries with
the same code as the index job, scores them against the stored features (exact,
certified search over the per-checkpoint FAISS indexes) and gives self-influence.

Query noise: the m draws ξ' of query row r at checkpoint c come from the key
``(NOISE_QUERY, query_seed, c, r)`` -- independent of every training sample's
draws (paper eq. 10), and reproducible from the seed returned with the answer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import torch
from torch import nn

from proponent.build.job import MANIFEST_VERSION, resolve_device
from proponent.format import ann
from proponent.format.fsio import read_json, sha256_file
from proponent.format.store import FeatureStore, StoreError, ckpt_group
from proponent.model.architectures import ModelConfig
from proponent.model.checkpoints import CheckpointSpec, load_checkpoint
from proponent.model.featurizers import make_featurizer
from proponent.model.objectives import NOISE_QUERY, Objective, draw_noise, objective_from_spec
from proponent.model.projection import ProjectionSpec, Projector, build_projector
from proponent.query.search import ArrayRows, TopK, certified_topk, exact_scores, prefiltered_topk, scan_topk

Direction = Literal["proponents", "opponents"]
Strategy = Literal["auto", "scan", "threshold"]
Convention = Literal["lr", "visits"]


class IndexError_(RuntimeError):
    """The index cannot be served: names what is wrong."""


def verify_index(path: str | Path, *, check_hashes: bool = True) -> list[str]:
    """Everything the server checks before serving; returns a list of problems (empty = sound)."""
    path = Path(path)
    problems: list[str] = []
    mpath = path / "manifest.json"
    if not mpath.is_file():
        return [f"{mpath}: manifest missing (not an index directory?)"]
    try:
        man = read_json(mpath)
    except ValueError as e:
        return [str(e)]
    if man.get("format") != "proponent-index":
        return [f"{mpath}: not a proponent index manifest"]
    if man.get("version") != MANIFEST_VERSION:
        return [f"{mpath}: manifest version {man.get('version')}, this proponent reads version {MANIFEST_VERSION}"]
    if not man.get("complete"):
        problems.append(f"{path}: index is incomplete (the index job did not finish; run it again to resume)")
    n, dim, dt = man["n"], man["projection"]["dim"], man["dtype"]
    for c, ck in enumerate(man["checkpoints"]):
        p = path / ck["path"]
        if not p.is_file():
            problems.append(f"checkpoint {c}: {p} missing")
        elif check_hashes and sha256_file(p) != ck["sha256"]:
            problems.append(f"checkpoint {c}: {p} sha256 differs from the manifest (file changed or corrupt)")
    try:
        store = FeatureStore.open(path / "store.zarr")
    except StoreError as e:
        return [*problems, str(e)]
    if store.n != n or store.dim != dim or store.n_checkpoints != len(man["checkpoints"]):
        problems.append(
            f"store.zarr: holds N={store.n}, D={store.dim}, C={store.n_checkpoints}; manifest says "
            f"N={n}, D={dim}, C={len(man['checkpoints'])}"
        )
        return problems
    expected: dict[str, tuple[tuple[int, ...], str]] = {"ids": ((n,), "int64"), "labels": ((n,), "int64")}
    for c in range(store.n_checkpoints):
        g = ckpt_group(c)
        expected[f"{g}/features"] = ((n, dim), dt)
        expected[f"{g}/sq_norm"] = ((n,), "float64")
        expected[f"{g}/loss"] = ((n,), "float32")
    for name, (shape, dtype) in expected.items():
        try:
            got_shape, got_dtype = store.array_meta(name)
        except KeyError:
            problems.append(f"store.zarr: array {name} missing")
            continue
        if got_shape != shape or got_dtype != np.dtype(dtype):
            problems.append(f"store.zarr: {name} is {got_shape} {got_dtype}, expected {shape} {dtype}")
    for c in range(store.n_checkpoints):
        if not store.done_mask(c).all():
            missing = int((~store.done_mask(c)).sum())
            problems.append(f"store.zarr: checkpoint {c} has {missing} unfinished row chunks")
    files = man.get("index", {}).get("files", [])
    if man.get("complete") and len(files) != len(man["checkpoints"]):
        problems.append(f"manifest lists {len(files)} FAISS files for {len(man['checkpoints'])} checkpoints")
    for c, f in enumerate(files):
        fp = path / f["path"]
        if not fp.is_file():
            problems.append(f"checkpoint {c}: FAISS index {fp} missing")
            continue
        if check_hashes and sha256_file(fp) != f["sha256"]:
            problems.append(f"checkpoint {c}: FAISS index {fp} sha256 differs from the manifest")
            continue
        try:
            idx = ann.read(fp)
        except ann.IndexSpecError as e:
            problems.append(str(e))
            continue
        if idx.d != dim or idx.ntotal != n:
            problems.append(
                f"checkpoint {c}: FAISS index has d={idx.d}, ntotal={idx.ntotal}; expected d={dim}, ntotal={n}"
            )
    return problems


def _flat_vectors(index: faiss.IndexFlat) -> np.ndarray:
    """The vectors a flat FAISS index holds, as a numpy view (no second copy in memory)."""
    return faiss.rev_swig_ptr(index.get_xb(), index.ntotal * index.d).reshape(index.ntotal, index.d)


class _FaissSearcher:
    def __init__(self, index: faiss.Index):
        self.index = index
        self.lock = threading.Lock()  # GPU indexes are not thread-safe

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self.lock:
            d, i = self.index.search(np.ascontiguousarray(q[None, :], dtype=np.float32), k)
        return d[0].astype(np.float64), i[0].astype(np.int64)


def _max_row_norm(x: np.ndarray, block: int = 4096) -> float:
    """Largest row norm, accumulated in float64 block by block (no full float64 copy)."""
    best = 0.0
    for i in range(0, len(x), block):
        b = x[i : i + block].astype(np.float64)
        best = max(best, float(np.einsum("ij,ij->i", b, b).max(initial=0.0)))
    return float(np.sqrt(best))


@dataclass
class InfluenceResult:
    rows: np.ndarray  # row indices into the store
    ids: np.ndarray  # sample ids
    scores: np.ndarray
    contributions: np.ndarray  # [k, C_active]
    checkpoints: list[int]
    exact: bool
    search: TopK | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class InfluenceIndex:
    def __init__(self, path: str | Path, device: str = "auto", use_gpu_faiss: bool = True, verify: bool = True):
        self.path = Path(path)
        if verify:
            problems = verify_index(self.path)
            if problems:
                raise IndexError_(f"{self.path}: index cannot be served: " + "; ".join(problems))
        self.manifest: dict[str, Any] = read_json(self.path / "manifest.json")
        man = self.manifest
        self.store = FeatureStore.open(self.path / "store.zarr")
        self.n: int = man["n"]
        self.dim: int = man["projection"]["dim"]
        self.shape = tuple(man["dataset"]["shape"])
        self.checkpoints = [CheckpointSpec.from_dict(c) for c in man["checkpoints"]]
        self.model_config = ModelConfig.from_dict(man["model_config"])
        self.objective: Objective = objective_from_spec(man["objective"])
        self.device = resolve_device(device)
        self.exact_indexes = bool(man["index"]["exact"])
        self.ids = self.store.array("ids")
        self.labels = self.store.array("labels")
        self.origin = self.store.array("origin")
        self.source_row = self.store.array("source_row")
        self.injected = self.store.array("injected")
        self._row_of_id = {int(i): r for r, i in enumerate(self.ids)}
        # encoder means at the final checkpoint, [N, L] (None for classifiers): pre-filter, sample metadata
        self.latent_mu = self.store.array("latent_mu").astype(np.float32) if self.store.latent_dim else None
        self._models: dict[int, nn.Module] = {}
        self._projectors: dict[int, Projector] = {}
        self._lock = threading.Lock()
        # Featurization uses the shared models (hooks, torch.func parameter swaps): one at a time.
        self.featurize_lock = threading.RLock()
        self.cpu_indexes = [ann.read(self.path / f["path"]) for f in man["index"]["files"]]
        self.sources = [
            ArrayRows(_flat_vectors(idx) if isinstance(idx, faiss.IndexFlat) else self.store.features(c))
            for c, idx in enumerate(self.cpu_indexes)
        ]
        self.searchers = [_FaissSearcher(ann.to_gpu(i) if use_gpu_faiss else i) for i in self.cpu_indexes]
        self.faiss_on_gpu = use_gpu_faiss and ann.gpu_available()
        self.max_row_norms = [_max_row_norm(s.all()) for s in self.sources]
        for c in range(len(self.checkpoints)):  # load models and projections now, not on the first query
            self.model(c)
        # On a GPU the fused scan reads features from GPU memory (a copy, when it fits in half of it).
        self._gpu_features: dict[int, torch.Tensor] = {}
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            need = sum(s.all().nbytes for s in self.sources)
            if need < free // 2:
                self._gpu_features = {c: torch.from_numpy(s.all()).to(self.device) for c, s in enumerate(self.sources)}

    # ------------------------------------------------------------------ metadata
    def row_of(self, sample_id: int) -> int:
        try:
            return self._row_of_id[int(sample_id)]
        except KeyError:
            raise KeyError(
                f"sample id {sample_id} is not in the index (ids {self.ids.min()}..{self.ids.max()})"
            ) from None

    def approximations(self, checkpoints: list[int] | None = None, prefilter: int | None = None) -> list[str]:
        """What separates answers from exact VAE-TracIn over all parameters and checkpoints."""
        out = []
        proj = self.manifest["projection"]
        if any(l["projected_in"] or l["projected_out"] for l in proj["layers"]):
            out.append(
                f"random projection: kron k={proj['k']} (D={self.dim}), unbiased estimate of gradient inner products"
            )
        if self.manifest["layers"] != "all":
            out.append(f"layer subset: {self.manifest['layers']}")
        if self.manifest["dtype"] != "float32":
            out.append(f"features stored as {self.manifest['dtype']}")
        cks = self.resolve_checkpoints(checkpoints)
        if len(cks) < len(self.checkpoints):
            out.append(f"checkpoint subset: {cks} of {len(self.checkpoints)}")
        if not self.exact_indexes:
            out.append(f"approximate nearest-neighbour index: {self.manifest['index']['kind']}")
        if prefilter:
            out.append(f"latent pre-filter: only the {prefilter} training samples nearest in latent space")
        return out

    def weights(self, convention: Convention = "lr") -> np.ndarray:
        return np.array([c.weight(convention, self.n) for c in self.checkpoints], dtype=np.float64)

    def resolve_checkpoints(self, checkpoints: list[int] | None) -> list[int]:
        if checkpoints is None:
            return list(range(len(self.checkpoints)))
        bad = [c for c in checkpoints if not 0 <= c < len(self.checkpoints)]
        if bad:
            raise ValueError(f"unknown checkpoint(s) {bad}; the index has checkpoints 0..{len(self.checkpoints) - 1}")
        if not checkpoints:
            raise ValueError("checkpoint subset is empty")
        return sorted(set(checkpoints))

    # ------------------------------------------------------------------ models and featurization
    def model(self, c: int) -> nn.Module:
        with self._lock:
            if c not in self._models:
                m, _, _ = load_checkpoint(self.path / self.checkpoints[c].path, self.model_config)
                self._models[c] = m.to(self.device)
                spec = self.manifest["projection"]
                self._projectors[c] = build_projector(
                    m, self.manifest["layers"], ProjectionSpec(spec["kind"], spec["k"], spec["seed"]), self.device
                )
                if self._projectors[c].dim != self.dim:
                    raise IndexError_(
                        f"projection rebuilt with dim {self._projectors[c].dim}, manifest says {self.dim}"
                    )
            return self._models[c]

    def featurize(
        self,
        x: np.ndarray,
        *,
        objective: Objective | None = None,
        seed: int = 0,
        labels: np.ndarray | None = None,
        checkpoints: list[int] | None = None,
    ) -> dict[int, np.ndarray]:
        """Query features ``{checkpoint: [B, D]}`` of images ``x [B, *shape]``."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape[1:] != self.shape:
            raise ValueError(f"query shape {x.shape[1:]} does not match the index's input shape {self.shape}")
        obj = objective or self.objective
        xt = torch.from_numpy(x)
        yt = torch.from_numpy(np.zeros(len(x), np.int64) if labels is None else np.asarray(labels, np.int64))
        out = {}
        with self.featurize_lock:
            for c in self.resolve_checkpoints(checkpoints):
                model = self.model(c)
                obj_c = (
                    obj.objective_for(c) if hasattr(obj, "objective_for") else obj
                )  # per-checkpoint (crossloss probe)
                feat = make_featurizer(self.manifest["featurizer"], model, obj_c, self._projectors[c])
                eps = draw_noise(NOISE_QUERY, seed, c, np.arange(len(x)), obj_c.m, obj_c.noise_shape(model))
                out[c] = feat.featurize(xt, yt, eps).features.cpu().numpy()
        return out

    def latent_means(self, x: np.ndarray) -> np.ndarray:
        """Encoder means ``[B, L]`` of images at the final checkpoint (as stored in ``latent_mu``)."""
        model = self.model(len(self.checkpoints) - 1)
        with self.featurize_lock, torch.no_grad():
            mu, _ = model.encode(torch.from_numpy(np.asarray(x, np.float32)).to(self.device))  # type: ignore[operator]
        return mu.cpu().numpy()

    def latent_neighbours(self, mu: np.ndarray, size: int) -> np.ndarray:
        """Rows of the ``size`` training samples nearest to ``mu`` in latent space (the paper's
        §6 pre-filter: proponents and opponents tend to be similar samples)."""
        if size < 1:
            raise ValueError(f"prefilter size must be >= 1, got {size}")
        if self.latent_mu is None:
            raise ValueError("this index stores no latent means (not a VAE): no latent pre-filter")
        d = ((self.latent_mu - np.asarray(mu, np.float32)[None, :]) ** 2).sum(axis=1)
        size = min(size, self.n)
        return np.argpartition(d, size - 1)[:size] if size < self.n else np.arange(self.n)

    def stored_features(self, row: int, checkpoints: list[int] | None = None) -> dict[int, np.ndarray]:
        return {c: self.sources[c].rows(np.array([row]))[0] for c in self.resolve_checkpoints(checkpoints)}

    # ------------------------------------------------------------------ scoring
    def _weighted(
        self, q: dict[int, np.ndarray], convention: Convention, checkpoints: list[int] | None
    ) -> tuple[list[int], list[np.ndarray]]:
        cks = self.resolve_checkpoints(checkpoints)
        w = self.weights(convention)
        missing = [c for c in cks if c not in q]
        if missing:
            raise ValueError(f"query features lack checkpoints {missing}")
        return cks, [(w[c] * np.asarray(q[c], dtype=np.float64)).astype(np.float32) for c in cks]

    def scores(
        self, q: dict[int, np.ndarray], convention: Convention = "lr", checkpoints: list[int] | None = None
    ) -> np.ndarray:
        """Brute-force scores of every training row ``[N]`` (float64)."""
        cks, qs = self._weighted(q, convention, checkpoints)
        return exact_scores(qs, [self.sources[c].all() for c in cks]).sum(axis=1)

    def top(
        self,
        q: dict[int, np.ndarray],
        k: int = 10,
        direction: Direction = "proponents",
        convention: Convention = "lr",
        checkpoints: list[int] | None = None,
        strategy: Strategy = "auto",
        candidates: np.ndarray | None = None,
    ) -> InfluenceResult:
        """Top-k proponents (largest scores) or opponents (most negative).

        ``candidates`` (row indices, e.g. from :meth:`latent_neighbours`) restricts the answer to
        those rows, scored exactly; the answer is then approximate (``exact`` false).

        ``auto``: one fused exact scan over flat indexes (the fastest exact answer); the
        threshold algorithm over the per-checkpoint indexes otherwise (approximate for
        IVF/HNSW). ``threshold`` forces the certified threshold algorithm.
        """
        if direction not in ("proponents", "opponents"):
            raise ValueError(f"direction must be proponents or opponents, got {direction!r}")
        if strategy not in ("auto", "scan", "threshold"):
            raise ValueError(f"strategy must be auto, scan or threshold, got {strategy!r}")
        cks, qs = self._weighted(q, convention, checkpoints)
        sign = 1.0 if direction == "proponents" else -1.0
        qs = [sign * v for v in qs]
        if candidates is not None:
            res = prefiltered_topk(qs, [self.sources[c] for c in cks], np.asarray(candidates, np.int64), k)
        elif strategy == "scan" or (strategy == "auto" and self.exact_indexes):
            res = scan_topk(
                qs,
                [self.sources[c] for c in cks],
                k,
                [self.max_row_norms[c] for c in cks],
                partial_scores=self._gpu_scan(cks) if self._gpu_features else None,
            )
        else:
            res = certified_topk(
                qs,
                [self.searchers[c] for c in cks],
                [self.sources[c] for c in cks],
                self.n,
                k,
                exact_indexes=self.exact_indexes,
                max_row_norms=[self.max_row_norms[c] for c in cks],
            )
        return InfluenceResult(
            rows=res.ids,
            ids=self.ids[res.ids],
            scores=sign * res.scores,
            contributions=sign * res.contributions,
            checkpoints=cks,
            exact=res.exact,
            search=res,
        )

    def _gpu_scan(self, cks: list[int]) -> Any:
        def partial(queries: list[np.ndarray]) -> np.ndarray:
            acc = None
            for c, q in zip(cks, queries):
                v = self._gpu_features[c] @ torch.from_numpy(np.ascontiguousarray(q, np.float32)).to(self.device)
                acc = v if acc is None else acc + v
            assert acc is not None
            return acc.cpu().numpy()

        return partial

    def influence(
        self,
        x: np.ndarray,
        k: int = 10,
        direction: Direction = "proponents",
        convention: Convention = "lr",
        checkpoints: list[int] | None = None,
        seed: int = 0,
    ) -> InfluenceResult:
        """Proponents or opponents of one image ``x [*shape]``."""
        q = self.featurize(np.asarray(x)[None], seed=seed, checkpoints=checkpoints)
        return self.top({c: v[0] for c, v in q.items()}, k, direction, convention, checkpoints)

    def proponents(self, x: np.ndarray, k: int = 10, **kw: Any) -> InfluenceResult:
        return self.influence(x, k, "proponents", **kw)

    def opponents(self, x: np.ndarray, k: int = 10, **kw: Any) -> InfluenceResult:
        return self.influence(x, k, "opponents", **kw)

    def self_influence(self, convention: Convention = "lr", checkpoints: list[int] | None = None) -> np.ndarray:
        """Σ_c w_c ||g_c(x_i)||² from the exact (unprojected) norms, ``[N]``."""
        w = self.weights(convention)
        return sum(w[c] * self.store.sq_norm(c) for c in self.resolve_checkpoints(checkpoints))  # type: ignore[return-value]

    def losses(self, c: int | None = None) -> np.ndarray:
        return self.store.loss(len(self.checkpoints) - 1 if c is None else c)

    def image(self, row: int) -> np.ndarray:
        """The stored training image of a row, float32 in [0, 1], shape ``self.shape``."""
        return self.store.images(np.array([row]))[0]


def open_index(path: str | Path, device: str = "auto", use_gpu_faiss: bool = True) -> InfluenceIndex:
    return InfluenceIndex(path, device=device, use_gpu_faiss=use_gpu_faiss)
