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
  memory is measured), sampled at 25%, 50% and 100% of the run to show it is flat.

Usage::

    python benchmarks/index_throughput.py            # full run (MLP N=60,000)
    python benchmarks/index_throughput.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
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
from proponent.model.projection import ProjectionSpec, build_projector

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
    t = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return batch * steps / (time.perf_counter() - t)


def featurize_rows_per_s(feat, cfg, m: int, device, batch: int, batches: int) -> float:
    data = [_batch(cfg, m, batch, 100 + i, device) for i in range(min(batches, 2))]
    feat.featurize(*data[0])
    _sync(device)
    t = time.perf_counter()
    for i in range(batches):
        fb = feat.featurize(*data[i % len(data)])
    fb.features.sum().item()
    _sync(device)
    return batch * m * batches / (time.perf_counter() - t)


def floor_rows_per_s(kron: KroneckerFeaturizer, cfg, m: int, device, batch: int, batches: int) -> float:
    """The hooked forward + backward to the layer outputs alone: what any per-sample method pays."""
    data = [_batch(cfg, m, batch, 100 + i, device) for i in range(min(batches, 2))]
    kron._capture(*data[0])
    _sync(device)
    t = time.perf_counter()
    for i in range(batches):
        kron._capture(*data[i % len(data)])
    _sync(device)
    return batch * m * batches / (time.perf_counter() - t)


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
    args = ap.parse_args()
    if args.quick:
        args.repeats = min(args.repeats, 1)
        args.train_steps = min(args.train_steps, 2)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    print(
        f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} m={args.m} k={args.k} "
        f"repeats={args.repeats}{' quick' if args.quick else ''} loadavg={os.getloadavg()[0]:.1f}"
    )
    results = [run_model(name.strip(), args, device) for name in args.models.split(",") if name.strip()]

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


if __name__ == "__main__":
    main()
