"""Fidelity of whitened indexes: per-layer sketch widths calibrated on the raw gradients vs on the whitened ones.

For each training run and whitening (``KIND:ALPHA``) builds two whitened indexes of the same total width D: the
product's (``proponent index --whiten``: the per-layer widths follow the *whitened* gradients' energy) and one whose
widths are calibrated on the raw gradients (what the index job did before; passed explicitly as
``ProjectionSpec.layer_dims``). Prints, per index, the widths and the index job's own fidelity check per
checkpoint (median recall@10 of the exact top-10 proponents / opponents, median relative score error, against
the exact whitened gradients; README "Every index measures its own fidelity").

    python benchmarks/whiten_fidelity.py --run runs/digits --whiten kfac:0.1,kfac:1,adam:0.1 --workdir W
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="append", required=True, help="a training run directory (repeatable)")
    ap.add_argument("--whiten", default="kfac:0.1", help="comma-separated KIND:ALPHA")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--proj-dim", type=int, default=None, help="total width D (default: the default layout's)")
    ap.add_argument("--m", type=int, default=None, help="draws per sample (default: the index job's)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    from proponent.format.fsio import IndexDir
    from proponent.format.manifest import read_manifest
    from proponent.indexer.data import load_dataset
    from proponent.indexer.job import IndexOptions, build_index, calibrate_layer_dims, checkpoints_from_runs
    from proponent.model.projection import ProjectionSpec
    from proponent.model.runtime import model_from_checkpoint, objective_from_record
    from proponent.threads import set_threads

    set_threads(a.threads)
    spec = ProjectionSpec() if a.proj_dim is None else ProjectionSpec(dim=a.proj_dim)
    work = Path(a.workdir)
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# whiten_fidelity: D={spec.dim}, {when}, torch {torch.__version__}, {a.threads} threads")
    print("# per checkpoint: recall@10 proponents / opponents, relative score error (the index job's fidelity check)")
    for run in a.run:
        specs, run_json = checkpoints_from_runs([run])
        data = load_dataset(run_json["data"]["spec"])
        for item in a.whiten.split(","):
            kind, alpha = item.split(":")
            base = IndexOptions(whiten=kind, whiten_alpha=float(alpha), projection=spec)
            if a.m is not None:
                base = dataclasses.replace(base, m=a.m)
            name = f"{Path(run).name}-{kind}{alpha}-d{spec.dim}"
            t0 = time.perf_counter()
            white = Path(build_index(data, specs, work / f"{name}-whitened", base, show_progress=False))
            t_white = time.perf_counter() - t0
            man = read_manifest(IndexDir(white))
            # the raw calibration, as the job did it before: the first and last checkpoints, no whitening
            raws = [Path(ck.path).read_bytes() for ck in specs]
            models = [model_from_checkpoint(man.model, raw, f"checkpoint {c}") for c, raw in enumerate(raws)]
            ends = [models[0], models[-1]] if len(models) > 1 else models
            objective = objective_from_record(man.objective, man.model)
            dims = calibrate_layer_dims(
                ends, objective, data, spec, man.projection.selection, torch.device("cpu"), man.objective.seed
            )
            opts = dataclasses.replace(base, projection=ProjectionSpec(dim=spec.dim, layer_dims=dims))
            t0 = time.perf_counter()
            raw = Path(build_index(data, specs, work / f"{name}-rawcal", opts, show_progress=False))
            t_raw = time.perf_counter() - t0
            for label, where, secs in (("raw-calibrated", raw, t_raw), ("whitened-calibrated", white, t_white)):
                m = read_manifest(IndexDir(where))
                assert m.fidelity is not None
                per = "; ".join(
                    f"{ch.recall_proponents:.2f} / {ch.recall_opponents:.2f}, {ch.relative_error:.3f}"
                    for ch in m.fidelity.checkpoints
                )
                widths = [l.k_in if l.tensor else f"exact {l.in_dim * l.out_dim}" for l in m.projection.layers]
                print(f"{name:<28} {label:<20} widths {widths} (job {secs:.1f} s)\n    {per}", flush=True)


if __name__ == "__main__":
    main()
