"""Sharded serving on Ray Serve (:func:`deploy`; the command is ``proponent serve --shards N [--ray-address ADDR]``).

The index's rows are split into N contiguous, chunk-aligned ranges
(:func:`~proponent.query.searcher.shard_ranges`). Each range is served by one Ray Serve
application ``proponent-shard-I`` (one replica, a :class:`ShardReplica`): it holds -- or
streams -- only its chunks (``ServedFeatures(..., rows=(lo, hi))``) and answers a
:class:`~proponent.query.searcher.SearchRequest` with the exact top-k of its rows through the
ordinary :class:`~proponent.query.searcher.LocalSearcher` (``offset=lo``: answers carry the
index's rows).

The router is the application ``proponent`` (route ``/``): the normal FastAPI app of
:func:`proponent.service.app.create_app`, same REST API, client and UI, with the index opened
without its features. It featurizes each query once and its searcher, a
:class:`~proponent.query.searcher.ShardedSearcher`, sends the same request to every shard and
merges their exact top-k -- the exact global top-k (the proof is in
:func:`~proponent.query.searcher.merge_topk`). A shard that is down (deleted, restarting, timed
out) makes a query answer 503 with ``Retry-After``, never a silently partial answer; with
``allow_partial=true`` the answer comes from the shards that answered, flagged ``partial: true``.
``GET /v1/index`` lists the shards: rows, mode, resident bytes and whether each is healthy.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
from ray import serve
from ray.serve.api import RunTarget

from proponent.format.fsio import index_dir
from proponent.format.manifest import read_manifest
from proponent.query.index import open_index
from proponent.query.scan import TopK
from proponent.query.searcher import SearchRequest, ShardedSearcher, shard_ranges
from proponent.raycluster import forwarded_env
from proponent.service.app import create_app
from proponent.service.settings import Settings
from proponent.threads import set_threads

ROUTER_APP = "proponent"
SHARD_DEPLOYMENT = "Shard"


def shard_app(i: int) -> str:
    return f"proponent-shard-{i}"


class ShardReplica:
    """One shard: rows ``[lo, hi)`` of the index, held (memory / quantized) or streamed, searched exactly."""

    def __init__(self, settings: dict[str, Any], rows: tuple[int, int]):
        s = Settings(**settings)
        set_threads(s.threads)
        if s.index is None:
            raise RuntimeError("no index configured: set PROPONENT_INDEX (or `proponent serve --index DIR`)")
        # the index opened as a server opens it (verified; chunk cache for object stores), with only these rows
        self.index = open_index(
            s.index,
            device=s.device,
            use_gpu_faiss=False,
            memory_budget=s.memory_budget,
            feature_mode=s.feature_mode,
            load_ann=False,
            cache_dir=s.cache_dir,
            cache_bytes=s.cache_bytes,
            rows=rows,
        )
        self.served = self.index.features
        self.searcher = self.index.searcher
        self.started = time.time()

    def search(self, request: SearchRequest) -> dict[str, TopK]:
        return self.searcher.search(request)

    def describe(self) -> dict[str, Any]:
        info = self.served.describe()
        info.update({"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "up_s": time.time() - self.started})
        return info


@dataclass
class ServeShard:
    """The router's view of one shard: calls its Ray Serve deployment (implements ``searcher.Shard``)."""

    app: str
    rows: tuple[int, int]
    _handle: Any = field(default=None, repr=False)

    def handle(self) -> Any:
        if self._handle is None:
            self._handle = serve.get_deployment_handle(SHARD_DEPLOYMENT, app_name=self.app, _check_exists=False)
        return self._handle

    def search(self, request: SearchRequest, timeout_s: float) -> dict[str, TopK]:
        return self.handle().search.remote(request).result(timeout_s=timeout_s)

    def describe(self, timeout_s: float) -> dict[str, Any]:
        return self.handle().describe.remote().result(timeout_s=timeout_s)


def _router_builder(settings: dict[str, Any], shards: list[tuple[str, tuple[int, int]]], timeout_s: float) -> Any:
    """A builder of the router's app, evaluated on its replica (nothing unpicklable crosses the wire)."""

    def build() -> Any:
        def searcher(index: Any) -> ShardedSearcher:
            return ShardedSearcher([ServeShard(app, rows) for app, rows in shards], timeout_s=timeout_s)

        return create_app(Settings(**settings), searcher_factory=searcher)

    return build


@dataclass
class ShardedDeployment:
    url: str
    ranges: list[tuple[int, int]]
    apps: list[str]  # the shards' applications, in row order
    router: str = ROUTER_APP


class DeployError(RuntimeError):
    """Sharded serving cannot start on this cluster (the message says what it needs and what there is)."""


def replica_cpus(
    shards: int, cpus_per_replica: float | None, free_cpus: float, free_gpus: float = 0.0, gpus_per_shard: float = 0.0
) -> float:
    """The CPUs each of the ``shards + 1`` replicas (shards and router) requests: ``cpus_per_replica`` when it
    fits in the cluster's free CPUs, else a refusal naming both; None: sized to fit (at most 1 each)."""
    n = shards + 1
    if gpus_per_shard * shards > free_gpus + 1e-9:
        raise DeployError(
            f"--shards {shards} needs {gpus_per_shard * shards:g} GPUs ({gpus_per_shard:g} per shard) but the Ray "
            f"cluster has {free_gpus:g} free; give fewer shards or a smaller --gpus-per-shard"
        )
    if cpus_per_replica is None:
        size = math.floor(min(1.0, free_cpus / n) * 100) / 100
        if size < MIN_REPLICA_CPUS:
            raise DeployError(
                f"--shards {shards} needs {n} replicas (the shards and the router) but the Ray cluster has only "
                f"{free_cpus:g} free CPUs ({size:g} each, under the minimum {MIN_REPLICA_CPUS:g}); give fewer shards"
            )
        return size
    if n * cpus_per_replica > free_cpus + 1e-9:
        fit = math.floor(free_cpus / n * 100) / 100
        raise DeployError(
            f"--shards {shards} with --cpus-per-replica {cpus_per_replica:g} needs {n * cpus_per_replica:g} CPUs "
            f"({shards} shards + the router) but the Ray cluster has {free_cpus:g} free; give --cpus-per-replica "
            f"{fit:g} or less (or leave it out to size the replicas to fit), or fewer shards"
        )
    return cpus_per_replica


MIN_REPLICA_CPUS = 0.05
START_TIMEOUT_S = 120.0  # a replica not running by then (e.g. never scheduled) fails start-up


def _wait_running(apps: list[str], timeout_s: float) -> None:
    """Until every application is RUNNING; a deployment failure or ``timeout_s`` raises DeployError (one line)."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications
        states = {a: status[a] if a in status else None for a in apps}
        failed = [(a, st) for a, st in states.items() if st is not None and str(st.status).endswith("DEPLOY_FAILED")]
        if failed:
            a, st = failed[0]
            raise DeployError(f"{a} failed to deploy: {' '.join(str(st.message).split())[:300]}")
        waiting = [a for a, st in states.items() if st is None or not str(st.status).endswith("RUNNING")]
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise DeployError(
                f"{', '.join(waiting)} not running after {timeout_s:g} s (a replica that Ray cannot schedule: "
                "too few free CPUs/GPUs for its request?); see `ray status`"
            )
        time.sleep(0.5)


def deploy(
    settings: Settings,
    shards: int,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    shard_timeout_s: float | None = None,
    cpus_per_replica: float | None = None,
    gpus_per_shard: float = 0.0,
    start_timeout_s: float = START_TIMEOUT_S,
) -> ShardedDeployment:
    """Deploy N shard applications and the router on the connected Ray cluster; returns once all are running.

    Before deploying, the replicas' CPU (and GPU) requests are compared with the cluster's free resources:
    refused in one line when they cannot fit, or sized to fit (``cpus_per_replica=None``); a replica not
    running within ``start_timeout_s`` fails start-up (DeployError) instead of waiting for ever."""
    free = ray.available_resources()
    cpus_per_replica = replica_cpus(
        shards, cpus_per_replica, float(free.get("CPU", 0.0)), float(free.get("GPU", 0.0)), gpus_per_shard
    )
    if settings.index is None:
        raise RuntimeError("no index configured: set PROPONENT_INDEX (or `proponent serve --index DIR`)")
    where = index_dir(settings.index)
    man = read_manifest(where)
    ranges = shard_ranges(man.n, man.storage.chunk_rows, shards)
    # the replicas run elsewhere (another working directory, maybe another node): absolute local paths
    fixed: dict[str, Any] = {"state_dir": str(Path(settings.state_dir).resolve())}
    if where.is_local:
        fixed["index"] = str(Path(str(settings.index)).resolve())
    if settings.cache_dir is not None:
        fixed["cache_dir"] = str(Path(settings.cache_dir).resolve())
    # threads pinned explicitly in every replica (torch and FAISS share the process): its CPU share by default
    fixed["threads"] = settings.threads or max(1, int(cpus_per_replica))
    conf = settings.model_dump(mode="json") | fixed
    timeout = shard_timeout_s if shard_timeout_s is not None else max(1.0, 0.8 * settings.request_timeout_s)
    runtime_env = {"env_vars": forwarded_env()}  # settings and object-store credentials, on any node
    serve.start(http_options={"host": host, "port": port})
    shard_cls: Any = serve.deployment(
        ShardReplica,
        name=SHARD_DEPLOYMENT,
        num_replicas=1,
        ray_actor_options={"num_cpus": cpus_per_replica, "num_gpus": gpus_per_shard, "runtime_env": runtime_env},
    )
    apps = [shard_app(i) for i in range(shards)]
    targets = [
        RunTarget(shard_cls.bind(conf, rows), name=app, route_prefix=None)
        for app, rows in zip(apps, ranges, strict=True)
    ]
    router_cls: Any = serve.deployment(
        serve.ingress(_router_builder(conf, list(zip(apps, ranges, strict=True)), timeout))(),
        name="Router",
        num_replicas=1,
        ray_actor_options={"num_cpus": cpus_per_replica, "runtime_env": runtime_env},
    )
    targets.append(RunTarget(router_cls.bind(), name=ROUTER_APP, route_prefix="/"))
    dep = ShardedDeployment(f"http://{host}:{port}", ranges, apps)
    serve.run_many(targets, wait_for_applications_running=False)
    try:
        _wait_running([*apps, ROUTER_APP], start_timeout_s)
    except DeployError:
        undeploy(dep)
        raise
    return dep


def undeploy(dep: ShardedDeployment) -> None:
    for app in [dep.router, *dep.apps]:
        try:
            serve.delete(app)
        except Exception:
            pass
