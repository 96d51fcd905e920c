"""β-VAE models (MLP and convolutional) and a small classifier.

Every parameterised layer is an ``nn.Linear`` or ``nn.Conv2d``, so the
Kronecker-factored featurizer covers the whole model (it covers ``ConvTranspose2d``
too, as in the VAE-TracIn authors' model, ``examples/official_vae/model.py``); the
decoder upsamples with ``nn.Upsample`` + ``nn.Conv2d``.

Models are batch-agnostic (no BatchNorm): per-sample gradients of a batched loss
are the gradients of the per-sample losses, which both featurizers rely on.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import torch
from torch import nn

ModelKind = Literal["mlp", "conv", "classifier"]
Likelihood = Literal["gaussian", "bernoulli"]


class ConfigError(ValueError):
    """A model configuration that cannot be built."""


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model; saved with every checkpoint.

    ``beta`` and ``likelihood`` define the training objective and travel with the
    model so that an index built later uses the objective the model was trained on.
    """

    kind: ModelKind = "mlp"
    input_shape: tuple[int, ...] = (1, 8, 8)
    latent_dim: int = 16
    hidden: tuple[int, ...] = (256, 128)
    channels: tuple[int, ...] = (32, 64)
    beta: float = 1.0
    likelihood: Likelihood = "bernoulli"
    num_classes: int = 10
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("input_shape", "hidden", "channels"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"model config: unknown keys {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        for key in ("input_shape", "hidden", "channels"):
            if key in d:
                d[key] = tuple(int(v) for v in d[key])
        cfg = cls(**d)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.kind not in ("mlp", "conv", "classifier"):
            raise ConfigError(f"model config: kind must be mlp, conv or classifier, got {self.kind!r}")
        if self.likelihood not in ("gaussian", "bernoulli"):
            raise ConfigError(f"model config: likelihood must be gaussian or bernoulli, got {self.likelihood!r}")
        if self.latent_dim < 1:
            raise ConfigError(f"model config: latent_dim must be >= 1, got {self.latent_dim}")
        if self.beta < 0:
            raise ConfigError(f"model config: beta must be >= 0, got {self.beta}")
        if any(h < 1 for h in self.hidden) or any(c < 1 for c in self.channels):
            raise ConfigError("model config: hidden sizes and channels must be positive")
        if self.kind == "conv":
            if len(self.input_shape) != 3:
                raise ConfigError(f"conv VAE needs input shape (C, H, W), got {self.input_shape}")
            _, h, w = self.input_shape
            f = 2 ** len(self.channels)
            if h % f or w % f:
                raise ConfigError(
                    f"conv VAE with {len(self.channels)} stride-2 stages needs H and W divisible by {f}, got {h}x{w}"
                )

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)


def _mlp(sizes: list[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return layers


class VAE(nn.Module):
    """β-VAE; ``forward(x, eps)`` returns ``(mu, logvar, logits)``.

    ``eps`` has shape ``[B, m, latent]``: m reparameterised draws per sample
    (``z = mu + exp(logvar / 2) * eps``); the decoder sees ``B * m`` rows, ordered
    sample-major (rows ``i*m .. i*m+m-1`` belong to sample i). ``logits`` has shape
    ``[B, m, *input_shape]`` and is the pre-sigmoid decoder output.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        d, L = config.input_dim, config.latent_dim
        if config.kind == "mlp":
            self.encoder = nn.Sequential(nn.Flatten(), *_mlp([d, *config.hidden, 2 * L]))
            self.decoder = nn.Sequential(*_mlp([L, *reversed(config.hidden), d]))
        elif config.kind == "conv":
            c_in, h, w = config.input_shape
            chans = list(config.channels)
            enc: list[nn.Module] = []
            prev = c_in
            for c in chans:
                enc += [nn.Conv2d(prev, c, kernel_size=4, stride=2, padding=1), nn.ReLU()]
                prev = c
            f = 2 ** len(chans)
            self._bottleneck = (chans[-1], h // f, w // f)
            flat = chans[-1] * (h // f) * (w // f)
            enc += [nn.Flatten(), nn.Linear(flat, 2 * L)]
            self.encoder = nn.Sequential(*enc)
            dec: list[nn.Module] = [nn.Linear(L, flat), nn.ReLU(), nn.Unflatten(1, self._bottleneck)]
            rev = list(reversed(chans))
            for i, c in enumerate(rev):
                nxt = rev[i + 1] if i + 1 < len(rev) else c_in
                dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, nxt, kernel_size=3, padding=1)]
                if i + 1 < len(rev):
                    dec.append(nn.ReLU())
            self.decoder = nn.Sequential(*dec)
        else:
            raise ConfigError(f"VAE cannot be built from kind {config.kind!r}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        mu, logvar = h.chunk(2, dim=-1)
        return mu, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        out = self.decoder(z)
        return out.reshape(z.shape[0], *self.config.input_shape)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(x)
        b, m, L = eps.shape
        z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
        logits = self.decode(z.reshape(b * m, L))
        return mu, logvar, logits.reshape(b, m, *self.config.input_shape)


class Classifier(nn.Module):
    """An MLP classifier: ``forward(x, eps)`` ignores ``eps`` and returns logits.

    Exists so that the featurizers are exercised on plain (supervised) TracIn.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.net = nn.Sequential(nn.Flatten(), *_mlp([config.input_dim, *config.hidden, config.num_classes]))

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x)


def build_model(config: ModelConfig) -> nn.Module:
    config.validate()
    return Classifier(config) if config.kind == "classifier" else VAE(config)


def default_config_for(shape: tuple[int, ...], kind: ModelKind | None = None, **overrides: Any) -> ModelConfig:
    """A sensible model for data of this shape: MLP unless the image suits the conv VAE."""
    if kind is None:
        kind = "mlp"
    hidden = (128, 64) if math.prod(shape) <= 256 else (512, 256)
    cfg = ModelConfig(kind=kind, input_shape=tuple(shape), hidden=hidden)
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, tuple(v) if isinstance(v, list) else v)
    cfg.validate()
    return cfg
