"""Offline commands: ``train``, ``index``, ``verify``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_DATA = "digits"


def int_list(s: str) -> list[int]:
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
    g.add_argument("--hidden", type=int_list, default=None, help="MLP hidden sizes, e.g. 512,256")
    g.add_argument("--channels", type=int_list, default=None, help="conv channels, e.g. 32,64")
    g.add_argument("--beta", type=float, default=1.0)
    g.add_argument(
        "--likelihood",
        choices=["gaussian", "bernoulli"],
        default="bernoulli",
        help='decoder likelihood (default bernoulli: README "Design decisions")',
    )


def _cmd_train(a: argparse.Namespace) -> int:
    from proponent.indexer.data import load_dataset  # lazy: CLI start-up
    from proponent.indexer.training import TrainConfig, train
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
        noise=a.noise,
    )
    out = train(data, cfg, a.out, tc, show_progress=not a.quiet)
    run = json.loads((out / "run.json").read_text())
    print(
        f"trained {cfg.kind} VAE on {len(data)} samples in {run['seconds']:.1f}s (final loss {run['final_loss']:.3f}); "
        f"{len(run['checkpoints'])} checkpoints in {out}"
    )
    return 0


def _per_ckpt(vals: list[Any] | None, name: str, n: int) -> list[Any] | None:
    if vals is None:
        return None
    if len(vals) == 1:
        return vals * n
    if len(vals) != n:
        raise ValueError(f"--{name} needs 1 or {n} values, got {len(vals)}")
    return vals


# What each weight-relevant value is called, and the flag that gives it when the files do not.
WEIGHT_FIELDS = {"lr": "--lr", "batch_size": "--batch-size-trained", "steps": "--steps or --iterations-from-names"}


def _meta_rows(path: str, n: int) -> list[dict[str, Any]]:
    from proponent.format.fsio import read_json  # lazy: CLI start-up

    meta = read_json(path)
    rows = meta.get("checkpoints") if isinstance(meta, dict) else meta
    if not isinstance(rows, list) or len(rows) != n or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected a list of {n} checkpoint objects (one per --checkpoints)")
    known = {"lr", "batch_size", "step", "iteration", "steps_since_prev", "epoch"}
    for i, r in enumerate(rows):
        for k, v in r.items():
            if k not in known:
                raise ValueError(f"{path}: entry {i}: unknown key {k!r} (known: {', '.join(sorted(known))})")
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValueError(f"{path}: entry {i}: {k} must be a number, got {json.dumps(v)}")
    return rows


def external_checkpoints(a: argparse.Namespace) -> tuple[list[Any], list[str]]:
    """CheckpointSpecs of ``--checkpoints`` and the weight-relevant values assumed (``--uniform-weights``).

    Each value comes from the checkpoint file when it holds it (``checkpoint_metadata``: common key
    names), then from the flags, then from ``--checkpoint-meta``; two sources that disagree are an
    error, and a weight-relevant value (lr, batch size, steps) found nowhere is an error naming the
    flag that gives it, unless ``--uniform-weights`` takes every missing one as 1 (recorded)."""
    from proponent.model.checkpoints import CheckpointSpec, checkpoint_metadata, read_checkpoint  # lazy: CLI start-up

    paths = list(a.checkpoints)
    n = len(paths)
    in_file = [checkpoint_metadata(read_checkpoint(p)) for p in paths]
    rows = _meta_rows(a.checkpoint_meta, n) if a.checkpoint_meta else [{} for _ in paths]
    meta_name = f"--checkpoint-meta {a.checkpoint_meta}"
    lrs = _per_ckpt(a.lr, "lr", n)
    bss = _per_ckpt(a.batch_size_trained, "batch-size-trained", n)
    gaps = _per_ckpt(a.steps, "steps", n)
    named_steps: list[int] | None = None
    if a.iterations_from_names:
        try:
            named_steps = [int(Path(p).stem) for p in paths]
        except ValueError:
            raise ValueError(
                "--iterations-from-names: every checkpoint file name must be an iteration number"
            ) from None

    def pick(i: int, field: str, flag: tuple[Any, str] | None, meta_keys: tuple[str, ...]) -> float | None:
        cands: list[tuple[float, str]] = []
        if field in in_file[i]:
            v, key = in_file[i][field]
            cands.append((v, f"the file's {key!r}"))
        if flag is not None and flag[0] is not None:
            cands.append((float(flag[0]), flag[1]))
        for k in meta_keys:
            if k in rows[i]:
                cands.append((float(rows[i][k]), f"{meta_name} ({k})"))
                break
        for v, src in cands[1:]:
            if v != cands[0][0]:
                raise ValueError(
                    f"{paths[i]}: {field} is {cands[0][0]:g} from {cands[0][1]} but {v:g} from {src}; "
                    "give one value (or none where the file holds it)"
                )
        return cands[0][0] if cands else None

    specs = []
    assumed: set[str] = set()
    missing: dict[str, list[str]] = {}
    prev_step: float | None = 0.0
    for i, p in enumerate(paths):
        lr = pick(i, "lr", (lrs[i] if lrs else None, "--lr"), ("lr",))
        bs = pick(i, "batch_size", (bss[i] if bss else None, "--batch-size-trained"), ("batch_size",))
        epoch = pick(i, "epoch", None, ("epoch",))
        step = pick(
            i,
            "step",
            (named_steps[i] if named_steps else None, "--iterations-from-names"),
            ("step", "iteration"),
        )
        gap = pick(i, "steps_since_prev", (gaps[i] if gaps else None, "--steps"), ("steps_since_prev",))
        if step is not None and prev_step is not None:
            derived = step - prev_step
            if derived <= 0:
                raise ValueError(
                    f"{p}: step {step:g} is not after the previous checkpoint's {prev_step:g}; "
                    "give the checkpoints in training order"
                )
            if gap is not None and gap != derived:
                raise ValueError(
                    f"{p}: {gap:g} steps since the previous checkpoint (--steps / {meta_name}) but the steps "
                    f"recorded say {derived:g}"
                )
            gap = derived
        if step is None and gap is not None and prev_step is not None:
            step = prev_step + gap
        prev_step = step
        for field, v in (("lr", lr), ("batch_size", bs), ("steps", gap)):
            if v is None:
                missing.setdefault(field, []).append(Path(p).name)
        for field, v in (("lr", lr), ("batch_size", bs), ("steps", gap)):
            if v is not None and not (v > 0 and v == v and v != float("inf")):
                raise ValueError(f"{p}: {field} must be a positive number, got {v:g}")
        if bs is not None and bs != int(bs):
            raise ValueError(f"{p}: batch_size must be a whole number, got {bs:g}")
        if missing and not a.uniform_weights:
            continue
        assumed.update(missing)
        specs.append(
            CheckpointSpec(
                path=p,
                lr=1.0 if lr is None else lr,
                batch_size=1 if bs is None else int(bs),
                steps_since_prev=1 if gap is None else int(gap),
                step=int(step) if step is not None else 0,
                epoch=0.0 if epoch is None else epoch,
            )
        )
    if missing and not a.uniform_weights:
        field, files = next(iter(missing.items()))
        more = [f for f in missing if f != field]
        also = f" (also missing: {', '.join(more)})" if more else ""
        raise ValueError(
            f"{files[0]}: no {field} in the checkpoint file{'s' if len(files) > 1 else ''} or the flags{also}; give "
            f"{WEIGHT_FIELDS[field]} (one, or one per checkpoint), --checkpoint-meta FILE, or --uniform-weights to "
            "take what is missing as 1 (recorded in the index and every answer)"
        )
    return specs, sorted(assumed)


def _cmd_index(a: argparse.Namespace) -> int:
    from proponent.format.fsio import index_dir  # lazy: CLI start-up
    from proponent.format.manifest import read_manifest
    from proponent.indexer.job import IndexOptions, build_index, checkpoints_from_runs
    from proponent.model.architectures import ModelConfig
    from proponent.model.projection import ProjectionSpec
    from proponent.threads import set_threads

    set_threads(a.threads)
    model_config = None
    record = None
    assumed: list[str] = []
    if a.run:
        specs, run = checkpoints_from_runs(a.run)
        data_spec = a.data or run["data"]["spec"]
    else:
        if not a.checkpoints:
            raise ValueError("give --run DIR or --checkpoints FILE [FILE ...]")
        if not a.data:
            raise ValueError("--data is required with --checkpoints")
        data_spec = a.data
        if a.model_code:
            from proponent.model.plugin import plugin_record  # lazy: CLI start-up

            print(f"importing model code {a.model_code} (this runs it)")
            record = plugin_record(a.model_code, checkpoint_key=a.checkpoint_key, code_dir=a.model_code_dir)
        elif a.model_config:
            from proponent.format.fsio import read_json  # lazy: CLI start-up

            model_config = ModelConfig.from_dict(read_json(a.model_config))
        specs, assumed = external_checkpoints(a)
        if record is None and a.checkpoint_key:
            from proponent.indexer.job import builtin_record  # lazy: CLI start-up

            if model_config is None:
                raise ValueError("--checkpoint-key needs --model-config or --model-code")
            record = builtin_record(model_config, a.checkpoint_key)
    opts = IndexOptions(
        m=a.m,
        seed=a.seed,
        projection=ProjectionSpec(
            kind=a.projection,
            k=a.proj_k,
            dim=a.proj_dim,
            seed=a.proj_seed,
            sketch=None if a.sketch == "none" else a.sketch,
            sketch_dim=a.sketch_dim if a.sketch != "none" else None,
        ),
        layers=a.layers,
        featurizer=a.featurizer,
        dtype=a.dtype,
        index_kind=a.index_kind,
        batch_size=a.batch_size,
        device=a.device,
        shard=a.shard,
        assumed_metadata=tuple(assumed),
        whiten=a.whiten,
        whiten_alpha=a.whiten_alpha,
    )
    t0 = time.perf_counter()
    where = index_dir(a.out)
    engine = None
    if a.engine == "ray":
        from proponent.indexer.ray_engine import ray_engine  # lazy: CLI start-up

        engine = ray_engine(
            address=a.ray_address,
            workers=a.workers,
            gpus_per_worker=a.gpus_per_worker,
            device=a.device,
            threads=a.threads,
            show_progress=not a.quiet,
            log=None if a.quiet else print,
        )
    out = build_index(
        data_spec,
        specs,
        a.out,
        opts,
        model_config=model_config,
        model_record=record,
        overwrite=a.overwrite,
        show_progress=not a.quiet,
        engine=engine,
        log=None if a.quiet else print,
    )
    man = read_manifest(where)
    if not man.complete:
        print(
            f"shard {a.shard[0]}/{a.shard[1]} done in {time.perf_counter() - t0:.1f}s; run the other shards, "
            f"then once more without --shard to finish -> {out}"
        )
        return 0
    layout = {"tensor": "tensor sketches", "kron": "Kronecker projections", "none": "exact gradients"}
    print(
        f"indexed {man.n} samples x {len(man.checkpoints)} checkpoints (D={man.dim} {man.storage.dtype}, "
        f"{layout[man.projection.kind]}, m={man.objective.m}) in {time.perf_counter() - t0:.1f}s -> {a.out}"
    )
    return 0


def _cmd_verify(a: argparse.Namespace) -> int:
    from proponent.format.integrity import verify_index  # lazy: CLI start-up

    t0 = time.perf_counter()
    problems = verify_index(a.index, deep=a.deep, preconditioner=True)
    if problems:
        for p in problems:
            print(f"FAIL {p}")
        return 1
    what = "every chunk's checksum, " if a.deep else ""
    print(
        f"OK {a.index}: manifest, {what}checkpoints, store, ANN and preconditioner files are consistent "
        f"({time.perf_counter() - t0:.1f}s)"
    )
    return 0


def _cmd_precondition(a: argparse.Namespace) -> int:
    from proponent.format import precond  # lazy: CLI start-up
    from proponent.format.fsio import index_dir
    from proponent.format.integrity import open_store, verify_contents
    from proponent.format.manifest import read_manifest
    from proponent.threads import set_threads

    set_threads(a.threads)
    where = index_dir(a.index)
    man = read_manifest(where)
    problems = verify_contents(where, man)
    if problems:
        raise ValueError(f"{where}: index cannot be preconditioned: " + "; ".join(problems))
    if a.kind != "gram":
        return _precondition_curvature(a, where, man, open_store(where, man))
    alpha = precond.DEFAULT_ALPHA if a.alpha is None else a.alpha
    man = precond.compute(where, man, open_store(where, man), alpha=alpha, rank=a.rank)
    rec = man.precondition
    assert rec is not None
    size = sum(where.size(f.path) for ck in rec.checkpoints for f in (ck.vectors, ck.values, ck.leverage))
    for c, ck in enumerate(rec.checkpoints):
        cut = f" (truncated from {ck.nonzero})" if ck.truncated else ""
        print(f"checkpoint {c}: λ={ck.lam:.6g} (α={rec.alpha:g} x mean eigenvalue), rank {ck.rank}{cut}")
    print(f"Gram preconditioner of {where}: {size} bytes, {rec.seconds:.1f}s; query with --precondition gram")
    return 0


def _precondition_curvature(a: argparse.Namespace, where, man, store) -> int:
    from proponent.format import curvature  # lazy: CLI start-up (torch)
    from proponent.indexer.curvature import compute

    alpha = curvature.DEFAULT_ALPHA if a.alpha is None else a.alpha
    man = compute(where, man, store, a.kind, alpha=alpha, log=lambda s: print(s, file=sys.stderr))
    rec = man.curvature[a.kind]
    size = sum(where.size(f.path) for ck in rec.checkpoints for f in (ck.factors, ck.leverage))
    name = curvature.NAMES[a.kind]
    for c, ck in enumerate(rec.checkpoints):
        lams = ", ".join(f"{v:.4g}" for v in ck.lams)
        print(f"checkpoint {c}: λ per layer {lams} (α={rec.alpha:g} x mean Λ); exact norms within {ck.norm_error:.2g}")
    print(f"{name} preconditioner of {where}: {size} bytes, {rec.seconds:.1f}s; query with --precondition {a.kind}")
    return 0


def register(sub: Any) -> None:
    from proponent.format.ann import KINDS  # lazy: CLI start-up

    t = sub.add_parser("train", help="train a β-VAE and save TracIn checkpoints")
    t.add_argument("--data", default=DEFAULT_DATA, help='data spec (default: digits); README "Data sources"')
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
    t.add_argument(
        "--noise",
        choices=["stream", "keyed"],
        default="stream",
        help="keyed: each sample's draws depend on (seed, step, sample id) only, so runs on subsets are paired "
        "(with --batch-size >= N: they differ only by the samples left out)",
    )
    t.add_argument("--device", default="cpu")
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=_cmd_train)

    from proponent.format.whiten import DEFAULT_ALPHA as WHITEN_ALPHA  # lazy: CLI start-up
    from proponent.format.whiten import KINDS as WHITEN_KINDS  # lazy: CLI start-up
    from proponent.indexer.job import DEFAULT_DTYPE  # lazy: CLI start-up
    from proponent.model.projection import ProjectionSpec

    defaults = ProjectionSpec()
    i = sub.add_parser("index", help="featurize training data at every checkpoint into the index's Zarr store")
    i.add_argument(
        "--run",
        action="append",
        help="run directory written by `proponent train`; repeat it for an ensemble of runs of the same model "
        "on the same data (their checkpoints are concatenated: scores are summed over runs)",
    )
    i.add_argument("--data", help="data spec (default: the run's)")
    g = i.add_argument_group("a model trained elsewhere")
    g.add_argument("--checkpoints", nargs="+", help="checkpoint files, in training order")
    g.add_argument("--model-config", help="JSON config of a built-in model for bare state dicts")
    g.add_argument(
        "--model-code",
        help='your model: FILE.py:FACTORY or package.module:FACTORY (README "Your own model"); loading it runs it',
    )
    g.add_argument(
        "--model-code-dir",
        help="a directory of your model's code: every .py file under it is hashed too (default: the modules "
        "the code imports from outside site-packages)",
    )
    g.add_argument(
        "--checkpoint-key", help="dotted key of the state dict inside each checkpoint, e.g. model_states.net"
    )
    g.add_argument(
        "--checkpoint-meta",
        help="JSON list (or {'checkpoints': [...]}) of {lr, batch_size, step, steps_since_prev, epoch} per checkpoint",
    )
    g.add_argument("--lr", type=float, nargs="+", help="learning rate (one, or one per checkpoint)")
    g.add_argument("--batch-size-trained", type=int, nargs="+", help="training batch size (one, or per checkpoint)")
    g.add_argument("--steps", type=int, nargs="+", help="optimiser steps since the previous checkpoint")
    g.add_argument(
        "--iterations-from-names", action="store_true", help="file names are iteration numbers: steps follow from them"
    )
    g.add_argument(
        "--uniform-weights",
        action="store_true",
        help="take lr / batch size / steps that neither the files nor the flags give as 1 (recorded in every answer)",
    )
    i.add_argument("--out", required=True, help="index directory")
    i.add_argument("--m", type=int, default=16, help="reparameterised draws per sample (default 16)")
    i.add_argument("--seed", type=int, default=0, help="noise seed")
    f = i.add_argument_group('feature layout (README "Indexing")')
    f.add_argument(
        "--projection",
        choices=["tensor", "kron", "none"],
        default=defaults.kind,
        help=f"per-layer stage: tensor sketches (default), Kronecker, or exact gradients (default {defaults.kind})",
    )
    f.add_argument(
        "--proj-dim",
        type=int,
        default=defaults.dim,
        help=f"tensor: the feature dimension the layers share, by gradient energy (default {defaults.dim})",
    )
    f.add_argument(
        "--proj-k", type=int, default=defaults.k, help=f"kron: projection size per side (default {defaults.k})"
    )
    f.add_argument("--proj-seed", type=int, default=0)
    f.add_argument(
        "--sketch", default=defaults.sketch or "none", help=f"second stage (default {defaults.sketch or 'none'})"
    )
    f.add_argument("--sketch-dim", type=int, default=defaults.sketch_dim, help="dimension after the sketch")
    f.add_argument("--layers", default="all", help="all | encoder | decoder | last:K | module prefixes")
    f.add_argument("--dtype", choices=["int8", "float16", "float32"], default=DEFAULT_DTYPE, help="stored precision")
    f.add_argument(
        "--whiten",
        choices=["none", *WHITEN_KINDS],
        default="none",
        help='store every layer\'s gradient whitened, L G Rᵀ, before the sketch (README "Whitened indexes"): kfac = '
        "K-FAC with factored damping (one more pass over the training set per checkpoint), adam = the checkpoints' "
        "Adam second moments, Adafactor-factored; layers other than Linear / Conv2d / ConvTranspose2d get diagonal "
        "factors; scores are then preconditioned inner products (default none)",
    )
    f.add_argument(
        "--whiten-alpha",
        type=float,
        default=WHITEN_ALPHA,
        help=f"damping of each factor: λ = α x its mean eigenvalue (default {WHITEN_ALPHA:g})",
    )
    i.add_argument("--featurizer", choices=["kron", "dense"], default="kron")
    i.add_argument("--index-kind", default="none", help=f"optional FAISS index for approximate search: {KINDS}")
    i.add_argument("--batch-size", type=int, help="featurization batch (default: from available memory)")
    i.add_argument("--device", default="auto")
    i.add_argument("--threads", type=int)
    i.add_argument("--shard", type=_shard, help="I/N: featurize only units u with u %% N == I")
    i.add_argument("--engine", choices=["local", "ray"], default="local", help="where units run (default here)")
    i.add_argument("--ray-address", help="Ray cluster address (default: start or join a local one)")
    i.add_argument("--workers", type=int, help="Ray workers (default: one per CPU / GPU)")
    i.add_argument("--gpus-per-worker", type=float, default=0.0)
    i.add_argument("--overwrite", action="store_true")
    i.add_argument("--quiet", action="store_true")
    i.set_defaults(func=_cmd_index)

    v = sub.add_parser("verify", help="check an index as the server does before serving (--deep: every chunk)")
    v.add_argument("--index", required=True)
    v.add_argument("--deep", action="store_true", help="read every chunk and check its checksum")
    v.set_defaults(func=_cmd_verify)

    pc = sub.add_parser(
        "precondition",
        help="store a preconditioner: TRAK's Gram (Φ_cᵀΦ_c + λ_c I)⁻¹ of an index's features (--precondition gram), "
        "or K-FAC / EK-FAC per layer (--kind kfac|ekfac; --precondition kfac|ekfac)",
    )
    pc.add_argument("--index", required=True)
    pc.add_argument(
        "--kind",
        choices=["gram", "kfac", "ekfac", "adam"],
        default="gram",
        help="gram (default): TRAK's over the stored features; kfac / ekfac: kronfluence's per layer, from the "
        "index's models, inputs and draws (a pass over the training set per factor: 2 for kfac, 3 for ekfac); "
        "adam: diag(1/(v̂ + λ)) per layer from the checkpoints' Adam state (one pass, for the leverage)",
    )
    pc.add_argument(
        "--alpha",
        type=float,
        default=None,
        help="gram: λ_c = α x the mean eigenvalue of Φ_cᵀΦ_c (default 1000: the best LDS of "
        "benchmarks/results/lds_precondition_gram.txt); kfac / ekfac: λ_l = α x mean Λ_l per layer (default 0.01: "
        "the best LDS on paired digits and the conv VAE, benchmarks/results/lds_grid_*.txt; minibatch-trained "
        "digits wants 100-1000)",
    )
    pc.add_argument(
        "--rank",
        type=int,
        default=2048,
        help="eigenpairs kept per checkpoint (default 2048); beyond, the rest count as 0 (listed in approximations)",
    )
    pc.add_argument("--threads", type=int)
    pc.set_defaults(func=_cmd_precondition)
