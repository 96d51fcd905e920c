"""What does each feature layout cost in answer quality? Recall against EXACT gradients per byte.

Default mode (``pareto``): for each data set, train a β-VAE (MLP, Bernoulli likelihood, 5 TracIn
checkpoints), then score queries against every training sample with

* exact, unprojected per-sample gradients (the reference; accumulated batch by batch as
  ``[N, n_queries]`` score columns, the ``N x P`` gradient matrix is never stored), and
* every candidate layout: Kronecker ``k`` per side alone; a Kronecker first stage followed by a
  second-stage sketch (``proponent.model.sketch``: SRHT, sparse JL, Gaussian) down to ``D2``;
  energy-allocated Kronecker (per-layer k from the mean squared gradient norm per layer on a
  calibration sample) -- each stored as float32, float16 or int8 with one float32 scale per row
  (``value = round(f / scale)``, ``scale = max|f| / 127``; scored with the dequantized values),
  over several projection seeds.

Queries are training samples featurized with independent query draws (noise domain
NOISE_QUERY, as the service does); training features use the index draws (NOISE_INDEX).
Score = ``Σ_c w_c <q_c, f_c(i)>`` with the ``lr`` convention. Per layout and seed: recall@10
of the exact top-10 proponents and of the exact bottom-10 opponents and the Spearman
correlation over all N scores (medians over queries), and self-top1 (fraction of queries that
are their own strongest proponent). The table gives the median over seeds and the minimum over
seeds, bytes per sample per checkpoint, and marks the cheapest layout that reaches median
recall@10 >= 0.95 (proponents) and >= 0.90 (opponents) on every data set run.

    python benchmarks/projection_fidelity.py --datasets digits --out benchmarks/results/fid_pareto_digits.json
    python benchmarks/projection_fidelity.py --datasets digits28 --queries 48 \\
        --out benchmarks/results/fid_pareto_digits28.json
    python benchmarks/projection_fidelity.py --combine benchmarks/results/fid_pareto_digits.json \\
        benchmarks/results/fid_pareto_digits28.json      # one table over both, from the saved results

Data sets: ``digits`` (scikit-learn's 1,797 8x8 digits; MLP 64-128-64-16) and ``digits28``
(``digits,size=28,augment=6``: 10,782 random affine variants at 28x28; MLP 784-512-256-16,
1.08 M parameters, MNIST size).

``--mode index`` runs the earlier study on real built indexes (Kronecker k only, plus
checkpoint subsets and the latent pre-filter on the exact index):

    python benchmarks/projection_fidelity.py --mode index [--ks 8,16,32,64] [--queries 64] [--epochs 100]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, astuple, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from proponent.indexer.data import load_dataset
from proponent.indexer.job import IndexOptions, build_index, checkpoints_from_run
from proponent.indexer.training import TrainConfig, train, training_objective
from proponent.model.architectures import default_config_for
from proponent.model.checkpoints import load_checkpoint
from proponent.model.featurizers.kronecker import KroneckerFeaturizer
from proponent.model.objectives import NOISE_INDEX, NOISE_QUERY, draw_noise
from proponent.model.projection import ProjectionSpec, Projector, build_projector, discover_layers
from proponent.model.sketch import Sketch, allocate_dims, allocate_tensor, storage_bytes
from proponent.query.index import open_index
from proponent.research.sketches import (
    KronVariance,
    LayerTensorSketch,
    allocate_hybrid,
    allocate_kron,
    allocate_kron_variance,
    calibrate_kron,
    dequantize_rows,
    kron_projector,
    quantize_rows,
)
from proponent.threads import set_threads

DATASETS = {"digits": "digits", "digits28": "digits,size=28,augment=6"}
DTYPES = ("float32", "float16", "int8")
TARGET_PRO, TARGET_OPP = 0.95, 0.90


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray | np.generic):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


# ============================================================================ the Pareto study


@dataclass
class Stage1:
    """A first-stage (Kronecker) layout for one seed."""

    name: str
    seed: int
    projector: Projector
    feat: KroneckerFeaturizer | None = None


@dataclass
class Layout:
    """A stored layout: a first stage, an optional sketch, a storage dtype; scores per seed."""

    name: str  # without the seed
    stage1: str
    sketch: tuple[str, int, int] | None  # (kind, D2, nnz)
    dtype: str
    dim: int = 0
    scores: dict[int, np.ndarray] = field(default_factory=dict)  # seed -> [N, Q] float32

    @property
    def bytes(self) -> int:
        return storage_bytes(self.dim, self.dtype)


def features_from_capture(feat: KroneckerFeaturizer, calls: Any, deltas: Any, b: int) -> torch.Tensor:
    """The featurizer's features from a capture shared by every layout (same model, same layers)."""
    out = torch.empty(b, feat.projector.dim, dtype=torch.float32)
    for i, lay in enumerate(feat.layers):
        f, _ = feat._layer_features(lay, calls[i].inputs, deltas[i], b)
        blk = lay.block
        out[:, blk.offset : blk.offset + blk.dim] = f.reshape(b, -1)
    return out


def shared_features(
    exact: KroneckerFeaturizer,
    feats: dict[Any, KroneckerFeaturizer],
    tensor: dict[Any, LayerTensorSketch],
    x: torch.Tensor,
    y: torch.Tensor,
    eps: torch.Tensor,
    need_exact: bool = True,
) -> tuple[torch.Tensor | None, dict[Any, torch.Tensor]]:
    """Exact features and every first stage's features (Kronecker projectors and per-layer tensor
    sketches, from the layers' factors) from one hooked forward + backward."""
    calls, deltas, _ = exact._capture(x, y, eps)
    b = x.shape[0]
    with torch.no_grad():
        fx = features_from_capture(exact, calls, deltas, b) if need_exact else None
        f1 = {key: features_from_capture(f, calls, deltas, b) for key, f in feats.items()}
        if tensor:
            factors = []
            for i, lay in enumerate(exact.layers):
                a, d = exact._factors(lay, calls[i].inputs[0], deltas[i][0], b)
                if lay.bias:
                    a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
                factors.append((a, d))
            for key, ts in tensor.items():
                f1[key] = torch.cat([ts.block(i, a, d) for i, (a, d) in enumerate(factors)], dim=1)
    return fx, f1


def stored(f: torch.Tensor, dtype: str) -> torch.Tensor:
    """Features as the store would give them back (quantized, then dequantized); the torch twin of
    ``research.sketches.quantize_rows`` + ``dequantize_rows`` (checked against them in ``check_stored``)."""
    if dtype == "float32":
        return f
    if dtype == "float16":
        return f.half().float()
    peak = f.abs().amax(dim=1, keepdim=True)
    scale = torch.where(peak > 0, peak / 127, torch.ones_like(peak))
    return torch.round(f / scale).clamp_(-127, 127) * scale


def check_stored(f: torch.Tensor) -> None:
    for dt in DTYPES:
        q, scale = quantize_rows(f, dt)
        torch.testing.assert_close(stored(f, dt), torch.from_numpy(dequantize_rows(q, scale)), rtol=1e-6, atol=1e-7)


def layer_energy(exact: Projector, feats: torch.Tensor) -> np.ndarray:
    """Mean squared gradient norm per layer, from exact (projection none) features."""
    return np.array([float(feats[:, b.offset : b.offset + b.dim].double().pow(2).sum(1).mean()) for b in exact.blocks])


def parse_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def pareto_dataset(name: str, a: argparse.Namespace, wd: Path, log: Callable[[str], None]) -> dict[str, Any]:
    spec = DATASETS.get(name, name)
    data = load_dataset(spec)
    run = wd / f"run_{name.replace(',', '_').replace('=', '')}"
    cfg = default_config_for(data.shape, latent_dim=a.latent_dim, likelihood=a.likelihood)
    t0 = time.perf_counter()
    if not (run / "run.json").exists():
        train(data, cfg, run, TrainConfig(epochs=a.epochs), show_progress=False)
    specs, run_json = checkpoints_from_run(run)
    t_train = time.perf_counter() - t0
    n = len(data)
    rng = np.random.default_rng(a.query_seed)
    qrows = np.sort(rng.choice(n, size=min(a.queries, n), replace=False))
    nq = len(qrows)
    x_all = torch.from_numpy(data.x)
    y_all = torch.from_numpy(data.labels if data.labels is not None else np.zeros(n, np.int64))
    seeds = list(range(a.seeds))
    ks, d2s = parse_list(a.ks), parse_list(a.d2)
    two_stage = [v for v in a.stage1.split(",") if v]
    kinds = [k for k in a.sketches.split(",") if k]
    alloc_dims = parse_list(a.alloc)
    valloc_dims = parse_list(a.valloc)
    gauss_d2 = [d for d in d2s if d <= a.gaussian_max_d2]
    gauss_seeds = seeds[: a.gaussian_seeds]
    gauss_stage1 = [v for v in a.gaussian_stage1.split(",") if v]
    sparse_only = [v for v in a.sparse_only_stage1.split(",") if v]

    model0, _, _ = load_checkpoint(specs[0].path, None)
    layers = discover_layers(model0)
    n_params = sum(p.numel() for p in model0.parameters())
    obj = training_objective(cfg, a.m)
    noise_shape = obj.noise_shape(model0)
    exact_proj = build_projector(model0, "all", ProjectionSpec(kind="none"))

    # ---- calibration: per-layer energy (mean squared exact gradient norm) on a small sample
    t0 = time.perf_counter()
    cal = np.arange(min(a.calibration, n))
    energy = np.zeros(len(layers))
    sums = np.zeros((len(layers), 4))
    for c, ck in enumerate(specs):
        model, _, _ = load_checkpoint(ck.path, None)
        ef = KroneckerFeaturizer(model, obj, exact_proj)
        eps = draw_noise(NOISE_INDEX, 0, c, cal, a.m, noise_shape)
        for s0 in range(0, len(cal), 64):  # exact features of 64 samples at a time (P floats each)
            part = slice(s0, s0 + 64)
            fb = ef.featurize(x_all[cal[part]], y_all[cal[part]], eps[part])
            energy += layer_energy(exact_proj, fb.features) * len(cal[part]) / len(cal) / len(specs)
        vcal = cal[: a.variance_calibration]
        for lid, term in enumerate(calibrate_kron(model, obj, layers, x_all[vcal], y_all[vcal], eps[: len(vcal)])):
            sums[lid] += np.array(astuple(term)) / len(specs)  # the checkpoints' mean (equal weights)
    terms = [KronVariance(*(float(v) for v in row)) for row in sums]
    t_cal = time.perf_counter() - t0
    frac = energy / energy.sum()
    log(
        f"[{name}] N={n} P={n_params:,} C={len(specs)} m={a.m} queries={nq}; per-layer energy share: "
        + ", ".join(f"{lay.name} {f:.3f}" for lay, f in zip(layers, frac, strict=True))
    )

    # ---- first stages (per seed) and layouts
    def first_stage(nm: str, seed: int) -> Projector:
        if nm.startswith("kron"):
            return build_projector(model0, "all", ProjectionSpec(kind="kron", k=int(nm[4:]), seed=seed))
        dims_in, dims_out = [li.in_dim for li in layers], [li.out_dim for li in layers]
        if nm.startswith("alloc"):
            return kron_projector(layers, allocate_kron(energy, dims_in, dims_out, int(nm[5:])), seed=seed)
        if nm.startswith("valloc"):
            return kron_projector(layers, allocate_kron_variance(terms, dims_in, dims_out, int(nm[6:])), seed=seed)
        raise ValueError(f"first stage {nm!r}: expected kronK, allocD or vallocD")

    alone = [f"kron{k}" for k in ks] + [f"alloc{d}" for d in alloc_dims] + [f"valloc{d}" for d in valloc_dims]
    names1 = list(dict.fromkeys(alone + two_stage))
    stage1 = {s: {nm: first_stage(nm, s) for nm in names1} for s in seeds}
    for nm, p in stage1[0].items():
        if "alloc" in nm:
            log(f"[{name}] {nm}: D={p.dim} (k_in x k_out) = " + " ".join(f"{b.k_in}x{b.k_out}" for b in p.blocks))

    exact_sizes = [li.in_dim * li.out_dim for li in layers]
    probe = KroneckerFeaturizer(model0, obj, exact_proj)
    eps2 = draw_noise(NOISE_INDEX, 0, 0, np.arange(2), a.m, noise_shape)
    calls, deltas, _ = probe._capture(x_all[:2], y_all[:2], eps2)
    rows_per = [
        probe._factors(lay, calls[i].inputs[0], deltas[i][0], 2)[0].shape[1] for i, lay in enumerate(probe.layers)
    ]
    tensor_specs: dict[str, list[Any]] = {
        f"ts{d}": allocate_dims(energy, d, max_dims=exact_sizes) for d in parse_list(a.ts)
    }
    for d in parse_list(a.tsf):
        tensor_specs[f"tsf{d}"] = allocate_tensor(energy, d, exact_sizes, smooth=True)
    for d in parse_list(a.hybrid):
        tensor_specs[f"hyb{d}"] = allocate_hybrid(layers, energy, terms, rows_per, d)
    for d in parse_list(a.hybrid_fft):
        tensor_specs[f"hybt{d}"] = allocate_hybrid(layers, energy, terms, rows_per, d, max_fft_work=a.max_fft_work)
    tensor = {(s, nm): LayerTensorSketch(layers, sp, seed=s) for s in seeds for nm, sp in tensor_specs.items()}
    for nm, sp in tensor_specs.items():
        log(f"[{name}] {nm}: per-layer blocks (tensor-sketch dim or Kronecker k_in x k_out) {sp}")

    def stage1_dim(nm: str) -> int:
        return tensor[(0, nm)].dim if (0, nm) in tensor else stage1[0][nm].dim

    def dtypes_for(dim: int) -> tuple[str, ...]:
        return DTYPES if dim <= a.dtype_max_dim else ("float32",)

    layouts: list[Layout] = []
    for nm in alone + list(tensor_specs):
        for dt in dtypes_for(stage1_dim(nm)):
            layouts.append(Layout(f"{nm} {dt}", nm, None, dt, stage1_dim(nm)))
    for nm in two_stage:
        for kind in kinds:
            if (kind == "gaussian" and nm not in gauss_stage1) or (nm in sparse_only and kind != "sparse"):
                continue
            for d2 in gauss_d2 if kind == "gaussian" else d2s:
                for dt in dtypes_for(d2):
                    label = kind if kind != "sparse" else f"sparse{a.nnz}"
                    layouts.append(Layout(f"{nm}+{label}>{d2} {dt}", nm, (kind, d2, a.nnz), dt, d2))
    # one sketch per (seed, first stage, kind, D2); nested kinds are applied once at their largest D2
    sketches: dict[tuple[int, str, str, int], Sketch] = {}
    for lay in layouts:
        if lay.sketch is None:
            continue
        kind, d2, nnz = lay.sketch
        for s in gauss_seeds if kind == "gaussian" else seeds:
            lay.scores[s] = np.zeros((n, nq), dtype=np.float32)
            key = (s, lay.stage1, kind, d2)
            if key not in sketches:
                sketches[key] = Sketch(stage1[s][lay.stage1].dim, d2, kind, seed=s, nnz=nnz if kind == "sparse" else 1)
    for lay in layouts:
        if lay.sketch is None:
            for s in seeds:
                lay.scores[s] = np.zeros((n, nq), dtype=np.float32)
    widest: dict[tuple[int, str, str], int] = {}
    for s_, nm, kind, d2 in sketches:
        if sketches[(s_, nm, kind, d2)].nested:
            widest[(s_, nm, kind)] = max(widest.get((s_, nm, kind), 0), d2)

    def sketch_all(f1: dict[tuple[int, str], torch.Tensor]) -> dict[tuple[int, str, str, int], torch.Tensor]:
        out: dict[tuple[int, str, str, int], torch.Tensor] = {}
        wide = {k3: sketches[(*k3, d)].apply(f1[k3[:2]]) for k3, d in widest.items()}
        for key, sk in sketches.items():
            k3 = key[:3]
            if k3 in widest:
                d_max = widest[k3]
                out[key] = wide[k3][:, : key[3]] * float(np.sqrt(d_max / key[3]))
            else:
                out[key] = sk.apply(f1[k3[:2]])
        return out

    exact_scores = np.zeros((n, nq), dtype=np.float64)
    cache = wd / f"exact_{name}_q{nq}_qs{a.query_seed}_m{a.m}_c{len(specs)}.npy"
    need_exact = not (a.exact_cache and cache.exists())
    if not need_exact:
        exact_scores = np.load(cache)
        log(f"[{name}] exact scores from {cache}")
    log(f"[{name}] {len(layouts)} layouts x up to {len(seeds)} seeds; {len(sketches)} sketches")

    # ---- featurize: one capture per batch shared by the exact path and every first stage
    t_feat = time.perf_counter()
    xq, yq = x_all[qrows], y_all[qrows]
    for c, ck in enumerate(specs):
        w = float(ck.lr)
        model, _, _ = load_checkpoint(ck.path, None)
        exact = KroneckerFeaturizer(model, obj, exact_proj)
        feats = {(s, nm): KroneckerFeaturizer(model, obj, p) for s in seeds for nm, p in stage1[s].items()}

        if c == 0:  # the shared capture gives exactly what each featurizer gives on its own
            eps = draw_noise(NOISE_INDEX, 0, c, np.arange(4), a.m, noise_shape)
            _, f1 = shared_features(exact, feats, tensor, x_all[:4], y_all[:4], eps)
            for key, f in list(feats.items())[:3]:
                torch.testing.assert_close(f1[key], f.featurize(x_all[:4], y_all[:4], eps).features)
                check_stored(f1[key])
        eps_q = draw_noise(NOISE_QUERY, 0, c, np.arange(nq), a.m, noise_shape)
        qx, q1 = shared_features(exact, feats, tensor, xq, yq, eps_q, need_exact)
        qx_t = qx.T.contiguous() if qx is not None else None
        qs = {key: v.T.contiguous() for key, v in q1.items()}
        q_sk = {key: v.T.contiguous() for key, v in sketch_all(q1).items()}
        del qx, q1
        for b0 in range(0, n, a.batch):
            rows = np.arange(b0, min(n, b0 + a.batch))
            eps = draw_noise(NOISE_INDEX, 0, c, rows, a.m, noise_shape)
            fx, f1 = shared_features(exact, feats, tensor, x_all[rows], y_all[rows], eps, need_exact)
            with torch.no_grad():
                if fx is not None and qx_t is not None:
                    exact_scores[rows] += w * (fx @ qx_t).double().numpy()
                del fx
                z = sketch_all(f1)
                for lay in layouts:
                    for s in lay.scores:
                        if lay.sketch is None:
                            f, q = f1[(s, lay.stage1)], qs[(s, lay.stage1)]
                        else:
                            key = (s, lay.stage1, lay.sketch[0], lay.sketch[1])
                            f, q = z[key], q_sk[key]
                        lay.scores[s][rows] += w * (stored(f, lay.dtype) @ q).numpy()
        log(f"[{name}] checkpoint {c + 1}/{len(specs)} done, {time.perf_counter() - t_feat:.0f} s")
    t_feat = time.perf_counter() - t_feat
    if need_exact and a.exact_cache:
        np.save(cache, exact_scores)

    # ---- metrics
    top_p = [set(np.argsort(-exact_scores[:, j])[:10].tolist()) for j in range(nq)]
    top_o = [set(np.argsort(exact_scores[:, j])[:10].tolist()) for j in range(nq)]

    def metrics(sc: np.ndarray) -> dict[str, Any]:
        rp = [len(set(np.argsort(-sc[:, j])[:10].tolist()) & top_p[j]) / 10 for j in range(nq)]
        ro = [len(set(np.argsort(sc[:, j])[:10].tolist()) & top_o[j]) / 10 for j in range(nq)]
        sp = [spearman(sc[:, j], exact_scores[:, j]) for j in range(nq)]
        self1 = float(np.mean([int(np.argmax(sc[:, j])) == int(qrows[j]) for j in range(nq)]))
        return {
            "recall_pro": float(np.median(rp)),
            "recall_opp": float(np.median(ro)),
            "spearman": float(np.median(sp)),
            "self_top1": self1,
            "recall_pro_queries": rp,
            "recall_opp_queries": ro,
        }

    exact_m = metrics(exact_scores)
    results = []
    for lay in layouts:
        per_seed = {s: metrics(sc) for s, sc in lay.scores.items()}
        results.append(
            {
                "layout": lay.name,
                "stage1": lay.stage1,
                "stage1_dim": stage1_dim(lay.stage1),
                "sketch": lay.sketch,
                "dtype": lay.dtype,
                "dim": lay.dim,
                "bytes": lay.bytes,
                "seeds": {str(s): m for s, m in per_seed.items()},
            }
        )
    return {
        "dataset": name,
        "spec": spec,
        "n": n,
        "params": n_params,
        "checkpoints": len(specs),
        "m": a.m,
        "queries": qrows.tolist(),
        "epochs": a.epochs,
        "likelihood": a.likelihood,
        "layers": [
            {"name": li.name, "in_dim": li.in_dim, "out_dim": li.out_dim, "energy_share": float(f), **asdict(t)}
            for li, f, t in zip(layers, frac, terms, strict=True)
        ],
        "stage1_layouts": {nm: [[b.k_in, b.k_out] for b in p.blocks] for nm, p in stage1[0].items()},
        "tensor_layouts": {nm: [v if isinstance(v, int) else list(v) for v in sp] for nm, sp in tensor_specs.items()},
        "rows_per_sample": rows_per,
        "exact_self_top1": exact_m["self_top1"],
        "seconds": {"train": t_train, "calibration": t_cal, "featurize_and_score": t_feat},
        "final_loss": run_json.get("final_loss"),
        "results": results,
    }


def summarize(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for r in res["results"]:
        seeds = r["seeds"].values()
        rp = [m["recall_pro"] for m in seeds]
        ro = [m["recall_opp"] for m in seeds]
        out[r["layout"]] = {
            "dim": r["dim"],
            "bytes": r["bytes"],
            "n_seeds": len(rp),
            "pro_med": float(np.median(rp)),
            "pro_min": float(np.min(rp)),
            "opp_med": float(np.median(ro)),
            "opp_min": float(np.min(ro)),
            "pro_mean": float(np.median([np.mean(m["recall_pro_queries"]) for m in seeds])),
            "opp_mean": float(np.median([np.mean(m["recall_opp_queries"]) for m in seeds])),
            "spearman": float(np.median([m["spearman"] for m in seeds])),
            "self_top1": float(np.median([m["self_top1"] for m in seeds])),
        }
    return out


def print_table(
    all_res: list[dict[str, Any]],
    emit: Callable[[str], None],
    max_bytes: int | None = None,
    only_dtype: str | None = None,
) -> None:
    """One row per layout measured on every data set, cheapest first; ``max_bytes`` / ``only_dtype``
    hide wider layouts / other storage dtypes except the references (Kronecker alone, float32)."""
    sums = [summarize(r) for r in all_res]
    names = [n for n in sums[0] if all(n in s for s in sums)]
    ok = {n: all(s[n]["pro_med"] >= TARGET_PRO and s[n]["opp_med"] >= TARGET_OPP for s in sums) for n in names}
    cost = {n: max(s[n]["bytes"] for s in sums) for n in names}
    passing = sorted((cost[n], n) for n in names if ok[n])
    best = passing[0][1] if passing else None
    for r in all_res:
        emit(
            f"{r['dataset']} ({r['spec']}): N={r['n']}, P={r['params']:,}, C={r['checkpoints']}, m={r['m']}, "
            f"{len(r['queries'])} queries, {r['likelihood']}, {r['epochs']} epochs; exact self-top1 "
            f"{r['exact_self_top1']:.3f}; energy share per layer: "
            + ", ".join(f"{li['name']} {li['energy_share']:.3f}" for li in r["layers"])
        )
    head = f"{'layout':<30}{'bytes':>8}"
    for r in all_res:
        tag = r["dataset"]
        head += f" | {tag + ' D':>12}{'pro med/min':>13}{'opp med/min':>13}{'mean p/o':>11}{'spear':>7}{'self1':>6}"
    emit("")
    emit(head)
    emit("-" * len(head))
    for n in sorted(names, key=lambda n: (cost[n], n)):
        reference = n.startswith("kron") and "+" not in n and n.endswith(" float32")
        if max_bytes is not None and cost[n] > max_bytes and not reference:
            continue
        if only_dtype is not None and not n.endswith(" " + only_dtype) and not reference:
            continue
        line = f"{n:<30}{cost[n]:>8,}"
        for s in sums:
            v = s[n]
            seeds_tag = "" if v["n_seeds"] > 1 else "*"
            line += (
                f" | {v['dim']:>12,}{v['pro_med']:>7.2f}/{v['pro_min']:<4.2f}{seeds_tag:1}"
                f"{v['opp_med']:>6.2f}/{v['opp_min']:<4.2f}{v['pro_mean']:>6.2f}/{v['opp_mean']:<4.2f}"
                f"{v['spearman']:>7.3f}{v['self_top1']:>6.2f}"
            )
        emit(line + ("   <== cheapest passing" if n == best else ("   ok" if ok[n] else "")))
    emit("")
    emit(
        "recall@10 of the exact top-10 (pro: largest scores, opp: most negative): median over queries, then median / "
        "min over projection seeds (* = one seed); mean p/o = mean over queries (median over seeds); "
        "spear = median Spearman over all N scores; "
        f"self1 = fraction of queries that are their own top proponent. Pass = median recall >= {TARGET_PRO} (pro) "
        f"and >= {TARGET_OPP} (opp) on every data set; bytes = per sample per checkpoint (int8: + 4-byte scale)."
    )
    if best:
        emit(f"cheapest passing layout: {best} ({cost[best]:,} bytes per sample per checkpoint)")
    else:
        emit("no layout passes on every data set")


def pareto_main(a: argparse.Namespace) -> None:
    set_threads(a.threads)
    lines: list[str] = []

    def emit(s: str) -> None:
        print(s, flush=True)
        lines.append(s)

    if a.combine:
        all_res = []
        for path in a.combine:  # runs of one data set (same queries, same exact reference) are merged
            res = json.loads(Path(path).read_text())
            same = [r for r in all_res if r["dataset"] == res["dataset"]]
            if same and same[0]["queries"] == res["queries"]:
                known = {x["layout"] for x in same[0]["results"]}
                same[0]["results"] += [x for x in res["results"] if x["layout"] not in known]
            else:
                all_res.append(res)
    else:
        wd = Path(a.workdir or tempfile.mkdtemp(prefix="fidelity_"))
        emit(
            f"threads={torch.get_num_threads()} torch={torch.__version__} loadavg={os.getloadavg()[0]:.1f} workdir={wd}"
        )
        all_res = []
        for name in a.datasets.split(","):
            res = pareto_dataset(name.strip(), a, wd, emit)
            res["args"] = vars(a)
            all_res.append(res)
            if a.out:
                out = Path(a.out if len(a.datasets.split(",")) == 1 else f"{a.out}.{name}.json")
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(res, default=_json_default))
                emit(f"raw results: {out}")
    print_table(all_res, emit, a.max_bytes, a.only_dtype)
    if a.table:
        Path(a.table).write_text("\n".join(lines) + "\n")


# ============================================================================ the index study


def index_main(a: argparse.Namespace) -> None:
    set_threads(a.threads)
    wd = Path(a.workdir or tempfile.mkdtemp(prefix="fidelity_"))
    data = load_dataset("digits")
    run = wd / "run"
    if not (run / "run.json").exists():
        train(
            data,
            default_config_for(data.shape, latent_dim=a.latent_dim, likelihood=a.likelihood),
            run,
            TrainConfig(epochs=a.epochs, device="cuda" if a.device == "cuda" else "cpu"),
            show_progress=False,
        )
    specs, _ = checkpoints_from_run(run)

    def build(name: str, proj: ProjectionSpec) -> tuple[Path, float]:
        t = time.perf_counter()
        out = build_index(
            data,
            specs,
            wd / name,
            IndexOptions(m=a.m, projection=proj, featurizer=a.featurizer, device=a.device),
            show_progress=False,
        )
        return out, time.perf_counter() - t

    exact_path, t_exact = build("none", ProjectionSpec(kind="none"))
    exact = open_index(exact_path)
    rows = np.arange(a.queries)
    ex_scores = [exact.scores(exact.stored_features(int(r))) for r in rows]

    def sanity(idx) -> str:  # type: ignore[no-untyped-def]
        stored = np.mean([idx.top(idx.stored_features(int(r)), k=1).rows[0] == r for r in range(128)])
        q = idx.featurize(idx.store.images(slice(0, 128)), seed=1)
        fresh = np.mean([idx.top({c: v[r] for c, v in q.items()}, k=1).rows[0] == r for r in range(128)])
        return f"{stored:.3f}/{fresh:.3f}"

    print(
        f"digits, {a.likelihood} likelihood, latent {a.latent_dim}, {a.epochs} epochs; N={exact.n}, "
        f"C={len(exact.checkpoints)}, m={a.m}, featurizer={a.featurizer}, {a.queries} queries"
    )
    print(
        f"{'projection':>12} {'D':>7} {'store MB':>9} {'index s':>8} {'recall@10 pro':>14} {'recall@10 opp':>14} "
        f"{'spearman':>9} {'self-top1 stored/fresh':>23}"
    )
    print(
        f"{'none':>12} {exact.dim:>7} {dir_size(exact_path) / 1e6:>9.1f} {t_exact:>8.1f} {1.0:>14.3f} {1.0:>14.3f} "
        f"{1.0:>9.3f} {sanity(exact):>23}"
    )
    for k in parse_list(a.ks):
        path, t_idx = build(f"k{k}", ProjectionSpec(kind="kron", k=k))
        idx = open_index(path)
        rp, ro, sp = [], [], []
        for r, es in zip(rows, ex_scores):
            s = idx.scores(idx.stored_features(int(r)))
            rp.append(len(set(np.argsort(-s)[:10]) & set(np.argsort(-es)[:10])) / 10)
            ro.append(len(set(np.argsort(s)[:10]) & set(np.argsort(es)[:10])) / 10)
            sp.append(spearman(s, es))
        print(
            f"{'kron k=' + str(k):>12} {idx.dim:>7} {dir_size(path) / 1e6:>9.1f} {t_idx:>8.1f} "
            f"{np.median(rp):>14.3f} {np.median(ro):>14.3f} {np.median(sp):>9.3f} {sanity(idx):>23}"
        )
    # The paper's other scaling suggestion: a subset of checkpoints, measured on exact gradients.
    n_ck = len(exact.checkpoints)
    subsets = [[n_ck - 1], [0, n_ck - 1], list(range(0, n_ck, 2))]
    print(f"\ncheckpoint subsets (exact gradients) against all {n_ck} checkpoints")
    print(f"{'checkpoints':>16} {'recall@10 pro':>14} {'recall@10 opp':>14} {'spearman':>9}")
    for sub in subsets:
        sp_p, sp_o, sp_r = [], [], []
        for r, es in zip(rows, ex_scores):
            s = exact.scores(exact.stored_features(int(r), checkpoints=sub), checkpoints=sub)
            sp_p.append(len(set(np.argsort(-s)[:10]) & set(np.argsort(-es)[:10])) / 10)
            sp_o.append(len(set(np.argsort(s)[:10]) & set(np.argsort(es)[:10])) / 10)
            sp_r.append(spearman(s, es))
        print(
            f"{','.join(map(str, sub)):>16} {np.median(sp_p):>14.3f} {np.median(sp_o):>14.3f} {np.median(sp_r):>9.3f}"
        )
    # The paper's first scaling suggestion: score only the nearest samples in latent space.
    print("\nlatent pre-filter (exact gradients): score only the L nearest training samples in latent space")
    print(f"{'L':>16} {'recall@10 pro':>14} {'recall@10 opp':>14}")
    mu = exact.store.array("latent_mu")
    for size in (50, 200, 800):
        pf_p, pf_o = [], []
        for r, es in zip(rows, ex_scores):
            q = exact.stored_features(int(r))
            cand = exact.latent_neighbours(mu[int(r)], size)
            pro = exact.top(q, k=10, candidates=cand).rows
            opp = exact.top(q, k=10, direction="opponents", candidates=cand).rows
            pf_p.append(len(set(pro.tolist()) & set(np.argsort(-es)[:10].tolist())) / 10)
            pf_o.append(len(set(opp.tolist()) & set(np.argsort(es)[:10].tolist())) / 10)
        print(f"{size:>16} {np.median(pf_p):>14.3f} {np.median(pf_o):>14.3f}")
    print(
        "(recall and spearman: medians over queries; self-top1: fraction of the first 128 training samples that are"
        " their own strongest proponent, querying with the stored gradient / with fresh query draws)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", default="pareto", choices=["pareto", "index"])
    ap.add_argument("--datasets", default="digits,digits28", help="comma-separated: digits, digits28, or a spec")
    ap.add_argument("--ks", default=None, help="Kronecker k alone (pareto default 16,32,64,128; index 8,16,32,64)")
    ap.add_argument("--stage1", default="kron64,kron128,alloc20000", help="first stages of the two-stage layouts")
    ap.add_argument("--sparse-only-stage1", default="alloc20000", help="first stages followed by sparse sketches only")
    ap.add_argument("--dtype-max-dim", type=int, default=20_000, help="wider layouts are stored as float32 only")
    ap.add_argument("--sketches", default="srht,sparse,gaussian")
    ap.add_argument("--nnz", type=int, default=1, help="nonzeros per input coordinate of the sparse sketch")
    ap.add_argument("--d2", default="1024,2048,4096,8192", help="second-stage dimensions")
    ap.add_argument("--alloc", default="2000,4000,8000", help="energy-allocated Kronecker (k ∝ E^(2/3)), total dims")
    ap.add_argument(
        "--valloc", default="2000,4000,8000", help="variance-allocated Kronecker (per side, calibrated), total dims"
    )
    ap.add_argument("--ts", default="1024,2048,4096,8192", help="per-layer tensor sketches (d_l ∝ energy), total dims")
    ap.add_argument("--tsf", default="", help="tensor sketches with FFT-friendly per-layer sizes, total dims")
    ap.add_argument("--hybrid", default="2048,4096,8192", help="tensor sketches (one-row layers) + Kronecker, dims")
    ap.add_argument("--hybrid-fft", default="", help="hybrids that keep tensor sketches up to --max-fft-work, dims")
    ap.add_argument("--max-fft-work", type=int, default=12_000, help="rows x dim per layer kept as a tensor sketch")
    ap.add_argument("--no-exact-cache", dest="exact_cache", action="store_false", help="recompute exact scores")
    ap.add_argument("--variance-calibration", type=int, default=64, help="samples for the variance calibration")
    ap.add_argument("--gaussian-max-d2", type=int, default=1 << 30, help="skip Gaussian sketches above this D2")
    ap.add_argument("--gaussian-seeds", type=int, default=3, help="seeds for the (slow) Gaussian reference")
    ap.add_argument("--gaussian-stage1", default="kron64", help="first stages that get Gaussian sketches")
    ap.add_argument("--seeds", type=int, default=3, help="projection seeds")
    ap.add_argument("--queries", type=int, default=64)
    ap.add_argument("--query-seed", type=int, default=0, help="which training rows are the queries")
    ap.add_argument("--calibration", type=int, default=256, help="samples for the per-layer energy")
    ap.add_argument("--batch", type=int, default=128, help="training samples per featurization pass")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--featurizer", default="kron")
    ap.add_argument("--likelihood", default="bernoulli", choices=["gaussian", "bernoulli"])
    ap.add_argument("--latent-dim", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None, help="raw results JSON (pareto)")
    ap.add_argument("--table", default=None, help="also write the printed output here (pareto)")
    ap.add_argument("--combine", nargs="+", default=None, help="print one table from saved raw results")
    ap.add_argument("--only-dtype", default=None, help="table: one storage dtype (Kronecker references kept)")
    ap.add_argument("--max-bytes", type=int, default=None, help="table: hide wider layouts (Kronecker references kept)")
    a = ap.parse_args()
    if a.mode == "index":
        a.ks = a.ks or "8,16,32,64"
        index_main(a)
    else:
        a.ks = a.ks or "16,32,64,128"
        pareto_main(a)


if __name__ == "__main__":
    main()
