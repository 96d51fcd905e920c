"""The worked example: the VAE-TracIn authors' own model, checkpoints and loss, indexed through the plugin
contract by examples/official_vae/run.sh, checked against brute-force float64 autograd, and served.

Needs the shared data next to the repository (``../shared/vae-tracin-official``, present in CI).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from proponent.client import InfluenceClient
from proponent.format.fsio import IndexDir
from proponent.format.integrity import verify_index
from proponent.format.whiten import load as wload
from proponent.model.checkpoints import read_checkpoint, state_dict_at
from proponent.model.objectives import NOISE_INDEX, NOISE_QUERY, draw_noise
from proponent.model.plugin import PluginError, load_plugin
from proponent.model.projection import ProjectionSpec, Projector
from proponent.query.index import IndexOpenError, open_index
from tests.conftest import svc_run_server

REPO = Path(__file__).resolve().parents[1]
OFFICIAL = REPO.parent / "shared" / "vae-tracin-official"
ITERATIONS = (50000, 500000, 1000000, 1500000)

pytestmark = [
    pytest.mark.skipif(not (OFFICIAL / "checkpoints").is_dir(), reason=f"the authors' data is not at {OFFICIAL}"),
    pytest.mark.timeout(1200),
]


@pytest.fixture(scope="module")
def official_index(tmp_path_factory) -> Path:
    return _run_example(tmp_path_factory.mktemp("official") / "idx")


def _run_example(out: Path, *flags: str, **env_vars: str) -> Path:
    env = {**os.environ, "PROPONENT": f"{sys.executable} -m proponent", **env_vars}
    r = subprocess.run(
        [str(REPO / "examples" / "official_vae" / "run.sh"), str(out), str(OFFICIAL), "--quiet", *flags],
        env=env,
        capture_output=True,
        text=True,
        timeout=1100,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _float64_grad(module: torch.nn.Module, objective, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """One sample's gradient of the authors' loss, by plain autograd, in float64 (every parameter)."""
    loss = objective.loss(module, x[None], torch.zeros(1, dtype=torch.long), eps[None])[0]
    params = [p for _, p in module.named_parameters()]
    grads = torch.autograd.grad(loss, params)
    return torch.cat([g.reshape(-1) for g in grads])


def _project(module: torch.nn.Module, proj, g: torch.Tensor) -> np.ndarray:
    """The index's projection of a flat gradient (float32 products, as the featurizers compute them)."""
    parts, start = {}, 0
    for n, p in module.named_parameters():
        parts[n] = g[start : start + p.numel()].reshape(1, *p.shape).float()
        start += p.numel()
    return proj.finish(proj.project_gradients(parts))[0].double().numpy()


def test_index_records_the_users_model_and_training(official_index):
    idx = open_index(official_index, device="cpu")
    man = idx.manifest
    assert man.model.kind == "plugin" and man.model.plugin.factory == "plugin"
    assert Path(man.model.plugin.code).name == "model.py" and man.model.checkpoint_key == "model_states.net"
    assert man.n == 128 and man.shape == (3, 64, 64) and man.objective.m == 16
    assert man.objective.beta == 2.0 and man.objective.scale == pytest.approx(1 / (3 * 64 * 64))
    gaps = [b - a for a, b in zip((0, *ITERATIONS[:-1]), ITERATIONS, strict=True)]
    assert [c.steps_since_prev for c in man.checkpoints] == gaps and [c.step for c in man.checkpoints] == list(
        ITERATIONS
    )
    # the authors' weights: lr · batch · (iteration gap) / N
    np.testing.assert_allclose(idx.weights("visits"), [3e-4 * 64 * g / 128 for g in gaps])
    # every parameterised layer (Conv2d, Linear, ConvTranspose2d) is in the features
    assert {l.kind for l in man.projection.layers} >= {"conv2d", "linear", "convt2d"}


def test_scores_equal_brute_force_float64_autograd(official_index):
    """Scores and exact norms equal a per-sample float64 autograd of the authors' loss with the same noise."""
    idx = open_index(official_index, device="cpu")
    man = idx.manifest
    plugin = load_plugin(man.model.plugin)
    objective = plugin.objective(man.objective.m)
    x = idx.input(idx.row_of(3))  # a training image as the query: its gradient with fresh query draws
    rows = [0, 3, 64, 127]
    inputs = torch.from_numpy(idx.store.inputs(np.array(rows))).double()
    w = idx.weights("visits")
    expected = np.zeros(len(rows))
    for c, ck in enumerate(man.checkpoints):
        module = plugin.build_module()
        state = state_dict_at(read_checkpoint(idx.where.read_bytes(ck.path)), man.model.checkpoint_key, ck.path)
        module.load_state_dict(state)
        module = module.double().eval()
        proj = idx.runtime.projector(c)
        eps_q = draw_noise(NOISE_QUERY, 0, c, [0], 16, (64,))[0].double()
        gq = _float64_grad(module, objective, torch.from_numpy(x).double(), eps_q)
        pq = _project(module, proj, gq)
        for j, (r, xi) in enumerate(zip(rows, inputs, strict=True)):
            eps = draw_noise(NOISE_INDEX, 0, c, [int(idx.meta.ids[r])], 16, (64,))[0].double()
            g = _float64_grad(module, objective, xi, eps)
            assert idx.features.sq_norm[c][r] == pytest.approx(float(g @ g), rel=1e-4)  # exact, unprojected
            expected[j] += w[c] * float(_project(module, proj, g) @ pq)
    got = idx.scores(x, convention="visits", scoring="raw")[rows]
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-4 * np.abs(expected).max())


def test_whitened_index_of_the_authors_model(official_index, tmp_path):
    """``--whiten kfac`` on the authors' model, whose decoder is ConvTranspose2d (its weight whitened as the swapped
    Conv2d's, its bias block by its own factor): checked files, the fidelity bar passed, scores equal a float64
    autograd of the authors' loss pushed through the whitened exact layout and the index's sketch."""
    out = _run_example(tmp_path / "white", "--whiten", "kfac")
    idx = open_index(out, device="cpu")
    man = idx.manifest
    assert man.whiten is not None and man.whiten.kind == "kfac"
    assert verify_index(IndexDir(out)) == []
    convt = [l.kind == "convt2d" and l.bias_dim > 0 for l in man.projection.layers]
    assert any(convt)
    for ck in man.whiten.checkpoints:
        assert [lam > 0 for lam in ck.lams_bias] == convt
    assert man.fidelity is not None and all(ch.passed for ch in man.fidelity.checkpoints)
    plugin = load_plugin(man.model.plugin)
    objective = plugin.objective(man.objective.m)
    x = idx.input(idx.row_of(3))
    rows = [0, 64]
    inputs = torch.from_numpy(idx.store.inputs(np.array(rows))).double()
    w = idx.weights("visits")
    expected, over_stored = np.zeros(len(rows)), np.zeros(len(rows))
    for c, ck in enumerate(man.checkpoints):
        module = plugin.build_module()
        module.load_state_dict(
            state_dict_at(read_checkpoint(idx.where.read_bytes(ck.path)), man.model.checkpoint_key, ck.path)
        )
        module = module.double().eval()
        proj = idx.runtime.projector(c)
        exact = Projector([b.info for b in proj.blocks], ProjectionSpec(kind="none"))
        exact.set_whitening(wload(IndexDir(out), man, c))
        eps_q = draw_noise(NOISE_QUERY, 0, c, [0], 16, (64,))[0].double()
        pq = _project(module, proj, _float64_grad(module, objective, torch.from_numpy(x).double(), eps_q))
        over_stored += w[c] * (idx.store.feature_rows(c, np.array(rows)).astype(np.float64) @ pq)
        for j, (r, xi) in enumerate(zip(rows, inputs, strict=True)):
            eps = draw_noise(NOISE_INDEX, 0, c, [int(idx.meta.ids[r])], 16, (64,))[0].double()
            g = _float64_grad(module, objective, xi, eps)
            white = _project(module, exact, g)
            assert idx.features.sq_norm[c][r] == pytest.approx(float(white @ white), rel=1e-3)
            expected[j] += w[c] * float(_project(module, proj, g) @ pq)
    got = idx.scores(x, convention="visits", scoring="raw")[rows]
    np.testing.assert_allclose(got, over_stored, rtol=1e-5)  # exact over the stored rows
    # against the unquantized sketch: the int8 rows' error. Whitened, this model's rows are spiky (max/rms ~45: the
    # last layers' bias blocks, summed over 64 x 64 positions and 16 draws, dominate), so int8 costs each row 7-12 %
    # and a score ~0.6 % (unwhitened: max/rms ~6, within 2e-3 above)
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=1e-4 * np.abs(expected).max())
    plain = open_index(official_index, device="cpu").scores(x, convention="visits", scoring="raw")[rows]
    assert not np.allclose(plain, got, rtol=1e-2)
    res = idx.influence(x, k=5, convention="visits")
    assert res.approximations[0].startswith("index whitened by")


def test_query_jpegs_through_the_api_and_client(official_index, tmp_path):
    with svc_run_server(index=official_index, state_dir=tmp_path / "s") as s:
        with InfluenceClient(s.url, timeout=300, retries=0) as c:
            info = c.index_info()
            assert info.n == 128 and info.shape == [3, 64, 64]
            for q in sorted((OFFICIAL / "images" / "query").glob("*.jpg")):
                r = c.influence(q, k=5, direction="both", convention="visits")
                assert len(r.proponents) == len(r.opponents) == 5 and r.exact
                assert all(h.source.startswith("folder:") for h in r.proponents)
            # the same query as raw bytes gives the same answer
            q0 = OFFICIAL / "images" / "query" / "0.jpg"
            a, b = c.influence(q0, k=5), c.influence(q0.read_bytes(), k=5)
            assert a.ids() == b.ids() and a.scores() == b.scores()


def test_changed_model_code_is_refused(official_index, tmp_path):
    """The server loads the recorded code and refuses, naming the file, when its hash differs."""
    copy = tmp_path / "idx"
    shutil.copytree(official_index, copy)
    code = tmp_path / "model.py"
    shutil.copy(REPO / "examples" / "official_vae" / "model.py", code)
    man = json.loads((copy / "manifest.json").read_text())
    man["model"]["plugin"]["code"] = str(code)
    man["model"]["plugin"]["files"][0]["path"] = str(code)
    from proponent.format.fsio import IndexDir
    from proponent.format.manifest import Manifest, write_manifest

    write_manifest(IndexDir(copy), Manifest.model_validate(man))
    open_index(copy, device="cpu")  # the same bytes elsewhere: fine
    code.write_text(code.read_text() + "\n# edited\n")
    with pytest.raises((PluginError, IndexOpenError), match=r"model\.py: its sha256 .* differs from the index's"):
        open_index(copy, device="cpu")


@pytest.fixture(scope="module")
def authors_loss_index(tmp_path_factory) -> Path:
    return _run_example(tmp_path_factory.mktemp("official_authors") / "idx", AUTHORS_LOSS="1")


def _example_model():
    import importlib.util

    spec = importlib.util.spec_from_file_location("official_vae_model", REPO / "examples" / "official_vae" / "model.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _AuthorsScoringLoss:
    """The authors' tracin.py loss, written out here: (Σ (sigmoid(logits) − x)² / 3 + β·KL) / (3·64·64),
    the mean over the draws (their calc_loss on an unbatched image divides by x.size(0) = 3)."""

    def __init__(self, mod):
        self.mod = mod

    def loss(self, module, x, y, eps):
        mu, logvar, logits = module(x, eps)
        recon = (torch.sigmoid(logits) - x.unsqueeze(1)).pow(2).flatten(2).sum(-1).mean(1) / 3
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)
        return (recon + 2.0 * kl) / (3 * 64 * 64)


def test_authors_loss_reproduces_their_scoring_code(authors_loss_index, official_index):
    """AUTHORS_LOSS=1: the recorded factory is plugin_authors, and the scores equal a float64 brute force of
    the authors' scoring loss (written independently above) with the same noise; they differ from the default's."""
    mod = _example_model()
    idx = open_index(authors_loss_index, device="cpu")
    man = idx.manifest
    assert man.model.plugin.factory == "plugin_authors"
    objective = _AuthorsScoringLoss(mod)
    x = idx.input(idx.row_of(3))
    rows = [0, 3, 64, 127]
    inputs = torch.from_numpy(idx.store.inputs(np.array(rows))).double()
    w = idx.weights("visits")
    expected = np.zeros(len(rows))
    for c, ck in enumerate(man.checkpoints):
        module = mod.build(inplace=False)
        module.load_state_dict(
            state_dict_at(read_checkpoint(idx.where.read_bytes(ck.path)), man.model.checkpoint_key, ck.path)
        )
        module = module.double().eval()
        proj = idx.runtime.projector(c)
        eps_q = draw_noise(NOISE_QUERY, 0, c, [0], 16, (64,))[0].double()
        pq = _project(module, proj, _float64_grad(module, objective, torch.from_numpy(x).double(), eps_q))
        for j, (r, xi) in enumerate(zip(rows, inputs, strict=True)):
            eps = draw_noise(NOISE_INDEX, 0, c, [int(idx.meta.ids[r])], 16, (64,))[0].double()
            g = _float64_grad(module, objective, xi, eps)
            assert idx.features.sq_norm[c][r] == pytest.approx(float(g @ g), rel=1e-4)
            expected[j] += w[c] * float(_project(module, proj, g) @ pq)
    got = idx.scores(x, convention="visits", scoring="raw")[rows]
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-4 * np.abs(expected).max())
    default = open_index(official_index, device="cpu").scores(x, convention="visits", scoring="raw")[rows]
    assert not np.allclose(default, got, rtol=1e-2)
