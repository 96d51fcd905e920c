"""Query commands: ``influence``, ``scores``, ``self-influence``, ``serve``.

``proponent influence`` answers through :func:`proponent.query.usecase.answer`, the code the
server runs for ``POST /v1/influence[/samples/{id}]``; ``--json`` prints the API's response body.
Many queries at once (``--sample-ids 1,2,3`` or ``--images a.png b.png``) go through
:func:`~proponent.query.usecase.answer_batch`, as ``POST /v1/influence/batch`` does (one pass over the rows).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, get_args

from pydantic import ValidationError

from proponent.api.registry import PRECONDITIONS, SCORINGS
from proponent.api.schemas import (
    BatchInfluenceResponse,
    BatchTimings,
    Convention,
    Direction,
    FeaturesMode,
    InfluenceParams,
    SearchMode,
)
from proponent.cli.build import int_list


def _open(a: argparse.Namespace, feature_mode: str = "auto") -> Any:
    from proponent.query.index import open_index  # lazy: CLI start-up
    from proponent.threads import set_threads

    set_threads(a.threads)
    return open_index(
        a.index,
        device=a.device,
        use_gpu_faiss=False,
        memory_budget=getattr(a, "memory_budget", None),
        feature_mode=feature_mode,
    )


def _query(a: argparse.Namespace) -> tuple[InfluenceParams, Any, Any]:
    """The query's parameters, the opened index and the ``--image`` decoded to its shape (None: --sample-id);
    for ``influence --sample-ids/--images`` the third item is the list of decoded images (None: --sample-ids)."""
    from proponent.format.images import load_image_bytes  # lazy: CLI start-up

    many = getattr(a, "sample_ids", None) is not None or bool(getattr(a, "images", None))
    given = [a.sample_id is not None, a.image is not None, getattr(a, "sample_ids", None) is not None]
    if sum(given) + bool(getattr(a, "images", None)) != 1:
        raise ValueError(
            "give exactly one of --sample-id N or --image FILE"
            + (", --sample-ids 1,2,3 or --images FILE..." if hasattr(a, "images") else "")
        )
    try:
        params = influence_params(a)
    except ValidationError as e:
        err = e.errors()[0]
        raise ValueError(f"--{'-'.join(str(p) for p in err['loc'])}: {err['msg']}") from None
    idx = _open(a)

    def read(name: str) -> Any:
        path = Path(name)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise ValueError(f"cannot read image {path}: {e.strerror or e}") from None
        return load_image_bytes(raw, idx.shape, allow_resize=a.resize)

    if many:
        return params, idx, ([read(f) for f in a.images] if a.images else None)
    return params, idx, (read(a.image) if a.image is not None else None)


def _cmd_scores(a: argparse.Namespace) -> int:
    from proponent.format.fsio import atomic_write_bytes  # lazy: CLI start-up
    from proponent.query.usecase import npy_bytes, score_vector

    params, idx, x = _query(a)
    table = score_vector(idx, params, x=x, sample_id=a.sample_id)
    atomic_write_bytes(a.out, npy_bytes(table))
    approx = idx.meta.approximations(idx.meta.resolve_checkpoints(params.checkpoints), precondition=params.precondition)
    print(f"scored {len(table)} training samples ({params.scoring}, {params.convention}) -> {a.out}")
    if approx:
        print("approximations: " + "; ".join(approx))
    return 0


def _cmd_influence(a: argparse.Namespace) -> int:
    from proponent.query.usecase import answer, answer_batch  # lazy: CLI start-up

    t0 = time.perf_counter()
    params, idx, x = _query(a)
    if a.sample_ids is not None or a.images:
        results = answer_batch(idx, params, xs=x, sample_ids=a.sample_ids)
        total = time.perf_counter() - t0
        batch = BatchInfluenceResponse(
            results=results,
            timings=BatchTimings(
                total_ms=total * 1e3, search_ms=results[0].timings.search_ms, queries_per_s=len(results) / total
            ),
        )
        if a.json:
            print(batch.model_dump_json())
            return 0
        names = [f"sample {i}" for i in a.sample_ids] if a.sample_ids is not None else list(a.images)
        for name, res in zip(names, results, strict=True):
            print(f"== {name}")
            _print_answer(res)
        print(f"{len(results)} queries in {total:.2f}s ({batch.timings.queries_per_s:.1f} queries/s)")
        return 0
    res = answer(idx, params, x=x, sample_id=a.sample_id)
    if a.json:
        print(res.model_dump_json())
        return 0
    _print_answer(res)
    return 0


def _print_answer(res: Any) -> None:
    for d in ("proponents", "opponents"):
        hits = getattr(res, d)
        if hits is None:
            continue
        pre = "" if res.query.precondition == "none" else f", precondition {res.query.precondition}"
        print(f"{d} ({'exact' if res.exact else 'approximate'}; scoring {res.query.scoring}{pre}):")
        for h in hits:
            lab = "" if h.label is None else f"  label {h.label}"
            inj = "  injected" if h.injected else ""
            se = "" if h.stderr is None else f" ± {h.stderr:.2g}"
            tie = "  ~next" if h.separated_from_next is False else ""
            print(f"  {h.rank:3d}  id {h.id:<8d} score {h.score:+.6g}{se}{lab}{inj}{tie}")
    if res.approximations:
        print("approximations: " + "; ".join(res.approximations))


def _cmd_self_influence(a: argparse.Namespace) -> int:
    from proponent.format.fsio import atomic_write_bytes  # lazy: CLI start-up
    from proponent.query.selfinfluence import SelfInfluenceJob, SelfInfluenceParams, ranking_rows, rows_to_csv

    idx = _open(a, feature_mode="stream")  # norms only: no features are loaded
    params = SelfInfluenceParams(
        convention=a.convention,
        checkpoints=a.checkpoints,
        m=a.m,
        seed=a.seed,
        estimator=a.estimator,
        precondition=a.precondition,
    )
    with tempfile.TemporaryDirectory() as tmp:
        state = Path(a.state_dir) if a.state_dir else Path(tmp)
        scores = SelfInfluenceJob(idx, params, state).run()
    assert scores is not None
    rows = ranking_rows(idx, scores)
    atomic_write_bytes(a.out, rows_to_csv(rows).encode())
    names = {"gram": "Gram", "kfac": "K-FAC", "ekfac": "EK-FAC", "adam": "Adam"}
    what = f"leverage under the {names[a.precondition]} preconditioner" if a.precondition in names else "self-influence"
    print(f"ranked {len(rows)} samples by {what} -> {a.out}")
    return 0


def _check_servable(location: str | None) -> None:
    """What the server's start-up would refuse, refused here in one line (not a traceback from inside the
    server): a damaged index, changed model code, model code that fails to import or to build."""
    if not location:
        return  # the server says that no index is configured
    from proponent.format.fsio import index_dir  # lazy: CLI start-up
    from proponent.format.integrity import verify_index
    from proponent.format.manifest import read_manifest

    problems = verify_index(location)
    if problems:
        raise ValueError(f"{location}: index cannot be served: {problems[0]}")
    plugin = read_manifest(index_dir(location)).model.plugin
    if plugin is not None:
        from proponent.model.plugin import load_plugin  # lazy: CLI start-up

        load_plugin(plugin).build_module()


def serve_settings(a: argparse.Namespace) -> Any:
    """The server's settings: ``PROPONENT_*`` variables (and ``.env``), overridden by the flags given."""
    from proponent.service.settings import Settings  # lazy: CLI start-up

    given = {f: getattr(a, f, None) for f in ("index", "state_dir", "memory_budget", "feature_mode")}
    return Settings(**{f: v for f, v in given.items() if v})


def _cmd_serve(a: argparse.Namespace) -> int:
    settings = serve_settings(a)
    _check_servable(None if settings.index is None else str(settings.index))
    if a.shards:
        return _serve_sharded(settings, a)
    import uvicorn  # lazy: CLI start-up

    from proponent.service.app import create_app  # lazy: CLI start-up

    uvicorn.run(create_app(settings), host=a.host, port=a.port, log_level=a.log_level)
    return 0


def _serve_sharded(settings: Any, a: argparse.Namespace) -> int:
    """``proponent serve --shards N``: deploy on Ray Serve (a local cluster unless ``--ray-address``); until ^C."""
    import ray  # lazy: CLI start-up
    from ray import serve

    from proponent.raycluster import connect  # lazy: CLI start-up
    from proponent.service.sharded import START_TIMEOUT_S, deploy, undeploy

    started = connect(a.ray_address)
    try:
        dep = deploy(
            settings,
            a.shards,
            host=a.host,
            port=a.port,
            cpus_per_replica=getattr(a, "cpus_per_replica", None),
            gpus_per_shard=getattr(a, "gpus_per_shard", 0.0),
            start_timeout_s=getattr(a, "start_timeout", None) or START_TIMEOUT_S,
        )
        rows = ", ".join(f"{lo}..{hi - 1}" for lo, hi in dep.ranges)
        print(f"serving {settings.index} in {a.shards} shards (rows {rows}) on {dep.url}; ^C stops", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        undeploy(dep)
    finally:
        if started and not a.ray_address:
            serve.shutdown()  # the local cluster started here goes: Serve with it (a joined cluster keeps its Serve)
        if started:
            ray.shutdown()
    return 0


# The offline ``influence`` command's flags are the API's query parameters (InfluenceParams: names, choices
# and defaults from there; tests/api/test_contract.py checks every field), except:
CLI_WITHOUT = {"uncertainty": "always computed offline", "allow_partial": "sharded servers only"}
CLI_DEST = {"allow_resize": "resize"}  # the flag is --resize
CLI_DEFAULTS = {"direction": "both"}  # the command prints both directions unless told otherwise
# ``scores`` takes the same flags but these (a score vector has every row, scored exactly)
SCORES_WITHOUT = {"k", "direction", "prefilter", "search"}


def influence_params(a: argparse.Namespace) -> InfluenceParams:
    """The API's query parameters from the ``influence`` command's flags (None: the API's default)."""
    given = {f: getattr(a, CLI_DEST.get(f, f), None) for f in InfluenceParams.model_fields if f not in CLI_WITHOUT}
    return InfluenceParams(**{f: v for f, v in given.items() if v is not None})


def _default(field: str) -> Any:
    return CLI_DEFAULTS.get(field, InfluenceParams.model_fields[field].default)


def _add_query_args(i: argparse.ArgumentParser, without: set[str] | frozenset[str] = frozenset()) -> None:
    """The flags of one query: the API's query parameters (but ``without``), the index and the input."""
    i.add_argument("--index", required=True)
    i.add_argument("--sample-id", type=int)
    i.add_argument("--image", help="image file (PNG, JPEG, .npy)")
    i.add_argument("--sample-ids", type=int_list, help="many stored samples at once, e.g. 3,17,40 (one pass)")
    i.add_argument("--images", nargs="+", help="many image files at once (one pass over the rows)")
    i.add_argument("--resize", action="store_true", help="resize the image to the index's shape")
    if "k" not in without:
        i.add_argument("--k", type=int, default=_default("k"))
    if "direction" not in without:
        i.add_argument("--direction", choices=get_args(Direction), default=_default("direction"))
    i.add_argument("--scoring", choices=list(SCORINGS), default=_default("scoring"), help=SCORINGS.describe())
    i.add_argument(
        "--precondition",
        choices=list(PRECONDITIONS),
        default=_default("precondition"),
        help=PRECONDITIONS.describe(),
    )
    i.add_argument("--objective", default=_default("objective"), help="elbo | reconstruction | kl | elbo_beta | probe")
    i.add_argument("--label", type=int, help="query label (classifiers, objective probe; default: the stored sample's)")
    i.add_argument("--beta", type=float, help="β of objective elbo_beta")
    i.add_argument("--checkpoints", type=int_list, help="checkpoint subset, e.g. 0,2,4")
    i.add_argument("--convention", choices=get_args(Convention), default=_default("convention"))
    if "prefilter" not in without:
        i.add_argument("--prefilter", type=int, help="score only the L training samples nearest in latent space")
    i.add_argument(
        "--features",
        choices=get_args(FeaturesMode),
        default=_default("features"),
        help="stored samples: recompute with fresh query draws (default) or use the index's stored features",
    )
    if "search" not in without:
        i.add_argument("--search", choices=get_args(SearchMode), default=_default("search"))
    i.add_argument("--seed", type=int, default=_default("seed"), help="query noise seed")
    i.add_argument("--device", default="cpu")
    i.add_argument("--threads", type=int)
    i.add_argument("--memory-budget", help="features held in memory, e.g. 8G (default: half the available RAM)")


def register(sub: Any) -> None:
    i = sub.add_parser("influence", help="proponents / opponents of a stored sample or an image file (offline)")
    _add_query_args(i)
    i.add_argument("--json", action="store_true", help="print the API's JSON response")
    i.set_defaults(func=_cmd_influence)

    sc = sub.add_parser(
        "scores", help="every training sample's score for one query, as a .npy of (id, score) records (offline)"
    )
    _add_query_args(sc, SCORES_WITHOUT)
    sc.add_argument("--out", required=True, help=".npy file: N records (id int64, score float64) in row order")
    sc.set_defaults(func=_cmd_scores)

    s = sub.add_parser("self-influence", help="rank the training set by self-influence (CSV)")
    s.add_argument("--index", required=True)
    s.add_argument("--out", required=True, help="CSV file")
    s.add_argument("--convention", choices=["lr", "visits"], default="lr")
    s.add_argument("--checkpoints", type=int_list, help="checkpoint subset, e.g. 0,2,4")
    s.add_argument("--m", type=int, help="recompute gradients with this many fresh draws (default: stored norms)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--estimator",
        choices=["norm", "unbiased"],
        default="norm",
        help="norm: ||mean gradient||^2 (paper's code); "
        "unbiased: <g, g'> over two independent draw sets (dense, slower)",
    )
    s.add_argument(
        "--precondition",
        choices=list(PRECONDITIONS),
        default="none",
        help="none: Σ_c w_c ||g_c||²; gram: the leverage Σ_c w_c f_cᵀ P_c f_c (needs `proponent precondition`); "
        "kfac / ekfac: the exact gradients' leverage Σ_c w_c g_cᵀ P_c g_c (needs `proponent precondition --kind`)",
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
    sv.add_argument("--memory-budget", help="features held in memory, e.g. 8G (default: half the available RAM)")
    sv.add_argument(
        "--feature-mode",
        choices=["auto", "memory", "quantized", "stream"],
        help="auto (default): from the budget; memory, quantized (int8 + exact rescoring) or stream",
    )
    sv.add_argument("--shards", type=int, help="split the rows into N shards served by Ray Serve replicas")
    sv.add_argument("--ray-address", help="Ray cluster address for --shards (default: a local one)")
    sv.add_argument("--gpus-per-shard", type=float, default=0.0, help="GPUs per shard replica (--shards)")
    sv.add_argument(
        "--cpus-per-replica",
        type=float,
        help="Ray CPUs reserved per shard and router replica (--shards; default: sized to the free CPUs, at most 1)",
    )
    sv.add_argument(
        "--start-timeout",
        type=float,
        help="seconds for every replica to be running before start-up fails (--shards; default 120)",
    )
    sv.add_argument("--log-level", default="info")
    sv.set_defaults(func=_cmd_serve)
