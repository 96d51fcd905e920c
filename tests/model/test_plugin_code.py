"""The user's model code is hashed whole (the plugin file, the modules it imports from outside
site-packages, --model-code-dir), checked by verify, the server and every command, and every plugin
failure is one line; --help texts cite README headings that exist (issue 19)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from proponent.cli import main
from proponent.format.fsio import IndexDir
from proponent.format.manifest import read_manifest


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.err.strip()


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
    from proponent.query.index import IndexOpenError

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
        with pytest.raises(IndexOpenError, match=re.escape(f"model code {changed.resolve()}: its sha256")):
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
        for line in (Path(__file__).resolve().parents[2] / "README.md").read_text().splitlines()
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
