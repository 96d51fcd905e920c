"""The fast path: Kronecker-factored per-sample gradients from one batched pass.

For an ``nn.Linear`` / ``nn.Conv2d`` layer the per-sample gradient is
``G_i = Σ_t δ_t a_tᵀ`` where ``a_t`` are the layer inputs (for a convolution the
unfolded patches, plus a constant 1 for the bias) and ``δ_t`` the gradients of the
summed loss w.r.t. the layer outputs; ``t`` runs over the rows of sample i (one
row for an encoder layer, m draws for a decoder layer, sample-major) and, for a
convolution, over the output positions.

An ``nn.ConvTranspose2d`` ``y = conv_transpose2d(x, W)`` is the adjoint of the
Conv2d with the same weight, so its weight gradient is a Conv2d weight gradient
with the roles swapped: conv input = ``δ`` (channels C_out), conv output gradient
= ``x`` (channels C_in), same stride, padding and dilation (``x`` zero-padded at the
bottom/right when an output padding makes that conv's output larger). Everything
below then runs on that Conv2d view: ``G = Σ_t x_t u_tᵀ`` ``[C_in, C_out·kh·kw]``,
with ``u_t`` the unfolded ``δ``. The bias (per output channel, ``Σ_t δ_t``) is a
separate small block (see :mod:`proponent.model.projection`). Forward hooks record ``a``; one
``torch.autograd.grad`` of ``objective.loss(...).sum()`` w.r.t. the recorded
layer outputs gives every ``δ`` at once (parameters' ``.grad`` are never touched
and no batch-summed weight gradient is computed).

Each layer then takes the cheaper of two exact routes, chosen from its shapes:

* **factor route** (few rows per sample, e.g. MLP layers): project first,
  ``ã = a P_in``, ``δ̃ = δ P_out`` (one big matmul each), then one batched
  ``δ̃ᵀ ã`` per layer gives ``P_outᵀ G_i P_in``; the exact ``||G_i||²`` comes from
  the Gram identity ``Σ_{t,s} (δ_t·δ_s)(a_t·a_s)`` (two small batched Grams).
  ``G_i`` is never formed.
* **matrix route** (many rows per sample, e.g. convolutions over all positions):
  form the small per-sample ``G_i [out, in]`` directly -- for a convolution with
  one grouped ``convolution_backward`` (groups = samples), no unfold -- then take
  its norm and project it. It costs what the weight gradient of a training step
  costs.

Other parameterised layers (and grouped convolutions) fall back to the dense
torch.func path for just their parameters; :meth:`KroneckerFeaturizer.layer_routes`
says which layer took which path. The feature layout is the projector's, identical to
:class:`~proponent.model.featurizers.dense.DenseFeaturizer`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from proponent.model.featurizers.base import FeatureBatch, Featurizer, per_draw_rows
from proponent.model.featurizers.dense import DenseFeaturizer
from proponent.model.objectives import Objective
from proponent.model.projection import LayerBlock, Projector

# Largest per-sample row count for which the Gram route is considered at all.
_MAX_GRAM_ROWS = 2048
# Bound (bytes) on the per-sample G matrices materialised at once in the matrix route.
_MAT_CHUNK_BYTES = 64 << 20


def _per_sample_loop(device: torch.device, rows_per_sample: int) -> bool:
    """Conv matrix route: one ordinary weight gradient per sample (a Python loop over samples) rather
    than one grouped call with a group per row. On CPU with several rows per sample (decoder layers,
    m draws) the loop measured 2-10x less CPU time on the authors' decoder layers (m = 16, one
    thread); on CUDA the single grouped call is kept (one launch instead of one per sample)."""
    return device.type == "cpu" and rows_per_sample > 1


@dataclass
class _Calls:
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)


_FAST_KINDS = ("linear", "conv2d", "convt2d")


class _Layer:
    """A Linear/Conv2d/ConvTranspose2d block: its module and projection matrices cast per dtype."""

    def __init__(self, block: LayerBlock, module: nn.Module):
        self.block = block
        self.module = module
        self.info = block.info
        self.bias = block.info.bias_column  # the bias is the last column of G
        self.bias_sep = block.info.bias_dim > 0  # the bias is its own block (ConvTranspose2d)
        self.in_nb = block.info.in_dim - int(self.bias)  # input columns without the bias column
        self.out = block.info.out_dim
        self.is_convt = block.info.kind == "convt2d"
        self.is_conv = block.info.kind in ("conv2d", "convt2d")
        self._mats: dict[Any, tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]] = {}
        self._pbias: dict[Any, torch.Tensor | None] = {}

    def mats(self, dtype: torch.dtype, device: torch.device):
        """``(P_in without the bias row, P_in's bias row, P_out)``, each None when identity."""
        key = (dtype, device)
        if key not in self._mats:
            b = self.block
            p_w = p_b = p_out = None
            if b.p_in is not None:
                p_in = b.p_in.to(device=device, dtype=dtype)
                p_w = p_in[: self.in_nb].contiguous()
                p_b = p_in[self.in_nb].contiguous() if self.bias else None
            if b.p_out is not None:
                p_out = b.p_out.to(device=device, dtype=dtype).contiguous()
            self._mats[key] = (p_w, p_b, p_out)
        return self._mats[key]

    def bias_mat(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
        """``P_bias`` of a separate bias block, None when identity."""
        key = (dtype, device)
        if key not in self._pbias:
            p = self.block.p_bias
            self._pbias[key] = None if p is None else p.to(device=device, dtype=dtype).contiguous()
        return self._pbias[key]

    def convt_grad_hw(self, d: torch.Tensor) -> tuple[int, int]:
        """ConvTranspose2d: spatial size of the swapped Conv2d's output (conv of ``δ``), >= the input's."""
        mod = self.module
        assert isinstance(mod, nn.ConvTranspose2d)
        h, w = d.shape[-2:]
        k, s, p, dil = mod.kernel_size, mod.stride, mod.padding, mod.dilation
        return (
            (h + 2 * int(p[0]) - dil[0] * (k[0] - 1) - 1) // s[0] + 1,
            (w + 2 * int(p[1]) - dil[1] * (k[1] - 1) - 1) // s[1] + 1,
        )

    def conv_operands(self, a: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """``(conv input, conv output gradient, integer padding)`` of the Conv2d whose weight gradient
        is this layer's G: the layer's own for a Conv2d, the swapped one for a ConvTranspose2d."""
        if not self.is_convt:
            xp, pad = self.conv_geometry(a)
            return xp, d, pad
        mod = self.module
        assert isinstance(mod, nn.ConvTranspose2d)
        ho, wo = self.convt_grad_hw(d)
        h, w = a.shape[-2:]
        if (ho, wo) != (h, w):
            if ho < h or wo < w:
                raise ValueError(
                    f"layer {self.info.name!r}: ConvTranspose2d output {tuple(d.shape[-2:])} is too small for "
                    f"its input {(h, w)}"
                )
            a = F.pad(a, (0, wo - w, 0, ho - h))  # positions the input does not reach: zero
        return d, a, [int(p) for p in mod.padding]

    def conv_geometry(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Input padded explicitly where needed, and the integer padding left for the conv."""
        mod = self.module
        assert isinstance(mod, nn.Conv2d)
        if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
            mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
            if any(mod._reversed_padding_repeated_twice):
                x = F.pad(x, mod._reversed_padding_repeated_twice, mode=mode)
            return x, [0, 0]
        return x, [int(p) for p in mod.padding]  # type: ignore[union-attr]


class KroneckerFeaturizer(Featurizer):
    """Projected per-sample gradients and exact squared norms from one batched pass.

    ``chunk_size``: samples per forward/backward pass (None: the whole batch).
    ``route``: ``"auto"`` (per layer, by estimated cost), ``"factor"`` or ``"matrix"``
    (forced, for tests and benchmarks).
    """

    method = "kron"

    def __init__(
        self,
        model: nn.Module,
        objective: Objective,
        projector: Projector,
        chunk_size: int | None = None,
        route: str = "auto",
    ):
        super().__init__(model, objective, projector)
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size}")
        if route not in ("auto", "factor", "matrix"):
            raise ValueError(f"route must be auto, factor or matrix, got {route!r}")
        self.chunk_size = chunk_size
        self.route = route
        modules = dict(model.named_modules())
        self.layers: list[_Layer] = []
        other: list[LayerBlock] = []
        for block in projector.blocks:
            if block.info.kind in _FAST_KINDS:
                self.layers.append(_Layer(block, modules[block.info.name]))
            else:
                other.append(block)
        self.other_blocks = other
        self._dense: DenseFeaturizer | None = None
        if other:
            sub = copy.copy(projector)
            sub.blocks = other
            self._dense = DenseFeaturizer(model, objective, sub)
        self._fast_params = [p for lay in self.layers for p in lay.module.parameters(recurse=False)]
        # (layer, 0 = input / 1 = output) recorded tensors the model was seen to modify in place: copied
        self._safe: set[tuple[int, int]] = set()
        self._routes: dict[str, str] = {}  # layer name -> route taken in the last pass
        self.layer_sq: dict[str, torch.Tensor] = {}  # layer name -> exact squared norms of the last chunk [B]

    # ------------------------------------------------------------------ public

    def layer_routes(self) -> list[tuple[str, str]]:
        """``(layer name, path)`` for every layer of the projector, in feature order.

        ``path`` is ``"kronecker (factor route)"`` / ``"kronecker (matrix route)"`` (or
        ``"tensor sketch (… route)"`` for a layer the tensor layout sketches) for a layer on
        the fast path (the route taken in the most recent pass; the auto route is chosen from
        the layer's shapes, so it is the same for every batch of one dataset),
        ``"kronecker (route not chosen yet)"`` before the first pass or for a layer the last
        forward did not use, and ``"dense fallback"`` for a layer featurized by torch.func
        (any parameterised module other than Linear, Conv2d and ConvTranspose2d with groups=1).
        """
        fast = {lay.info.name for lay in self.layers}
        out = []
        for blk in self.projector.blocks:
            name = blk.info.name
            if name not in fast:
                out.append((name, "dense fallback"))
            else:
                what = "tensor sketch" if blk.tensor is not None else "kronecker"
                route = f"{self._routes[name]} route" if name in self._routes else "route not chosen yet"
                out.append((name, f"{what} ({route})"))
        return out

    def featurize(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, group: int = 1) -> FeatureBatch:
        """As :meth:`Featurizer.featurize`; with ``group = g > 1`` the rows come in consecutive groups
        of g and ``sq_norm [B / g]`` is the exact squared norm of each group's *summed* gradient
        (``features`` and ``loss`` stay per row): how :meth:`draw_features` gets the mean gradient's
        norm from the per-draw rows."""
        x, y, eps = x.to(self.device), y.to(self.device), eps.to(self.device)
        n = x.shape[0]
        if group < 1 or n % group:
            raise ValueError(f"{n} rows do not split into groups of {group}")
        step = n if self.chunk_size is None else max(group, self.chunk_size - self.chunk_size % group)
        if n == 0:
            return FeatureBatch(
                torch.empty(0, self.projector.stage1_dim, dtype=torch.float32, device=self.device),
                torch.empty(0, dtype=torch.float64, device=self.device),
                torch.empty(0, dtype=torch.float32, device=self.device),
            )
        if n <= step:
            return self._featurize_chunk(x, y, eps, group)
        feats = torch.empty(n, self.projector.stage1_dim, dtype=torch.float32, device=self.device)
        sq = torch.empty(n // group, dtype=torch.float64, device=self.device)
        losses = torch.empty(n, dtype=torch.float32, device=self.device)
        for s in range(0, n, step):
            fb = self._featurize_chunk(x[s : s + step], y[s : s + step], eps[s : s + step], group)
            feats[s : s + step] = fb.features
            sq[s // group : (s + step) // group] = fb.sq_norm
            losses[s : s + step] = fb.loss
        return FeatureBatch(feats, sq, losses)

    def draw_features(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> tuple[FeatureBatch, torch.Tensor]:
        """One pass over each draw as a row of its own: the draws' features ``[B, m, D]``, their mean
        (the projection is linear, so that is the mean gradient's projection) and the exact norm of
        the mean gradient from the draws' cross terms (``featurize(..., group=m)``). The same answer
        as the base class's two passes up to float32 rounding, for about half the work."""
        b, m = eps.shape[:2]
        if m == 1:
            fb = self.features(x, y, eps)
            return fb, fb.features.reshape(b, 1, -1)
        xr, yr, er = per_draw_rows(x, y, eps)
        fb = self.featurize(xr, yr, er, group=m)
        per = self.projector.finish(fb.features).reshape(b, m, -1)
        return FeatureBatch(per.mean(dim=1), fb.sq_norm / (m * m), fb.loss.reshape(b, m).mean(dim=1)), per

    # ----------------------------------------------------------------- private

    def _capture(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor):
        """One hooked forward and one backward: per-layer (inputs, output grads), losses.

        If the model modifies a recorded layer input or output in place (e.g.
        ``nn.ReLU(inplace=True)`` right after a Linear), the recorded tensors would no
        longer be the layer's; that is detected from version counters and the pass is
        redone with the hooks keeping copies of just those tensors (and from then on
        always): an output is copied by letting the model continue on a clone.
        """
        calls, grads, loss, dirty = self._capture_once(x, y, eps, self._safe)
        while dirty:
            if dirty <= self._safe:  # cannot happen; copying everything is always clean
                dirty = {(i, s) for i in range(len(self.layers)) for s in (0, 1)}
            self._safe |= dirty
            calls, grads, loss, dirty = self._capture_once(x, y, eps, self._safe)
        deltas: dict[int, list[torch.Tensor]] = {}
        pos = 0
        for i in calls:
            k = len(calls[i].outputs)
            deltas[i] = list(grads[pos : pos + k])
            pos += k
            calls[i].outputs.clear()
        return calls, deltas, loss.detach()

    def _capture_once(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, safe: set[tuple[int, int]]):
        """One pass; also returns the (layer, input/output) keys of uncopied recorded tensors that
        the model modified in place (empty: the pass is valid)."""
        calls: dict[int, _Calls] = {i: _Calls() for i in range(len(self.layers))}
        versions: list[tuple[torch.Tensor, int, tuple[int, int]]] = []
        handles = []

        def make_hook(i: int):
            def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor):
                a = args[0] if args else kwargs["input"]
                if (i, 0) in safe:
                    calls[i].inputs.append(a.detach().clone())
                else:
                    calls[i].inputs.append(a.detach())
                    versions.append((a, a._version, (i, 0)))
                calls[i].outputs.append(out)
                if (i, 1) in safe:
                    return out.clone()  # the model continues on a copy; `out` stays the layer's output
                versions.append((out, out._version, (i, 1)))
                return None

            return hook

        try:
            for i, lay in enumerate(self.layers):
                handles.append(lay.module.register_forward_hook(make_hook(i), with_kwargs=True))
            with torch.enable_grad():
                if not all(p.requires_grad for p in self._fast_params) and x.is_floating_point():
                    x = x.detach().requires_grad_(True)
                loss = self.objective.loss(self.model, x, y, eps)
                dirty = {key for t, v, key in versions if t._version != v}
                if dirty:
                    return calls, (), loss, dirty
                outs = [o for i in calls for o in calls[i].outputs]
                if outs:
                    grads = torch.autograd.grad(loss.sum(), outs, allow_unused=True, materialize_grads=True)
                else:
                    grads = ()
        finally:
            for h in handles:
                h.remove()
        return calls, grads, loss, set()

    def _featurize_chunk(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, group: int = 1) -> FeatureBatch:
        b = x.shape[0]
        if self.layers:
            calls, deltas, loss = self._capture(x, y, eps)
        else:  # only "other" layers: the dense path does all the work
            calls, deltas = {}, {}
            with torch.no_grad():
                loss = self.objective.loss(self.model, x, y, eps)
        feats = torch.empty(b, self.projector.stage1_dim, dtype=torch.float32, device=self.device)
        sq = torch.zeros(b // group, dtype=torch.float64, device=self.device)
        with torch.no_grad():
            for i, lay in enumerate(self.layers):
                ins, ds = calls[i].inputs, deltas[i]
                blk = lay.block
                if not ins:  # layer unused by this forward: zero gradient
                    feats[:, blk.offset : blk.offset + blk.dim] = 0
                    self._routes.pop(lay.info.name, None)
                    continue
                f, s = self._layer_features(lay, ins, ds, b, group)
                w = blk.k_in * blk.k_out
                feats[:, blk.offset : blk.offset + w] = f.reshape(b, -1)
                s = s.double()
                if lay.bias_sep:
                    fb, sb = self._separate_bias(lay, ds, b, group)
                    feats[:, blk.offset + w : blk.offset + blk.dim] = fb
                    s = s + sb.double()
                self.layer_sq[lay.info.name] = s
                sq += s
                ins.clear()
                ds.clear()
        if self._dense is not None:
            self._other_features(x, y, eps, feats, sq, group)
        return FeatureBatch(feats, sq, loss.float())

    def _separate_bias(
        self, lay: _Layer, ds: list[torch.Tensor], b: int, group: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A ConvTranspose2d bias: per-sample ``Σ_{rows, positions} δ`` ``[b, C_out]``, projected; its
        norm (per group of ``group`` samples, summed)."""
        gb = None
        for d in ds:
            if d.dtype in (torch.float16, torch.bfloat16):
                d = d.float()
            g = d.reshape(b, -1, d.shape[1], d[0, 0].numel()).sum(dim=(1, 3))
            gb = g if gb is None else gb + g
        assert gb is not None
        gb = lay.block.whiten_bias(gb)  # B g_b when the index is whitened
        p = lay.bias_mat(gb.dtype, gb.device)
        return (gb if p is None else gb @ p), _group_sum(gb, group).square().sum(1)

    def _other_features(
        self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor, feats: torch.Tensor, sq: torch.Tensor, group: int = 1
    ) -> None:
        """Dense torch.func fallback for the other layers, written at their offsets."""
        assert self._dense is not None
        grads, _ = self._dense.per_sample_gradients(x, y, eps)
        b = x.shape[0]
        with torch.no_grad():
            for blk in self.other_blocks:
                g = torch.cat([grads[p].reshape(b, -1) for p in blk.info.params], dim=1)
                g = blk.whiten_matrix(g.unsqueeze(1)).squeeze(1)  # a whitened index: its diagonal factors
                s = _group_sum(g.double(), group).pow(2).sum(dim=1)
                self.layer_sq[blk.info.name] = s
                sq += s
                if blk.p_in is not None:
                    g = g @ blk.p_in.to(device=g.device, dtype=g.dtype)
                feats[:, blk.offset : blk.offset + blk.dim] = g

    # ------------------------------------------------------------ per layer

    def _factors(self, lay: _Layer, a: torch.Tensor, d: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``a [b, T, in_nb]`` and ``δ [b, T, out]`` for one call (conv: patches via unfold; ConvTranspose2d:
        the swapped pair, unfolded ``δ`` and the input)."""
        if lay.is_conv:
            mod = lay.module
            assert isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d))
            inp, gout, pad = lay.conv_operands(a, d)
            # [R, in, L]
            u = F.unfold(inp, mod.kernel_size, dilation=mod.dilation, padding=tuple(pad), stride=mod.stride)
            a = u.transpose(1, 2).reshape(b, -1, lay.in_nb)
            d = gout.flatten(2).transpose(1, 2).reshape(b, -1, lay.out)
            return a, d
        return a.reshape(b, -1, lay.in_nb), d.reshape(b, -1, lay.out)

    def _rows_per_sample(self, lay: _Layer, a: torch.Tensor, d: torch.Tensor, b: int) -> int:
        if lay.is_conv and a.dim() != 4:
            raise ValueError(
                f"layer {lay.info.name!r}: {type(lay.module).__name__} input must be batched [N, C, H, W], "
                f"got {tuple(a.shape)}"
            )
        rows = a.shape[0] if lay.is_conv else a.numel() // max(lay.in_nb, 1)
        if rows % b:
            raise ValueError(
                f"layer {lay.info.name!r} saw {rows} rows for a batch of {b} samples; rows must be a multiple of "
                "the batch size and ordered sample-major"
            )
        if lay.is_convt:
            positions = math.prod(lay.convt_grad_hw(d))
        else:
            positions = d[0, 0].numel() if lay.is_conv else 1
        return rows // b * positions

    def _choose(self, lay: _Layer, t: int, n_calls: int) -> str:
        if self.route != "auto":
            return self.route
        blk = lay.block
        i, o = lay.info.in_dim, lay.out
        if blk.tensor is not None:  # sketch from the factors (2t FFTs) or from the materialised G
            if n_calls > 1 or t > _MAX_GRAM_ROWS:
                return "matrix"
            d = blk.k_in
            fft = 2 * (2 * t + 1) * d * max(1.0, math.log2(d))
            factor = t * (i + o) + fft + (0 if t == 1 else t * t * (i + o + 1)) + (2 * t * i if lay.is_conv else 0)
            matrix = t * i * o + 2 * i * o
            return "factor" if factor <= matrix else "matrix"
        if n_calls > 1 or (blk.p_in is None and blk.p_out is None) or t > _MAX_GRAM_ROWS:
            return "matrix"
        i, o = lay.info.in_dim, lay.out
        proj = t * (i * blk.k_in if blk.p_in is not None else 0) + t * (o * blk.k_out if blk.p_out is not None else 0)
        factor = proj + t * blk.k_in * blk.k_out + (0 if t == 1 else t * t * (i + o + 1))
        if lay.is_conv:
            factor += 2 * t * i  # unfold and transposes
        matrix = t * i * o + o * i * blk.k_in + o * blk.k_in * blk.k_out
        return "factor" if factor <= matrix else "matrix"

    def _layer_features(
        self, lay: _Layer, ins: list[torch.Tensor], ds: list[torch.Tensor], b: int, group: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if ds[0].dtype in (torch.float16, torch.bfloat16):  # Gram sums and norms need more precision
            ins = [a.float() for a in ins]
            ds = [d.float() for d in ds]
        t = self._rows_per_sample(lay, ins[0], ds[0], b)
        route = self._choose(lay, t, len(ins))
        if route == "factor" and len(ins) == 1:
            self._routes[lay.info.name] = "factor"
            a, d = self._factors(lay, ins[0], ds[0], b)
            if lay.block.whiten is None:
                return self._factor_route(lay, a, d, group, lay.bias)
            # whitened: every row's (δ, a) -> (L δ, R a); the bias column is mixed into R a, so it is no longer 1
            if lay.bias:
                a = torch.cat([a, a.new_ones(*a.shape[:2], 1)], dim=2)
            a, d = lay.block.whiten_rows(a, d)
            return self._factor_route(lay, a, d, group, False)
        self._routes[lay.info.name] = "matrix"
        return self._matrix_route(lay, ins, ds, b, group)

    def _factor_route(
        self, lay: _Layer, a: torch.Tensor, d: torch.Tensor, group: int, bias: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``bias``: ``a`` lacks the layer's constant-1 bias column (False also when a whitened ``a`` holds it)."""
        p_w, p_b, p_out = lay.mats(a.dtype, a.device)
        if lay.bias and not bias and p_w is not None:  # the bias column is one of a's columns: P_in whole
            assert p_b is not None
            p_w, p_b = torch.cat([p_w, p_b.unsqueeze(0)]), None
        b, t, _ = a.shape
        ts = lay.block.tensor
        if ts is not None:  # the tensor sketch of Σ_t δ_t a_tᵀ from the factors (the bias column included)
            feat = ts.apply_factors(a, d, bias=bias).to(a.dtype).reshape(b, 1, -1)
        elif p_w is not None:
            ap = torch.matmul(a, p_w)
            if p_b is not None:
                ap += p_b
        elif bias:
            ap = torch.cat([a, a.new_ones(b, t, 1)], dim=2)
        else:
            ap = a
        if ts is None:
            dp = torch.matmul(d, p_out) if p_out is not None else d
            feat = torch.bmm(dp.transpose(1, 2), ap)  # [b, k_out, k_in]
        if group > 1:  # a group's summed gradient: its rows' positions together
            return feat, _gram_sq(a.reshape(b // group, group * t, -1), d.reshape(b // group, group * t, -1), bias)
        if t == 1:
            na = a.reshape(b, -1).square().sum(1)
            if bias:
                na += 1
            s = d.reshape(b, -1).square().sum(1) * na
        else:
            ga = torch.bmm(a, a.transpose(1, 2))
            if bias:
                ga += 1
            gd = torch.bmm(d, d.transpose(1, 2))
            s = (ga * gd).sum(dim=(1, 2))
        return feat, s

    def _per_sample_matrix(self, lay: _Layer, a: torch.Tensor, d: torch.Tensor, b: int) -> torch.Tensor:
        """``G [b, out, in_dim]`` (bias column last, if it is one) for one call."""
        if lay.is_conv:
            mod = lay.module
            assert isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d))
            xp, d, pad = lay.conv_operands(a, d)  # ConvTranspose2d: δ as the input, the input as grad_output
            rows, c, h, w = xp.shape
            o, ho, wo = d.shape[1:]
            r = rows // b

            def weight_grad(gout: torch.Tensor, inp: torch.Tensor, groups: int) -> torch.Tensor:
                return torch.ops.aten.convolution_backward(
                    gout,
                    inp,
                    d.new_empty((gout.shape[1], inp.shape[1] // groups, *mod.kernel_size)),
                    None,
                    list(mod.stride),
                    pad,
                    list(mod.dilation),
                    False,
                    [0, 0],
                    groups,
                    [False, True, False],
                )[1]

            if _per_sample_loop(xp.device, r):
                # one ordinary weight gradient per sample over its r (contiguous) rows
                g = d.new_empty((b, o, lay.in_nb))
                for i in range(b):
                    g[i] = weight_grad(d[i * r : (i + 1) * r], xp[i * r : (i + 1) * r], 1).reshape(o, -1)
            else:
                # one group per row (no transposes): per-row weight gradients, then summed per sample
                gw = weight_grad(d.reshape(1, rows * o, ho, wo), xp.reshape(1, rows * c, h, w), rows)
                g = gw.reshape(b, r, o, lay.in_nb).sum(dim=1) if r > 1 else gw.reshape(b, o, lay.in_nb)
            if lay.bias:
                g = torch.cat([g, d.reshape(b, r, o, -1).sum(dim=(1, 3)).unsqueeze(2)], dim=2)
            return g
        a = a.reshape(b, -1, lay.in_nb)
        d = d.reshape(b, -1, lay.out)
        g = torch.bmm(d.transpose(1, 2), a)
        if lay.bias:
            g = torch.cat([g, d.sum(dim=1).unsqueeze(2)], dim=2)
        return g

    def _matrix_route(
        self, lay: _Layer, ins: list[torch.Tensor], ds: list[torch.Tensor], b: int, group: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        item = ds[0].element_size()
        per_row = max(a.shape[0] // b for a in ins) if lay.is_conv else 1
        if lay.is_conv and not _per_sample_loop(ds[0].device, per_row):
            per_row_g = per_row  # conv, grouped per row: per-row G before the sum
        else:
            per_row_g = 1
        step = max(1, min(b, _MAT_CHUNK_BYTES // max(1, per_row_g * lay.out * lay.info.in_dim * item)))
        step = max(group, step - step % group)  # whole groups
        p_w, p_b, p_out = lay.mats(ds[0].dtype, ds[0].device)
        blk = lay.block
        feat = ds[0].new_empty(b, blk.k_out, blk.k_in)
        sq = ds[0].new_empty(b // group)
        for s in range(0, b, step):
            e = min(b, s + step)
            g = None
            for a, d in zip(ins, ds, strict=True):
                if lay.is_conv:
                    r = a.shape[0] // b
                    a_s, d_s = a[s * r : e * r], d[s * r : e * r]
                else:
                    a_s = a.reshape(b, -1, lay.in_nb)[s:e]
                    d_s = d.reshape(b, -1, lay.out)[s:e]
                gi = self._per_sample_matrix(lay, a_s, d_s, e - s)
                g = gi if g is None else g + gi
            assert g is not None
            g = blk.whiten_matrix(g)  # L G Rᵀ when the index is whitened
            sq[s // group : e // group] = _group_sum(g.reshape(e - s, -1), group).square().sum(1)
            if blk.tensor is not None:
                feat[s:e] = blk.tensor.apply_matrix(g).to(feat.dtype).reshape(e - s, 1, -1)
                continue
            if p_w is not None:
                pw = g[:, :, : lay.in_nb] @ p_w
                if p_b is not None:
                    pw += g[:, :, lay.in_nb :] * p_b
                g = pw
            if p_out is not None:
                g = p_out.T @ g
            feat[s:e] = g
        return feat, sq

    # ----------------------------------------------------------- memory model

    def bytes_per_sample(self, x: torch.Tensor, y: torch.Tensor, eps: torch.Tensor) -> int:
        """Estimated peak bytes per sample of one pass, from probes on ``x[:2]`` and ``x[:4]``
        (inputs must hold at least 4 samples): tensors saved for backward, the captured
        layer inputs and output gradients, and the per-layer work buffers."""

        def probe(n: int) -> int:
            saved = 0

            def pack(t: torch.Tensor) -> torch.Tensor:
                nonlocal saved
                saved += t.numel() * t.element_size()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                calls, deltas, _ = self._capture(x[:n], y[:n], eps[:n])
            extra = 0
            for i, lay in enumerate(self.layers):
                for a, d in zip(calls[i].inputs, deltas[i], strict=True):
                    size = d.element_size()
                    extra += a.numel() * a.element_size() + d.numel() * size  # captured a and δ
                    t = self._rows_per_sample(lay, a, d, n)
                    if self._choose(lay, t, len(calls[i].inputs)) == "factor":
                        work = 2 * n * t * t + n * t * (lay.block.k_in + lay.block.k_out)
                        if lay.is_conv:
                            work += n * t * lay.info.in_dim
                    else:
                        work = 2 * n * lay.out * lay.info.in_dim + (a.numel() + d.numel() if lay.is_conv else 0)
                    extra += work * size
            return saved + extra

        b2, b4 = probe(2), probe(4)
        per = max((b4 - b2) / 2, b4 / 4)
        if self._dense is not None:
            numel = sum(p.numel() for blk in self.other_blocks for p in self._param_tensors(blk))
            per += 4 * numel * x.element_size()
        return int(math.ceil(per))

    def _param_tensors(self, blk: LayerBlock) -> list[torch.Tensor]:
        params = dict(self.model.named_parameters())
        return [params[p] for p in blk.info.params]


def _group_sum(v: torch.Tensor, group: int) -> torch.Tensor:
    """``[b, ...] -> [b / group, ...]``: the sum over each group of consecutive rows."""
    return v if group == 1 else v.reshape(v.shape[0] // group, group, *v.shape[1:]).sum(dim=1)


def _gram_sq(a: torch.Tensor, d: torch.Tensor, bias: bool) -> torch.Tensor:
    """``||Σ_t δ_t a_tᵀ||²`` per sample for ``a [n, T, in]``, ``δ [n, T, out]`` (a constant-1 bias column
    appended to ``a`` if ``bias``): the Gram identity ``Σ_{t,s} (δ_t·δ_s)(a_t·a_s)`` or the matrix
    itself, whichever costs less."""
    n, t, i = a.shape
    o = d.shape[2]
    if t <= _MAX_GRAM_ROWS and t * t * (i + o + 1) <= t * i * o:
        ga = torch.bmm(a, a.transpose(1, 2))
        if bias:
            ga += 1
        return (ga * torch.bmm(d, d.transpose(1, 2))).sum(dim=(1, 2))
    s = torch.bmm(d.transpose(1, 2), a).square().sum(dim=(1, 2))
    if bias:
        s += d.sum(dim=1).square().sum(dim=1)
    return s


def _probe_inputs(
    model: nn.Module, objective: Objective, device: torch.device, sample_shape: tuple[int, ...] | None, n: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if sample_shape is None:
        cfg = getattr(model, "config", None)
        if cfg is None or not hasattr(cfg, "input_shape"):
            raise ValueError("auto_batch_size: model has no config.input_shape; pass sample_shape")
        sample_shape = tuple(cfg.input_shape)
    dtype = next(model.parameters()).dtype
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.rand(n, *sample_shape, generator=g, dtype=dtype).to(device)
    y = torch.zeros(n, dtype=torch.long, device=device)
    eps = torch.randn(n, objective.m, *objective.noise_shape(model), generator=g, dtype=dtype).to(device)
    return x, y, eps


def auto_batch_size(
    model: nn.Module,
    objective: Objective,
    projector: Projector,
    device: torch.device | str | None = None,
    budget_bytes: int | None = None,
    sample_shape: tuple[int, ...] | None = None,
) -> int:
    """Samples per Kronecker pass that fit ``budget_bytes``, clamped to [1, 4096].

    The per-sample cost is measured with two small probe passes (see
    :meth:`KroneckerFeaturizer.bytes_per_sample`). Default budget: 25% of the
    available RAM on CPU (psutil), half of the free memory on CUDA.
    """
    device = torch.device(device) if device is not None else projector.device
    if budget_bytes is None:
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget_bytes = int(free * 0.5)
        else:
            import psutil  # lazy: psutil only to size the batch from free memory

            budget_bytes = int(psutil.virtual_memory().available * 0.25)
    feat = KroneckerFeaturizer(model, objective, projector)
    x, y, eps = _probe_inputs(model, objective, device, sample_shape, 4)
    per = feat.bytes_per_sample(x, y, eps)
    return int(max(1, min(4096, budget_bytes // max(per, 1))))
