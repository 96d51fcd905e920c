"""Nothing invented, nothing stale (issue 19): training metadata comes from the checkpoint files or the
user, an index directory is never silently reused with other settings, and identical runs write
identical bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from proponent.cli import main
from proponent.format.fsio import IndexDir
from proponent.format.manifest import read_manifest
from proponent.indexer.data import load_dataset
from proponent.indexer.training import TrainConfig, train
from proponent.model.architectures import ModelConfig
from proponent.model.checkpoints import checkpoint_metadata

DATA = "digits,limit=80"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Two checkpoints of a tiny MLP VAE, written three ways: bare state dicts, with metadata, as the config."""
    data = load_dataset(DATA)
    cfg = ModelConfig(kind="mlp", input_shape=data.shape, hidden=(12,), latent_dim=3)
    root = tmp_path_factory.mktemp("trust")
    run = train(
        data, cfg, root / "run", TrainConfig(epochs=2, batch_size=32, checkpoints=2, seed=0), show_progress=False
    )
    (root / "config.json").write_text(json.dumps(cfg.to_dict()))
    bare, rich = [], []
    for i, f in enumerate(sorted((run / "checkpoints").glob("*.pt"))):
        state = torch.load(f, weights_only=True)["state_dict"]
        torch.save(state, root / f"bare{i}.pt")
        optim = {"state": {}, "param_groups": [{"lr": 0.01, "momentum": 0.0, "params": [0]}]}
        torch.save(
            {"net": state, "iteration": 30 * (i + 1), "batch_size": 32, "optimizer": optim}, root / f"rich{i}.pt"
        )
        bare.append(str(root / f"bare{i}.pt"))
        rich.append(str(root / f"rich{i}.pt"))
    return {"root": root, "bare": bare, "rich": rich, "config": str(root / "config.json")}


def _index(ck: dict[str, object], out: Path, files: str, *flags: str) -> list[str]:
    args = ["index", "--data", DATA, "--checkpoints", *ck[files], "--model-config", ck["config"]]  # type: ignore[misc]
    if files == "rich":
        args += ["--checkpoint-key", "net"]
    return [*args, "--out", str(out), "--m", "2", "--featurizer", "dense", "--projection", "none", "--quiet", *flags]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.err.strip()


def test_metadata_found_in_checkpoint_files(ckpts, tmp_path, capsys) -> None:
    raw = torch.load(ckpts["rich"][0], weights_only=True)
    meta = checkpoint_metadata(raw)
    assert meta["lr"] == (0.01, "optimizer.param_groups[0].lr") and meta["step"] == (30.0, "iteration")
    rc, err = _run(_index(ckpts, tmp_path / "i", "rich"), capsys)
    assert rc == 0, err
    man = read_manifest(IndexDir(tmp_path / "i"))
    assert [(c.lr, c.batch_size, c.step, c.steps_since_prev) for c in man.checkpoints] == [
        (0.01, 32, 30, 30),
        (0.01, 32, 60, 30),
    ]
    assert man.assumed_metadata == []
    # a flag that contradicts the file is refused, naming both values
    rc, err = _run(_index(ckpts, tmp_path / "j", "rich", "--lr", "0.02"), capsys)
    assert rc == 2 and "lr is 0.01 from the file's 'optimizer.param_groups[0].lr' but 0.02 from --lr" in err
    # --steps that disagree with the recorded iterations too
    rc, err = _run(_index(ckpts, tmp_path / "j", "rich", "--steps", "5"), capsys)
    assert rc == 2 and "5 steps since the previous checkpoint" in err and "say 30" in err


def test_missing_metadata_is_refused_naming_the_flag(ckpts, tmp_path, capsys) -> None:
    rc, err = _run(_index(ckpts, tmp_path / "i", "bare"), capsys)
    assert rc == 2 and "no lr in the checkpoint files" in err and "--lr" in err and "--uniform-weights" in err
    assert "also missing: batch_size, steps" in err and not (tmp_path / "i").exists()
    rc, err = _run(_index(ckpts, tmp_path / "i", "bare", "--lr", "0.1", "--steps", "7"), capsys)
    assert rc == 2 and "no batch_size" in err and "--batch-size-trained" in err
    meta = tmp_path / "meta.json"
    meta.write_text(json.dumps([{"lr": 0.1, "batch_size": 8, "step": 7}, {"lr": 0.05, "batch_size": 8, "step": 9}]))
    rc, err = _run(_index(ckpts, tmp_path / "i", "bare", "--checkpoint-meta", str(meta)), capsys)
    assert rc == 0, err
    man = read_manifest(IndexDir(tmp_path / "i"))
    assert [(c.lr, c.batch_size, c.steps_since_prev) for c in man.checkpoints] == [(0.1, 8, 7), (0.05, 8, 2)]
    meta.write_text(json.dumps([{"lr": True}, {"lr": 0.1}]))
    rc, err = _run(_index(ckpts, tmp_path / "k", "bare", "--checkpoint-meta", str(meta)), capsys)
    assert rc == 2 and "entry 0: lr must be a number, got true" in err


def test_uniform_weights_are_recorded_in_every_answer(ckpts, tmp_path, capsys) -> None:
    rc, err = _run(_index(ckpts, tmp_path / "u", "bare", "--uniform-weights"), capsys)
    assert rc == 0, err
    man = read_manifest(IndexDir(tmp_path / "u"))
    assert man.assumed_metadata == ["batch_size", "lr", "steps"]
    assert [(c.lr, c.batch_size, c.steps_since_prev) for c in man.checkpoints] == [(1.0, 1, 1)] * 2
    rc = main(["influence", "--index", str(tmp_path / "u"), "--sample-id", "3", "--k", "3", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert any("lr, steps not recorded, taken as 1 (--uniform-weights)" in a for a in out["approximations"])


def test_reindexing_with_other_settings_refuses_or_overwrites(ckpts, tmp_path, capsys) -> None:
    out = tmp_path / "i"
    base = ["--batch-size-trained", "16", "--steps", "10"]
    rc, err = _run(_index(ckpts, out, "bare", "--lr", "1.0", *base), capsys)
    assert rc == 0, err
    before = (out / "manifest.json").read_bytes()
    rc, err = _run(_index(ckpts, out, "bare", "--lr", "0.001", *base), capsys)
    assert rc == 2 and "holds an index built with other settings" in err
    assert "checkpoint metadata[0]: [1.0, 16, 10, 10, 0.0] -> [0.001, 16, 10, 10, 0.0]" in err and "--overwrite" in err
    assert (out / "manifest.json").read_bytes() == before
    rc, err = _run(_index(ckpts, out, "bare", "--lr", "1.0", *base, "--m", "3"), capsys)
    assert rc == 2 and "objective.m: 2 -> 3" in err
    rc, err = _run(_index(ckpts, out, "bare", "--lr", "0.001", *base, "--overwrite"), capsys)
    assert rc == 0, err
    assert [c.lr for c in read_manifest(IndexDir(out)).checkpoints] == [0.001, 0.001]
    # the same configuration again: nothing to do, nothing changed
    after = (out / "manifest.json").read_bytes()
    rc, err = _run(_index(ckpts, out, "bare", "--lr", "0.001", *base), capsys)
    assert rc == 0 and (out / "manifest.json").read_bytes() == after


def test_resume_only_with_the_same_configuration(ckpts, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("PROPONENT_CHUNK_ROWS", "16")  # five units: a shard leaves some pending
    out = tmp_path / "i"
    base = ["--batch-size-trained", "16", "--steps", "10"]
    rc, err = _run(_index(ckpts, out, "bare", "--lr", "1.0", *base, "--shard", "0/2"), capsys)
    assert rc == 0, err
    assert not read_manifest(IndexDir(out)).complete
    rc, err = _run(_index(ckpts, out, "bare", "--lr", "2.0", *base), capsys)
    assert rc == 2 and "checkpoint metadata[1]: [1.0, 16, 10, 20, 0.0] -> [2.0, 16, 10, 20, 0.0]" in err
    rc, err = _run(_index(ckpts, out, "bare", "--lr", "1.0", *base), capsys)
    assert rc == 0, err
    assert read_manifest(IndexDir(out)).complete


def test_identical_runs_write_identical_manifests(ckpts, tmp_path, capsys) -> None:
    args = ["--lr", "0.5", "--batch-size-trained", "16", "--steps", "10"]
    for name in ("a", "b"):
        rc, err = _run(_index(ckpts, tmp_path / name, "bare", *args), capsys)
        assert rc == 0, err
    a, b = (tmp_path / "a" / "manifest.json").read_bytes(), (tmp_path / "b" / "manifest.json").read_bytes()
    assert a == b and b'"seconds": null' in a
    assert json.loads((tmp_path / "a" / "timings.json").read_text())["seconds"] > 0
    # the summary line names the layout (here exact gradients), not the featurizer's route
    rc = main([a for a in _index(ckpts, tmp_path / "a", "bare", *args) if a != "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0 and "indexed 80 samples x 2 checkpoints (D=" in out and "exact gradients, m=2)" in out
