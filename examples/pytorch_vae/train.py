"""Train the PyTorch-examples VAE (``model.py``) the way its ``main.py`` does -- Adam, lr 1e-3, batch
128 -- and save three checkpoints with ``torch.save`` that carry what TracIn needs.

There is no MNIST download here, so the data are scikit-learn's 1,797 bundled 8×8 digits upscaled to
28×28 (bilinear), written to ``OUT/digits28.npz`` (``x`` uint8 N×28×28, ``y`` labels) for
``proponent index --data npz:OUT/digits28.npz``.

    python examples/pytorch_vae/train.py OUT [--epochs 6]

Each checkpoint ``OUT/ckpt_<step>.pt`` is ``{"model": state_dict, "optimizer": optimizer state,
"step": optimiser steps so far, "epoch": epochs so far, "batch_size": 128}``: proponent reads the
learning rate (from the optimizer state), the step, the epoch and the batch size from the files.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import VAE, loss_function  # noqa: E402


def digits28() -> tuple[np.ndarray, np.ndarray]:
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x28 = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)[:, 0]
    return np.round(x28.clamp(0, 1).numpy() * 255).astype(np.uint8), d.target.astype(np.int64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--checkpoints", type=int, default=3, help="saved after evenly spaced epochs")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    x, y = digits28()
    np.savez(out / "digits28.npz", x=x, y=y)
    data = torch.from_numpy(x.astype(np.float32) / 255.0)

    torch.manual_seed(a.seed)
    model = VAE()
    optimizer = torch.optim.Adam(model.parameters(), lr=a.lr)
    save_at = {round(a.epochs * (i + 1) / a.checkpoints) for i in range(a.checkpoints)}
    step = 0
    for epoch in range(1, a.epochs + 1):
        model.train()
        total = 0.0
        for batch in torch.randperm(len(data)).split(a.batch_size):
            xb = data[batch]
            optimizer.zero_grad()
            recon, mu, logvar = model(xb)
            loss = loss_function(recon, xb, mu, logvar)
            loss.backward()
            optimizer.step()
            total += loss.item()
            step += 1
        print(f"epoch {epoch}: average loss {total / len(data):.2f}")
        if epoch in save_at:
            path = out / f"ckpt_{step:05d}.pt"
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}
            torch.save({**state, "epoch": epoch, "batch_size": a.batch_size}, path)
            print(f"saved {path}")


if __name__ == "__main__":
    main()
