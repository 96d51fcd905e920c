"""Whitening an nn.ConvTranspose2d layer (the VAE-TracIn authors' decoder), held to a float64 brute force.

The brute force is written from the definitions with autograd and ``F.unfold``: the layer's weight gradient is the
swapped Conv2d's, ``G = Σ_p x_p a_pᵀ`` over the layer's input positions p (``x_p`` the input ``[C_in]``, ``a_p`` the
output gradient's patch ``[C_out · kh · kw]`` that position reaches; the test checks this sum against autograd), so
K-FAC's factors are ``S = E[x xᵀ]`` and ``A = E[a aᵀ]`` over rows and positions; the separate bias block's gradient
is ``Σ δ`` over the output positions, whitened by ``B = (S_b + λ_b)^{-1/2}`` with ``S_b = E[δ δᵀ]`` over rows and
output positions. The product's factors (``proponent.indexer.whiten.compute``, float32 products summed in float64)
equal it, and every featurizer (Kronecker, both routes; dense) stores ``L G Rᵀ`` and ``B g_b`` with their exact
norms. Adam's form of the bias block is ``1 / sqrt(v̂ + α mean v̂)``.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from proponent.format import whiten as wfmt
from proponent.indexer import whiten as wjob
from proponent.model.featurizers.dense import DenseFeaturizer
from proponent.model.featurizers.kronecker import KroneckerFeaturizer
from proponent.model.objectives import ELBO, NOISE_INDEX, draw_noise
from proponent.model.projection import ProjectionSpec, Projector, discover_layers
from tests.model.test_kronecker import _convt_model

ALPHA, M, N, SEED = 0.1, 3, 10, 7


def _inv_sqrt(m: np.ndarray, lam: float) -> np.ndarray:
    e, q = np.linalg.eigh(m)
    return q @ np.diag(1.0 / np.sqrt(np.clip(e, 0, None) + lam)) @ q.T


def _damped(m: np.ndarray) -> np.ndarray:
    return _inv_sqrt(m, ALPHA * np.trace(m) / len(m))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = _convt_model("k4s2p1")  # float64; the authors' upsampling geometry (4 -> 8, then 8 -> 16, cropped)
    layers = discover_layers(model)
    g = torch.Generator().manual_seed(3)
    x = torch.rand(N, 2, 8, 8, generator=g, dtype=torch.float64)
    ids = np.arange(N, dtype=np.int64)
    eps = draw_noise(NOISE_INDEX, SEED, 0, ids, M, (model.config.latent_dim,)).double()
    data = SimpleNamespace(x=x.float().numpy(), labels=np.zeros(N, np.int64), ids=ids)
    return model, layers, x, eps, data


def _convt_rows(model, x, eps):
    """Per ConvTranspose2d module name: (input [R, C_in, h, w], output gradient [R, C_out, H, W]) by autograd."""
    got, outs = {}, {}

    def hook(name):
        def f(mod, args, out):
            out.retain_grad()
            got[name] = args[0].detach()
            outs[name] = out

        return f

    handles = [
        mod.register_forward_hook(hook(name))
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.ConvTranspose2d)
    ]
    try:
        model.zero_grad()
        ELBO(m=M).loss(model, x, torch.zeros(len(x), dtype=torch.long), eps).sum().backward()
    finally:
        for h in handles:
            h.remove()
    return {k: (got[k], outs[k].grad.detach()) for k in got}


def test_kfac_factors_of_a_convtranspose_layer_equal_the_definitions(setup) -> None:
    model, layers, x, eps, data = setup
    rows = _convt_rows(model, x, eps)
    made = wjob.compute("kfac", ALPHA, [model], [(b"", "c0")], ELBO(m=M), layers, data, SEED)
    ((raw, lams_out, lams_in, lams_bias),) = made
    mats = wfmt.decode(raw, layers)
    assert len(lams_bias) == len(layers)
    mods = dict(model.named_modules())
    checked = 0
    for k, lay in enumerate(layers):
        left, right, bias = mats[k]
        if lay.kind != "convt2d":
            assert bias is None and lams_bias[k] == 0.0
            continue
        mod = mods[lay.name]
        xin, dout = rows[lay.name]
        # the swapped conv: patches of the output gradient at every input position
        a = F.unfold(dout, mod.kernel_size, dilation=mod.dilation, padding=mod.padding, stride=mod.stride)
        assert a.shape[-1] == xin.shape[-2] * xin.shape[-1]  # this geometry: the swapped conv's output is the input
        a = a.transpose(1, 2).reshape(-1, a.shape[1]).numpy()
        d = xin.flatten(2).transpose(1, 2).reshape(-1, xin.shape[1]).numpy()
        grad_w = mod.weight.grad.reshape(mod.in_channels, -1).numpy()  # summed over the batch
        np.testing.assert_allclose(d.T @ a, grad_w, rtol=1e-9, atol=1e-12 * np.abs(grad_w).max())
        b = dout.permute(0, 2, 3, 1).reshape(-1, dout.shape[1]).numpy()
        np.testing.assert_allclose(b.sum(0), mod.bias.grad.numpy(), rtol=1e-9, atol=1e-12)
        for got, want in (
            (left, _damped(d.T @ d / len(d))),
            (right, _damped(a.T @ a / len(a))),
            (bias, _damped(b.T @ b / len(b))),
        ):
            assert got is not None
            np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4 * np.abs(want).max())
        np.testing.assert_allclose(lams_bias[k], ALPHA * np.trace(b.T @ b / len(b)) / b.shape[1], rtol=1e-4)
        checked += 1
    assert checked == 2


def _brute_features(model, proj, mats, x, eps) -> tuple[np.ndarray, np.ndarray]:
    """Per sample by autograd: every layer's ``L G Rᵀ`` flattened, then ``B g_b`` where the layer has a bias block."""
    params = dict(model.named_parameters())
    feats, sq = [], []
    for i in range(len(x)):
        loss = ELBO(m=M).loss(model, x[i : i + 1], torch.zeros(1, dtype=torch.long), eps[i : i + 1])[0]
        names = proj.param_names
        grads = dict(zip(names, (g.unsqueeze(0) for g in torch.autograd.grad(loss, [params[n] for n in names]))))
        row = []
        for blk, (left, right, bias) in zip(proj.blocks, mats, strict=True):
            g = proj.gradient_matrix(blk, grads)[0].numpy()
            row.append((left @ g @ right.T).reshape(-1))
            gb = proj.bias_gradient(blk, grads)
            if gb is not None:
                assert bias is not None
                row.append(bias @ gb[0].numpy())
        r = np.concatenate(row)
        feats.append(r)
        sq.append(r @ r)
    return np.stack(feats), np.array(sq)


@pytest.mark.parametrize("featurizer", ["factor", "matrix", "dense"])
def test_every_featurizer_stores_the_whitened_convtranspose_gradients(setup, featurizer) -> None:
    model, layers, x, eps, data = setup
    ((raw, *_),) = wjob.compute("kfac", ALPHA, [model], [(b"", "c0")], ELBO(m=M), layers, data, SEED)
    mats = wfmt.decode(raw, layers)
    proj = Projector(layers, ProjectionSpec(kind="none"))
    proj.set_whitening(mats)
    want, want_sq = _brute_features(model, proj, mats, x, eps)
    if featurizer == "dense":
        fb = DenseFeaturizer(model, ELBO(m=M), proj).featurize(x, torch.zeros(N, dtype=torch.long), eps)
    else:
        feat = KroneckerFeaturizer(model, ELBO(m=M), proj, route=featurizer)
        fb = feat.featurize(x, torch.zeros(N, dtype=torch.long), eps)
    np.testing.assert_allclose(fb.features.double().numpy(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(fb.sq_norm.numpy(), want_sq, rtol=1e-9)
    # the bias block is whitened (not the raw Σ δ): its features differ from the unwhitened ones
    raw_proj = Projector(layers, ProjectionSpec(kind="none"))
    plain = KroneckerFeaturizer(model, ELBO(m=M), raw_proj).featurize(x, torch.zeros(N, dtype=torch.long), eps)
    blk = next(b for b in proj.blocks if b.info.bias_dim)
    cols = slice(blk.offset + blk.k_in * blk.k_out, blk.offset + blk.dim)
    assert not np.allclose(fb.features[:, cols].numpy(), plain.features[:, cols].numpy(), rtol=1e-2)


def test_factors_files_carry_the_bias_block_and_refuse_a_misshapen_one(setup) -> None:
    model, layers, *_, data = setup
    ((raw, *_),) = wjob.compute("kfac", ALPHA, [model], [(b"", "c0")], ELBO(m=M), layers, data, SEED)
    z = np.load(io.BytesIO(raw))
    want = {f"bias_{k}" for k, lay in enumerate(layers) if lay.bias_dim}
    assert {n for n in z.files if n.startswith("bias_")} == want and want
    mats = wfmt.decode(raw, layers)
    proj = Projector(layers, ProjectionSpec(kind="none"))
    k = next(i for i, lay in enumerate(layers) if lay.bias_dim)
    broken = list(mats)
    broken[k] = (mats[k][0], mats[k][1], None)
    with pytest.raises(ValueError, match=f"layer {layers[k].name}: whitening shapes"):
        proj.set_whitening(broken)


def test_adam_bias_factor_is_the_inverse_square_root_of_its_moments() -> None:
    v = np.array([1e-4, 4e-4, 9e-4])
    b, lam = wfmt.adam_bias_factor(v, ALPHA)
    assert lam == pytest.approx(ALPHA * v.mean())
    np.testing.assert_allclose(b, 1 / np.sqrt(v + ALPHA * v.mean()))
    with pytest.raises(wfmt.WhitenError, match="bias"):
        wfmt.adam_bias_factor(np.zeros(3), ALPHA)
