"""The main job on the embedded default data (scikit-learn's digits), end to end.

train a β-VAE -> index it (Zarr + FAISS) -> start the server -> query it with the client
-> rank the training set by self-influence -> write the HTML report.

    python examples/demo.py --workdir demo_out
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(*args: str) -> None:
    print("$ proponent", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "proponent", *args], check=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="demo_out")
    ap.add_argument("--epochs", type=int, default=30)
    args = ap.parse_args()
    wd = Path(args.workdir)
    run_dir, idx_dir = wd / "run", wd / "index"
    t0 = time.perf_counter()
    if not (run_dir / "run.json").exists():
        run("train", "--data", "digits", "--out", str(run_dir), "--epochs", str(args.epochs))
    run("index", "--run", str(run_dir), "--out", str(idx_dir))
    t_index = time.perf_counter() - t0

    port = free_port()
    env = {**os.environ, "PROPONENT_INDEX": str(idx_dir), "PROPONENT_STATE_DIR": str(wd / "state")}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "proponent.service.app:create_app",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env=env,
    )
    try:
        from proponent.client import InfluenceClient

        with InfluenceClient(f"http://127.0.0.1:{port}", timeout=60) as c:
            deadline = time.time() + 120
            while True:
                try:
                    if c.health():
                        break
                except Exception:
                    pass
                if time.time() > deadline:
                    raise RuntimeError("server did not become ready")
                time.sleep(0.3)
            info = c.index_info()
            print(f"\nserving {info.n} samples x {len(info.checkpoints)} checkpoints (D={info.dim})")
            png = c.sample_image(0)
            img_path = wd / "query.png"
            img_path.write_bytes(png)
            r = c.influence(img_path, k=5, direction="both")
            print(
                f"query: training sample 0 uploaded as {img_path} (exact={r.exact}, "
                f"{r.timings.total_ms:.1f} ms server-side)"
            )
            print("  proponents:", [(h.id, round(h.score, 4), h.label) for h in r.proponents or []])
            print("  opponents: ", [(h.id, round(h.score, 4), h.label) for h in r.opponents or []])
            job = c.start_self_influence()
            job.wait(progress=True)
            ranked = job.result()
            print(
                "highest self-influence (candidate outliers):",
                [(row.id, round(row.self_influence, 4)) for row in ranked[:5]],
            )
    finally:
        server.terminate()
        server.wait(timeout=30)
    run("report", "--index", str(idx_dir), "--out", str(wd / "report.html"))
    print(f"\ndone in {time.perf_counter() - t0:.0f}s (train + index {t_index:.0f}s); report: {wd / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
