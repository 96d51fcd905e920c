"""Nothing invented, nothing stale: training metadata comes from the files or the user (issue 19),
an index directory is never silently reused with other settings, and identical runs write
identical bytes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from proponent.build.data import load_dataset
from proponent.build.training import TrainConfig, train
from proponent.cli import main
from proponent.format.fsio import IndexDir
from proponent.format.manifest import read_manifest
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


# ------------------------------------------------------------------ model code hashed whole
NET = """
import torch
from torch import nn
from {helper} import ACT


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(64, 6)
        self.dec = nn.Linear(3, 64)

    def encode(self, x):
        h = ACT(self.enc(x.flatten(1)))
        return h[:, :3], h[:, 3:]
"""
PLUGIN = """
import torch
from {net} import Net

from proponent.model.plugin import VAEParts


def plugin():
    return VAEParts(
        module=Net(),
        encode=lambda m, x: m.encode(x),
        decode=lambda m, z: m.dec(z).reshape(-1, 8, 8),
        reconstruction=lambda out, x: (torch.sigmoid(out) - x).pow(2).flatten(1).sum(1),
        latent_dim=3,
    )
"""


def _plugin_tree(root: Path, tag: str) -> tuple[Path, Path, Path, list[str]]:
    """A plugin file importing a sibling module (no PYTHONPATH) that imports another; two checkpoints."""
    code = root / "code"
    code.mkdir()
    helper, net = f"acts_{tag}", f"net_{tag}"
    (code / f"{helper}.py").write_text("import torch\nACT = torch.tanh\n")
    (code / f"{net}.py").write_text(NET.format(helper=helper))
    (code / "my_vae.py").write_text(PLUGIN.format(net=net))
    torch.manual_seed(0)
    ckpts = []
    for i in range(2):
        state = {"enc.weight": torch.randn(6, 64) * 0.1, "enc.bias": torch.zeros(6)}
        state.update({"dec.weight": torch.randn(64, 3) * 0.1, "dec.bias": torch.zeros(64)})
        torch.save({"model": state, "lr": 0.1, "step": 10 * (i + 1), "batch_size": 4}, root / f"{i}.pt")
        ckpts.append(str(root / f"{i}.pt"))
    return code / "my_vae.py", code / f"{net}.py", code / f"{helper}.py", ckpts


def test_model_code_hashed_whole(tmp_path, capsys) -> None:
    from proponent import open_index
    from proponent.query.index import IndexError_

    plugin, net, helper, ckpts = _plugin_tree(tmp_path, "a")
    out = tmp_path / "idx"
    argv = ["index", "--data", "digits,limit=40", "--model-code", f"{plugin}:plugin", "--checkpoints", *ckpts]
    argv += ["--checkpoint-key", "model", "--out", str(out), "--m", "2", "--featurizer", "dense"]
    rc, err = _run([*argv, "--projection", "none", "--quiet"], capsys)
    assert rc == 0, err
    rec = read_manifest(IndexDir(out)).model.plugin
    assert rec is not None
    assert [Path(f.path) for f in rec.files] == [plugin.resolve(), helper.resolve(), net.resolve()]
    assert main(["verify", "--index", str(out)]) == 0
    capsys.readouterr()
    for changed in (net, plugin):
        saved = changed.read_text()
        changed.write_text(saved.replace("torch.tanh", "torch.sigmoid") + "\n# edited\n")
        rc = main(["verify", "--index", str(out)])
        text = capsys.readouterr().out
        assert rc == 1 and f"FAIL model code {changed.resolve()}: its sha256" in text
        with pytest.raises(IndexError_, match=re.escape(f"model code {changed.resolve()}: its sha256")):
            open_index(out, device="cpu")
        rc, err = _run(["influence", "--index", str(out), "--sample-id", "1"], capsys)
        assert rc == 2 and f"model code {changed.resolve()}" in err and "\n" not in err
        changed.write_text(saved)
    assert main(["verify", "--index", str(out)]) == 0


def test_model_code_dir_is_hashed_and_missing_files_named(tmp_path, capsys) -> None:
    plugin, net, helper, ckpts = _plugin_tree(tmp_path, "b")
    extra = plugin.parent / "data_utils.py"  # imported by nothing: only --model-code-dir covers it
    extra.write_text("SCALE = 1.0\n")
    out = tmp_path / "idx"
    argv = ["index", "--data", "digits,limit=40", "--model-code", f"{plugin}:plugin", "--checkpoints", *ckpts]
    argv += ["--checkpoint-key", "model", "--out", str(out), "--m", "2", "--featurizer", "dense", "--quiet"]
    rc, err = _run([*argv, "--projection", "none", "--model-code-dir", str(plugin.parent)], capsys)
    assert rc == 0, err
    rec = read_manifest(IndexDir(out)).model.plugin
    assert rec is not None and str(extra.resolve()) in [f.path for f in rec.files]
    extra.unlink()
    rc = main(["verify", "--index", str(out)])
    assert rc == 1 and f"model code {extra.resolve()}: file missing" in capsys.readouterr().out


def test_plugin_failures_are_one_line_in_every_command(tmp_path, capsys, monkeypatch) -> None:
    for env in ("PROPONENT_INDEX", "PROPONENT_STATE_DIR"):  # serve sets them: restored after the test
        monkeypatch.setenv(env, "")
    plugin, net, helper, ckpts = _plugin_tree(tmp_path, "c")
    out = tmp_path / "idx"
    argv = ["index", "--data", "digits,limit=40", "--model-code", f"{plugin}:plugin", "--checkpoints", *ckpts]
    argv += ["--checkpoint-key", "model", "--out", str(out), "--m", "2", "--featurizer", "dense", "--quiet"]
    saved = plugin.read_text()
    plugin.write_text(saved.replace("def plugin():", "def plugin():\n    raise RuntimeError('no GPU here')\n"))
    rc, err = _run([*argv, "--projection", "none"], capsys)
    assert (
        rc == 2
        and err == f"proponent: error: model code {plugin.resolve()}: plugin() failed (RuntimeError: no GPU here)"
    )
    plugin.write_text("import no_such_module_here\n" + saved)
    rc, err = _run([*argv, "--projection", "none"], capsys)
    assert rc == 2 and "\n" not in err and "importing it failed (ModuleNotFoundError: No module named" in err
    plugin.write_text(saved)
    rc, err = _run([*argv, "--projection", "none"], capsys)
    assert rc == 0, err
    net.write_text(net.read_text() + "\n# edited\n")
    for cmd in (
        ["serve", "--index", str(out), "--port", "1"],
        ["self-influence", "--index", str(out), "--out", str(tmp_path / "s.csv")],
    ):
        rc, err = _run(cmd, capsys)
        assert rc == 2 and "\n" not in err and f"model code {net.resolve()}: its sha256" in err, (cmd, err)


def test_help_texts_cite_readme_headings_that_exist() -> None:
    """Every `README "Heading"` a --help text cites names a heading of README.md (its start, backticks aside)."""
    import argparse

    from proponent.cli import build_parser

    headings = [
        line.lstrip("#").strip().replace("`", "")
        for line in (Path(__file__).resolve().parents[1] / "README.md").read_text().splitlines()
        if line.startswith("#")
    ]
    texts: list[str] = []

    def walk(p: argparse.ArgumentParser) -> None:
        texts.extend([p.description or "", p.epilog or ""])
        for g in p._action_groups:
            texts.append(g.title or "")
        for act in p._actions:
            texts.append(act.help or "")
            if isinstance(act, argparse._SubParsersAction):
                for choice in act._choices_actions:
                    texts.append(choice.help or "")
                for sub in act.choices.values():
                    walk(sub)

    walk(build_parser())
    cited = [m for t in texts for m in re.findall(r'README[:,]? "([^"]+)"', t)]
    assert len(cited) >= 4
    assert [c for c in cited if not any(h.startswith(c) for h in headings)] == []
    assert not [t for t in texts if "README" in t and not re.search(r'README[:,]? "[^"]+"', t)], "cite a heading"
