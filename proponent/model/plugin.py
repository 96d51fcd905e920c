"""Your own model: the plugin contract.

Name a Python file or an importable module and a factory in it (``--model-code FILE.py:FACTORY`` or
``package.module:FACTORY``). The factory takes no arguments and returns one of:

* :class:`VAEParts` -- a β-VAE: the ``module`` (an ``nn.Module`` whose parameters live in its
  submodules), ``encode(module, x) -> (μ, log σ²)``, ``decode(module, z) -> output``, a per-sample
  ``reconstruction(output, x) -> [N]`` term (−log p(x|z) up to a constant, for one draw), ``beta``,
  ``latent_dim`` and an optional ``scale`` of the whole loss. proponent draws the noise,
  ``z = μ + exp(log σ²/2)·ε``, and the loss of a sample is
  ``scale · (mean over m draws of reconstruction + β · KL(N(μ, σ²) ‖ N(0, I)))``.
* :class:`LossParts` -- any model: the ``module`` and a per-sample ``loss(module, x, y, noise) -> [B]``
  that takes its noise as an argument (``noise [B, m, *noise_shape]``, standard normal, drawn by
  proponent and keyed by sample id and checkpoint so that resumed or distributed runs write the
  same bytes), averaging over its m draws itself; ``supervised=True`` when it needs labels ``y``.

The checkpoints are the module's state dicts (``--checkpoint-key model_states.net`` when nested
in a dict), read with ``weights_only=True``. The plugin file's directory is put on the import path
(sibling modules import without ``PYTHONPATH``). The manifest records the factory and the sha256 of
every file of the model's code (:func:`code_files`: the plugin file, the modules it imports from
outside the standard library and site-packages, and ``--model-code-dir``); loading refuses, naming
the file, when any of them changed. **Loading user code runs it**: only name code you trust.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import site
import sys
import sysconfig
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
from torch import nn

from proponent.format.integrity import code_problems
from proponent.format.manifest import FileRecord, ModelRecord, PluginRecord
from proponent.model.objectives import ELBO, Forward, Objective, gaussian_kl


class PluginError(ValueError):
    """The user's model code cannot be loaded or does not keep the contract (the message says how)."""


@dataclass
class VAEParts:
    module: nn.Module
    encode: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    decode: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    reconstruction: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    latent_dim: int
    beta: float = 1.0
    scale: float = 1.0


@dataclass
class LossParts:
    module: nn.Module
    loss: Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    noise_shape: tuple[int, ...] = (1,)
    supervised: bool = False
    encode: Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    latent_dim: int = 0


class PluginModule(nn.Module):
    """The user's module, adopted: its submodules become this module's under the same names, so
    parameter names (and state-dict keys) are the user's, and ``forward`` takes explicit noise."""

    def __init__(self, parts: VAEParts | LossParts):
        super().__init__()
        user = parts.module
        own = [n for n, _ in user.named_parameters(recurse=False)]
        if own:
            raise PluginError(f"the model's parameters must live in submodules (found {own} on the top-level module)")
        for name, child in user.named_children():
            self.add_module(name, child)
        for name, buf in user.named_buffers(recurse=False):
            self.register_buffer(name, buf)
        self.parts = parts
        self.user = [user]  # the user's own object (a list: not registered twice)
        self.config = SimpleNamespace(latent_dim=int(parts.latent_dim))

    def forward(self, *args: torch.Tensor) -> Any:
        parts = self.parts
        user = self.user[0]
        if isinstance(parts, LossParts):
            x, y, eps = args
            return parts.loss(user, x, y, eps)
        x, eps = args
        mu, logvar = parts.encode(user, x)
        b, m, latent = eps.shape
        z = mu.unsqueeze(1) + torch.exp(0.5 * logvar).unsqueeze(1) * eps
        out = parts.decode(user, z.reshape(b * m, latent))
        return mu, logvar, out.reshape(b, m, *out.shape[1:])

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fn = self.parts.encode
        if fn is None:
            raise ValueError("this model's plugin gives no encode(): no latent space")
        return fn(self.user[0], x)


@dataclass
class PluginELBO(ELBO):
    """The β-VAE loss with the user's reconstruction term and scale (cross-loss variants included)."""

    reconstruction: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    scale: float = 1.0
    likelihood: str = "plugin"

    def loss(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        assert self.reconstruction is not None
        mu, logvar, out = forward(x, eps)
        b, m = out.shape[:2]
        total = torch.zeros(b, dtype=x.dtype, device=x.device)
        if self.beta:
            total = total + self.beta * gaussian_kl(mu, logvar)
        if self.recon_weight:
            xr = x.unsqueeze(1).expand(b, m, *x.shape[1:]).reshape(b * m, *x.shape[1:])
            recon = self.reconstruction(out.reshape(b * m, *out.shape[2:]), xr).reshape(b, m).mean(dim=1)
            total = total + self.recon_weight * recon
        return self.scale * total

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "scale": self.scale}


@dataclass
class PluginLoss(Objective):
    """A general per-sample loss with explicit noise."""

    m: int = 1
    shape: tuple[int, ...] = (1,)
    name: str = "plugin_loss"

    def noise_shape(self, model: nn.Module) -> tuple[int, ...]:
        return tuple(self.shape)

    def loss(self, forward: Forward, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return forward(x, y, eps)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _parse(spec: str) -> tuple[str, str]:
    if ":" not in spec:
        raise PluginError(f"--model-code {spec!r}: expected FILE.py:FACTORY or package.module:FACTORY")
    code, factory = spec.rsplit(":", 1)
    if not factory.isidentifier():
        raise PluginError(f"--model-code {spec!r}: {factory!r} is not a Python name")
    return code, factory


def _code_file(code: str) -> Path:
    if code.endswith(".py") or "/" in code or Path(code).is_file():
        p = Path(code).expanduser().resolve()
        if not p.is_file():
            raise PluginError(f"model code {code}: file not found")
        return p
    try:
        spec = importlib.util.find_spec(code)
    except (ImportError, ValueError) as e:
        raise PluginError(f"model code {code}: cannot import ({e})") from None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        raise PluginError(f"model code {code}: no such importable module")
    return Path(spec.origin)


_CACHE: dict[tuple[str, str, str], Plugin] = {}
_LOCK = threading.Lock()


class Plugin:
    """A loaded plugin: builds fresh modules and the training objective."""

    def __init__(self, record: PluginRecord, module: ModuleType):
        self.record = record
        self.module = module
        fn = getattr(module, record.factory, None)
        if not callable(fn):
            raise PluginError(f"model code {record.code}: no callable {record.factory!r} in it")
        self.factory = fn

    def parts(self) -> VAEParts | LossParts:
        try:
            parts = self.factory()
        except Exception as e:
            raise PluginError(
                f"model code {self.record.code}: {self.record.factory}() failed ({_one_line(e)})"
            ) from None
        if not isinstance(parts, (VAEParts, LossParts)):
            raise PluginError(
                f"model code {self.record.code}: {self.record.factory}() must return proponent.model.plugin.VAEParts "
                f"or LossParts, got {type(parts).__name__}"
            )
        return parts

    def build_module(self) -> PluginModule:
        return PluginModule(self.parts())

    def objective(self, m: int) -> Objective:
        parts = self.parts()
        if isinstance(parts, VAEParts):
            return PluginELBO(
                beta=float(parts.beta), m=m, reconstruction=parts.reconstruction, scale=float(parts.scale)
            )
        return PluginLoss(m=m, shape=tuple(parts.noise_shape))

    def describe(self) -> dict[str, Any]:
        parts = self.parts()
        if isinstance(parts, VAEParts):
            return {"latent_dim": int(parts.latent_dim), "supervised": False}
        return {"latent_dim": int(parts.latent_dim if parts.encode is not None else 0), "supervised": parts.supervised}


def _excluded_roots() -> list[Path]:
    """Where code that is not the user's lives: the standard library, site-packages, proponent itself."""
    paths = sysconfig.get_paths()
    roots = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    roots.update(site.getsitepackages())
    roots.add(site.getusersitepackages())
    roots.add(str(Path(__file__).resolve().parents[1]))  # the proponent package
    return [Path(r).resolve() for r in roots if r]


def _is_user_file(path: Path, excluded: list[Path]) -> bool:
    if path.suffix != ".py" or not path.is_file():
        return False
    parts = set(path.parts)
    if "site-packages" in parts or "dist-packages" in parts:
        return False
    return not any(path.is_relative_to(root) for root in excluded)


def _imported_names(path: Path, package: str) -> set[str]:
    """Module names ``path`` imports (statically: every import statement, also inside functions)."""

    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                if not package:
                    continue
                try:
                    base = importlib.util.resolve_name("." * node.level + base, package)
                except ImportError:
                    continue
            if base:
                names.add(base)
                names.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return names


def _origin(name: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(name)
    except Exception:  # noqa: BLE001 -- a name that is not a module (from x import function), or a broken one
        return None
    if spec is None or not spec.origin or spec.origin in ("built-in", "frozen"):
        return None
    return Path(spec.origin).resolve()


def code_files(path: Path, code_dir: Path | None = None, loaded: set[str] | None = None) -> list[Path]:
    """The model's code: ``path``, every module it imports (transitively, statically) from outside the
    standard library and site-packages, those imported while it was loaded (``loaded``: module
    names), and every .py file under ``code_dir``."""
    excluded = _excluded_roots()
    found: dict[Path, str] = {path.resolve(): ""}
    todo = [(path.resolve(), "")]
    for name in sorted(loaded or ()):
        mod = sys.modules.get(name)
        f = getattr(mod, "__file__", None)
        if f and _is_user_file(Path(f).resolve(), excluded) and Path(f).resolve() not in found:
            found[Path(f).resolve()] = getattr(mod, "__package__", "") or ""
            todo.append((Path(f).resolve(), found[Path(f).resolve()]))
    while todo:
        f, package = todo.pop()
        for name in sorted(_imported_names(f, package)):
            origin = _origin(name)
            if origin is not None and origin not in found and _is_user_file(origin, excluded):
                pkg = name if origin.name == "__init__.py" else name.rpartition(".")[0]
                found[origin] = pkg
                todo.append((origin, pkg))
    files = set(found)
    if code_dir is not None:
        files.update(
            p.resolve()
            for p in code_dir.rglob("*.py")
            if not any(part.startswith(".") or part == "__pycache__" for part in p.relative_to(code_dir).parts)
        )
    return [path.resolve()] + sorted(files - {path.resolve()})


def _sys_path_with(directory: Path) -> None:
    """The plugin's own directory on the import path (its sibling modules import without PYTHONPATH)."""
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))


def load_plugin(record: PluginRecord) -> Plugin:
    """Import the recorded code (once per process), refusing it when any of its files changed."""
    path = _code_file(record.code)
    sha = file_sha256(path)
    if sha != record.sha256:
        raise PluginError(
            f"model code {path}: its sha256 {sha[:12]}… differs from the index's {record.sha256[:12]}… (the file "
            "changed since the index was built); restore it, or rebuild the index with the new code"
        )
    problems = code_problems(record)
    if problems:
        raise PluginError(problems[0])
    key = (str(path), record.factory, sha + "".join(f.sha256 for f in record.files))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
        _sys_path_with(path.parent)
        if record.code_dir:
            _sys_path_with(Path(record.code_dir))
        module = _import_file(path, f"proponent_user_model_{sha[:12]}")
        plugin = Plugin(record, module)
        _CACHE[key] = plugin
        return plugin


def _import_file(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"model code {path}: cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise PluginError(f"model code {path}: importing it failed ({_one_line(e)})") from None
    return module


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first[:300]}" if first else type(e).__name__


def plugin_record(spec: str, *, checkpoint_key: str | None = None, code_dir: str | None = None) -> ModelRecord:
    """The manifest's record of ``--model-code spec``; imports the code (running it) to check the contract,
    and hashes every file of the model's code (:func:`code_files`)."""
    code, factory = _parse(spec)
    path = _code_file(code)
    cdir = Path(code_dir).expanduser().resolve() if code_dir else None
    if cdir is not None and not cdir.is_dir():
        raise PluginError(f"--model-code-dir {code_dir}: not a directory")
    rec = PluginRecord(
        code=str(path), factory=factory, sha256=file_sha256(path), code_dir=None if cdir is None else str(cdir)
    )
    before = set(sys.modules)
    plugin = load_plugin(rec)
    info = plugin.describe()
    loaded = set(sys.modules) - before
    files = [FileRecord(path=str(f), sha256=file_sha256(f)) for f in code_files(path, cdir, loaded)]
    return ModelRecord(
        kind="plugin",
        plugin=rec.model_copy(update={"files": files}),
        checkpoint_key=checkpoint_key,
        latent_dim=info["latent_dim"],
        supervised=info["supervised"],
    )


__all__ = [
    "LossParts",
    "Plugin",
    "PluginELBO",
    "PluginError",
    "PluginLoss",
    "PluginModule",
    "VAEParts",
    "code_files",
    "load_plugin",
    "plugin_record",
]
