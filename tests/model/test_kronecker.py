"""The Kronecker featurizer against the dense torch.func reference and plain autograd."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from proponent.model.architectures import ModelConfig, build_model
from proponent.model.featurizers.dense import DenseFeaturizer
from proponent.model.featurizers.kronecker import KroneckerFeaturizer, auto_batch_size
from proponent.model.objectives import ELBO, CrossEntropy
from proponent.model.projection import ProjectionSpec, Projector, build_projector, discover_layers, select_layers

B, M = 5, 3


def _double_projector(proj: Projector) -> Projector:
    """The dense reference projects in the gradients' dtype: give it float64 matrices."""
    for bl in proj.blocks:
        if bl.p_in is not None:
            bl.p_in = bl.p_in.double()
        if bl.p_out is not None:
            bl.p_out = bl.p_out.double()
        if bl.p_bias is not None:
            bl.p_bias = bl.p_bias.double()
    return proj


def _spec(model: nn.Module, selection: str, proj_kind: str, k: int = 3, seed: int = 4) -> ProjectionSpec:
    """``kron`` / ``none``, or ``tensor`` with small per-layer sketches (7 dims, or exact when smaller)."""
    if proj_kind != "tensor":
        return ProjectionSpec(kind=proj_kind, k=k, seed=seed)
    layers = select_layers(discover_layers(model), selection)
    dims = tuple(min(7, li.in_dim * li.out_dim) for li in layers)
    return ProjectionSpec(kind="tensor", seed=seed, dim=sum(dims), layer_dims=dims)


def _model(kind: str, **kw) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        cfg = ModelConfig(kind="mlp", input_shape=(1, 6, 6), hidden=(24, 12), latent_dim=4, **kw)
    elif kind == "conv":
        cfg = ModelConfig(kind="conv", input_shape=(1, 8, 8), channels=(4, 8), latent_dim=3, **kw)
    else:
        cfg = ModelConfig(kind="classifier", input_shape=(1, 6, 6), hidden=(20, 12), num_classes=5, **kw)
    model = build_model(cfg).double()
    # perturb biases so no gradient is accidentally symmetric
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _data(model: nn.Module, m: int = M, n: int = B, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    cfg = model.config
    x = torch.rand(n, *cfg.input_shape, generator=g, dtype=dtype)
    eps = torch.randn(n, m, cfg.latent_dim, generator=g, dtype=dtype)
    y = torch.randint(0, getattr(cfg, "num_classes", 2), (n,), generator=g)
    return x, y, eps


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def _autograd_sq_norms(model, objective, proj, x, y, eps) -> torch.Tensor:
    params = dict(model.named_parameters())
    chosen = [params[n] for n in proj.param_names]
    out = []
    for i in range(x.shape[0]):
        loss = objective.loss(model, x[i : i + 1], y[i : i + 1], eps[i : i + 1])[0]
        gs = torch.autograd.grad(loss, chosen)
        out.append(sum(g.double().pow(2).sum() for g in gs))
    return torch.stack(out)


def _check(model, objective, proj, x, y, eps, routes=("auto",), tol=1e-6, **kw) -> None:
    ref = DenseFeaturizer(model, objective, proj).featurize(x, y, eps)
    for route in routes:
        out = KroneckerFeaturizer(model, objective, proj, route=route, **kw).featurize(x, y, eps)
        assert out.features.shape == ref.features.shape == (x.shape[0], proj.dim)
        assert out.features.dtype == torch.float32 and out.sq_norm.dtype == torch.float64
        assert _rel(out.features, ref.features) < tol, route
        assert torch.allclose(out.sq_norm, ref.sq_norm, rtol=tol, atol=0), route
        assert torch.allclose(out.loss, ref.loss, rtol=1e-6)


@pytest.mark.parametrize("kind", ["mlp", "conv"])
@pytest.mark.parametrize("proj_kind", ["tensor", "kron", "none"])
@pytest.mark.parametrize("selection", ["all", "encoder", "decoder", "last:2"])
def test_matches_dense_vae(kind: str, proj_kind: str, selection: str) -> None:
    model = _model(kind)
    obj = ELBO(m=M, beta=0.7)
    proj = _double_projector(build_projector(model, selection, _spec(model, selection, proj_kind)))
    if proj_kind == "kron":
        assert any(bl.p_in is not None for bl in proj.blocks) and any(bl.p_out is not None for bl in proj.blocks)
    if proj_kind == "tensor":
        assert all(bl.tensor is not None for bl in proj.blocks) and proj.dim == 7 * len(proj.blocks)
    routes = ("auto", "factor", "matrix") if selection == "all" else ("auto",)
    _check(model, obj, proj, *_data(model), routes=routes)


def test_bernoulli_and_chunks() -> None:
    model = _model("mlp", likelihood="bernoulli")
    obj = ELBO(m=4, likelihood="bernoulli")
    proj = _double_projector(build_projector(model, "all", ProjectionSpec(kind="kron", k=5)))
    x, y, eps = _data(model, m=4, n=7)
    _check(model, obj, proj, x, y, eps, routes=("auto", "matrix"), chunk_size=3)


def test_sq_norms_equal_autograd() -> None:
    for kind in ("mlp", "conv"):
        model = _model(kind)
        obj = ELBO(m=M)
        proj = build_projector(model, "all", ProjectionSpec(kind="kron", k=3))
        x, y, eps = _data(model)
        want = _autograd_sq_norms(model, obj, proj, x, y, eps)
        for route in ("auto", "factor", "matrix"):
            got = KroneckerFeaturizer(model, obj, proj, route=route).featurize(x, y, eps).sq_norm
            assert torch.allclose(got, want, rtol=1e-10, atol=0), (kind, route)


def test_float32_close_to_dense_and_model_untouched() -> None:
    model = _model("conv").float()
    before = copy.deepcopy(model.state_dict())
    obj = ELBO(m=M)
    proj = build_projector(model, "all", ProjectionSpec(kind="kron", k=4))
    x, y, eps = _data(model, dtype=torch.float32)
    ref = DenseFeaturizer(model, obj, proj).featurize(x, y, eps)
    out = KroneckerFeaturizer(model, obj, proj).featurize(x, y, eps)
    assert _rel(out.features, ref.features) < 1e-5
    assert torch.allclose(out.sq_norm, ref.sq_norm, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])


def test_classifier_cross_entropy() -> None:
    model = _model("classifier")
    obj = CrossEntropy()
    for selection in ("all", "last:1"):
        proj = _double_projector(build_projector(model, selection, ProjectionSpec(kind="kron", k=4)))
        x, y, eps = _data(model, m=1)
        _check(model, obj, proj, x, y, eps, routes=("auto", "factor", "matrix"))
        want = _autograd_sq_norms(model, obj, proj, x, y, eps)
        got = KroneckerFeaturizer(model, obj, proj).featurize(x, y, eps).sq_norm
        assert torch.allclose(got, want, rtol=1e-10)


class _NormClassifier(nn.Module):
    """Linear -> LayerNorm -> ReLU -> grouped conv ... : two "other" layers between fast ones."""

    def __init__(self) -> None:
        super().__init__()
        self.config = ModelConfig(kind="classifier", input_shape=(2, 6, 6), num_classes=4)
        self.conv = nn.Conv2d(2, 4, 3, padding="same", padding_mode="reflect")
        self.dw = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=2)  # groups != 1: dense fallback
        self.fc1 = nn.Linear(36, 10)
        self.norm = nn.LayerNorm(10)
        self.fc2 = nn.Linear(10, 4, bias=False)

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.relu(self.dw(torch.relu(self.conv(x))))
        return self.fc2(torch.relu(self.norm(self.fc1(h.flatten(1)))))


def test_other_layers_fall_back_to_dense() -> None:
    torch.manual_seed(0)
    model = _NormClassifier().double()
    kinds = {l.name: l.kind for l in discover_layers(model)}
    assert kinds == {"conv": "conv2d", "dw": "other", "fc1": "linear", "norm": "other", "fc2": "linear"}
    obj = CrossEntropy()
    x, y, eps = _data(model, m=1)
    for proj_kind in ("kron", "none"):
        proj = _double_projector(build_projector(model, "all", ProjectionSpec(kind=proj_kind, k=3)))
        _check(model, obj, proj, x, y, eps, routes=("auto", "factor", "matrix"))
    only_other = _double_projector(build_projector(model, "norm,dw", ProjectionSpec(kind="kron", k=3)))
    _check(model, obj, only_other, x, y, eps)


def test_vae_with_layernorm_in_decoder() -> None:
    model = _model("mlp")
    model.decoder = nn.Sequential(model.decoder[0], nn.LayerNorm(12).double(), *model.decoder[1:])
    obj = ELBO(m=M)
    for selection in ("all", "decoder"):
        proj = _double_projector(build_projector(model, selection, ProjectionSpec(kind="kron", k=3)))
        assert any(bl.info.kind == "other" for bl in proj.blocks)
        _check(model, obj, proj, *_data(model))


class _Shared(nn.Module):
    """The same Linear applied twice: per-sample gradients sum over both calls."""

    def __init__(self) -> None:
        super().__init__()
        self.config = ModelConfig(kind="classifier", input_shape=(8,), num_classes=8)
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        return self.a(torch.tanh(self.b(torch.tanh(self.a(x)))))


def test_layer_called_twice_and_frozen_parameters() -> None:
    torch.manual_seed(0)
    model = _Shared().double()
    obj = CrossEntropy()
    x, y, eps = _data(model, m=1)
    proj = _double_projector(build_projector(model, "all", ProjectionSpec(kind="kron", k=3)))
    _check(model, obj, proj, x, y, eps, routes=("auto", "factor", "matrix"))
    # frozen layers still get their per-sample gradients (the input is made to require grad)
    for p in model.parameters():
        p.requires_grad_(False)
    _check(model, obj, proj, x, y, eps)
    assert all(p.grad is None for p in model.parameters())


def test_rows_must_be_sample_major_multiple() -> None:
    model = _model("mlp")
    obj = ELBO(m=M)
    proj = build_projector(model, "all", ProjectionSpec(kind="kron", k=3))
    feat = KroneckerFeaturizer(model, obj, proj)
    lay = feat.layers[0]
    with pytest.raises(ValueError, match="multiple"):
        feat._rows_per_sample(lay, torch.zeros(7, lay.in_nb), torch.zeros(7, lay.out), 2)


def test_auto_batch_size() -> None:
    for kind in ("mlp", "conv"):
        model = _model(kind).float()
        obj = ELBO(m=8)
        proj = build_projector(model, "all", ProjectionSpec(kind="kron", k=4))
        n = auto_batch_size(model, obj, proj, "cpu")
        assert isinstance(n, int) and 1 <= n <= 4096
        assert auto_batch_size(model, obj, proj, "cpu", budget_bytes=1) == 1
        feat = KroneckerFeaturizer(model, obj, proj)
        per = feat.bytes_per_sample(*_data(model, m=8, n=4, dtype=torch.float32))
        assert per > 0
        assert auto_batch_size(model, obj, proj, "cpu", budget_bytes=per * 10) in range(8, 13)
    big = _model("conv").float()
    big_proj = build_projector(big, "all", ProjectionSpec(kind="kron"))
    small_budget = auto_batch_size(big, ELBO(m=64), big_proj, "cpu", 2**24)
    assert small_budget < auto_batch_size(big, ELBO(m=1), big_proj, "cpu", 2**24)


def test_selection_subset_of_layers_matches_full_blocks() -> None:
    """A featurizer over a sub-selection equals the same blocks of the full featurizer."""
    model = _model("conv")
    obj = ELBO(m=M)
    spec = ProjectionSpec(kind="kron", k=3)
    layers = discover_layers(model)
    full = Projector(layers, spec)
    part = Projector(select_layers(layers, "decoder"), spec)
    x, y, eps = _data(model)
    f_full = KroneckerFeaturizer(model, obj, full).featurize(x, y, eps).features
    f_part = KroneckerFeaturizer(model, obj, part).featurize(x, y, eps).features
    names = {bl.info.name: bl for bl in full.blocks}
    for bl in part.blocks:
        fb = names[bl.info.name]
        assert torch.allclose(f_part[:, bl.offset : bl.offset + bl.dim], f_full[:, fb.offset : fb.offset + fb.dim])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    for kind in ("mlp", "conv"):
        model = _model(kind)
        obj = ELBO(m=M)
        x, y, eps = _data(model)
        proj = _double_projector(build_projector(model, "all", ProjectionSpec(kind="kron", k=3)))
        ref = KroneckerFeaturizer(model, obj, proj).featurize(x, y, eps)
        gmodel = copy.deepcopy(model).cuda()
        gproj = _double_projector(build_projector(gmodel, "all", ProjectionSpec(kind="kron", k=3), device="cuda"))
        for route in ("auto", "matrix"):
            out = KroneckerFeaturizer(gmodel, obj, gproj, route=route).featurize(x, y, eps)
            assert out.features.device.type == "cuda"
            assert _rel(out.features.cpu(), ref.features) < 1e-6
            assert torch.allclose(out.sq_norm.cpu(), ref.sq_norm, rtol=1e-8)
        assert 1 <= auto_batch_size(gmodel.float(), obj, gproj) <= 4096


class _Inplace(nn.Module):
    """Linear -> ReLU(inplace=True): the recorded layer output is overwritten by the ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.config = ModelConfig(kind="classifier", input_shape=(6,), num_classes=3)
        self.fc1 = nn.Linear(6, 7)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def test_inplace_activation_detected() -> None:
    torch.manual_seed(0)
    model = _Inplace().double()
    obj = CrossEntropy()
    x, y, eps = _data(model, m=1, n=6)
    proj = _double_projector(build_projector(model, "all", ProjectionSpec(kind="kron", k=3)))
    ref = DenseFeaturizer(model, obj, proj).featurize(x, y, eps)
    feat = KroneckerFeaturizer(model, obj, proj)
    out = feat.featurize(x, y, eps)
    assert feat._safe
    assert _rel(out.features, ref.features) < 1e-6
    assert torch.allclose(out.sq_norm, ref.sq_norm, rtol=1e-10)


def test_empty_batch() -> None:
    model = _model("mlp")
    proj = build_projector(model, "all", ProjectionSpec(kind="kron", k=3))
    x, y, eps = _data(model, n=0)
    fb = KroneckerFeaturizer(model, ELBO(m=M), proj).featurize(x, y, eps)
    assert fb.features.shape == (0, proj.dim) and fb.sq_norm.shape == (0,) and fb.loss.shape == (0,)


# ------------------------------------------------------------------ ConvTranspose2d

# (kernel, stride, padding, output_padding, dilation) of the first decoder ConvTranspose2d; from 4x4
CONVT_SPECS = {
    "k4s2p1": (4, 2, 1, 0, 1),  # the authors' upsampling layer: 4 -> 8
    "k3s2p1op1": (3, 2, 1, 1, 1),  # output padding: 4 -> 8
    "k3s1p0": (3, 1, 0, 0, 1),  # 4 -> 6
    "k2s3p1op2": (2, 3, 1, 2, 1),  # stride > kernel (positions no input reaches): 4 -> 9
    "k3s1p2d2": (3, 1, 2, 0, 2),  # dilation: 4 -> 4
    "k3s1p1d2op1": (3, 1, 1, 1, 2),  # output padding >= stride (< dilation): the swapped conv outgrows the input
    "rect": ((3, 2), (2, 1), (1, 0), (1, 0), (1, 2)),  # per-axis geometry: 4x4 -> 9x6
}


class _ConvTVAE(nn.Module):
    """A small conv VAE whose decoder upsamples with ConvTranspose2d (cropped to the input size)."""

    def __init__(self, spec: tuple, bias: bool = True, groups: int = 1) -> None:
        super().__init__()
        self.config = ModelConfig(kind="conv", input_shape=(2, 8, 8), latent_dim=3)
        k, s, p, op, d = spec
        self.encoder = nn.Sequential(nn.Conv2d(2, 4, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 6))
        self.decoder = nn.Sequential(
            nn.Linear(3, 6 * 16),
            nn.Unflatten(1, (6, 4, 4)),
            nn.ReLU(),
            nn.ConvTranspose2d(6, 4, k, s, p, op, groups=groups, bias=bias, dilation=d),
            nn.Tanh(),
            nn.ConvTranspose2d(4, 2, 4, 2, 1, bias=bias),
        )

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        b, m, L = eps.shape
        z = (mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps).reshape(b * m, L)
        logits = self.decoder(z)[..., :8, :8]
        return mu, logvar, logits.reshape(b, m, 2, 8, 8)


def _convt_model(spec_name: str, bias: bool = True, groups: int = 1) -> nn.Module:
    torch.manual_seed(0)
    model = _ConvTVAE(CONVT_SPECS[spec_name], bias, groups).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def test_convtranspose_layout() -> None:
    model = _convt_model("rect")
    info = {l.name: l for l in discover_layers(model)}
    t = info["decoder.3"]
    assert (t.kind, t.in_dim, t.out_dim, t.has_bias, t.bias_dim) == ("convt2d", 4 * 3 * 2, 6, True, 4)
    assert not t.bias_column and info["encoder.0"].bias_column
    proj = build_projector(model, "all", ProjectionSpec(kind="kron", k=3))
    blk = {b.info.name: b for b in proj.blocks}
    assert (blk["decoder.3"].k_bias, blk["decoder.3"].dim) == (3, 9 + 3)  # C_out = 4 > k: projected bias
    assert (blk["decoder.5"].k_bias, blk["decoder.5"].p_bias) == (2, None)  # C_out = 2 <= k: identity
    assert proj.dim == sum(b.dim for b in proj.blocks)
    layer = {d["name"]: d for d in proj.manifest()["layers"]}
    assert layer["decoder.3"]["bias_dim"] == 4 and layer["decoder.3"]["projected_bias"]
    # kind "none": the exact gradients, weight as stored [C_in, C_out, kh, kw], then the bias
    none = build_projector(model, "decoder.3", ProjectionSpec(kind="none"))
    gw, gb = torch.randn(2, 6, 4, 3, 2, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
    feats = none.project_gradients({"decoder.3.weight": gw, "decoder.3.bias": gb})
    assert torch.equal(feats, torch.cat([gw.reshape(2, -1), gb], dim=1))
    no_bias = {l.name: l for l in discover_layers(_convt_model("rect", bias=False))}["decoder.3"]
    assert (no_bias.has_bias, no_bias.bias_dim, no_bias.params) == (False, 0, ["decoder.3.weight"])
    grouped = {l.name: l for l in discover_layers(_convt_model("k4s2p1", groups=2))}
    assert grouped["decoder.3"].kind == "other"


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("spec", list(CONVT_SPECS))
def test_convtranspose_matches_dense(spec: str, bias: bool) -> None:
    model = _convt_model(spec, bias)
    obj = ELBO(m=M, beta=0.7)
    x, y, eps = _data(model)
    for proj_kind in ("tensor", "kron", "none"):
        proj = _double_projector(build_projector(model, "all", _spec(model, "all", proj_kind, seed=2)))
        assert [b.info.kind for b in proj.blocks].count("convt2d") == 2
        _check(model, obj, proj, x, y, eps, routes=("auto", "factor", "matrix"))
    proj = build_projector(model, "decoder", ProjectionSpec(kind="kron", k=3))
    want = _autograd_sq_norms(model, obj, proj, x, y, eps)
    for route in ("auto", "factor", "matrix"):
        feat = KroneckerFeaturizer(model, obj, proj, route=route)
        got = feat.featurize(x, y, eps).sq_norm
        assert torch.allclose(got, want, rtol=1e-10, atol=0), route
        assert all(p.startswith("kronecker") for _, p in feat.layer_routes())


def test_convtranspose_grouped_falls_back_and_chunks() -> None:
    model = _convt_model("k3s2p1op1", groups=2)
    obj = ELBO(m=M)
    proj = _double_projector(build_projector(model, "all", ProjectionSpec(kind="kron", k=3)))
    x, y, eps = _data(model, n=7)
    _check(model, obj, proj, x, y, eps, routes=("auto", "matrix"), chunk_size=3)


def test_layer_routes() -> None:
    torch.manual_seed(0)
    model = _NormClassifier().double()
    proj = build_projector(model, "all", ProjectionSpec(kind="kron", k=3))
    feat = KroneckerFeaturizer(model, CrossEntropy(), proj)
    pending = "kronecker (route not chosen yet)"
    assert feat.layer_routes() == [
        ("conv", pending),
        ("dw", "dense fallback"),
        ("fc1", pending),
        ("norm", "dense fallback"),
        ("fc2", pending),
    ]
    feat.featurize(*_data(model, m=1))
    routes = dict(feat.layer_routes())
    assert routes["dw"] == routes["norm"] == "dense fallback"
    assert all(routes[n] in ("kronecker (factor route)", "kronecker (matrix route)") for n in ("conv", "fc1", "fc2"))
    for route in ("factor", "matrix"):
        forced = KroneckerFeaturizer(model, CrossEntropy(), proj, route=route)
        forced.featurize(*_data(model, m=1))
        assert dict(forced.layer_routes())["fc1"] == f"kronecker ({route} route)"
    # a layer called twice always takes the matrix route
    shared = _Shared().double()
    feat = KroneckerFeaturizer(
        shared, CrossEntropy(), build_projector(shared, "all", ProjectionSpec(kind="kron", k=3)), route="factor"
    )
    feat.featurize(*_data(shared, m=1))
    assert feat.layer_routes() == [("a", "kronecker (matrix route)"), ("b", "kronecker (factor route)")]
    # the tensor layout without calibrated dimensions: a parameter-count prior, labelled as such
    proj = build_projector(model, "all", ProjectionSpec(dim=40))
    dims = proj.spec.layer_dims
    assert dims is not None and len(dims) == 5 and sum(dims) <= 40 and all(d >= 1 for d in dims)
    feat = KroneckerFeaturizer(model, CrossEntropy(), proj)
    feat.featurize(*_data(model, m=1))
    labels = dict(feat.layer_routes())
    assert labels["dw"] == "dense fallback"
    assert all(labels[n].startswith("tensor sketch (") for n in ("conv", "fc1", "fc2"))


def test_conv_matrix_route_grouped_and_per_sample_loop_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    """The conv matrix route's two forms (CPU: a loop over samples; CUDA: one call grouped per row)."""
    import proponent.model.featurizers.kronecker as kron

    obj = ELBO(m=M)
    for model in (_model("conv"), _convt_model("k3s1p1d2op1")):
        proj = _double_projector(build_projector(model, "all", ProjectionSpec(kind="kron", k=3)))
        x, y, eps = _data(model)
        loop = KroneckerFeaturizer(model, obj, proj, route="matrix").featurize(x, y, eps)
        monkeypatch.setattr(kron, "_per_sample_loop", lambda device, rows: False)
        grouped = KroneckerFeaturizer(model, obj, proj, route="matrix").featurize(x, y, eps)
        monkeypatch.undo()
        assert _rel(grouped.features, loop.features) < 1e-12
        assert torch.allclose(grouped.sq_norm, loop.sq_norm, rtol=1e-12, atol=0)


def test_convtranspose_manifest_record() -> None:
    """The projection record with a separate bias block validates and says whether it is exact."""
    from proponent.format.manifest import ProjectionRecord

    model = _convt_model("k4s2p1")
    rec = ProjectionRecord.model_validate(build_projector(model, "all", ProjectionSpec(kind="kron", k=3)).manifest())
    layer = {l.name: l for l in rec.layers}["decoder.3"]
    assert (layer.kind, layer.bias_dim, layer.k_bias, layer.projected_bias) == ("convt2d", 4, 3, True)
    assert not rec.is_exact
    exact = ProjectionRecord.model_validate(build_projector(model, "all", ProjectionSpec(kind="none")).manifest())
    assert exact.is_exact


# ------------------------------------------------------------------ the query's draws in one pass


def _layernorm_vae() -> nn.Module:
    model = _model("mlp")
    model.decoder = nn.Sequential(model.decoder[0], nn.LayerNorm(12).double(), *model.decoder[1:])
    return model


DRAW_MODELS = {
    "mlp": lambda: _model("mlp"),
    "conv": lambda: _model("conv"),
    "convt": lambda: _convt_model("k3s2p1op1"),
    "layernorm": _layernorm_vae,
}


@pytest.mark.parametrize("name", list(DRAW_MODELS))
@pytest.mark.parametrize("proj_kind", ["tensor", "kron", "none"])
def test_draw_features_one_pass_equals_two(name: str, proj_kind: str) -> None:
    """``draw_features``: the draws as rows of one pass, their mean and the mean gradient's exact
    norm from the draws' cross terms, against the two-pass reference (the mean pass and the
    per-draw pass), the dense featurizer and autograd of the mean loss."""
    from proponent.model.featurizers.base import Featurizer

    model = DRAW_MODELS[name]()
    m = 4
    obj = ELBO(m=m, beta=0.7)
    proj = _double_projector(build_projector(model, "all", _spec(model, "all", proj_kind)))
    x, y, eps = _data(model, m=m)
    want_sq = _autograd_sq_norms(model, obj, proj, x, y, eps)
    dense_mean, dense_draws = DenseFeaturizer(model, obj, proj).draw_features(x, y, eps)
    for route in ("auto", "factor", "matrix"):
        for chunk in (None, 6):  # 6 rows -> groups of 4 kept whole (4 rows per chunk)
            feat = KroneckerFeaturizer(model, obj, proj, route=route, chunk_size=chunk)
            mean, draws = feat.draw_features(x, y, eps)
            ref_mean, ref_draws = Featurizer.draw_features(feat, x, y, eps)  # the two passes
            assert draws.shape == (B, m, proj.dim) and mean.features.shape == (B, proj.dim)
            assert _rel(draws, ref_draws) < 1e-6 and _rel(draws, dense_draws) < 1e-6, (route, chunk)
            assert _rel(mean.features, ref_mean.features) < 1e-6 and _rel(mean.features, dense_mean.features) < 1e-6
            assert torch.allclose(mean.sq_norm, want_sq, rtol=1e-6, atol=0), (route, chunk)
            assert torch.allclose(mean.sq_norm, ref_mean.sq_norm, rtol=1e-6, atol=0)
            assert torch.allclose(mean.loss, ref_mean.loss, rtol=1e-6)


def test_grouped_norms_gram_and_matrix_agree() -> None:
    """The two forms of a group's summed-gradient norm (Gram identity; the matrix itself)."""
    import proponent.model.featurizers.kronecker as kron

    g = torch.Generator().manual_seed(3)
    a, d = (
        torch.randn(3, 40, 5, generator=g, dtype=torch.float64),
        torch.randn(3, 40, 7, generator=g, dtype=torch.float64),
    )
    for bias in (False, True):
        full = torch.cat([a, torch.ones(3, 40, 1, dtype=torch.float64)], dim=2) if bias else a
        want = torch.bmm(d.transpose(1, 2), full).square().sum(dim=(1, 2))
        matrix = kron._gram_sq(a, d, bias)  # 40 rows of 5 + 7: the matrix form is cheaper
        gram = kron._gram_sq(a[:, :2], d[:, :2], bias)  # 2 rows: the Gram form
        want2 = torch.bmm(d[:, :2].transpose(1, 2), full[:, :2]).square().sum(dim=(1, 2))
        assert torch.allclose(matrix, want, rtol=1e-12) and torch.allclose(gram, want2, rtol=1e-12)
    with pytest.raises(ValueError, match="groups of 4"):
        KroneckerFeaturizer(
            _model("mlp"), ELBO(m=1), build_projector(_model("mlp"), "all", ProjectionSpec())
        ).featurize(*_data(_model("mlp"), m=1, n=6), group=4)
