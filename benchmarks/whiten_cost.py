"""What ``proponent index --whiten kfac|adam`` costs: index-job time against the unwhitened job, same layout.

For every ``--run`` (a ``proponent train`` run directory; ``adam`` needs checkpoints with optimizer state), builds
the default index with each ``--kinds`` entry (``none`` first: the baseline) through the CLI, ``--repeats`` times
in alternating order, and prints the median of the job's own ``timings.json`` seconds, its ratio to the
unwhitened job's, and the factor files' bytes against the store's.

    python benchmarks/whiten_cost.py --run runs/lds/full-adam/run --kinds none,kfac,adam --repeats 3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="append", required=True, help="training run directory (repeatable)")
    ap.add_argument("--kinds", default="none,kfac,adam")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--m", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    kinds = [k for k in a.kinds.split(",") if k]
    print(f"index job seconds (timings.json), median of {a.repeats} alternating runs, m={a.m}, {a.threads} threads")
    print(f"{'run':>40} {'whiten':>7} {'seconds':>8} {'x none':>7} {'factors MB':>11} {'store MB':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for run in a.run:
            secs: dict[str, list[float]] = {k: [] for k in kinds}
            sizes: dict[str, tuple[int, int]] = {}
            for _ in range(a.repeats):
                for kind in kinds:
                    out = Path(tmp) / kind
                    shutil.rmtree(out, ignore_errors=True)
                    cmd = [sys.executable, "-m", "proponent", "index", "--run", run, "--out", str(out), "--quiet"]
                    cmd += ["--m", str(a.m), "--threads", str(a.threads), "--whiten", kind]
                    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                    secs[kind].append(json.loads((out / "timings.json").read_text())["seconds"])
                    sizes[kind] = (dir_bytes(out / "whiten"), dir_bytes(out / "store.zarr"))
            base = statistics.median(secs[kinds[0]])
            for kind in kinds:
                med = statistics.median(secs[kind])
                fb, sb = sizes[kind]
                print(f"{run[-40:]:>40} {kind:>7} {med:8.2f} {med / base:7.2f} {fb / 1e6:11.2f} {sb / 1e6:9.1f}")


if __name__ == "__main__":
    main()
