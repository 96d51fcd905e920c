"""The LDS grid of one data set and model: raw TracIn, Gram (TRAK), K-FAC and EK-FAC (kronfluence) x damping x
scoring on exact gradients, the gradient-free baselines, and the cross-seed ceiling, in one table.

One command runs the five steps in order (steps 1-4 the existing benchmark scripts on the same ``--workdir``
cache; a step whose JSON is already in ``<out>.d/`` is not rerun) and assembles their per-query LDS:

1. ``benchmarks/lds.py``: the full model, the subset models (seed 0), an index with exact gradients
   (``exact projection=none``) and the gradient-free baselines;
2. ``benchmarks/lds_precondition.py --mode gram``: TRAK's Gram preconditioner per checkpoint, α swept;
3. ``benchmarks/lds_kfac.py --mode kfac`` and 4. ``--mode ekfac``: per layer (Linear, and Conv2d in KFC form:
   A over the unfolded input patches with the bias column, S over the output gradient at every position, both
   averaged over samples, draws and positions as kronfluence does), α swept;
5. the same subsets retrained with seeds 1+j (``open_lds_cache(vary_seed=True)``, cached in the workdir as
   ``benchmarks/lds.py --vary-seed`` caches them). The **ceiling** is, per query, the Spearman correlation
   over subsets between the varied-seed models' losses and the seed-0 models' losses: how well a perfect
   predictor of "the loss of a model trained on this subset" ranks the seed-0 losses when training noise is
   the only difference (a deterministic attribution cannot beat it on average).

The summary gives, per family, the best (α, scoring) of the sweep twice: chosen and reported on all queries
(optimistic: the choice sees the test queries), and chosen on the even queries, reported on the odd ones
(an honest held-out choice), each with its paired difference against raw TracIn on the same queries.

    # 28x28 digits with 10 % injected letters (MLP 784-64-32-16)
    python benchmarks/lds_grid.py --name letters28 --workdir runs/lds_letters28 \\
        --train "digits,size=28,limit=797+glyphs:n=89,size=28,injected" --queries-from "digits,size=28,offset=1597" \\
        --out benchmarks/results/lds_grid_letters28 -- --hidden 64,32
    # a conv VAE on 8x8 digits (channels 16, 32)
    python benchmarks/lds_grid.py --name conv --workdir runs/lds_conv --out benchmarks/results/lds_grid_conv \\
        -- --model conv --channels 16,32

Arguments after ``--`` go to ``benchmarks/lds.py`` only (the model). Writes ``<out>.txt`` (the summary and
every step's table) and ``<out>.json`` (every per-query value); the steps' own outputs go to ``<out>.d/``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from proponent.analysis.lds import paired_difference, spearman_rows, summarize

HERE = Path(__file__).resolve().parent


def _ci(v: dict[str, Any]) -> str:
    return f"{v['mean']:+.3f} [{v['ci_low']:+.3f}, {v['ci_high']:+.3f}]"


def _best(per_query: dict[str, list[float]], keys: list[str], pick: np.ndarray) -> str:
    """The key whose mean LDS over the queries ``pick`` is highest."""
    return max(keys, key=lambda k: float(np.nanmean(np.asarray(per_query[k])[pick])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--name", required=True)
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--out", required=True, help="output stem: <out>.txt, <out>.json, <out>.d/")
    ap.add_argument("--train", default="digits,limit=1597")
    ap.add_argument("--queries-from", default="digits,offset=1597")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--subsets", type=int, default=40)
    ap.add_argument("--gram-alphas", default="1e-4,1e-2,1,100,1000")
    ap.add_argument("--kfac-alphas", default="1e-3,1e-2,0.1,1,10,100")
    ap.add_argument(
        "--ceiling-subsets", type=int, default=None, help="retrain the first K subsets with other seeds (default: all)"
    )
    ap.add_argument("--families", default="gram,kfac,ekfac", help="preconditioner families to run (comma-separated)")
    ap.add_argument("model_args", nargs="*", help="after --: arguments for benchmarks/lds.py (the model)")
    a = ap.parse_args()
    out = Path(a.out)
    steps_dir = out.parent / (out.name + ".d")
    steps_dir.mkdir(parents=True, exist_ok=True)
    common = [
        "--workdir", a.workdir, "--train", a.train, "--queries-from", a.queries_from,
        "--queries", str(a.queries), "--subsets", str(a.subsets),
    ]  # fmt: skip
    lds_args = ["--index", "exact projection=none", "--prefilters", "", "--checkpoint-sets", "all", "--threads", "1"]
    steps = {
        "lds": ["lds.py", *common, *a.model_args, *lds_args],
        "gram": ["lds_precondition.py", *common, "--index", "exact", "--mode", "gram", "--alphas", a.gram_alphas],
        "kfac": ["lds_kfac.py", *common, "--index", "exact", "--mode", "kfac", "--alphas", a.kfac_alphas],
        "ekfac": ["lds_kfac.py", *common, "--index", "exact", "--mode", "ekfac", "--alphas", a.kfac_alphas],
    }
    fams = [f for f in a.families.split(",") if f]
    steps = {k: v for k, v in steps.items() if k == "lds" or k in fams}
    texts = {}
    for name, cmd in steps.items():
        js, txt = steps_dir / f"{name}.json", steps_dir / f"{name}.txt"
        if not js.exists():
            print(f"step {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
            with txt.open("w") as fh:
                subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:], "--json", str(js)], stdout=fh, check=True)
        texts[name] = txt.read_text()

    lds = json.loads((steps_dir / "lds.json").read_text())
    per_query: dict[str, list[float]] = {}
    for r in lds["indexes"]["exact"]["rows"]:
        per_query[f"TracIn {r['scoring']}"] = r["per_query"]
    families: dict[str, list[str]] = {}
    for fam in fams:
        pq = json.loads((steps_dir / f"{fam}.json").read_text())["per_query"]
        keys = [k for k in pq if k.startswith(f"{fam} a=")]
        per_query.update({k: pq[k] for k in keys})
        families[fam] = keys
    for b in lds.get("baselines", []):
        per_query[f"baseline: {b['name']}"] = b["per_query"]

    # the ceiling: varied-seed subset models' losses predict the seed-0 ones (same subsets, same queries)
    from proponent.analysis.lds import open_lds_cache

    spec = dict(train_spec=a.train, queries_from=a.queries_from, queries=a.queries, subsets=a.subsets)
    l0 = open_lds_cache(a.workdir, **spec).losses  # type: ignore[arg-type]
    k_ceil = a.ceiling_subsets or a.subsets
    spec["subsets"] = k_ceil  # the masks of the first K subsets are those of any longer run (the seed scheme)
    l0 = l0[:k_ceil]
    progress = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    l1 = open_lds_cache(a.workdir, vary_seed=True, progress=progress, **spec).losses  # type: ignore[arg-type]
    per_query["ceiling: varied-seed losses predict seed-0 losses"] = spearman_rows(-l1.T, -l0.T).tolist()

    raw = per_query["TracIn raw"]
    nq = len(raw)
    every, even, odd = np.arange(nq), np.arange(0, nq, 2), np.arange(1, nq, 2)
    lines = [
        f"LDS grid '{a.name}': {lds['train']} (N={lds['n_train']}), {nq} held-out queries from {lds['queries_from']}, "
        f"{lds['subsets']} subset models on {lds['fraction']:.0%} subsets, TrainConfig epochs="
        f"{lds['train_config']['epochs']} lr={lds['train_config']['lr']} batch={lds['train_config']['batch_size']}, "
        f"index 'exact' (projection=none, D={lds['indexes']['exact']['dim']}), all checkpoints, lr weights; "
        f"lds.py model args: {' '.join(a.model_args) or '(defaults)'}",
        "mean LDS over queries [95% bootstrap CI]; '- raw': paired difference against raw TracIn on the same queries",
        "",
        f"{'':>58} {'LDS':>24} {'- raw':>24}",
    ]
    summary: dict[str, Any] = {}

    def row(label: str, key: str, pick: np.ndarray) -> None:
        v = np.asarray(per_query[key])[pick]
        s, d = summarize(v), paired_difference(v, np.asarray(raw)[pick])
        summary[label] = {"key": key, "lds": s, "minus_raw": d, "queries": "all" if len(pick) == nq else "odd"}
        lines.append(f"{label:>58} {_ci(s):>24} {_ci(d):>24}")

    for sc in ("raw", "cosine", "relatif"):
        row(f"TracIn {sc}", f"TracIn {sc}", every)
    for fam, keys in families.items():
        k_all = _best(per_query, keys, every)
        row(f"best {fam}: {k_all[len(fam) + 1 :]} (chosen on all)", k_all, every)
    for fam, keys in families.items():
        k_even = _best(per_query, keys, even)
        row(f"best {fam}: {k_even[len(fam) + 1 :]} (chosen even, odd q.)", k_even, odd)
    for key in per_query:
        if key.startswith("baseline: "):
            row(key[:58], key, every)
    row(
        f"ceiling ({k_ceil} subsets): varied-seed losses predict",
        "ceiling: varied-seed losses predict seed-0 losses",
        every,
    )
    lines.append("")
    body = "\n".join(lines)
    full = body + "\n\n" + "\n\n".join(f"=== step {k} ===\n{t}" for k, t in texts.items())
    print(body)
    out.with_suffix(".txt").write_text(full)
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "per_query": per_query}, indent=1))


if __name__ == "__main__":
    main()
