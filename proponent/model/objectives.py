"""Per-sample objectives and their reproducible noise.

An objective maps ``(forward, x, y, eps)`` to one loss per sample, where
``forward`` has the signature of ``model.forward`` (it may be a
``torch.func.functional_call`` closure), ``x`` is ``[B, *shape]``, ``y`` is
``[B]`` (labels, ignored by unsupervised objectives) and ``eps`` is
``[B, m, *noise_shape]``: m reparameterised draws per sample. The loss of a
sample is the mean over its m draws, so its gradient is the average of the m
per-draw gradients (paper eq. 10).

Noise is drawn per sample from a counter-based generator keyed by
``(domain, seed, checkpoint, sample id)`` -- never by batch position -- so that
any batching, sharding or resumption of a job produces the same bytes.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

Forward = Callable[..., Any]

# Domain separation for noise keys: index features and queries never share draws.
NOISE_INDEX = 0
NOISE_QUERY = 1
NOISE_TRAIN = 4  # training draws keyed by sample (TrainConfig.noise='keyed')


def draw_noise(
    domain: int, seed: int, checkpoint: int, ids: Sequence[int] | np.ndarray, m: int, shape: tuple[int, ...]
) -> torch.Tensor:
    """Standard normal noise ``[len(ids), m, *shape]``; row i depends only on its key."""
    n = math.prod(shape) * m
    out = np.empty((len(ids), n), dtype=np.float32)
    for r, i in enumerate(np.asarray(ids, dtype=np.int64)):
        ss = np.random.SeedSequence([domain, seed, checkpoint, int(i)])
        out[r] = np.random.Generator(np.random.Philox(ss)).standard_normal(n, dtype=np.float32)
    return torch.from_numpy(out.reshape(len(ids), m, *shape))


class Objective(ABC):
    """A per-sample loss. ``m`` draws of ``noise_shape`` noise per sample."""

    name: str = "objective"
    m: int = 1

    @abstractmethod
    def noise_shape(self, model: torch.nn.Module) -> tuple[int, ...]: ...

    @abstractmethod
    def loss(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """One loss per sample, ``[B]``."""

    def spec(self) -> dict[str, Any]:
        return {"name": self.name, "m": self.m}


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag(exp(logvar))) || N(0, I)) per sample."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=-1)


def reconstruction_nll(logits: torch.Tensor, x: torch.Tensor, likelihood: str) -> torch.Tensor:
    """-log P(x | z) per (sample, draw) up to a constant: ``[B, m]``.

    gaussian: sum of squared errors between x and sigmoid(logits) (fixed variance 1/2);
    bernoulli: binary cross-entropy with logits.
    """
    target = x.unsqueeze(1).expand_as(logits)
    if likelihood == "gaussian":
        err = (torch.sigmoid(logits) - target).pow(2)
    else:
        err = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    return err.flatten(2).sum(dim=-1)


@dataclass
class ELBO(Objective):
    """β-VAE loss (paper eq. 6): ``β·KL(Q(·|x)||N(0,I)) − E_ξ log P(x|ξ)``.

    ``kl_weight`` and ``recon_weight`` let the same class express the cross-loss
    query objectives (reconstruction only, KL only, another β).
    """

    beta: float = 1.0
    likelihood: str = "gaussian"
    m: int = 16
    recon_weight: float = 1.0
    name: str = "elbo"

    def noise_shape(self, model: torch.nn.Module) -> tuple[int, ...]:
        return (int(model.config.latent_dim),)  # type: ignore[union-attr,arg-type]

    def loss(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        mu, logvar, logits = forward(x, eps)
        total = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        if self.beta:
            total = total + self.beta * gaussian_kl(mu, logvar)
        if self.recon_weight:
            total = total + self.recon_weight * reconstruction_nll(logits, x, self.likelihood).mean(dim=1)
        return total

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "m": self.m,
            "beta": self.beta,
            "likelihood": self.likelihood,
            "recon_weight": self.recon_weight,
        }


@dataclass
class CrossEntropy(Objective):
    """Cross-entropy of a classifier: plain TracIn through the same featurizers."""

    m: int = 1
    name: str = "cross_entropy"

    def noise_shape(self, model: torch.nn.Module) -> tuple[int, ...]:
        return (1,)

    def loss(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(forward(x, eps), y, reduction="none")


def objective_from_spec(spec: dict[str, Any]) -> Objective:
    """Rebuild a training objective recorded in a manifest."""
    name = spec.get("name")
    if name == "elbo":
        return ELBO(
            beta=float(spec["beta"]),
            likelihood=str(spec["likelihood"]),
            m=int(spec["m"]),
            recon_weight=float(spec.get("recon_weight", 1.0)),
        )
    if name == "cross_entropy":
        return CrossEntropy(m=int(spec.get("m", 1)))
    raise ValueError(f"unknown objective {name!r}")


def objective_at(objective: Objective, c: int) -> Objective:
    """The objective to use at checkpoint ``c`` (per-checkpoint families resolve here)."""
    fn = getattr(objective, "objective_for", None)
    return fn(c) if callable(fn) else objective
