"""The VAE-TracIn authors' published β-VAE as a user's model (examples/official_vae/model.py).

Needs the shared data next to the repository (``../shared/vae-tracin-official``, as in CI).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from proponent.model.featurizers.dense import DenseFeaturizer
from proponent.model.featurizers.kronecker import KroneckerFeaturizer
from proponent.model.objectives import Objective
from proponent.model.projection import ProjectionSpec, build_projector, discover_layers

REPO = Path(__file__).resolve().parents[2]
OFFICIAL = REPO.parent / "shared" / "vae-tracin-official"
CHECKPOINTS = ("50000", "500000", "1000000", "1500000")

pytestmark = pytest.mark.skipif(
    not (OFFICIAL / "checkpoints").is_dir(), reason=f"the authors' checkpoints are not at {OFFICIAL}"
)


def _load_example() -> ModuleType:
    """Import the model file the way a user's file is imported: by path."""
    spec = importlib.util.spec_from_file_location("official_vae_model", REPO / "examples" / "official_vae" / "model.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


official = _load_example()


class OfficialLoss(Objective):
    """The authors' per-sample loss as a proponent objective (explicit noise, mean over m draws)."""

    name = "official"

    def __init__(self, m: int):
        self.m = m

    def noise_shape(self, model: nn.Module) -> tuple[int, ...]:
        return (official.Z_DIM,)

    def loss(self, forward, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return official.per_sample_loss(forward, x, eps)


def _images(n: int) -> torch.Tensor:
    out = []
    for i in range(n):
        with Image.open(OFFICIAL / "images" / "train" / f"{i:03d}.jpg") as im:
            out.append(np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()  # [n, 3, 64, 64] in [0, 1]


def _trained(name: str) -> nn.Module:
    model = official.build()
    model.load_state_dict(official.load_checkpoint(OFFICIAL / "checkpoints" / name), strict=True)
    return model.eval()


def test_checkpoints_load_weights_only_and_strict() -> None:
    names = {n for n, _ in official.build().named_parameters()}
    for name in CHECKPOINTS:
        ckpt = torch.load(OFFICIAL / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert set(ckpt) == {"iter", "win_states", "model_states", "optim_states"}
        assert ckpt["iter"] == int(name)
        assert set(ckpt["win_states"].values()) == {None}
        sd = ckpt["model_states"]["net"]
        assert set(sd) == names and all(isinstance(v, torch.Tensor) for v in sd.values())
        group = ckpt["optim_states"]["optim"]["param_groups"][0]
        assert group["lr"] == official.LEARNING_RATE and group["momentum"] == 0
        model = official.build()
        model.load_state_dict(sd, strict=True)  # raises on any missing / unexpected key or shape
        assert torch.equal(model.decoder[3].weight, sd["decoder.3.weight"])


def test_encode_decode_and_trained_loss() -> None:
    x = _images(32)
    assert x.shape == (32, *official.IMAGE_SHAPE) and 0 <= x.min() and x.max() <= 1
    eps = torch.randn(32, 4, official.Z_DIM, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    random_model = official.build()
    with torch.no_grad():
        random_recon = official.reconstruction_error(random_model(x, eps)[2], x).mean()
        for name in CHECKPOINTS:
            model = _trained(name)
            mu, logvar = official.encode(model, x)
            assert mu.shape == logvar.shape == (32, official.Z_DIM)
            logits = official.decode(model, mu)
            assert logits.shape == x.shape
            recon = official.reconstruction_error(logits, x).mean()
            # trained: a fraction of the random model's error (measured 170-230 against 726)
            assert recon < 0.4 * random_recon, (name, recon.item(), random_recon.item())
            loss = official.per_sample_loss(model, x, eps)
            mu2, logvar2, logits2 = model(x, eps)
            want = (official.reconstruction_error(logits2, x).mean(1) + 2 * official.kl_divergence(mu2, logvar2)) / (
                3 * 64 * 64
            )
            assert loss.shape == (32,) and torch.allclose(loss, want)
            assert official.per_sample_loss(random_model, x, eps).mean() > 2 * loss.mean()


def _double(proj):
    for bl in proj.blocks:
        for attr in ("p_in", "p_out", "p_bias"):
            if getattr(bl, attr) is not None:
                setattr(bl, attr, getattr(bl, attr).double())
    return proj


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_kronecker_covers_every_layer_and_matches_dense() -> None:
    model = _trained("1500000").double()
    assert [l.kind for l in discover_layers(model)] == ["conv2d"] * 5 + ["linear"] * 2 + ["convt2d"] * 5
    x = _images(2).double()
    m = 3
    eps = torch.randn(2, m, official.Z_DIM, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long)
    obj = OfficialLoss(m)
    # exact squared norms: per-sample autograd
    params = [p for _, p in model.named_parameters()]
    want_sq = torch.stack(
        [
            sum(
                g.pow(2).sum()
                for g in torch.autograd.grad(obj.loss(model, x[i : i + 1], y[:1], eps[i : i + 1])[0], params)
            )
            for i in range(2)
        ]
    )
    for spec in (ProjectionSpec(kind="kron", k=16, seed=3), ProjectionSpec(kind="none")):
        proj = _double(build_projector(model, "all", spec))
        ref = DenseFeaturizer(model, obj, proj).featurize(x, y, eps)
        assert torch.allclose(ref.sq_norm, want_sq, rtol=1e-10)
        for route in ("auto", "factor", "matrix"):
            feat = KroneckerFeaturizer(model, obj, proj, route=route)
            out = feat.featurize(x, y, eps)
            assert all(path.startswith("kronecker (") for _, path in feat.layer_routes()), feat.layer_routes()
            assert _rel(out.features, ref.features) < 1e-5, (spec.kind, route)
            assert torch.allclose(out.sq_norm, want_sq, rtol=1e-10, atol=0), (spec.kind, route)
            assert torch.allclose(out.loss.double(), ref.loss.double(), rtol=1e-6)
    assert all(p.grad is None for p in model.parameters())
