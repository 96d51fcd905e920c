"""Throughput and memory of the featurizers against a plain training step.

For (a) the MLP VAE at MNIST size and (b) the conv VAE at 32x32x3, on synthetic
data in [0, 1] (and, with ``--models official``, (c) the VAE-TracIn authors' β-VAE from
``examples/official_vae/model.py`` at 64x64x3 with their loss, their last checkpoint when
``../shared/vae-tracin-official`` is there, and SGD (lr 3e-4, batch 64) as their training step):

* gradient rows/s (one row = one sample x one draw) of the Kronecker featurizer and
  of the dense torch.func path (on fewer samples: it is slow);
* plain training samples/s (Adam step on the ELBO with m=1, batch 256);
* their ratios, as medians over ``--repeats`` interleaved repeats;
* peak RSS while streaming N synthetic samples through the Kronecker featurizer
  (features are reduced to a checksum and dropped, so only the featurizer's own
  memory is measured), sampled at 25%, 50% and 100% of the run to show it is flat;
* feature layouts (``--layouts``, MLP only): rows/s of the Kronecker first stage followed by a
  second-stage sketch (``proponent.model.sketch``) and optional int8 storage quantization,
  each against the bare hooked forward + backward (the floor), interleaved in the same run.
  ``default[:DTYPE]`` is the product's own path: :class:`KroneckerFeaturizer` with the default tensor-sketch
  projector (D = 7,996 split by gradient energy as the index job's calibration does), int8 unless given.
  A layout is ``STAGE1[+KIND[NNZ]>D2][:int8]`` with STAGE1 ``tsD`` (per-layer tensor sketches from
  the Kronecker factors, ``d_l ∝`` the layer's gradient energy, total D), ``hybD`` (tensor sketches
  for the one-row encoder layers, Kronecker blocks for the m-row decoder layers), ``kronK`` (k per
  side), ``allocD``
  (per-layer k ∝ energy^(2/3)) or ``vallocD`` (per-side k from the variance model), total D, with
  the per-layer k taken from ``--calibration-from`` (a projection_fidelity.py results JSON, e.g. the
  trained digits28 run) or calibrated on the synthetic batch; KIND ``sparse``,
  ``srht`` or ``gaussian``; e.g. ``kron64+sparse1>8192:int8``.

Usage::

    python benchmarks/index_throughput.py            # full run (MLP N=60,000)
    python benchmarks/index_throughput.py --quick    # smoke run
    python benchmarks/index_throughput.py --models mlp --layouts-only --layouts kron64,kron64+sparse1>8192:int8
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import re
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

from proponent.model.architectures import ModelConfig, build_model
from proponent.model.featurizers.dense import DenseFeaturizer
from proponent.model.featurizers.kronecker import KroneckerFeaturizer, auto_batch_size
from proponent.model.objectives import ELBO, Objective
from proponent.model.projection import DEFAULT_DIM, ProjectionSpec, Projector, build_projector, discover_layers
from proponent.model.sketch import Sketch, allocate_dims, allocate_tensor
from proponent.research.sketches import (
    KronVariance,
    LayerTensorSketch,
    allocate_hybrid,
    allocate_kron,
    allocate_kron_variance,
    calibrate_kron,
    kron_projector,
)

MODELS = {
    "mlp": ModelConfig(kind="mlp", input_shape=(1, 28, 28), hidden=(512, 256), latent_dim=16),
    "conv": ModelConfig(kind="conv", input_shape=(3, 32, 32), channels=(32, 64), latent_dim=32),
    "official": ModelConfig(kind="conv", input_shape=(3, 64, 64), latent_dim=64),  # shapes only: see _official
}
TARGET_VS_TRAIN = {"mlp": 0.5, "conv": 0.3, "official": 0.3}
TARGET_VS_DENSE = 20.0
TARGET_RSS_GB = 3.0
REPO = Path(__file__).resolve().parents[1]
OFFICIAL_CKPT = REPO.parent / "shared" / "vae-tracin-official" / "checkpoints" / "1500000"


# The clock of the throughput timings: wall time by default; ``--clock cpu`` uses the process's
# CPU time (all threads), which is far less disturbed by other processes on a shared machine
# (use it with --threads 1: idle OpenMP workers spinning would count as work).
CLOCK = time.perf_counter


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch(cfg: ModelConfig, m: int, n: int, seed: int, device: torch.device):
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.rand(n, *cfg.input_shape, generator=g)
    eps = torch.randn(n, m, cfg.latent_dim, generator=g)
    y = torch.zeros(n, dtype=torch.long)
    return x.to(device), y.to(device), eps.to(device)


class _UserLoss(Objective):
    """A user's per-sample loss ``fn(forward, x, eps)`` with m draws of ``noise`` as an objective."""

    name = "user"

    def __init__(self, fn, m: int, noise: tuple[int, ...]):
        self.fn, self.m, self.noise = fn, m, noise

    def noise_shape(self, model) -> tuple[int, ...]:
        return self.noise

    def loss(self, forward, x, y, eps):
        return self.fn(forward, x, eps)


def _official(m: int, device: torch.device):
    """The authors' model file (imported by path, as a user's file is), a model and its loss."""
    spec = importlib.util.spec_from_file_location("official_vae_model", REPO / "examples/official_vae/model.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    model = mod.build()
    if OFFICIAL_CKPT.is_file():
        model.load_state_dict(mod.load_checkpoint(OFFICIAL_CKPT), strict=True)
    print(f"official: weights {'from ' + str(OFFICIAL_CKPT) if OFFICIAL_CKPT.is_file() else 'random (no checkpoint)'}")
    return model.to(device), _UserLoss(mod.per_sample_loss, m, (mod.Z_DIM,)), mod


def train_samples_per_s(model, cfg, device, batch: int, steps: int, obj=None, sgd_lr: float | None = None) -> float:
    obj = obj or ELBO(m=1)
    opt = torch.optim.SGD(model.parameters(), lr=sgd_lr) if sgd_lr else torch.optim.Adam(model.parameters(), lr=1e-4)
    x, y, eps = _batch(cfg, 1, batch, 1, device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        obj.loss(model, x, y, eps).mean().backward()
        opt.step()

    step()
    _sync(device)
    t = CLOCK()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (CLOCK() - t)


def featurize_rows_per_s(feat, cfg, m: int, device, batch: int, batches: int) -> float:
    data = [_batch(cfg, m, batch, 100 + i, device) for i in range(min(batches, 2))]
    feat.featurize(*data[0])
    _sync(device)
    t = CLOCK()
    for i in range(batches):
        fb = feat.featurize(*data[i % len(data)])
    fb.features.sum().item()
    _sync(device)
    return batch * m * batches / (CLOCK() - t)


def floor_rows_per_s(kron: KroneckerFeaturizer, cfg, m: int, device, batch: int, batches: int) -> float:
    """The hooked forward + backward to the layer outputs alone: what any per-sample method pays."""
    data = [_batch(cfg, m, batch, 100 + i, device) for i in range(min(batches, 2))]
    kron._capture(*data[0])
    _sync(device)
    t = CLOCK()
    for i in range(batches):
        kron._capture(*data[i % len(data)])
    _sync(device)
    return batch * m * batches / (CLOCK() - t)


DEFAULT_LAYOUTS = (
    "default:int8,kron1,kron64,tsf7996:int8,tsf8192:int8,tsf4096:float16,ts7996:int8,hybt7996:int8,hyb8192:int8,"
    "kron64+sparse1>8192:int8,kron64+srht>8192:int8,kron64+gaussian>2048,valloc20000+sparse1>8192:int8,valloc8000:int8"
)
_LAYOUT = re.compile(
    r"^(kron\d+|v?alloc\d+|tsf?\d+|hybt?\d+)(?:\+(sparse|srht|gaussian)(\d*)>(\d+))?(?::(int8|float16|float32))?$"
)


@dataclass
class FeatureLayout:
    name: str
    feat: KroneckerFeaturizer
    sketch: Sketch | None
    dtype: str
    tensor: LayerTensorSketch | None = None

    @property
    def stage1_dim(self) -> int:
        return self.tensor.dim if self.tensor is not None else self.feat.projector.dim

    @property
    def dim(self) -> int:
        return self.sketch.out_dim if self.sketch is not None else self.stage1_dim

    def run(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        if self.tensor is not None:
            f = tensor_features(self.feat, self.tensor, x, y, eps)
        else:
            f = self.feat.featurize(x, y, eps).features
        if self.sketch is not None:
            f = self.sketch.apply(f)
        if self.dtype == "int8":  # the stored values (and one scale per row), as the store would write them
            scale = f.abs().amax(dim=1, keepdim=True).clamp_min(1e-30) / 127
            f = torch.round(f / scale).to(torch.int8)
        elif self.dtype == "float16":
            f = f.half()
        return f


def tensor_features(
    feat: KroneckerFeaturizer, ts: LayerTensorSketch, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor
) -> torch.Tensor:
    """What a tensor-sketch featurizer would do: the hooked pass, then per layer its factors, the exact
    squared norm (Gram identity, as the Kronecker featurizer computes it) and the tensor-sketch block."""
    calls, deltas, _ = feat._capture(x, y, eps)
    b = x.shape[0]
    blocks = []
    sq = torch.zeros(b, dtype=torch.float64, device=x.device)
    with torch.no_grad():
        for i, lay in enumerate(feat.layers):
            a, d = feat._factors(lay, calls[i].inputs[0], deltas[i][0], b)
            a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2) if lay.bias else a
            if a.shape[1] == 1:
                sq += (a.reshape(b, -1).square().sum(1) * d.reshape(b, -1).square().sum(1)).double()
            else:
                sq += (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(d, d.transpose(1, 2))).sum(dim=(1, 2)).double()
            blocks.append(ts.block(i, a, d))
    return torch.cat(blocks, dim=1)


def layer_energy_share(model, obj, cfg, device, n: int = 64) -> list[float]:
    exact = build_projector(model, "all", ProjectionSpec(kind="none"), device=device)
    f = KroneckerFeaturizer(model, obj, exact).featurize(*_batch(cfg, obj.m, n, 7, device)).features
    e = [float(f[:, b.offset : b.offset + b.dim].double().pow(2).sum(1).mean()) for b in exact.blocks]
    return [v / sum(e) for v in e]


def build_layouts(spec: str, model, obj, cfg, device, batch: int, calib: dict | None) -> list[FeatureLayout]:
    """``calib``: a projection_fidelity.py results JSON (per-layer energy and variance terms, and the
    per-layer k of the layouts it measured); without it, alloc/valloc layouts are calibrated on the
    synthetic batch with this (untrained) model."""
    layers = discover_layers(model)
    ins, outs = [li.in_dim for li in layers], [li.out_dim for li in layers]
    recorded = (calib or {}).get("stage1_layouts", {})
    out = []
    for text in [t.strip() for t in spec.split(",") if t.strip()]:
        if text.split(":")[0] == "default":  # the product's featurizer and layout, as the index job builds it
            energy = (
                [li["energy_share"] for li in calib["layers"]] if calib else layer_energy_share(model, obj, cfg, device)
            )
            dims = allocate_tensor(energy, DEFAULT_DIM, [li.in_dim * li.out_dim for li in layers])
            proj = build_projector(model, "all", ProjectionSpec(layer_dims=tuple(dims)), device=device)
            dtype = text.split(":")[1] if ":" in text else "int8"
            out.append(FeatureLayout(text, KroneckerFeaturizer(model, obj, proj, chunk_size=batch), None, dtype))
            continue
        m = _LAYOUT.match(text)
        if not m:
            raise SystemExit(f"layout {text!r}: expected STAGE1[+KIND[NNZ]>D2][:DTYPE], e.g. kron64+sparse1>8192:int8")
        stage1, kind, nnz, d2, dtype = m.groups()
        proj: Projector
        tensor = None
        if stage1.startswith(("ts", "hyb")):
            proj = build_projector(model, "all", ProjectionSpec(kind="none"), device=device)
            recorded_t = (calib or {}).get("tensor_layouts", {})
            energy = (
                [li["energy_share"] for li in calib["layers"]] if calib else layer_energy_share(model, obj, cfg, device)
            )
            if stage1 in recorded_t:
                specs = [v if isinstance(v, int) else tuple(v) for v in recorded_t[stage1]]
            elif stage1.startswith("tsf"):
                specs = allocate_tensor(energy, int(stage1[3:]), [li.in_dim * li.out_dim for li in layers])
            elif stage1.startswith("ts"):
                specs = allocate_dims(energy, int(stage1[2:]), max_dims=[li.in_dim * li.out_dim for li in layers])
            else:
                terms = (
                    [KronVariance(li["a"], li["b"], li["c"], li["energy"]) for li in calib["layers"]]
                    if calib
                    else calibrate_kron(model, obj, layers, *_batch(cfg, obj.m, 64, 7, device))
                )
                rows = [1 if li.name.startswith("encoder") else obj.m for li in layers]  # the VAE: m decoder rows
                if stage1.startswith("hybt"):
                    specs = allocate_hybrid(layers, energy, terms, rows, int(stage1[4:]), max_fft_work=12_000)
                else:
                    specs = allocate_hybrid(layers, energy, terms, rows, int(stage1[3:]))
            tensor = LayerTensorSketch(layers, specs)
        elif stage1.startswith("kron"):
            proj = build_projector(model, "all", ProjectionSpec(kind="kron", k=int(stage1[4:])), device=device)
        elif stage1 in recorded:
            proj = kron_projector(layers, [tuple(v) for v in recorded[stage1]], device=device)
        elif stage1.startswith("alloc"):
            energy = (
                [li["energy_share"] for li in calib["layers"]] if calib else layer_energy_share(model, obj, cfg, device)
            )
            proj = kron_projector(layers, allocate_kron(energy, ins, outs, int(stage1[5:])), device=device)
        else:
            if calib:
                terms = [KronVariance(li["a"], li["b"], li["c"], li["energy"]) for li in calib["layers"]]
            else:
                terms = calibrate_kron(model, obj, layers, *_batch(cfg, obj.m, 64, 7, device))
            proj = kron_projector(layers, allocate_kron_variance(terms, ins, outs, int(stage1[6:])), device=device)
        sk = None
        if kind:
            sk = Sketch(proj.dim, int(d2), kind, seed=0, nnz=int(nnz or 1) if kind == "sparse" else 1, device=device)
        feat = KroneckerFeaturizer(model, obj, proj, chunk_size=batch)
        out.append(FeatureLayout(text, feat, sk, dtype or "float32", tensor))
    return out


def layout_rows_per_s(lay: FeatureLayout, cfg, m: int, device, batch: int, batches: int) -> float:
    data = [_batch(cfg, m, batch, 100 + i, device) for i in range(min(batches, 2))]
    lay.run(*data[0])
    _sync(device)
    t = CLOCK()
    for i in range(batches):
        f = lay.run(*data[i % len(data)])
    f.float().sum().item()
    _sync(device)
    return batch * m * batches / (CLOCK() - t)


def run_layouts(args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    cfg = MODELS["mlp"]
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    obj = ELBO(m=args.m)
    batch = args.batch or (1024 if device.type == "cuda" else 256)
    calib = json.loads(open(args.calibration_from).read()) if args.calibration_from else None
    layouts = build_layouts(args.layouts, model, obj, cfg, device, batch, calib)
    floor_feat = layouts[0].feat
    batches = args.kron_batches or 8
    if args.quick:
        batches = max(1, batches // 4)
    fl: list[float] = []
    rows: dict[str, list[float]] = {lay.name: [] for lay in layouts}
    ratios: dict[str, list[float]] = {lay.name: [] for lay in layouts}
    for _ in range(args.repeats):  # each layout right after its own floor timing: load drift hits both alike
        for lay in layouts:
            f0 = floor_rows_per_s(floor_feat, cfg, args.m, device, batch, batches)
            r = layout_rows_per_s(lay, cfg, args.m, device, batch, batches)
            fl.append(f0)
            rows[lay.name].append(r)
            ratios[lay.name].append(r / f0)
    return {
        "layouts": layouts,
        "floor": fl,
        "rows": rows,
        "ratios": ratios,
        "batch": batch,
        "calib": args.calibration_from,
    }


def print_layouts(res: dict[str, object]) -> None:
    layouts: list[FeatureLayout] = res["layouts"]  # type: ignore[assignment]
    rows: dict[str, list[float]] = res["rows"]  # type: ignore[assignment]
    ratios: dict[str, list[float]] = res["ratios"]  # type: ignore[assignment]
    fl: list[float] = res["floor"]  # type: ignore[assignment]
    print()
    print(f"feature layouts, MLP 784-512-256-16, batch {res['batch']} (medians; ratio = per-repeat rows/s / floor)")
    hdr = f"{'layout':<32}{'stage-1 D':>10}{'D':>7}{'bytes':>8}{'rows/s':>11}{'/ floor':>9}{'min':>7}{'target':>8}"
    print(hdr)
    print("-" * len(hdr))
    print(f"{'fwd+bwd floor':<32}{'':>10}{'':>7}{'':>8}{statistics.median(fl):>11,.0f}{1.0:>9.2f}")
    for lay in layouts:
        nbytes = lay.dim * {"float32": 4, "float16": 2, "int8": 1}[lay.dtype] + (4 if lay.dtype == "int8" else 0)
        r = ratios[lay.name]
        print(
            f"{lay.name:<32}{lay.stage1_dim:>10,}{lay.dim:>7,}{nbytes:>8,}{statistics.median(rows[lay.name]):>11,.0f}"
            f"{statistics.median(r):>9.2f}{min(r):>7.2f}{'>=0.8':>8}"
        )
    per = "; ".join(f"{k}: " + ", ".join(f"{v:.2f}" for v in r) for k, r in ratios.items())
    print(f"ratios per repeat: {per}")
    if res["calib"] is None:
        print("alloc / valloc layouts: per-layer k calibrated on this (untrained) model and synthetic data")
    else:
        print(f"alloc / valloc layouts: per-layer k from {res['calib']}")


@dataclass
class RSSSampler:
    interval: float = 0.02
    peak: int = 0
    marks: dict[str, tuple[int, int]] = field(default_factory=dict)  # label -> (rss now, peak so far)

    def __post_init__(self) -> None:
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> RSSSampler:
        self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mark(self, label: str) -> None:
        rss = self._proc.memory_info().rss
        self.peak = max(self.peak, rss)
        self.marks[label] = (rss, self.peak)


def stream(feat, cfg, m: int, device, n: int, batch: int) -> tuple[RSSSampler, float, float]:
    """Featurize n synthetic samples batch by batch; returns sampler, rows/s, checksum."""
    checks = {int(n * f): f"{int(f * 100)}%" for f in (0.25, 0.5, 1.0)}
    done, checksum = 0, 0.0
    with RSSSampler() as rss:
        rss.mark("start")
        t = time.perf_counter()
        i = 0
        pending = sorted(checks)
        while done < n:
            b = min(batch, n - done)
            fb = feat.featurize(*_batch(cfg, m, b, 10_000 + i, device))
            checksum += float(fb.features.double().sum().item() + fb.sq_norm.sum().item())
            done += b
            i += 1
            while pending and done >= pending[0]:
                rss.mark(checks[pending.pop(0)])
        _sync(device)
        elapsed = time.perf_counter() - t
    return rss, n * m / elapsed, checksum


def gb(x: int) -> str:
    return f"{x / 2**30:.2f}"


def run_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, object]:
    cfg = MODELS[name]
    torch.manual_seed(0)
    train_kw: dict[str, object] = {}
    train_batch = 256
    if name == "official":  # the authors' model, loss and training step
        model, obj, official = _official(args.m, device)
        train_kw = {"obj": _UserLoss(official.per_sample_loss, 1, (cfg.latent_dim,)), "sgd_lr": official.LEARNING_RATE}
        train_batch = official.BATCH_SIZE
    else:
        model = build_model(cfg).to(device)
        obj = ELBO(m=args.m)
    proj = build_projector(model, "all", ProjectionSpec(kind="kron", k=args.k), device=device)
    if args.batch:
        batch = args.batch
    elif device.type == "cuda":
        batch = 1024 if name == "mlp" else 256
    else:
        batch = 256 if name == "mlp" else 32
    auto = auto_batch_size(model, obj, proj, device, sample_shape=cfg.input_shape)
    kron = KroneckerFeaturizer(model, obj, proj, chunk_size=batch)
    dense = DenseFeaturizer(model, obj, proj, chunk_size=args.dense_chunk)
    n_dense = args.dense_n or (8 if name == "mlp" else 2)
    kron_batches = args.kron_batches or (8 if name == "mlp" else 2)
    if args.quick:
        kron_batches = max(1, kron_batches // 4)
    train_model = copy.deepcopy(model)  # separate copy: training steps must not change the featurized model

    tr, kr, de, fl = [], [], [], []
    for _ in range(args.repeats):  # interleaved so that load drift affects all alike
        tr.append(train_samples_per_s(train_model, cfg, device, train_batch, args.train_steps, **train_kw))
        kr.append(featurize_rows_per_s(kron, cfg, args.m, device, batch, kron_batches))
        de.append(featurize_rows_per_s(dense, cfg, args.m, device, n_dense, 1))
        fl.append(floor_rows_per_s(kron, cfg, args.m, device, batch, kron_batches))
    n = args.n if name == "mlp" else args.n_conv
    if args.quick:
        n = min(n, 2048 if name == "mlp" else 128)
    rss, stream_rows, _ = stream(kron, cfg, args.m, device, n, batch)
    res: dict[str, object] = {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "dim": proj.dim,
        "batch": batch,
        "auto_batch": auto,
        "train": statistics.median(tr),
        "kron": statistics.median(kr),
        "dense": statistics.median(de),
        "floor": statistics.median(fl),
        "kron_per_repeat": kr,
        "train_per_repeat": tr,
        "ratio_train": statistics.median(k / t for k, t in zip(kr, tr, strict=True)),
        "ratio_dense": statistics.median(k / d for k, d in zip(kr, de, strict=True)),
        "n": n,
        "stream_rows": stream_rows,
        "rss": rss,
    }
    if device.type == "cuda":
        res["cuda_peak"] = torch.cuda.max_memory_allocated(device)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="mlp,conv", help="comma-separated subset of: mlp, conv, official")
    ap.add_argument("--m", type=int, default=16, help="draws per sample")
    ap.add_argument("--k", type=int, default=16, help="Kronecker projection size per side")
    ap.add_argument("--n", type=int, default=60_000, help="samples streamed for the MLP memory run")
    ap.add_argument("--n-conv", type=int, default=2_048, help="samples streamed for the conv memory run")
    ap.add_argument(
        "--batch", type=int, default=None, help="Kronecker chunk (samples); default 256 MLP, 32 conv (CUDA: 1024, 256)"
    )
    ap.add_argument("--kron-batches", type=int, default=None, help="batches per Kronecker timing")
    ap.add_argument("--dense-n", type=int, default=None, help="samples for the dense timing (default 8 MLP, 2 conv)")
    ap.add_argument("--dense-chunk", type=int, default=8, help="vmap chunk size of the dense path")
    ap.add_argument("--train-steps", type=int, default=5, help="Adam steps per training timing")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="fast smoke run (small N, fewer batches)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    ap.add_argument("--layouts", default=DEFAULT_LAYOUTS, help="feature layouts to time on the MLP ('' = none)")
    ap.add_argument("--layouts-only", action="store_true", help="only the layout section")
    ap.add_argument(
        "--calibration-from",
        default=None,
        help="projection_fidelity.py results JSON: per-layer k of alloc/valloc layouts",
    )
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="cpu: process CPU time (shared machines)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.quick:
        args.repeats = min(args.repeats, 1)
        args.train_steps = min(args.train_steps, 2)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} m={args.m} k={args.k} "
        f"repeats={args.repeats}{' quick' if args.quick else ''} clock={args.clock} loadavg={os.getloadavg()[0]:.1f}"
    )
    if args.layouts_only:
        print_layouts(run_layouts(args, device))
        return
    results = [run_model(name.strip(), args, device) for name in args.models.split(",") if name.strip()]
    layout_res = run_layouts(args, device) if args.layouts and "mlp" in args.models else None

    print()
    print("throughput (medians; row = sample x draw)")
    hdr = (
        f"{'model':<6}{'params':>10}{'dim':>6}{'batch':>7}{'auto':>6}{'train smp/s':>13}{'kron rows/s':>13}"
        f"{'dense rows/s':>14}{'fwd+bwd rows/s':>16}{'kron/train':>12}{'target':>8}{'kron/dense':>12}{'target':>8}"
    )
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        name = str(r["model"])
        print(
            f"{name:<6}{r['params']:>10,}{r['dim']:>6}{r['batch']:>7}{r['auto_batch']:>6}{r['train']:>13,.0f}"
            f"{r['kron']:>13,.0f}{r['dense']:>14,.1f}{r['floor']:>16,.0f}"
            f"{r['ratio_train']:>12.2f}{'>=' + str(TARGET_VS_TRAIN[name]):>8}"
            f"{r['ratio_dense']:>12.1f}{'>=' + str(int(TARGET_VS_DENSE)):>8}"
        )
    print("fwd+bwd = the hooked forward and the backward to the layer outputs alone (no per-sample work): a floor")
    print("that every per-sample method, the dense one included, pays; kron/dense cannot exceed dense-cost/floor.")
    print()
    print("memory while streaming N samples through the Kronecker featurizer (RSS GiB: now / peak so far)")
    hdr = f"{'model':<6}{'N':>8}{'rows/s':>10}{'start':>13}{'25%':>13}{'50%':>13}{'100%':>13}{'peak':>7}{'target':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        rss: RSSSampler = r["rss"]  # type: ignore[assignment]
        cells = "".join(
            f"{gb(rss.marks[k][0]) + ' / ' + gb(rss.marks[k][1]):>13}" for k in ("start", "25%", "50%", "100%")
        )
        target = "<" + str(TARGET_RSS_GB)
        print(f"{r['model']!s:<6}{r['n']:>8,}{r['stream_rows']:>10,.0f}{cells}{gb(rss.peak):>7}{target:>8}")
        if "cuda_peak" in r:
            print(f"       cuda max allocated {gb(int(r['cuda_peak']))} GiB")  # type: ignore[arg-type]
    print(f"loadavg at end {os.getloadavg()[0]:.1f} (other processes on the machine skew all timings)")
    for r in results:
        kr = ", ".join(f"{v:,.0f}" for v in r["kron_per_repeat"])  # type: ignore[attr-defined]
        tr = ", ".join(f"{v:,.0f}" for v in r["train_per_repeat"])  # type: ignore[attr-defined]
        print(f"{r['model']}: kron rows/s per repeat [{kr}]; train samples/s per repeat [{tr}]")
    if layout_res is not None:
        print_layouts(layout_res)


if __name__ == "__main__":
    main()
