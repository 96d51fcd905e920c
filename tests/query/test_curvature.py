"""precondition=kfac|ekfac: kronfluence's per-layer preconditioners on the query's exact gradient.

Held to an explicit float64 brute force written here from the definitions: the factors A = E[a aᵀ] and
S = E[δ δᵀ] captured by this file's own hooks on a float64 copy of each checkpoint's model with the index's draws,
the dense P = (kron(S, A) + λI)⁻¹ (K-FAC) or (Q_S ⊗ Q_A) diag(1/(Λ + λ)) (Q_S ⊗ Q_A)ᵀ (EK-FAC) per layer,
applied to exact per-sample gradients (torch.autograd per sample). On exact gradients (``projection=none``) the
scores of every scoring, the top-k and the leverage self-influence equal it to 1e-6; on a sketched int8 index the
scores estimate it within the measured bound. Damaged, foreign and absent preconditioners are refused by name; the
REST API, the client and the CLI give one answer.
"""

from __future__ import annotations

import copy
import io
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from proponent.analysis.lds import conv_kronecker_rows
from proponent.cli import main as cli_main
from proponent.client import InfluenceClient
from proponent.format.fsio import IndexDir
from proponent.format.integrity import verify_index
from proponent.format.manifest import read_manifest, write_manifest
from proponent.indexer.data import load_dataset
from proponent.indexer.training import TrainConfig, train
from proponent.model.architectures import ModelConfig
from proponent.model.objectives import NOISE_INDEX, NOISE_QUERY, draw_noise, objective_at
from proponent.model.projection import ProjectionSpec
from proponent.query.curvature import query_features
from proponent.query.index import open_index
from proponent.query.selfinfluence import SelfInfluenceJob, SelfInfluenceParams
from tests.conftest import svc_run_server
from tests.helpers import build_small_index, stored_matrix, top, weights

pytestmark = pytest.mark.timeout(900)
DATA = "digits,limit=120"
ALPHA = 0.05


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    data = load_dataset(DATA)
    cfg = ModelConfig(kind="mlp", input_shape=data.shape, hidden=(6,), latent_dim=2)
    out = tmp_path_factory.mktemp("kfac_run") / "run"
    return train(data, cfg, out, TrainConfig(epochs=3, batch_size=32, checkpoints=2, seed=5), show_progress=False)


def _build(run: Path, out: Path, **kw) -> Path:
    return build_small_index(run, out, **{"featurizer": "kron", **kw})


def _precondition(index: Path, kind: str) -> None:
    assert cli_main(["precondition", "--index", str(index), "--kind", kind, "--alpha", str(ALPHA)]) == 0


@pytest.fixture(scope="module")
def exact_index(run, tmp_path_factory) -> Path:
    out = _build(
        run, tmp_path_factory.mktemp("kfac_exact") / "idx", projection=ProjectionSpec(kind="none"), dtype="float32"
    )
    _precondition(out, "kfac")
    _precondition(out, "ekfac")
    _precondition(out, "adam")
    return out


@pytest.fixture(scope="module")
def sketch_index(run, tmp_path_factory) -> Path:
    out = _build(run, tmp_path_factory.mktemp("kfac_sketch") / "idx", projection=ProjectionSpec(kind="kron", k=4))
    _precondition(out, "ekfac")
    return out


# ----------------------------------------------------------------------------------------- the brute force


def _per_sample(idx, c: int, x: np.ndarray, eps: np.ndarray, labels: np.ndarray, objective):
    """Per Linear / Conv2d layer (the index's layer order): exact float64 per-sample gradients ``[B, out, in+1]``
    (``[∂W.flatten(1) | ∂b]``) by autograd one sample at a time, and the ``(a with a 1 column, δ)`` rows of the
    whole batch (a Conv2d's: its KFC rows, :func:`proponent.analysis.lds.conv_kronecker_rows`, tested against
    explicit per-sample gradients in tests/analysis/test_lds.py)."""
    model = copy.deepcopy(idx.runtime.model(c)).double()
    mods = dict(model.named_modules())
    names = [lay.name for lay in idx.manifest.projection.layers]
    assert all(isinstance(mods[n], (torch.nn.Linear, torch.nn.Conv2d)) for n in names)
    obj = objective_at(objective, c)
    xs, es = torch.from_numpy(x).double(), torch.from_numpy(eps).double()
    ys = torch.from_numpy(np.clip(labels, 0, None))
    grads: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(len(x)):
        loss = obj.loss(model, xs[i : i + 1], ys[i : i + 1], es[i : i + 1]).sum()
        params = [p for n in names for p in (mods[n].weight, mods[n].bias)]
        got = torch.autograd.grad(loss, params)
        for k, n in enumerate(names):
            grads[n].append(torch.cat([got[2 * k].flatten(1), got[2 * k + 1][:, None]], dim=1).numpy())
    ins: dict[str, torch.Tensor] = {}
    outs: dict[str, torch.Tensor] = {}

    def hook(name):
        def f(mod, inp, out):
            ins[name] = inp[0].detach()
            outs[name] = out

        return f

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    loss = obj.loss(model, xs, ys, es).sum()
    for h in handles:
        h.remove()
    ds = torch.autograd.grad(loss, [outs[n] for n in names])
    acts = []
    for n, d in zip(names, ds):
        if isinstance(mods[n], torch.nn.Conv2d):
            a3, d3 = conv_kronecker_rows(ins[n], d, mods[n])
            a, dd = a3.reshape(-1, a3.shape[-1]), d3.reshape(-1, d3.shape[-1])
        else:
            a, dd = ins[n].reshape(-1, ins[n].shape[-1]).numpy(), d.reshape(-1, d.shape[-1]).numpy()
        acts.append((np.concatenate([a, np.ones((len(a), 1))], 1), dd))
    return [np.stack(grads[n]) for n in names], acts


def _dense_p(idx, c: int, kind: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per layer the dense ``P [out·in, out·in]`` and the rows' exact gradients ``[N, out·in]``."""
    rt, man = idx.runtime, idx.manifest
    store = idx.store
    model = rt.model(c)
    shape = objective_at(rt.objective, c).noise_shape(model)
    eps = draw_noise(NOISE_INDEX, man.objective.seed, c, idx.meta.ids, man.objective.m, shape).numpy()
    g, acts = _per_sample(idx, c, store.inputs(slice(0, idx.n)), eps, idx.meta.labels, rt.objective)
    np.testing.assert_allclose(sum((gl**2).sum((1, 2)) for gl in g), store.sq_norm(c), rtol=1e-4)
    out_p, out_g = [], []
    for name, gl, (a, d) in zip([lay.name for lay in man.projection.layers], g, acts):
        A, S = a.T @ a / len(a), d.T @ d / len(d)
        flat = gl.reshape(len(gl), -1)
        if kind == "adam":
            v = _adam_v(idx, c, name)
            P = np.diag(1.0 / (v + ALPHA * v.mean()))
        elif kind == "kfac":
            K = np.kron(S, A)
            lam = ALPHA * np.trace(K) / len(K)
            P = np.linalg.inv(K + lam * np.eye(len(K)))
        else:
            _, qa = np.linalg.eigh(A)
            _, qs = np.linalg.eigh(S)
            Q = np.kron(qs, qa)
            lamda = ((flat @ Q) ** 2).mean(0)
            P = (Q / (lamda + ALPHA * lamda.mean())) @ Q.T
        out_p.append(P)
        out_g.append(flat)
    return out_p, out_g


def _adam_v(idx, c: int, layer: str) -> np.ndarray:
    """Adam's bias-corrected v̂ of one layer's ``[W.flatten(1) | b]``, read straight from the index's copy of the
    checkpoint file (the optimizer's state indexed in the model's parameter order)."""
    data = idx.runtime.where.read_bytes(idx.manifest.checkpoints[c].path)
    raw = torch.load(io.BytesIO(data), weights_only=True)
    opt = raw["optimizer"]
    order = {n: i for i, (n, _) in enumerate(idx.runtime.model(c).named_parameters())}
    beta2 = opt["param_groups"][0]["betas"][1]

    def v(name: str) -> torch.Tensor:
        st = opt["state"][order[name]]
        return st["exp_avg_sq"].double() / (1 - beta2 ** float(st["step"]))

    w, b = v(f"{layer}.weight"), v(f"{layer}.bias")
    return torch.cat([w.flatten(1), b[:, None]], dim=1).reshape(-1).numpy()


def _query_grads(idx, c: int, x: np.ndarray, seed: int) -> list[np.ndarray]:
    rt = idx.runtime
    shape = objective_at(rt.objective, c).noise_shape(rt.model(c))
    eps = draw_noise(NOISE_QUERY, seed, c, np.zeros(1, np.int64), rt.objective.m, shape).numpy()
    g, _ = _per_sample(idx, c, x[None], eps, np.zeros(1, np.int64), rt.objective)
    return [gl.reshape(1, -1)[0] for gl in g]


def _reference(idx, kind: str, x: np.ndarray, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every scoring's scores ``[N]`` and the leverage self-influence, from the dense P."""
    w = weights(idx, "lr")
    raw, cos, lev_sum = np.zeros(idx.n), np.zeros(idx.n), np.zeros(idx.n)
    for c in range(len(idx.checkpoints)):
        ps, gs = _dense_p(idx, c, kind)
        qs = _query_grads(idx, c, x, seed)
        dot = sum(g @ (p @ q) for p, g, q in zip(ps, gs, qs))
        qpq = sum(q @ p @ q for p, q in zip(ps, qs))
        lev = sum(np.einsum("ij,jk,ik->i", g, p, g) for p, g in zip(ps, gs))
        raw += w[c] * dot
        cos += w[c] * dot / np.sqrt(qpq * lev)
        lev_sum += w[c] * lev
    return {"raw": raw, "cosine": cos, "relatif": raw / np.sqrt(lev_sum)}, lev_sum


# ----------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("kind", ["kfac", "ekfac", "adam"])
def test_exact_gradients_equal_a_dense_brute_force(exact_index, kind, tmp_path) -> None:
    idx = open_index(exact_index, device="cpu")
    assert idx.manifest.projection.is_exact and idx.manifest.storage.dtype == "float32"
    x = idx.input(idx.row_of(7)) * 0.5 + idx.input(idx.row_of(9)) * 0.5
    want, want_lev = _reference(idx, kind, x, seed=4)
    np.testing.assert_allclose(idx.self_influence(precondition=kind), want_lev, rtol=1e-6)
    job = SelfInfluenceJob(idx, SelfInfluenceParams(precondition=kind), tmp_path / "state").run()
    assert job is not None
    np.testing.assert_allclose(job, want_lev, rtol=1e-6)
    name = {"kfac": "K-FAC", "ekfac": "EK-FAC", "adam": "Adam"}[kind]
    for scoring, ref in want.items():
        got = idx.scores(x, seed=4, scoring=scoring, precondition=kind)
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
        res = idx.influence(x, seed=4, scoring=scoring, precondition=kind, k=6, direction="both")
        assert res.exact and res.query.precondition == kind
        assert res.approximations[0].startswith(f"{name} preconditioner per layer")
        assert not any("projection" in a for a in res.approximations)  # exact gradients: no sketch named
        for d in ("proponents", "opponents"):
            ids, scores = top(idx, ref, 6, d)
            assert [h.id for h in getattr(res, d)] == ids, (scoring, d)
            np.testing.assert_allclose([h.score for h in getattr(res, d)], scores, rtol=1e-5)
    # each draw's preconditioned gradient (the hits' standard errors) averages to the query's
    cks = list(range(len(idx.checkpoints)))
    vec, _, draws = query_features(idx, kind, idx.runtime.objective, x, None, seed=4, checkpoints=cks, per_draw=True)
    assert draws is not None and draws[0].shape == (idx.manifest.objective.m, idx.dim)
    for c in cks:
        np.testing.assert_allclose(draws[c].mean(0), vec[c], rtol=1e-9, atol=1e-12 * np.abs(vec[c]).max())
    assert all(h.stderr is not None and h.stderr > 0 for h in res.proponents)
    # features="stored": the row's exact gradient with its own draws, under the same preconditioner
    row = 10
    sid = int(idx.meta.ids[row])
    res = idx.influence(sample_id=sid, features="stored", scoring="raw", precondition=kind, k=3)
    w = weights(idx, "lr")
    ref = np.zeros(idx.n)
    for c in range(len(idx.checkpoints)):
        ps, gs = _dense_p(idx, c, kind)
        ref += w[c] * sum(g @ (p @ g[row]) for p, g in zip(ps, gs))
    ids, scores = top(idx, ref, 3, "proponents")
    assert [h.id for h in res.proponents] == ids
    np.testing.assert_allclose([h.score for h in res.proponents], scores, rtol=1e-5)


def test_conv_layers_equal_the_brute_force(tmp_path) -> None:
    """A conv VAE (Conv2d encoder and decoder, Linear bottleneck): KFC's factors over samples x draws x positions."""
    data = load_dataset("digits,limit=40")
    cfg = ModelConfig(kind="conv", input_shape=data.shape, latent_dim=2, channels=(2,))
    run = train(
        data, cfg, tmp_path / "run", TrainConfig(epochs=1, batch_size=20, checkpoints=1, seed=1), show_progress=False
    )
    out = _build(run, tmp_path / "idx", projection=ProjectionSpec(kind="none"), dtype="float32", m=2)
    idx = open_index(out, device="cpu")
    assert {lay.kind for lay in idx.manifest.projection.layers} == {"conv2d", "linear"}
    for kind in ("kfac", "ekfac"):
        _precondition(out, kind)
        idx = open_index(out, device="cpu")
        x = idx.input(idx.row_of(5))
        want, want_lev = _reference(idx, kind, x, seed=3)
        np.testing.assert_allclose(idx.self_influence(precondition=kind), want_lev, rtol=1e-6)
        for scoring in ("raw", "cosine"):
            got = idx.scores(x, seed=3, scoring=scoring, precondition=kind)
            np.testing.assert_allclose(got, want[scoring], rtol=1e-6, atol=1e-6 * np.abs(want[scoring]).max())


def test_a_sketched_index_refuses_kfac_queries_and_keeps_the_leverage(sketch_index, tmp_path) -> None:
    """On a sketched int8 index K-FAC / EK-FAC queries are refused by name (the preconditioned query mapped through
    the sketch is a poor estimate of qᵀPg_i: its error is measured here, and on digits it lowered the LDS from 0.36
    to 0.14), while the leverage (the self-influence job) and qᵀPq stay exact; /v1/index lists kfac / ekfac for
    self-influence only."""
    idx = open_index(sketch_index, device="cpu")
    assert not idx.manifest.projection.is_exact and idx.manifest.storage.dtype == "int8"
    w = weights(idx, "lr")
    x = idx.input(idx.row_of(3))
    for kind in ("kfac", "ekfac"):
        with pytest.raises(ValueError, match=f"precondition={kind}: this index is sketched .*--projection none"):
            idx.influence(x, precondition=kind, k=3)
        with pytest.raises(ValueError, match="this index is sketched"):
            idx.scores(x, precondition=kind)
    with svc_run_server(index=sketch_index, state_dir=tmp_path / "state") as s:
        info = httpx.get(f"{s.url}/v1/index", timeout=60).json()
        assert info["preconditions"] == ["none"] and "ekfac" in info["self_influence_preconditions"]
        r = httpx.post(
            f"{s.url}/v1/influence/samples/{int(idx.meta.ids[3])}", json={"precondition": "ekfac"}, timeout=60
        )
        assert r.status_code == 422 and "this index is sketched" in r.text, r.text
    errs = []
    for r, seed in ((3, 1), (40, 2), (77, 3)):
        x = idx.input(idx.row_of(r))
        want, want_lev = _reference(idx, "ekfac", x, seed)
        np.testing.assert_allclose(idx.self_influence(precondition="ekfac"), want_lev, rtol=1e-6)
        cks = list(range(len(idx.checkpoints)))
        vec, sq, _ = query_features(
            idx, "ekfac", idx.runtime.objective, x, None, seed=seed, checkpoints=cks, per_draw=False
        )
        got = sum(w[c] * (stored_matrix(idx, c) @ vec[c]) for c in cks)  # the mapped form's scores
        sketched = np.zeros(idx.n)
        for c in cks:
            ps, _ = _dense_p(idx, c, "ekfac")
            qs = _query_grads(idx, c, x, seed)
            layers = idx.manifest.projection.layers
            pq = [(p @ q).reshape(1, lay.out_dim, lay.in_dim) for p, q, lay in zip(ps, qs, layers)]
            np.testing.assert_allclose(sq[c], sum(q @ p @ q for p, q in zip(ps, qs)), rtol=1e-6)
            proj = idx.runtime.projector(c)
            f = torch.cat([proj.project_matrix(b, torch.from_numpy(g).float()) for b, g in zip(proj.blocks, pq)], 1)
            sketched += w[c] * (stored_matrix(idx, c) @ f[0].double().numpy())
        np.testing.assert_allclose(got, sketched, rtol=1e-5, atol=1e-5 * np.abs(sketched).max())
        errs.append(np.linalg.norm(got - want["raw"]) / np.linalg.norm(want["raw"]))
    # measured (a k=4 Kronecker sketch of an 884-parameter MLP, α=0.05): ||s - s_exact|| / ||s_exact|| of 2.5-4.5;
    # P q lives mostly in low-curvature directions, so the sketch's cross terms with the rows' high-curvature
    # parts dominate (digits' default layout: 3.6, benchmarks/results/precondition_kfac_digits.txt)
    assert 0.5 < max(errs) < 8, errs


def test_adam_needs_the_checkpoints_adam_state(tmp_path, capsys) -> None:
    """An index whose checkpoints carry no Adam state (SGD here) refuses `--kind adam` by name, and stays as it was."""
    data = load_dataset("digits,limit=24")
    cfg = ModelConfig(kind="mlp", input_shape=data.shape, hidden=(4,), latent_dim=2)
    tc = TrainConfig(epochs=1, batch_size=12, checkpoints=1, seed=2, optimizer="sgd")
    out = _build(train(data, cfg, tmp_path / "run", tc, show_progress=False), tmp_path / "idx")
    before = (out / "manifest.json").read_bytes()
    capsys.readouterr()
    assert cli_main(["precondition", "--index", str(out), "--kind", "adam"]) != 0
    err = capsys.readouterr().err
    assert "not an Adam state" in err and "ckpt_000" in err, err
    assert (out / "manifest.json").read_bytes() == before


def test_refusals_are_named(exact_index, sketch_index, tmp_path, capsys) -> None:
    copy = tmp_path / "damaged"
    shutil.copytree(exact_index, copy)
    man = read_manifest(IndexDir(copy))
    rel = man.curvature["kfac"].checkpoints[1].factors.path
    data = bytearray((copy / rel).read_bytes())
    data[-30] ^= 0x01
    (copy / rel).write_bytes(bytes(data))
    idx = open_index(copy, device="cpu")
    sid = int(idx.meta.ids[2])
    with pytest.raises(ValueError, match=r"preconditioner .*ckpt_001/factors\.npz: damaged \(sha256.*--kind kfac"):
        idx.influence(sample_id=sid, precondition="kfac")
    assert idx.influence(sample_id=sid, precondition="ekfac", k=2).proponents  # the other kind still serves
    assert cli_main(["verify", "--index", str(exact_index)]) == 0
    capsys.readouterr()
    assert cli_main(["verify", "--index", str(copy)]) == 1
    assert "ckpt_001/factors.npz: damaged" in capsys.readouterr().out
    # made for other features: the sketched index's record and files copied into the exact one
    other = tmp_path / "foreign"
    shutil.copytree(exact_index, other)
    shutil.rmtree(other / "precond")
    shutil.copytree(sketch_index / "precond", other / "precond")
    foreign = read_manifest(IndexDir(sketch_index)).curvature
    where = IndexDir(other)
    write_manifest(where, read_manifest(where).model_copy(update={"curvature": foreign}))
    idx = open_index(other, device="cpu")
    with pytest.raises(ValueError, match=r"EK-FAC preconditioner of checkpoint 0 .*made from other features"):
        idx.influence(sample_id=sid, precondition="ekfac")
    assert any("checkpoint 1" in p for p in verify_index(other, preconditioner=True))
    # none of that kind stored
    with pytest.raises(ValueError, match=r"no stored K-FAC preconditioner; make one with `proponent precondition"):
        idx.influence(sample_id=sid, precondition="kfac")
    # an unknown kind
    with pytest.raises(SystemExit):
        cli_main(["precondition", "--index", str(other), "--kind", "shampoo"])
    with pytest.raises(ValueError, match="precondition"):
        idx.influence(sample_id=sid, precondition="shampoo")


def _hits(body: dict) -> dict:
    return {d: [(h["id"], h["score"]) for h in body[d]] for d in ("proponents", "opponents") if body.get(d)}


def test_rest_client_and_cli_give_the_same_answer(exact_index, tmp_path, capsys) -> None:
    idx = open_index(exact_index, device="cpu")
    sid = int(idx.meta.ids[17])
    params = {"k": 4, "direction": "both", "scoring": "cosine", "precondition": "ekfac", "seed": 2}
    py = idx.influence(sample_id=sid, **params).model_dump(mode="json")
    flags = [a for k, v in params.items() for a in (f"--{k}", str(v))]
    assert cli_main(["influence", "--index", str(exact_index), "--sample-id", str(sid), *flags, "--json"]) == 0
    cli = json.loads(capsys.readouterr().out)
    with svc_run_server(index=exact_index, state_dir=tmp_path / "state") as s:
        rest = httpx.post(f"{s.url}/v1/influence/samples/{sid}", json=params, timeout=120).json()
        with InfluenceClient(s.url, retries=0, timeout=120) as c:
            client = c.influence(sample_id=sid, **params).model_dump(mode="json")
            assert {"kfac", "ekfac"} <= set(c.index_info().preconditions)
            job = c.start_self_influence(precondition="kfac").wait(timeout=120)
            got = {r.id: r.self_influence for r in job.result()}
            want = idx.self_influence(precondition="kfac")
            np.testing.assert_allclose([got[int(i)] for i in idx.meta.ids], want, rtol=1e-12)
    out = tmp_path / "ranked.csv"
    assert cli_main(["self-influence", "--index", str(exact_index), "--precondition", "kfac", "--out", str(out)]) == 0
    assert "leverage under the K-FAC preconditioner" in capsys.readouterr().out
    lines = out.read_text().splitlines()[1:]
    by_id = {int(r.split(",")[1]): float(r.split(",")[2]) for r in lines}
    want = idx.self_influence(precondition="kfac")
    np.testing.assert_allclose([by_id[int(i)] for i in idx.meta.ids], want, rtol=1e-12)
    assert _hits(rest) == _hits(py) == _hits(cli) == _hits(client)
    assert rest["approximations"] == py["approximations"] == cli["approximations"] == client["approximations"]
    assert rest["query"]["precondition"] == "ekfac"
