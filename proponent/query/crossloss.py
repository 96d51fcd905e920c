"""Cross-loss influence (Silva, Chopra & Gombolay 2020): the query's objective may
differ from the training objective.

score(x, z) = Σ_c w_c <∇ l_train(x; θ_c), ∇ l_query(z; θ_c)>

The index stores ∇ l_train of every training sample; only the query side changes,
so any query objective works with an existing index. Built-in query objectives:

* ``elbo`` -- the training objective (default);
* ``reconstruction`` -- −E log P(z|ξ) only;
* ``kl`` -- KL(Q(·|z) || N(0, I)) only;
* ``elbo_beta`` -- the ELBO with another β (``beta=``);
* ``probe`` -- a supervised probe: a multinomial logistic regression fitted on the
  encoder means of the labelled training images *at each checkpoint*, then held
  fixed; the query loss is its cross-entropy on the query's label (``label=``),
  differentiated through the encoder. "Which training samples make the latent code
  of z more (or less) linearly decodable as its class?"

The probe depends on the checkpoint, so :class:`ProbeObjective` is a family of
objectives: ``objective_for(c)`` gives the fixed-probe objective of checkpoint c,
which :meth:`ModelRuntime.featurizer` uses at c (it calls ``objective_for`` when the
objective has it).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from proponent.model.objectives import ELBO, Forward, Objective
from proponent.model.runtime import encode

if TYPE_CHECKING:
    from proponent.query.index import InfluenceIndex

QUERY_OBJECTIVES = ("elbo", "reconstruction", "kl", "elbo_beta", "probe")


class ObjectiveError(ValueError):
    pass


# ---------------------------------------------------------------------------------- the probe


@dataclass(frozen=True)
class LinearProbe:
    """Softmax classifier on latent means: ``logits = mu @ weight.T + bias``."""

    weight: np.ndarray  # [K, d_latent] float32
    bias: np.ndarray  # [K] float32
    classes: np.ndarray  # [K] int64: the label of each row
    accuracy: float  # training accuracy (reported, not used)

    def class_index(self, label: int) -> int:
        hit = np.flatnonzero(self.classes == int(label))
        if not hit.size:
            raise ObjectiveError(f"label {label} is not a class of the probe (classes {self.classes.tolist()})")
        return int(hit[0])


def fit_probe(mu: np.ndarray, labels: np.ndarray, *, C: float = 1.0, max_iter: int = 2000) -> LinearProbe:
    """Multinomial logistic regression (L2, lbfgs: deterministic) on latent means."""
    from sklearn.linear_model import LogisticRegression  # lazy: scikit-learn takes ~1 s to import

    keep = labels >= 0
    mu, labels = np.asarray(mu, np.float64)[keep], np.asarray(labels, np.int64)[keep]
    classes = np.unique(labels)
    if classes.size < 2:
        raise ObjectiveError(f"a probe needs at least two classes among the labelled rows, got {classes.tolist()}")
    clf = LogisticRegression(C=C, max_iter=max_iter, tol=1e-8)
    clf.fit(mu, labels)
    W, b = clf.coef_, clf.intercept_
    if classes.size == 2:  # sklearn keeps one row for two classes: p(1) = σ(w·x + b) = softmax([0, w·x + b])
        W = np.vstack([np.zeros_like(W), W])
        b = np.concatenate([[0.0], b])
    acc = float((clf.predict(mu) == labels).mean())
    return LinearProbe(W.astype(np.float32), b.astype(np.float32), clf.classes_.astype(np.int64), acc)


_PROBE_CACHE: dict[tuple[str, str], LinearProbe] = {}
_PROBE_LOCK = threading.Lock()


def index_probe(index: InfluenceIndex, c: int) -> LinearProbe:
    """The probe of checkpoint ``c``, fitted on ``model(c).encode(images)[0]`` of the stored
    training images (labelled rows only); cached per (index, checkpoint hash)."""
    labels = np.asarray(index.meta.labels)
    if not index.meta.has_labels:
        raise ObjectiveError("objective 'probe' needs a labelled index; this index has no labels")
    key = (index.where.url, index.checkpoints[c].sha256 or str(c))
    with _PROBE_LOCK:
        hit = _PROBE_CACHE.get(key)
    if hit is not None:
        return hit
    model = index.runtime.model(c)
    mus = []
    with index.runtime.featurize_lock, torch.no_grad():
        for lo in range(0, index.n, 4096):
            rows = np.arange(lo, min(index.n, lo + 4096))
            x = torch.from_numpy(index.store.inputs(rows)).to(index.device)
            mus.append(encode(model, x)[0].float().cpu().numpy())
    probe = fit_probe(np.concatenate(mus), labels)
    with _PROBE_LOCK:
        _PROBE_CACHE[key] = probe
    return probe


@dataclass
class FixedProbeLoss(Objective):
    """Cross-entropy of a fixed linear probe on the encoder mean, per sample.

    ``y`` carries the labels (``label`` overrides them when set; ``make_query_objective``
    checks it is one of the probe's classes). The decoder output
    enters with weight 0 so every layer stays in the graph (zero gradient there).
    """

    probe: LinearProbe | None = None
    label: int | None = None
    m: int = 1
    name: str = "probe"

    def noise_shape(self, model: torch.nn.Module) -> tuple[int, ...]:
        return (int(model.config.latent_dim),)  # type: ignore[union-attr,arg-type]

    def loss(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        assert self.probe is not None
        mu, _, logits = forward(x, eps)
        W = torch.as_tensor(self.probe.weight, device=mu.device, dtype=mu.dtype)
        b = torch.as_tensor(self.probe.bias, device=mu.device, dtype=mu.dtype)
        logp = torch.log_softmax(mu @ W.T + b, dim=-1)
        if self.label is not None:  # validated here, outside any vmap
            ce = -logp[:, self.probe.class_index(self.label)]
        else:  # labels from y, vmap-safe (a label outside the probe's classes contributes 0)
            classes = torch.as_tensor(self.probe.classes, device=mu.device)
            onehot = (y.reshape(-1, 1) == classes.reshape(1, -1)).to(logp.dtype)
            ce = -(logp * onehot).sum(dim=-1)
        return ce + 0.0 * logits.reshape(x.shape[0], -1).sum(dim=1)

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "m": self.m, "label": self.label}


@dataclass
class ProbeObjective(Objective):
    """The probe query objective: one :class:`FixedProbeLoss` per checkpoint."""

    probes: Callable[[int], LinearProbe] = field(repr=False, default=None)  # type: ignore[assignment]
    label: int | None = None
    m: int = 1
    name: str = "probe"

    def noise_shape(self, model: torch.nn.Module) -> tuple[int, ...]:
        return (int(model.config.latent_dim),)  # type: ignore[union-attr,arg-type]

    def objective_for(self, c: int) -> FixedProbeLoss:
        return FixedProbeLoss(probe=self.probes(c), label=self.label, m=self.m)

    def loss(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        raise ObjectiveError("the probe objective depends on the checkpoint: use objective_for(c)")

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "m": self.m, "label": self.label}


# ---------------------------------------------------------------------------------- factory


def make_query_objective(
    index: InfluenceIndex, name: str = "elbo", *, beta: float | None = None, label: int | None = None
) -> Objective:
    """The query objective ``name`` for this index (same m and likelihood as training)."""
    train = index.runtime.objective
    if name == "elbo":
        return train
    if name not in QUERY_OBJECTIVES:
        raise ObjectiveError(f"unknown objective {name!r}; choose from {', '.join(QUERY_OBJECTIVES)}")
    if not isinstance(train, ELBO):
        raise ObjectiveError(f"objective {name!r} needs a VAE index; this index uses {train.name!r}")
    # variants of the training ELBO (a plugin's keeps its own reconstruction term and scale)
    if name == "reconstruction":
        return dataclasses.replace(train, beta=0.0, recon_weight=1.0, name="reconstruction")
    if name == "kl":
        return dataclasses.replace(train, beta=1.0, recon_weight=0.0, name="kl")
    if name == "elbo_beta":
        if beta is None or beta < 0:
            raise ObjectiveError("objective 'elbo_beta' needs beta >= 0")
        return dataclasses.replace(train, beta=float(beta), recon_weight=1.0, name="elbo_beta")
    # probe
    if label is None:
        raise ObjectiveError("objective 'probe' needs the query's label (label=...)")
    labels = np.asarray(index.meta.labels)
    if not index.meta.has_labels:
        raise ObjectiveError("objective 'probe' needs a labelled index; this index has no labels")
    if int(label) not in set(np.unique(labels[labels >= 0]).tolist()):
        raise ObjectiveError(
            f"label {label} is not a class of this index (classes {sorted(set(labels[labels >= 0].tolist()))})"
        )
    return ProbeObjective(probes=lambda c: index_probe(index, c), label=int(label), m=train.m)
