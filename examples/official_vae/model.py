"""The VAE-TracIn authors' β-VAE as a user's model file.

"BetaVAE_H" (Higgins et al.) as published with the paper's code
(zhifengkong/VAE-TracIn-pytorch, ``Beta_VAE/``), written from the architecture table in
``../shared/vae-tracin-official/README.md`` so that the authors' checkpoints load with
``strict=True``: ``ckpt["model_states"]["net"]`` holds ``encoder.<i>.*`` / ``decoder.<i>.*``
of two ``nn.Sequential`` s, with parameter-free modules (ReLU, reshapes) at the other indices.

This file depends on torch only. What a VAE plugin needs from it:

* ``build()``: the model (random weights), ``load_checkpoint(path)``: a checkpoint's state dict;
* ``encode(model, x) -> (mu, logvar)`` and ``decode(model, z) -> logits`` (pre-sigmoid);
* the authors' per-sample loss, ``(Σ_pixels (sigmoid(logits) − x)² + β·KL) / (3·64·64)`` with
  β = 2, in pieces (``reconstruction_error``, ``kl_divergence``, ``BETA``, ``LOSS_SCALE``) and
  whole (``per_sample_loss``, with explicit noise ``eps [B, m, 64]``: the mean over m draws).

``forward(x, eps)`` runs the whole VAE on explicit noise (``z = μ + exp(log σ² / 2)·ε``) and
returns ``(mu, logvar, logits [B, m, 3, 64, 64])``; ``per_sample_loss`` goes through it so that
``torch.func.functional_call`` (which swaps parameters for one call of ``forward``) sees every
parameter.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

Z_DIM = 64  # latent dimension
NC = 3  # image channels
IMAGE_SHAPE = (NC, 64, 64)  # inputs in [0, 1]
BETA = 2.0
LOSS_SCALE = 1.0 / (3 * 64 * 64)  # the authors divide the whole per-sample loss by the pixel count
LEARNING_RATE = 3e-4  # SGD, batch 64 (the checkpoints' file names are iteration numbers)
BATCH_SIZE = 64


class View(nn.Module):
    """Reshape inside an ``nn.Sequential`` (``-1`` keeps the batch dimension free)."""

    def __init__(self, shape: tuple[int, ...]):
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


class BetaVAE_H(nn.Module):
    """Conv encoder to ``2·z`` outputs (μ, then log σ²), ConvTranspose2d decoder to logits.

    ``inplace``: ReLUs in place, as the authors' code has them (proponent's Kronecker
    featurizer detects that and keeps copies of the tensors it records).
    """

    def __init__(self, z_dim: int = Z_DIM, nc: int = NC, inplace: bool = True):
        super().__init__()
        self.z_dim = z_dim
        self.nc = nc

        def relu() -> nn.Module:
            return nn.ReLU(inplace=inplace)

        self.encoder = nn.Sequential(
            nn.Conv2d(nc, 32, 4, 2, 1),  # 0: 32 x 32 x 32
            relu(),
            nn.Conv2d(32, 32, 4, 2, 1),  # 2: 32 x 16 x 16
            relu(),
            nn.Conv2d(32, 64, 4, 2, 1),  # 4: 64 x 8 x 8
            relu(),
            nn.Conv2d(64, 64, 4, 2, 1),  # 6: 64 x 4 x 4
            relu(),
            nn.Conv2d(64, 256, 4, 1),  # 8: 256 x 1 x 1
            relu(),
            View((-1, 256)),  # 10
            nn.Linear(256, 2 * z_dim),  # 11: μ, log σ²
        )
        self.decoder = nn.Sequential(
            nn.Linear(z_dim, 256),  # 0
            View((-1, 256, 1, 1)),  # 1
            relu(),
            nn.ConvTranspose2d(256, 64, 4),  # 3: 64 x 4 x 4
            relu(),
            nn.ConvTranspose2d(64, 64, 4, 2, 1),  # 5: 64 x 8 x 8
            relu(),
            nn.ConvTranspose2d(64, 32, 4, 2, 1),  # 7: 32 x 16 x 16
            relu(),
            nn.ConvTranspose2d(32, 32, 4, 2, 1),  # 9: 32 x 32 x 32
            relu(),
            nn.ConvTranspose2d(32, nc, 4, 2, 1),  # 11: nc x 64 x 64 logits
        )

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x [B, 3, 64, 64]``, ``eps [B, m, z]`` -> ``(mu, logvar, logits [B, m, 3, 64, 64])``.

        The decoder sees ``B·m`` rows, sample-major (rows ``i·m .. i·m+m-1`` are sample i's).
        """
        mu, logvar = encode(self, x)
        b, m, z_dim = eps.shape
        z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
        logits = decode(self, z.reshape(b * m, z_dim))
        return mu, logvar, logits.reshape(b, m, *logits.shape[1:])


def build(inplace: bool = True) -> BetaVAE_H:
    """The authors' model (z = 64, 3 channels) with PyTorch's default initialisation."""
    return BetaVAE_H(Z_DIM, NC, inplace=inplace)


def encode(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [B, 3, 64, 64]`` in [0, 1] -> ``(mu, logvar)``, each ``[B, 64]``."""
    h = model.encoder(x)
    return h[:, :Z_DIM], h[:, Z_DIM:]


def decode(model: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """``z [N, 64]`` -> logits ``[N, 3, 64, 64]`` (the reconstruction is their sigmoid)."""
    return model.decoder(z)


def reconstruction_error(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``Σ_pixels (sigmoid(logits) − x)²`` per row: logits ``[B, *IMAGE_SHAPE]`` or ``[B, m, *IMAGE_SHAPE]``."""
    if logits.dim() == x.dim() + 1:
        x = x.unsqueeze(1)
    return (torch.sigmoid(logits) - x).pow(2).flatten(-3).sum(-1)


def authors_reconstruction_error(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The reconstruction term as the authors' *scoring* code computes it: ``reconstruction_error / 3``.

    Their ``tracin.py`` calls ``calc_loss(z, ...)`` on one unbatched image ``z [3, 64, 64]``, and
    ``calc_loss`` divides the summed squared error by ``batch_size = x.size(0)``, which is then the
    channel count (3), not 1; the KL term is unaffected. Their training loss is :func:`reconstruction_error`.
    """
    return reconstruction_error(logits, x) / NC


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(μ, σ²) ‖ N(0, I))`` summed over the latent dimensions: ``[B]``."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)


def per_sample_loss(forward: Callable[..., Any], x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The authors' training loss per sample, averaged over the m draws in ``eps [B, m, 64]``: ``[B]``.

    ``forward`` is the model (or a ``functional_call`` closure with its signature).
    """
    mu, logvar, logits = forward(x, eps)
    recon = reconstruction_error(logits, x).mean(dim=1)
    return (recon + BETA * kl_divergence(mu, logvar)) * LOSS_SCALE


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The model's state dict from one of the authors' checkpoint files.

    The files (``torch.save`` zip format) hold only tensors and plain Python values --
    ``iter`` (int), ``win_states`` (visdom window names, all None), ``model_states["net"]``
    (an OrderedDict of tensors) and ``optim_states["optim"]`` (SGD's state dict: empty
    ``state``, one param group of floats/bools/ints) -- so ``weights_only=True`` loads them.
    """
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    return ckpt["model_states"]["net"]


def plugin() -> Any:
    """The factory ``proponent index --model-code examples/official_vae/model.py:plugin`` calls: the VAE parts.

    proponent draws the noise (keyed by sample id and checkpoint), forms ``z = μ + exp(log σ²/2)·ε`` and
    computes ``LOSS_SCALE · (mean over the draws of reconstruction_error + BETA · KL)`` -- the authors' loss.
    """
    return _parts(reconstruction_error)


def plugin_authors() -> Any:
    """The factory of ``AUTHORS_LOSS=1 run.sh``: the loss of the authors' scoring code
    (:func:`authors_reconstruction_error`, the reconstruction term divided by 3), to reproduce their
    numbers; :func:`plugin` is their training loss."""
    return _parts(authors_reconstruction_error)


def _parts(reconstruction: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Any:
    from proponent.model.plugin import VAEParts

    return VAEParts(
        module=build(),
        encode=encode,
        decode=decode,
        reconstruction=reconstruction,
        latent_dim=Z_DIM,
        beta=BETA,
        scale=LOSS_SCALE,
    )
