"""Models and featurization of an index: one loaded model and projector per checkpoint.

:class:`ModelRuntime` is what turns inputs into the index's features, for queries and for
recomputing jobs, with exactly the code and settings the index job used: the models come from
the checkpoint copies inside the index (hash-checked), the projection is rebuilt from its seed
and checked against the manifest's record. Featurization shares the models (hooks, torch.func
parameter swaps), so it runs under one lock.

Query noise: the m draws ξ' of query row r at checkpoint c come from the key
``(NOISE_QUERY, query_seed, c, r)`` -- independent of every training sample's draws (paper
eq. 10) and reproducible from the seed returned with the answer.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from proponent import _moved
from proponent.format import whiten as wfmt
from proponent.format.fsio import IndexDir
from proponent.format.manifest import Manifest, ModelRecord
from proponent.model.architectures import ModelConfig, build_model
from proponent.model.checkpoints import CheckpointError, load_state, read_checkpoint, state_dict_at
from proponent.model.featurizers import Featurizer, make_featurizer
from proponent.model.objectives import NOISE_QUERY, Objective, draw_noise, objective_at, objective_from_spec
from proponent.model.plugin import load_plugin
from proponent.model.projection import Projector, build_projector, spec_from_record


class ModelRuntimeError(RuntimeError):
    """The index's models cannot be rebuilt as recorded (names the checkpoint and the mismatch)."""


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fresh_model(record: ModelRecord) -> nn.Module:
    """An untrained module of the recorded architecture (built-in config or the user's factory)."""
    if record.kind == "builtin":
        assert record.config is not None
        return build_model(ModelConfig.from_dict(record.config))
    assert record.plugin is not None
    return load_plugin(record.plugin).build_module()


def objective_from_record(record: Any, model: Any = None) -> Objective:
    """Rebuild the training objective recorded in a manifest (``ObjectiveRecord``, ``ModelRecord``)."""
    if model is not None and getattr(model, "kind", "builtin") == "plugin":
        return load_plugin(model.plugin).objective(int(record.m))
    return objective_from_spec(record.model_dump())


def model_from_checkpoint(record: ModelRecord, data: bytes, name: str) -> nn.Module:
    """The module of ``record`` with the weights of the checkpoint bytes ``data`` (eval mode, CPU)."""
    raw = read_checkpoint(data, name)
    return load_state(fresh_model(record), state_dict_at(raw, record.checkpoint_key, name), name)


@dataclass
class QueryFeatures:
    """Features of a batch of queries at the searched checkpoints."""

    mean: dict[int, np.ndarray]  # c -> [B, D] float32: the m-draw average gradient, projected
    sq_norm: dict[int, np.ndarray]  # c -> [B] float64: its exact (unprojected) squared norm
    per_draw: dict[int, np.ndarray] | None = None  # c -> [B, m, D]: each draw's projected gradient


class ModelRuntime:
    def __init__(self, where: IndexDir, manifest: Manifest, device: str | torch.device = "auto"):
        self.where = where
        self.manifest = manifest
        self.device = resolve_device(device)
        self.objective: Objective = objective_from_record(manifest.objective, manifest.model)
        self.shape = manifest.shape
        self._models: dict[int, nn.Module] = {}
        self._projectors: dict[int, Projector] = {}
        self._lock = threading.Lock()
        self.featurize_lock = threading.RLock()  # queries and recompute jobs share the models
        for c in range(len(manifest.checkpoints)):  # load now, not on the first query
            self.model(c)

    @property
    def supervised(self) -> bool:
        return self.manifest.model.supervised

    @property
    def latent_dim(self) -> int:
        return self.manifest.model.latent_dim

    def model(self, c: int) -> nn.Module:
        with self._lock:
            if c not in self._models:
                ck = self.manifest.checkpoints[c]
                name = self.where.describe(ck.path)
                try:
                    m = model_from_checkpoint(self.manifest.model, self.where.read_bytes(ck.path), name)
                except CheckpointError as e:
                    raise ModelRuntimeError(str(e)) from None
                self._models[c] = m.to(self.device)
                proj = build_projector(
                    m, self.manifest.projection.selection, spec_from_record(self.manifest.projection), self.device
                )
                if proj.manifest(self.manifest.projection.selection) != self.manifest.projection.model_dump():
                    raise ModelRuntimeError(
                        f"{name}: the projection rebuilt from the model (D={proj.dim}) differs from the manifest's "
                        f"(D={self.manifest.dim}); the model code or the checkpoint does not match the index"
                    )
                try:
                    white = wfmt.load(self.where, self.manifest, c)
                except wfmt.WhitenError as e:
                    raise ModelRuntimeError(str(e)) from None
                if white is not None:  # queries are whitened as the stored rows were
                    proj.set_whitening(white)
                self._projectors[c] = proj
            return self._models[c]

    def projector(self, c: int) -> Projector:
        self.model(c)
        return self._projectors[c]

    def featurizer(self, c: int, objective: Objective | None = None, method: str | None = None) -> Featurizer:
        """A featurizer of checkpoint ``c`` (the index's method unless ``method``) for ``objective``."""
        obj = objective_at(objective or self.objective, c)
        return make_featurizer(method or self.manifest.featurizer, self.model(c), obj, self.projector(c))

    def labels_for(self, n: int, labels: np.ndarray | None) -> torch.Tensor:
        if labels is None:
            if self.supervised:
                raise ValueError(
                    "this index's model is a classifier: a query needs its label (label=...), which selects the loss"
                )
            return torch.zeros(n, dtype=torch.int64)
        lab = np.asarray(labels, np.int64).reshape(-1)
        if len(lab) != n:
            raise ValueError(f"{len(lab)} labels for {n} queries")
        return torch.from_numpy(lab)

    def featurize(
        self,
        x: np.ndarray,
        *,
        objective: Objective | None = None,
        seed: int = 0,
        labels: np.ndarray | None = None,
        checkpoints: list[int],
        per_draw: bool = False,
        draw_ids: np.ndarray | None = None,
    ) -> QueryFeatures:
        """Query features of inputs ``x [B, *shape]`` at ``checkpoints`` (and each draw's, if asked). Input
        ``i`` takes the query noise of key ``draw_ids[i]`` (default ``i``; a batch of independent queries
        passes zeros, so that each gets the noise it gets alone)."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape[1:] != self.shape:
            raise ValueError(
                f"query shape {list(x.shape[1:])} does not match the index's input shape {list(self.shape)}"
            )
        b = len(x)
        xt = torch.from_numpy(x)
        yt = self.labels_for(b, labels)
        mean, sq, draws = {}, {}, {}
        with self.featurize_lock:
            for c in checkpoints:
                feat = self.featurizer(c, objective)
                obj = feat.objective
                m = int(obj.m)
                ids = np.arange(b) if draw_ids is None else np.asarray(draw_ids, np.int64)
                eps = draw_noise(NOISE_QUERY, seed, c, ids, m, obj.noise_shape(self.model(c)))
                if per_draw and m > 1:
                    fb, fr = feat.draw_features(xt, yt, eps)
                    draws[c] = fr.cpu().numpy()
                else:
                    fb = feat.features(xt, yt, eps)
                mean[c] = fb.features.cpu().numpy()
                sq[c] = fb.sq_norm.cpu().numpy().astype(np.float64)
        return QueryFeatures(mean, sq, draws if per_draw and draws else None)

    def latent_means(self, x: np.ndarray) -> np.ndarray:
        """Encoder means ``[B, L]`` of inputs at the final checkpoint (as stored in ``latent_mu``)."""
        if not self.latent_dim:
            raise ValueError("this index's model has no latent space (not a VAE)")
        model = self.model(len(self.manifest.checkpoints) - 1)
        with self.featurize_lock, torch.no_grad():
            mu, _ = encode(model, torch.from_numpy(np.asarray(x, np.float32)).to(self.device))
        return mu.cpu().numpy()


def encode(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(μ, log σ²)`` of a VAE (a built-in model or a plugin's)."""
    fn: Any = getattr(model, "encode", None)
    if fn is None:
        raise ValueError("the model has no encoder")
    return fn(x)


_RENAMED = {"RuntimeError_": "ModelRuntimeError"}  # old name -> new name, kept for one release


def __getattr__(name: str) -> object:
    return _moved.renamed(__name__, name, _RENAMED, globals())
