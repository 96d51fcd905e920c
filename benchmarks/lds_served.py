"""LDS of the answers as served: score vectors through the product's query path, per preconditioner.

Runs on the cache of ``benchmarks/lds.py`` (same ``--workdir``, same settings) and one index it built there
(``--index``, e.g. ``default``: the default sketched int8 layout). For every entry of ``--preconditioners``
(``none``, or ``KIND:ALPHA`` with KIND one of ``proponent precondition --kind``), the preconditioner is
built on the index by the CLI (``proponent precondition --index … --kind KIND --alpha ALPHA``, replacing the
one stored before); for ``whiten-KIND:ALPHA`` (KIND ``kfac`` | ``adam``) the CLI builds a whitened index of the
same layout (``proponent index --whiten KIND --whiten-alpha ALPHA``, kept beside it as
``<index>-whiten-KIND-ALPHA``) and queries it plainly; and every held-out query's full score vector comes from
:meth:`proponent.query.index.InfluenceIndex.scores` (``precondition=KIND``, each ``--scorings``, query seed
0): what ``GET /v1/scores`` and ``proponent scores`` return. Each row: the mean LDS with its 95 % bootstrap
interval and the paired difference against the first row (the same queries). The build time and the
stored preconditioner's bytes are printed beside it.

Measures on the sketched layout what ``benchmarks/lds_kfac.py`` / ``lds_precondition.py`` measure on exact
gradients: the two together say what the sketch costs the preconditioned answers.

    python benchmarks/lds_served.py --workdir runs/lds --index default --preconditioners none,kfac:0.01,ekfac:0.01
    python benchmarks/lds_served.py --workdir runs/lds --index default --preconditioners none,whiten-kfac:0.1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from proponent.analysis.lds import add_cache_arguments, cache_from_arguments, lds_rows, paired_table, stderr_log
from proponent.query.index import open_index
from proponent.threads import set_threads


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def build_whitened(wd: Path, base: Path, kind: str, alpha: str, threads: int, log) -> Path:
    """``proponent index --whiten KIND`` of the cache's full model with the base index's layout (cached: built
    once). ``adam`` needs checkpoints with optimizer state: the cache's ``full-adam/run`` (``lds_adam.py
    --retrain-state`` makes it; the same weights as ``full/run``)."""
    from proponent.format.fsio import index_dir
    from proponent.format.manifest import read_manifest

    man = read_manifest(index_dir(base))
    out = wd / "index" / f"{base.name}-whiten-{kind}-{alpha or 'default'}"
    if (out / "timings.json").exists():
        return out
    run = wd / ("full-adam" if kind == "adam" else "full") / "run"
    proj = man.projection
    cmd = [sys.executable, "-m", "proponent", "index", "--run", str(run), "--out", str(out), "--overwrite"]
    cmd += ["--m", str(man.objective.m), "--seed", str(man.objective.seed), "--projection", proj.kind]
    cmd += ["--dtype", man.storage.dtype, "--layers", proj.selection, "--whiten", kind, "--quiet"]
    cmd += ["--threads", str(threads)] + (["--whiten-alpha", alpha] if alpha else [])
    if proj.kind == "tensor":
        cmd += ["--proj-dim", str(proj.stage1_dim), "--proj-seed", str(proj.seed)]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    log(f"whitened index {out.name}: built in {time.perf_counter() - t:.0f}s")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cache_arguments(ap, index="default")
    ap.add_argument("--preconditioners", default="none,kfac:0.01,ekfac:0.01")
    ap.add_argument("--scorings", default="raw,cosine")
    a = ap.parse_args()
    set_threads(a.threads)
    log = stderr_log()

    wd = Path(a.workdir)
    where = wd / "index" / a.index
    cache = cache_from_arguments(a)
    scorings = [s for s in a.scorings.split(",") if s]
    per_query: dict[str, list[float]] = {}
    costs: dict[str, dict[str, float]] = {}
    for entry in [e for e in a.preconditioners.split(",") if e]:
        kind, _, alpha = entry.partition(":")
        served = where
        if kind.startswith("whiten-"):  # a whitened index of the same layout, built by the CLI, queried plainly
            served = build_whitened(wd, where, kind.removeprefix("whiten-"), alpha, a.threads, log)
            costs[entry] = json.loads((served / "timings.json").read_text())
            costs[entry] = {"build_s": costs[entry]["seconds"], "bytes": dir_bytes(served / "whiten")}
            kind = "none"
        elif kind != "none":
            t = time.perf_counter()
            cmd = [sys.executable, "-m", "proponent", "precondition", "--index", str(where), "--kind", kind]
            subprocess.run(cmd + (["--alpha", alpha] if alpha else []), check=True, stdout=subprocess.DEVNULL)
            costs[entry] = {"build_s": time.perf_counter() - t, "bytes": dir_bytes(where / "precond")}
            log(f"{entry}: built in {costs[entry]['build_s']:.1f}s, {costs[entry]['bytes'] / 1e6:.1f} MB")
        idx = open_index(served, device="cpu")

        def scorer(index, x, scoring, convention, checkpoints, kind=kind):
            kw = {} if kind == "none" else {"precondition": kind}
            return np.asarray(index.scores(x, scoring=scoring, convention=convention, seed=0, **kw))

        t = time.perf_counter()
        rows = lds_rows(idx, cache.query_x, cache.masks, cache.losses, scorings=scorings, scorer=scorer)
        log(f"{entry}: {len(cache.query_x)} queries x {len(scorings)} scorings in {time.perf_counter() - t:.1f}s")
        for r in rows:
            per_query[f"{entry} {r['scoring']}"] = r["per_query"]
    base = next(iter(per_query))
    dim = open_index(where, device="cpu").dim
    print(
        f"LDS of served score vectors on {a.train}, index {a.index} (D={dim}), {len(cache.query_x)} held-out "
        f"queries, {a.subsets} subset models (cache of benchmarks/lds.py in {wd}); preconditioners built by "
        "`proponent precondition` (KIND:ALPHA), scores from InfluenceIndex.scores"
    )
    print("\n".join(paired_table(per_query, base)))
    for entry, c in costs.items():
        print(f"{entry:>20}: built in {c['build_s']:.1f}s, {c['bytes'] / 1e6:.1f} MB stored")
    log("done")
    if a.json:
        Path(a.json).write_text(json.dumps({"per_query": per_query, "costs": costs}))


if __name__ == "__main__":
    main()
