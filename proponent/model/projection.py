"""Layers of a model, which of them to featurize, and their seeded random projections.

Each parameterised layer contributes one block to the feature vector:

* ``nn.Linear`` / ``nn.Conv2d``: the per-sample gradient is the matrix
  ``G = [∂W | ∂b]`` of shape ``[out, in(+1)]`` (a conv weight flattened to
  ``[out, in·kh·kw]``, the bias as one more input column). Its block is
  ``vec(P_outᵀ G P_in)`` with seeded Gaussian ``P_in [in, k_in]`` and
  ``P_out [out, k_out]`` whose entries are N(0, 1/k): this equals projecting
  ``vec(G)`` with the Kronecker product ``P_in ⊗ P_out`` and keeps inner products
  unbiased (``E[P Pᵀ] = I`` on each side, and the sides are independent).
  A side whose dimension is at most ``k`` is not projected (identity): exact and
  no larger than the projection would be.
* ``nn.ConvTranspose2d`` (groups = 1): the weight ``[C_in, C_out, kh, kw]`` is taken
  as it is stored, ``G = ∂W`` of shape ``[C_in, C_out·kh·kw]`` -- the layout in which
  ``G = Σ_t x_t u_tᵀ`` (``x_t`` the layer input at position t, ``u_t`` the unfolded
  output gradient around it), so the Kronecker path applies with the roles of
  input and output swapped. The bias is per *output* channel and aligns with
  neither side of G, so it is its own block after the weight's: the vector
  ``∂b [C_out]`` times a seeded ``P_bias [C_out, k]`` (identity when ``C_out <= k``),
  i.e. the ``[1, C_out]`` matrix projected like any other.
* any other parameterised module: its flattened gradient (all its parameters,
  in ``named_parameters`` order) times a seeded Gaussian ``[numel, k·k]``.

With ``kind="none"`` every side is the identity: features are the exact
gradients (reordered into the layout above).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
from torch import nn

from proponent.format.whiten import square_shape
from proponent.model.sketch import Sketch, TensorSketch, allocate_tensor

LayerKind = Literal["linear", "conv2d", "convt2d", "other"]


@dataclass
class LayerInfo:
    name: str  # module name in the model
    kind: LayerKind
    params: list[str]  # full parameter names, weight first
    in_dim: int  # columns of G (bias column included, except for convt2d); numel for "other"
    out_dim: int  # rows of G; 1 for "other"
    has_bias: bool
    bias_dim: int = 0  # length of a separate bias block (convt2d: C_out); 0 when none

    @property
    def bias_column(self) -> bool:
        """Whether the bias is the last column of G (Linear, Conv2d) rather than its own block."""
        return self.has_bias and self.bias_dim == 0


def discover_layers(model: nn.Module) -> list[LayerInfo]:
    """Parameterised modules in registration (= forward, for our models) order."""
    layers: list[LayerInfo] = []
    for mname, mod in model.named_modules():
        own = [(n, p) for n, p in mod.named_parameters(recurse=False)]
        if not own:
            continue
        full = [f"{mname}.{n}" if mname else n for n, _ in own]
        if isinstance(mod, nn.Linear):
            bias = mod.bias is not None
            layers.append(LayerInfo(mname, "linear", full, mod.in_features + bias, mod.out_features, bias))
        elif isinstance(mod, nn.Conv2d) and mod.groups == 1:
            bias = mod.bias is not None
            k = mod.in_channels * math.prod(mod.kernel_size)
            layers.append(LayerInfo(mname, "conv2d", full, k + bias, mod.out_channels, bias))
        elif isinstance(mod, nn.ConvTranspose2d) and mod.groups == 1:
            bias = mod.bias is not None
            k = mod.out_channels * math.prod(mod.kernel_size)
            layers.append(LayerInfo(mname, "convt2d", full, k, mod.in_channels, bias, mod.out_channels if bias else 0))
        else:
            numel = sum(p.numel() for _, p in own)
            layers.append(LayerInfo(mname, "other", full, numel, 1, False))
    return layers


def select_layers(layers: list[LayerInfo], selection: str = "all") -> list[LayerInfo]:
    """``all``, ``encoder``, ``decoder``, ``last:K`` or comma-separated module-name prefixes."""
    sel = selection.strip()
    if sel == "all":
        chosen = layers
    elif sel in ("encoder", "decoder"):
        chosen = [l for l in layers if l.name == sel or l.name.startswith(sel + ".")]
    elif sel.startswith("last:"):
        try:
            k = int(sel.split(":", 1)[1])
        except ValueError:
            raise ValueError(f"layer selection {selection!r}: last:K needs an integer K") from None
        if k < 1:
            raise ValueError(f"layer selection {selection!r}: K must be >= 1")
        chosen = layers[-k:]
    else:
        prefixes = [p.strip() for p in sel.split(",") if p.strip()]
        chosen = [l for l in layers if any(l.name == p or l.name.startswith(p + ".") for p in prefixes)]
    if not chosen:
        names = ", ".join(l.name for l in layers)
        raise ValueError(f"layer selection {selection!r} matches no parameterised layer (layers: {names})")
    return chosen


_MAX_EXACT_BIAS = 256  # a separate bias block (ConvTranspose2d) is kept exact up to this many channels
DEFAULT_KIND: Literal["tensor", "kron", "none"] = "tensor"
DEFAULT_DIM = 7996  # with int8 storage: 7,996 + a 4-byte scale = 8,000 bytes per sample and checkpoint


@dataclass
class ProjectionSpec:
    """The feature layout (README "Feature layout"; chosen in benchmarks/projection_fidelity.py).

    * ``tensor`` (the default): every layer's gradient ``G = Σ_t δ_t a_tᵀ`` gets its own tensor sketch
      (a CountSketch of vec(G) computed from the factors by FFT, :class:`~proponent.model.sketch.TensorSketch`)
      of ``layer_dims[l]`` dimensions, allocated in proportion to the layer's gradient energy
      (measured by the index job on a calibration sample) so that the ``dim`` dimensions in all
      have the error of one Gaussian sketch of the whole gradient;
    * ``kron``: ``P_outᵀ G P_in`` with ``k`` per side (the first version's default, k = 64);
    * ``none``: the exact gradients;

    then optionally a second-stage ``sketch`` (srht | sparse | gaussian) of the concatenated vector
    down to ``sketch_dim``.
    """

    kind: Literal["tensor", "kron", "none"] = DEFAULT_KIND
    k: int = 64  # kron: per side for Linear/Conv2d; k*k for other layers
    seed: int = 0
    sketch: str | None = None  # second stage (proponent.model.sketch kinds), None = none
    sketch_dim: int | None = None
    dim: int = DEFAULT_DIM  # tensor: the total dimension the layers share
    layer_dims: tuple[int, ...] | None = None  # tensor: per layer (None: the index job calibrates them)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def uncalibrated_layer_dims(layers: list[LayerInfo], dim: int) -> tuple[int, ...]:
    """Per-layer tensor-sketch dimensions without gradients to measure: in proportion to each
    layer's parameter count (capped at its exact size). The index job measures the layers' gradient
    energy instead (:func:`proponent.indexer.job.calibrate_layer_dims`), which is what the fidelity
    figures are for; this prior serves library callers that build a projector directly."""
    exact = [info.in_dim * info.out_dim for info in layers]
    return tuple(int(d) for d in allocate_tensor([float(e) for e in exact], dim, exact))


def _seed_for(seed: int, layer: str, side: str) -> int:
    h = hashlib.sha256(f"{seed}/{layer}/{side}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _gaussian(rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(rows, cols, generator=g, dtype=torch.float32) / math.sqrt(cols)


@dataclass
class LayerBlock:
    info: LayerInfo
    k_in: int
    k_out: int
    offset: int
    p_in: torch.Tensor | None  # None = identity
    p_out: torch.Tensor | None
    k_bias: int = 0  # width of the separate bias block (convt2d), after the weight's k_out·k_in
    p_bias: torch.Tensor | None = None  # [bias_dim, k_bias]; None = identity
    tensor: Any = None  # a TensorSketch of vec(G) (layout "tensor": then k_in = its dim, k_out = 1)
    # index-time whitening (``proponent index --whiten``): ``(L [out, out], R [in, in])``, G -> L G Rᵀ before the
    # projection (the bias column included in R; a diagonal factor held as its diagonal [n]); None = none
    whiten: tuple[torch.Tensor, torch.Tensor] | None = None
    # a separate bias block's factor ``B [bias, bias]`` (a diagonal one as its diagonal): g_b -> B g_b; None = none
    whiten_b: torch.Tensor | None = None
    _whiten_cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def dim(self) -> int:
        return self.k_in * self.k_out + self.k_bias

    def whitening(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(L, R)`` in ``dtype`` on ``device`` (cached), None when the layer is not whitened."""
        if self.whiten is None:
            return None
        key = (dtype, device)
        if key not in self._whiten_cache:
            left, right = self.whiten
            self._whiten_cache[key] = (
                left.to(device=device, dtype=dtype).contiguous(),
                right.to(device=device, dtype=dtype).contiguous(),
            )
        return self._whiten_cache[key]

    def whiten_matrix(self, g: torch.Tensor) -> torch.Tensor:
        """``G [B, out, in] -> L G Rᵀ`` (unchanged when the layer is not whitened)."""
        w = self.whitening(g.dtype, g.device)
        if w is None:
            return g
        left, right = w
        g = g * left[:, None] if left.dim() == 1 else torch.matmul(left, g)
        return g * right if right.dim() == 1 else torch.matmul(g, right.T)

    def whiten_bias(self, gb: torch.Tensor) -> torch.Tensor:
        """A separate bias block's per-sample gradients ``[B, bias] -> B g_b`` as rows (unchanged when not whitened)."""
        if self.whiten_b is None:
            return gb
        key = ("bias", gb.dtype, gb.device)
        if key not in self._whiten_cache:
            self._whiten_cache[key] = self.whiten_b.to(device=gb.device, dtype=gb.dtype).contiguous()
        m = self._whiten_cache[key]
        return gb * m if m.dim() == 1 else torch.matmul(gb, m.T)

    def whiten_rows(self, a: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``a [.., in]`` (bias column included) and ``δ [.., out]`` -> ``(R a, L δ)`` as rows."""
        w = self.whitening(d.dtype, d.device)
        assert w is not None
        left, right = w
        a = a * right if right.dim() == 1 else torch.matmul(a, right.T)
        return a, (d * left if left.dim() == 1 else torch.matmul(d, left.T))


class Projector:
    """Seeded per-layer projections and the feature layout they define."""

    def __init__(self, layers: list[LayerInfo], spec: ProjectionSpec, device: torch.device | str = "cpu"):
        if spec.kind not in ("tensor", "kron", "none"):
            raise ValueError(f"projection kind must be tensor, kron or none, got {spec.kind!r}")
        if spec.k < 1:
            raise ValueError(f"projection k must be >= 1, got {spec.k}")
        if spec.kind == "tensor" and spec.layer_dims is None:
            spec = replace(spec, layer_dims=uncalibrated_layer_dims(layers, spec.dim))
        if spec.kind == "tensor" and len(spec.layer_dims or ()) != len(layers):
            raise ValueError(
                f"projection 'tensor' needs one dimension per layer ({len(layers)}), got {spec.layer_dims}"
            )
        self.spec = spec
        self.device = torch.device(device)
        self.blocks: list[LayerBlock] = []
        offset = 0
        for li, info in enumerate(layers):
            tensor = None
            if spec.kind == "tensor":
                assert spec.layer_dims is not None
                d = int(spec.layer_dims[li])
                exact = info.in_dim * info.out_dim
                if d < 1:
                    raise ValueError(f"layer {info.name}: tensor sketch dimension must be >= 1, got {d}")
                if d >= exact:  # as small as the sketch: exact
                    k_in, k_out, p_in, p_out = info.in_dim, info.out_dim, None, None
                elif info.kind == "other":
                    k_in, k_out = d, 1
                    p_in, p_out = _gaussian(info.in_dim, d, _seed_for(spec.seed, info.name, "flat")), None
                else:
                    k_in, k_out, p_in, p_out = d, 1, None, None
                    tensor = TensorSketch(info.in_dim, info.out_dim, d, spec.seed, info.name)
            elif spec.kind == "none":
                k_in, k_out, p_in, p_out = info.in_dim, info.out_dim, None, None
            elif info.kind == "other":
                k_in, k_out = min(info.in_dim, spec.k * spec.k), 1
                p_in = (
                    None
                    if k_in == info.in_dim
                    else _gaussian(info.in_dim, k_in, _seed_for(spec.seed, info.name, "flat"))
                )
                p_out = None
            else:
                k_in, k_out = min(info.in_dim, spec.k), min(info.out_dim, spec.k)
                p_in = (
                    None if k_in == info.in_dim else _gaussian(info.in_dim, k_in, _seed_for(spec.seed, info.name, "in"))
                )
                p_out = (
                    None
                    if k_out == info.out_dim
                    else _gaussian(info.out_dim, k_out, _seed_for(spec.seed, info.name, "out"))
                )
            k_bias, p_bias = info.bias_dim, None
            bias_k = spec.k if spec.kind == "kron" else _MAX_EXACT_BIAS
            if info.bias_dim and spec.kind != "none" and info.bias_dim > bias_k:
                k_bias = bias_k
                p_bias = _gaussian(info.bias_dim, k_bias, _seed_for(spec.seed, info.name, "bias"))
            p_in = None if p_in is None else p_in.to(self.device)
            p_out = None if p_out is None else p_out.to(self.device)
            p_bias = None if p_bias is None else p_bias.to(self.device)
            block = LayerBlock(info, k_in, k_out, offset, p_in, p_out, k_bias, p_bias, tensor)
            self.blocks.append(block)
            offset += block.dim
        self.stage1_dim = offset
        self.sketch: Any = None
        if spec.sketch:
            if not spec.sketch_dim or spec.sketch_dim < 1:
                raise ValueError(f"sketch {spec.sketch!r} needs sketch_dim >= 1, got {spec.sketch_dim}")

            self.sketch = Sketch(
                offset, spec.sketch_dim, spec.sketch, _seed_for(spec.seed, "", "sketch"), device=self.device
            )
        self.dim = int(spec.sketch_dim or 0) if self.sketch is not None else offset

    @property
    def whitened(self) -> bool:
        return any(b.whiten is not None for b in self.blocks)

    def set_whitening(self, mats: Sequence[tuple[Any, ...]] | None) -> None:
        """Whiten every layer's gradient ``G -> L G Rᵀ`` before its projection (``mats``: one ``(L, R)`` per
        block, or ``(L, R, B)`` with ``B`` the factor of a separate bias block (ConvTranspose2d: ``g_b -> B g_b``),
        arrays or tensors, taken as float64, a 1-D one as a diagonal; None removes it). nn.Linear, nn.Conv2d and
        nn.ConvTranspose2d blocks: their per-sample weight gradient stays a sum of rank-one ``(L δ)(R a)ᵀ``; a
        block of another kind (``G [1, numel]``, made by the dense fallback) is whitened by diagonal factors only."""
        if mats is None:
            for b in self.blocks:
                b.whiten = b.whiten_b = None
                b._whiten_cache.clear()
            return
        if len(mats) != len(self.blocks):
            raise ValueError(f"whitening has {len(mats)} layers, the projection {len(self.blocks)}")
        for b, m in zip(self.blocks, mats, strict=True):
            left, right, bias = m[0], m[1], (m[2] if len(m) > 2 else None)
            left, right = _diagonal_or_matrix(left), _diagonal_or_matrix(right)
            if b.info.kind == "other" and (left.dim() != 1 or right.dim() != 1):
                raise ValueError(f"layer {b.info.name} ({b.info.kind}): only diagonal whitening applies to it")
            nb = b.info.bias_dim
            want = ((b.info.out_dim, b.info.out_dim), (b.info.in_dim, b.info.in_dim), (nb, nb) if nb else None)
            got = (square_shape(left), square_shape(right), None if bias is None else square_shape(bias))
            if got != want:
                raise ValueError(
                    f"layer {b.info.name}: whitening shapes {', '.join(map(str, got))}; expected "
                    f"{', '.join(map(str, want))}"
                )
            b.whiten = (left, right)  # a diagonal one (adam's) as a vector
            b.whiten_b = None if bias is None else _diagonal_or_matrix(bias)
            b._whiten_cache.clear()

    def finish(self, stage1: torch.Tensor) -> torch.Tensor:
        """First-stage features ``[B, stage1_dim]`` -> stored features ``[B, dim]``."""
        if self.sketch is None:
            return stage1
        return self.sketch.apply(stage1)

    @property
    def param_names(self) -> list[str]:
        return [p for b in self.blocks for p in b.info.params]

    def project_matrix(self, block: LayerBlock, g: torch.Tensor) -> torch.Tensor:
        """``[B, out, in] -> [B, k_out * k_in]`` (``P_outᵀ G P_in``, or the layer's tensor sketch of ``G``)."""
        if block.tensor is not None:
            return block.tensor.apply_matrix(g).to(g.dtype)
        if block.p_in is not None:
            g = g @ block.p_in
        if block.p_out is not None:
            g = block.p_out.T @ g
        return g.reshape(g.shape[0], -1)

    def project_bias(self, block: LayerBlock, gb: torch.Tensor) -> torch.Tensor:
        """A separate bias block: ``[B, bias_dim] -> [B, k_bias]``."""
        return gb if block.p_bias is None else gb @ block.p_bias

    def gradient_matrix(self, block: LayerBlock, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per-sample parameter gradients of one layer as the matrix ``G`` ``[B, out, in]``
        (for convt2d the weight only: see :meth:`bias_gradient`)."""
        info = block.info
        first = grads[info.params[0]]
        b = first.shape[0]
        if info.kind == "other":
            return torch.cat([grads[p].reshape(b, -1) for p in info.params], dim=1).unsqueeze(1)
        w = first.reshape(b, info.out_dim, -1)  # convt2d: [C_in, C_out, kh, kw] -> [C_in, C_out·kh·kw]
        if info.bias_column:
            w = torch.cat([w, grads[info.params[1]].reshape(b, info.out_dim, 1)], dim=2)
        return w

    def bias_gradient(self, block: LayerBlock, grads: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The per-sample gradient ``[B, bias_dim]`` of a separate bias block, None if the layer has none."""
        if not block.info.bias_dim:
            return None
        g = grads[block.info.params[1]]
        return g.reshape(g.shape[0], -1)

    def project_block(self, block: LayerBlock, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """One layer's feature block ``[B, block.dim]`` from materialised per-sample gradients."""
        f = self.project_matrix(block, block.whiten_matrix(self.gradient_matrix(block, grads)))
        gb = self.bias_gradient(block, grads)
        if gb is None:
            return f
        return torch.cat([f, self.project_bias(block, block.whiten_bias(gb.to(f.dtype)))], dim=1)

    def project_gradients(self, grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """Project materialised per-sample gradients ``{param: [B, *shape]}`` to ``[B, dim]``."""
        return torch.cat([self.project_block(bl, grads) for bl in self.blocks], dim=1)

    def manifest(self, selection: str = "all") -> dict[str, Any]:
        """The projection record of the index manifest (``proponent.format.manifest.ProjectionRecord``)."""
        return {
            "kind": self.spec.kind,
            "k": self.spec.k,
            "seed": self.spec.seed,
            "selection": selection,
            "stage1_dim": self.stage1_dim,
            "dim": self.dim,
            "sketch": None if self.sketch is None else _sketch_record(self.sketch.to_dict()),
            "layers": [
                {
                    "name": b.info.name,
                    "kind": b.info.kind,
                    "params": b.info.params,
                    "in_dim": b.info.in_dim,
                    "out_dim": b.info.out_dim,
                    "k_in": b.k_in,
                    "k_out": b.k_out,
                    "offset": b.offset,
                    "projected_in": b.p_in is not None or b.tensor is not None,
                    "projected_out": b.p_out is not None or b.tensor is not None,
                    "tensor": b.tensor is not None,
                    "bias_dim": b.info.bias_dim,  # a separate bias block (ConvTranspose2d), 0 when none
                    "k_bias": b.k_bias,
                    "projected_bias": b.p_bias is not None,
                }
                for b in self.blocks
            ],
        }


def _diagonal_or_matrix(m: Any) -> torch.Tensor:
    """float64 ``m``, or its diagonal when it is diagonal (applied as an elementwise product: the same numbers); a
    1-D ``m`` is a diagonal already."""
    m = torch.as_tensor(m, dtype=torch.float64)
    if m.dim() == 1:
        return m
    d = torch.diagonal(m)
    return d.clone() if torch.equal(m, torch.diag(d)) else m


def build_projector(
    model: nn.Module, selection: str, spec: ProjectionSpec, device: torch.device | str = "cpu"
) -> Projector:
    return Projector(select_layers(discover_layers(model), selection), spec, device)


def _sketch_record(d: dict[str, Any]) -> dict[str, Any]:
    keys = ("kind", "in_dim", "out_dim", "seed")
    return {**{k: d[k] for k in keys}, "params": {k: v for k, v in d.items() if k not in keys}}


def spec_from_record(record: Any) -> ProjectionSpec:
    """The :class:`ProjectionSpec` that rebuilds a manifest's projection record."""
    sk = record.sketch
    dims = tuple(int(l.k_in * l.k_out) for l in record.layers) if record.kind == "tensor" else None
    return ProjectionSpec(
        kind=record.kind,
        k=record.k,
        seed=record.seed,
        sketch=None if sk is None else sk.kind,
        sketch_dim=None if sk is None else sk.out_dim,
        dim=int(record.stage1_dim) if record.kind == "tensor" else DEFAULT_DIM,
        layer_dims=dims,
    )
