"""The README's "Your own model" walk with the PyTorch-examples MNIST VAE (examples/pytorch_vae):
its own training script makes torch.save checkpoints, `proponent index` reads their metadata from
the files and hashes the model code, and the served answer is the offline one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from proponent.cli import main
from proponent.client import InfluenceClient
from proponent.format.fsio import IndexDir
from proponent.format.manifest import read_manifest
from tests.conftest import svc_run_server

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "pytorch_vae"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pytorch_vae")
    r = subprocess.run(
        [sys.executable, str(EXAMPLE / "train.py"), str(out), "--epochs", "2", "--checkpoints", "2"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    return out


def test_walk_from_checkpoints_to_a_served_answer(trained: Path, tmp_path: Path, capsys) -> None:
    ckpts = sorted(str(p) for p in trained.glob("ckpt_*.pt"))
    assert len(ckpts) == 2
    idx = tmp_path / "idx"
    argv = ["index", "--data", f"npz:{trained}/digits28.npz,limit=200", "--model-code", f"{EXAMPLE}/plugin.py:plugin"]
    argv += ["--checkpoints", *ckpts, "--checkpoint-key", "model", "--out", str(idx), "--m", "2", "--quiet"]
    assert main(argv) == 0, capsys.readouterr().err
    man = read_manifest(IndexDir(idx))
    steps = [int(Path(c).stem.split("_")[1]) for c in ckpts]  # 15 optimiser steps per epoch (1,797 / 128)
    assert [(c.lr, c.batch_size, c.step, c.epoch) for c in man.checkpoints] == [
        (1e-3, 128, steps[0], 1.0),
        (1e-3, 128, steps[1], 2.0),
    ]
    assert [c.steps_since_prev for c in man.checkpoints] == [steps[0], steps[1] - steps[0]]
    assert man.model.plugin is not None and man.assumed_metadata == []
    assert [Path(f.path).name for f in man.model.plugin.files] == ["plugin.py", "model.py"]
    capsys.readouterr()
    assert main(["influence", "--index", str(idx), "--sample-id", "3", "--k", "5", "--json"]) == 0
    offline = json.loads(capsys.readouterr().out)
    with svc_run_server(index=idx, state_dir=tmp_path / "state") as s:
        with InfluenceClient(s.url, timeout=120, retries=0) as c:
            served = c.influence(sample_id=3, k=5)
    assert served.ids() == [h["id"] for h in offline["proponents"]]
    assert served.scores() == pytest.approx([h["score"] for h in offline["proponents"]], rel=1e-6)
    assert not any("uniform" in a for a in served.approximations)
