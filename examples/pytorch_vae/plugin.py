"""proponent's view of the PyTorch-examples VAE: ``--model-code examples/pytorch_vae/plugin.py:plugin``.

``model.py`` is imported as a sibling module (proponent puts this file's directory on the import
path) and hashed with this file into the index's manifest. The loss per sample is the example's:
binary cross-entropy summed over the 784 pixels + KL (β = 1); proponent draws the noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from model import VAE

from proponent.model.plugin import VAEParts


def encode(model: VAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model.encode(x.reshape(-1, 784))  # x arrives as [B, 1, 28, 28] in [0, 1]


def reconstruction(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """−log p(x|z) per row: the example's binary cross-entropy, summed over pixels."""
    return F.binary_cross_entropy(out, x.reshape(-1, 784), reduction="none").sum(1)


def plugin() -> VAEParts:
    return VAEParts(
        module=VAE(), encode=encode, decode=lambda m, z: m.decode(z), reconstruction=reconstruction, latent_dim=20
    )
