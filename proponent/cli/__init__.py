"""The ``proponent`` command line.

Every command exits non-zero with one line ``proponent: error: ...`` on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_DATA = "digits"


def _int_list(s: str) -> list[int]:
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _shard(s: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in s.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N, got {s!r}") from None
    return i, n


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=["mlp", "conv", "classifier"], default="mlp", help="architecture (default mlp)")
    g.add_argument("--latent-dim", type=int, default=16)
    g.add_argument("--hidden", type=_int_list, default=None, help="MLP hidden sizes, e.g. 512,256")
    g.add_argument("--channels", type=_int_list, default=None, help="conv channels, e.g. 32,64")
    g.add_argument("--beta", type=float, default=1.0)
    g.add_argument(
        "--likelihood",
        choices=["gaussian", "bernoulli"],
        default="bernoulli",
        help="decoder likelihood (default bernoulli: see README, sanity check)",
    )


def _cmd_train(a: argparse.Namespace) -> int:
    from proponent.build.data import load_dataset
    from proponent.build.training import TrainConfig, train
    from proponent.model.architectures import default_config_for

    data = load_dataset(a.data)
    cfg = default_config_for(
        data.shape,
        kind=a.model,
        latent_dim=a.latent_dim,
        hidden=tuple(a.hidden) if a.hidden else None,
        channels=tuple(a.channels) if a.channels else None,
        beta=a.beta,
        likelihood=a.likelihood,
        num_classes=int(data.labels.max()) + 1 if data.labels is not None else 10,
    )
    tc = TrainConfig(
        epochs=a.epochs,
        batch_size=a.batch_size,
        lr=a.lr,
        optimizer=a.optimizer,
        momentum=a.momentum,
        checkpoints=a.checkpoints,
        checkpoint_every_steps=a.checkpoint_every_steps,
        checkpoint_every_epochs=a.checkpoint_every_epochs,
        seed=a.seed,
        device=a.device,
    )
    out = train(data, cfg, a.out, tc, show_progress=not a.quiet)
    run = json.loads((out / "run.json").read_text())
    print(
        f"trained {cfg.kind} VAE on {len(data)} samples in {run['seconds']:.1f}s (final loss {run['final_loss']:.3f}); "
        f"{len(run['checkpoints'])} checkpoints in {out}"
    )
    return 0


def _cmd_index(a: argparse.Namespace) -> int:
    from proponent.build.job import IndexOptions, build_index, checkpoints_from_run, set_threads
    from proponent.model.architectures import ModelConfig
    from proponent.model.checkpoints import CheckpointSpec
    from proponent.model.projection import ProjectionSpec

    set_threads(a.threads)
    model_config = None
    if a.run:
        specs, run = checkpoints_from_run(a.run)
        data_spec = a.data or run["data"]["spec"]
    else:
        if not a.checkpoints:
            raise ValueError("give --run DIR or --checkpoints FILE [FILE ...]")
        if not a.data:
            raise ValueError("--data is required with --checkpoints")
        data_spec = a.data
        if a.model_config:
            from proponent.format.fsio import read_json

            model_config = ModelConfig.from_dict(read_json(a.model_config))
        n_ck = len(a.checkpoints)

        def per_ckpt(vals: list[float] | None, default: float, name: str) -> list[float]:
            if vals is None:
                return [default] * n_ck
            if len(vals) == 1:
                return vals * n_ck
            if len(vals) != n_ck:
                raise ValueError(f"--{name} needs 1 or {n_ck} values, got {len(vals)}")
            return vals

        lrs = per_ckpt(a.lr, 1.0, "lr")
        bss = per_ckpt(a.batch_size_trained, 1, "batch-size-trained")
        sts = per_ckpt(a.steps, 1, "steps")
        specs = [CheckpointSpec(p, float(lr), int(b), int(s)) for p, lr, b, s in zip(a.checkpoints, lrs, bss, sts)]
    opts = IndexOptions(
        m=a.m,
        seed=a.seed,
        projection=ProjectionSpec(kind="none" if a.projection == "none" else "kron", k=a.proj_k, seed=a.proj_seed),
        layers=a.layers,
        featurizer=a.featurizer,
        dtype=a.dtype,
        index_kind=a.index_kind,
        batch_size=a.batch_size,
        device=a.device,
        shard=a.shard,
    )
    t0 = time.perf_counter()
    mpath = Path(a.out) / "manifest.json"
    if mpath.exists() and not a.overwrite and json.loads(mpath.read_text()).get("complete"):
        print(f"{a.out} holds a complete index; checking it was built with these settings")
    out = build_index(
        data_spec, specs, a.out, opts, model_config=model_config, overwrite=a.overwrite, show_progress=not a.quiet
    )
    man = json.loads((out / "manifest.json").read_text())
    if not man["complete"]:
        print(
            f"shard {a.shard[0]}/{a.shard[1]} done in {time.perf_counter() - t0:.1f}s; run the other shards, "
            f"then once more without --shard to finish -> {out}"
        )
        return 0
    print(
        f"indexed {man['n']} samples x {len(man['checkpoints'])} checkpoints (D={man['projection']['dim']}, "
        f"m={man['objective']['m']}, {man['featurizer']}) in {time.perf_counter() - t0:.1f}s -> {out}"
    )
    return 0


def _cmd_verify(a: argparse.Namespace) -> int:
    from proponent.query.index import verify_index

    problems = verify_index(a.index)
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        return 1
    print(f"OK {a.index}: manifest, checkpoints, store and FAISS indexes are consistent")
    return 0


def _cmd_self_influence(a: argparse.Namespace) -> int:
    from proponent.build.job import set_threads
    from proponent.format.fsio import atomic_write_bytes
    from proponent.query.index import open_index
    from proponent.query.selfinfluence import SelfInfluenceJob, SelfInfluenceParams, ranking_rows, rows_to_csv

    set_threads(a.threads)
    idx = open_index(a.index, device=a.device)
    params = SelfInfluenceParams(
        convention=a.convention, checkpoints=a.checkpoints, m=a.m, seed=a.seed, estimator=a.estimator
    )
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(a.state_dir) if a.state_dir else Path(tmp)
        scores = SelfInfluenceJob(idx, params, state).run()
    assert scores is not None
    rows = ranking_rows(idx, scores)
    atomic_write_bytes(a.out, rows_to_csv(rows).encode())
    print(f"ranked {len(rows)} samples by self-influence -> {a.out}")
    return 0


def _cmd_serve(a: argparse.Namespace) -> int:
    import os

    import uvicorn

    if a.index:
        os.environ["PROPONENT_INDEX"] = str(a.index)
    if a.state_dir:
        os.environ["PROPONENT_STATE_DIR"] = str(a.state_dir)
    from proponent.service.app import create_app

    uvicorn.run(create_app(), host=a.host, port=a.port, log_level=a.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="proponent", description="Training-data attribution for VAEs (VAE-TracIn).")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a β-VAE and save TracIn checkpoints")
    t.add_argument("--data", default=DEFAULT_DATA, help="data spec (default: digits); see README")
    t.add_argument("--out", required=True, help="run directory")
    _add_model_args(t)
    t.add_argument("--epochs", type=int, default=30)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    t.add_argument("--momentum", type=float, default=0.0)
    t.add_argument("--checkpoints", type=int, default=5, help="number of evenly spaced checkpoints")
    t.add_argument("--checkpoint-every-steps", type=int)
    t.add_argument("--checkpoint-every-epochs", type=int)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_cmd_train)

    i = sub.add_parser("index", help="featurize training data at every checkpoint into Zarr + FAISS")
    i.add_argument("--run", help="run directory written by `proponent train`")
    i.add_argument("--data", help="data spec (default: the run's)")
    i.add_argument("--checkpoints", nargs="+", help="checkpoint files trained elsewhere (with --model-config)")
    i.add_argument("--model-config", help="JSON model config for bare state dicts")
    i.add_argument("--lr", type=float, nargs="+", help="learning rate per checkpoint (external checkpoints)")
    i.add_argument("--batch-size-trained", type=int, nargs="+", help="training batch size per checkpoint")
    i.add_argument("--steps", type=int, nargs="+", help="optimiser steps since the previous checkpoint")
    i.add_argument("--out", required=True, help="index directory")
    i.add_argument("--m", type=int, default=16, help="reparameterised draws per sample (default 16)")
    i.add_argument("--seed", type=int, default=0, help="noise seed")
    i.add_argument("--projection", choices=["kron", "none"], default="kron")
    i.add_argument("--proj-k", type=int, default=64, help="projection size per side of each layer (default 64)")
    i.add_argument("--proj-seed", type=int, default=0)
    i.add_argument("--layers", default="all", help="all | encoder | decoder | last:K | module prefixes")
    i.add_argument("--featurizer", choices=["kron", "dense"], default="kron")
    i.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    i.add_argument("--index-kind", default="flat", help="flat | ivf:NLIST[:NPROBE] | hnsw:M[:EF]")
    i.add_argument("--batch-size", type=int, help="featurization batch (default: from available memory)")
    i.add_argument("--device", default="auto")
    i.add_argument("--threads", type=int)
    i.add_argument("--shard", type=_shard, help="I/N: featurize only row chunks k with k %% N == I")
    i.add_argument("--overwrite", action="store_true")
    i.add_argument("--quiet", action="store_true")
    i.set_defaults(func=_cmd_index)

    v = sub.add_parser("verify", help="check an index as the server does before serving")
    v.add_argument("--index", required=True)
    v.set_defaults(func=_cmd_verify)

    s = sub.add_parser("self-influence", help="rank the training set by self-influence (CSV)")
    s.add_argument("--index", required=True)
    s.add_argument("--out", required=True, help="CSV file")
    s.add_argument("--convention", choices=["lr", "visits"], default="lr")
    s.add_argument("--checkpoints", type=_int_list, help="checkpoint subset, e.g. 0,2,4")
    s.add_argument("--m", type=int, help="recompute gradients with this many fresh draws (default: stored norms)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--estimator",
        choices=["norm", "unbiased"],
        default="norm",
        help="norm: ||mean gradient||^2 (paper's code); "
        "unbiased: <g, g'> over two independent draw sets (dense, slower)",
    )
    s.add_argument("--state-dir", help="keep resumable job state here")
    s.add_argument("--device", default="auto")
    s.add_argument("--threads", type=int)
    s.set_defaults(func=_cmd_self_influence)

    sv = sub.add_parser("serve", help="run the influence server")
    sv.add_argument("--index", help="index directory (or PROPONENT_INDEX)")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--state-dir", help="job state directory (or PROPONENT_STATE_DIR)")
    sv.add_argument("--log-level", default="info")
    sv.set_defaults(func=_cmd_serve)

    from proponent.cli.analysis import register as register_analysis_commands

    register_analysis_commands(sub)  # classical, factors, report, influence
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        return int(a.func(a) or 0)
    except KeyboardInterrupt:
        print("proponent: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, KeyError, OSError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"proponent: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
