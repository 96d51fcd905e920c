"""Whitening a model with layers K-FAC does not cover (a LayerNorm in the decoder), held to a float64 brute force.

Such a layer's per-sample gradient is one row ``g [numel]`` (the dense fallback's), whitened elementwise by
``1 / sqrt(v + λ)``, ``λ = α · mean v``: ``v`` is ``E[g²]`` over the index's per-sample gradients (K-FAC: the
empirical Fisher's diagonal, computed here by autograd one sample at a time) or Adam's ``v̂``. The Linear layers
beside it keep their Kronecker factors; every featurizer stores ``L G Rᵀ`` for them and ``g ⊙ r`` for the LayerNorm
(with the exact norms), and an index's answer names the diagonal layers.
"""

from __future__ import annotations

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from proponent.format import whiten as wfmt
from proponent.indexer import whiten as wjob
from proponent.model.featurizers.dense import DenseFeaturizer
from proponent.model.featurizers.kronecker import KroneckerFeaturizer
from proponent.model.objectives import ELBO, NOISE_INDEX, draw_noise
from proponent.model.projection import ProjectionSpec, Projector, discover_layers
from tests.model.test_kronecker import _model

ALPHA, M, N, SEED = 0.1, 3, 12, 7


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = _model("mlp")  # float64
    model.decoder = nn.Sequential(model.decoder[0], nn.LayerNorm(12).double(), *model.decoder[1:])
    layers = discover_layers(model)
    assert [lay.kind for lay in layers].count("other") == 1
    g = torch.Generator().manual_seed(3)
    x = torch.rand(N, *model.config.input_shape, generator=g, dtype=torch.float64)
    ids = np.arange(N, dtype=np.int64)
    eps = draw_noise(NOISE_INDEX, SEED, 0, ids, M, (model.config.latent_dim,)).double()
    data = SimpleNamespace(x=x.float().numpy(), labels=np.zeros(N, np.int64), ids=ids)
    return model, layers, x, eps, data


def _per_sample(model, layers, x, eps) -> list[dict[str, torch.Tensor]]:
    """Every sample's exact parameter gradients (float64 autograd, one sample at a time, the index's draws)."""
    out = []
    for i in range(len(x)):
        model.zero_grad()
        ELBO(m=M).loss(model, x[i : i + 1], torch.zeros(1, dtype=torch.long), eps[i : i + 1]).sum().backward()
        out.append({n: p.grad.detach().clone() for n, p in model.named_parameters()})
    return out


def _brute(layers, grads, mats) -> tuple[np.ndarray, np.ndarray]:
    """Whitened features of projection "none", written from the definitions: ``L [W | b] Rᵀ`` flattened for a
    Linear layer, ``concat(params) ⊙ r`` for the other one."""
    rows = []
    for g in grads:
        parts = []
        for lay, (left, right, _) in zip(layers, mats, strict=True):
            left, right = wfmt.as_matrix(left), wfmt.as_matrix(right)
            if lay.kind == "other":
                flat = torch.cat([g[p].reshape(-1) for p in lay.params]).numpy()
                parts.append(flat * np.diag(right))
            else:
                w = g[lay.params[0]].numpy()
                if lay.bias_column:
                    w = np.concatenate([w, g[lay.params[1]].numpy()[:, None]], axis=1)
                parts.append((left @ w @ right.T).reshape(-1))
        rows.append(np.concatenate(parts))
    feats = np.stack(rows)
    return feats, (feats**2).sum(1)


def test_kfac_whitens_a_layernorm_by_its_empirical_fisher_diagonal(setup) -> None:
    model, layers, x, eps, data = setup
    logs: list[str] = []
    ((raw, lams_out, lams_in, _),) = wjob.compute(
        "kfac", ALPHA, [model], [(b"", "c0")], ELBO(m=M), layers, data, SEED, logs.append
    )
    mats = wfmt.decode(raw, layers)
    k = next(i for i, lay in enumerate(layers) if lay.kind == "other")
    grads = _per_sample(model, layers, torch.from_numpy(data.x).double(), eps)
    g = np.stack([torch.cat([gi[p].reshape(-1) for p in layers[k].params]).numpy() for gi in grads])
    v = (g**2).mean(0)
    left, right, bias = mats[k]
    assert left.shape == (1,) and left[0] == 1.0 and bias is None
    np.testing.assert_allclose(right, 1 / np.sqrt(v + ALPHA * v.mean()), rtol=1e-4)
    assert lams_out[k] == 0.0 and lams_in[k] == pytest.approx(ALPHA * v.mean(), rel=1e-4)
    # the Linear layers keep full Kronecker factors
    assert all(m[0].ndim == 2 and m[1].ndim == 2 for lay, m in zip(layers, mats, strict=True) if lay.kind != "other")
    assert "diagonal: decoder.1" in logs[0]


@pytest.mark.parametrize("featurizer", ["auto", "factor", "matrix", "dense"])
def test_every_featurizer_stores_the_whitened_layernorm_gradients(setup, featurizer) -> None:
    model, layers, x, eps, data = setup
    ((raw, *_),) = wjob.compute("kfac", ALPHA, [model], [(b"", "c0")], ELBO(m=M), layers, data, SEED)
    mats = wfmt.decode(raw, layers)
    proj = Projector(layers, ProjectionSpec(kind="none"))
    proj.set_whitening(mats)
    want, want_sq = _brute(layers, _per_sample(model, layers, x, eps), mats)
    y = torch.zeros(N, dtype=torch.long)
    if featurizer == "dense":
        fb = DenseFeaturizer(model, ELBO(m=M), proj).featurize(x, y, eps)
    else:
        fb = KroneckerFeaturizer(model, ELBO(m=M), proj, route=featurizer).featurize(x, y, eps)
    np.testing.assert_allclose(fb.features.double().numpy(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    np.testing.assert_allclose(fb.sq_norm.numpy(), want_sq, rtol=1e-8)
    # the LayerNorm's block is whitened, not the raw gradient
    blk = next(b for b in proj.blocks if b.info.kind == "other")
    plain = want[:, blk.offset : blk.offset + blk.dim] / mats[layers.index(blk.info)][1]
    assert not np.allclose(fb.features[:, blk.offset : blk.offset + blk.dim].numpy(), plain, rtol=1e-2)


def test_adam_whitens_a_layernorm_by_its_second_moments(setup) -> None:
    model, layers, x, eps, data = setup
    trained = _model("mlp")
    trained.decoder = nn.Sequential(trained.decoder[0], nn.LayerNorm(12).double(), *trained.decoder[1:])
    trained.load_state_dict(model.state_dict())
    opt = torch.optim.Adam(trained.parameters(), lr=1e-3)
    for _ in range(3):
        opt.zero_grad()
        ELBO(m=M).loss(trained, x, torch.zeros(N, dtype=torch.long), eps).mean().backward()
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": trained.state_dict(), "optimizer": opt.state_dict()}, buf)
    ((raw, _, lams_in, _),) = wjob.compute(
        "adam", ALPHA, [trained], [(buf.getvalue(), "c0")], ELBO(m=M), layers, data, SEED
    )
    mats = wfmt.decode(raw, layers)
    k = next(i for i, lay in enumerate(layers) if lay.kind == "other")
    state = opt.state_dict()["state"]
    names = [n for n, _ in trained.named_parameters()]
    v = np.concatenate(
        [
            (state[names.index(p)]["exp_avg_sq"] / (1 - 0.999 ** float(state[names.index(p)]["step"]))).numpy()
            for p in layers[k].params
        ]
    )
    np.testing.assert_allclose(mats[k][1], 1 / np.sqrt(v + ALPHA * v.mean()), rtol=1e-12)
    assert lams_in[k] == pytest.approx(ALPHA * v.mean())


def test_other_layers_take_diagonal_factors_only_and_answers_name_them(setup) -> None:
    model, layers, *_ = setup
    k = next(i for i, lay in enumerate(layers) if lay.kind == "other")
    proj = Projector(layers, ProjectionSpec(kind="none"))
    mats = [(np.eye(lay.out_dim), np.eye(lay.in_dim), None) for lay in layers]
    proj.set_whitening(mats)  # identity factors: diagonal, taken
    mats[k] = (np.eye(1), np.eye(layers[k].in_dim) + 0.1, None)  # a full matrix: not the dense fallback's form
    with pytest.raises(ValueError, match=f"layer {layers[k].name} \\(other\\): only diagonal whitening"):
        proj.set_whitening(mats)
    with pytest.raises(wfmt.WhitenError, match=f"layer {layers[k].name}"):
        wfmt.diagonal_factors(np.zeros(24), ALPHA, f"layer {layers[k].name} (other)")
    man = SimpleNamespace(
        whiten=SimpleNamespace(kind="kfac", alpha=ALPHA),
        projection=SimpleNamespace(layers=[SimpleNamespace(name=lay.name, kind=lay.kind) for lay in layers]),
    )
    assert "layers decoder.1 (not Linear / Conv) whitened by a diagonal only" in (wfmt.describe(man) or "")


_MODEL = '''
import torch
import torch.nn.functional as F
from torch import nn


class LNVAE(nn.Module):
    """A user's VAE with a LayerNorm in its encoder: a layer K-FAC does not cover."""

    def __init__(self):
        super().__init__()
        self.fc1, self.ln = nn.Linear(64, 16), nn.LayerNorm(16)
        self.fc21, self.fc22 = nn.Linear(16, 2), nn.Linear(16, 2)
        self.fc3, self.fc4 = nn.Linear(2, 16), nn.Linear(16, 64)

    def encode(self, x):
        h = F.relu(self.ln(self.fc1(x.reshape(-1, 64))))
        return self.fc21(h), self.fc22(h)

    def decode(self, z):
        return self.fc4(F.relu(self.fc3(z)))
'''

_PLUGIN = """
import torch.nn.functional as F
from lnvae import LNVAE

from proponent.model.plugin import VAEParts


def plugin():
    return VAEParts(
        module=LNVAE(),
        encode=lambda m, x: m.encode(x),
        decode=lambda m, z: m.decode(z),
        reconstruction=lambda out, x: F.binary_cross_entropy_with_logits(
            out, x.reshape(-1, 64), reduction="none"
        ).sum(1),
        latent_dim=2,
    )
"""


@pytest.mark.parametrize("kind", ["kfac", "adam"])
def test_a_users_model_with_a_layernorm_is_whitened_end_to_end(kind, tmp_path, capsys) -> None:
    """`proponent index --whiten` on a plugin model with a LayerNorm: built, verified, and its answers say which
    layers were whitened by a diagonal only."""
    import json
    import sys

    from proponent.cli import main
    from proponent.format.fsio import IndexDir
    from proponent.format.integrity import verify_index
    from proponent.format.manifest import read_manifest
    from proponent.indexer.data import load_dataset

    code = tmp_path / "code"
    code.mkdir()
    (code / "lnvae.py").write_text(_MODEL)
    (code / "plugin.py").write_text(_PLUGIN)
    sys.path.insert(0, str(code))
    try:
        from lnvae import LNVAE  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(code))
        sys.modules.pop("lnvae", None)
    torch.manual_seed(0)
    model = LNVAE()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.from_numpy(load_dataset("digits,limit=96").x).reshape(-1, 64)
    ckpts = []
    for step in range(1, 7):
        opt.zero_grad()
        mu, logvar = model.encode(x)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        rec = torch.nn.functional.binary_cross_entropy_with_logits(model.decode(z), x, reduction="none").sum(1)
        kl = -0.5 * (1 + logvar - mu**2 - logvar.exp()).sum(1)
        (rec + kl).mean().backward()
        opt.step()
        if step % 3 == 0:
            ckpts.append(tmp_path / f"ckpt_{step}.pt")
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}
            torch.save({**state, "epoch": step, "batch_size": 96}, ckpts[-1])
    idx = tmp_path / "idx"
    argv = ["index", "--data", "digits,limit=96", "--model-code", f"{code}/plugin.py:plugin", "--checkpoints"]
    argv += [*map(str, ckpts), "--checkpoint-key", "model", "--out", str(idx), "--m", "2", "--whiten", kind]
    assert main([*argv, "--quiet"]) == 0, capsys.readouterr().err
    man = read_manifest(IndexDir(idx))
    assert man.whiten is not None and man.whiten.kind == kind
    assert {l.name: l.kind for l in man.projection.layers}["ln"] == "other"
    assert verify_index(IndexDir(idx)) == []
    capsys.readouterr()
    assert main(["influence", "--index", str(idx), "--sample-id", "3", "--k", "5", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert any("layers ln (not Linear / Conv) whitened by a diagonal only" in a for a in answer["approximations"])
    assert len(answer["proponents"]) == 5
