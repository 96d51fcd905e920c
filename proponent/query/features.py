"""The features a server searches, held within a memory budget.

Three modes, chosen at start-up from the budget (``auto``) or forced:

* ``memory``: the stored features are held in RAM (or GPU memory) as stored -- int8 codes
  with their per-row scales (on the GPU too: the scan's int8 GEMM runs there), float16 or
  float32 (as float32).
  Resident int8 codes are ``[n, W]`` with ``W`` the dimension rounded up to a multiple of 8
  (zero columns: the widths the GPU's int8 GEMM takes), on every device, so the CPU runs the
  layout a GPU does.
* ``quantized``: float features held as int8 (a quarter or half of their size); the scan bounds
  every row's quantization error and rescores, from the store at stored precision, every row
  whose bound reaches the k-th best, so answers stay exact over the stored features.
* ``stream``: nothing is held; every query reads the store chunk by chunk (checksums verified
  on every read), with the same answers as the in-memory scan.

Per-row values the scan needs (exact squared gradient norms, stored-row norms, scales) are
always held: a few bytes per row and checkpoint.

A shard of a sharded server serves a contiguous, chunk-aligned row range ``rows=(lo, hi)`` of the
index: only the chunks of ``[lo, hi)`` are read and every per-row array is sliced, so ``n`` is
``hi - lo`` and rows here are local (``row - lo``); ``LocalSearcher(served, offset=lo)`` turns
them back into the index's rows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from ..format.store import FeatureStore, quantize_int8, round_up_f32

log = logging.getLogger("proponent.features")

MODES = ("auto", "memory", "quantized", "stream")
BLOCK_ROWS = 16384  # rows per scan block of resident features
READ_AHEAD = 2  # blocks a streamed scan reads ahead (one thread each)
COL_ALIGN = 8  # resident int8 codes are padded with zero columns to a multiple of this


def parse_size(text: str | int | None) -> int | None:
    """``"8G"``, ``"512MiB"``, ``"1.5GB"``, ``123456`` -> bytes (binary units); None stays None."""
    if text is None or isinstance(text, int):
        return text
    s = text.strip().lower().replace("ib", "").replace("b", "")
    mult = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    try:
        if s and s[-1] in mult:
            return int(float(s[:-1]) * mult[s[-1]])
        return int(float(s))
    except ValueError:
        raise ValueError(f"memory size {text!r}: expected a number of bytes or e.g. 512M, 8G") from None


def default_budget() -> int:
    """Half of the memory available at start-up."""
    import psutil  # lazy: psutil only to size the cache from free memory

    return int(psutil.virtual_memory().available * 0.5)


@dataclass
class Block:
    """Rows ``lo:hi`` of every searched checkpoint, as the scan kernels take them."""

    lo: int
    hi: int
    data: dict[int, torch.Tensor]  # checkpoint -> [hi - lo, D] int8 codes or float32 rows
    exact: bool  # the rows are the stored values (int8 codes x scale, or floats): rescoring may use them


class ServedFeatures:
    """Per-checkpoint features and per-row values of an index, resident or streamed."""

    def __init__(
        self,
        store: FeatureStore,
        checkpoints: int,
        *,
        mode: str = "auto",
        budget_bytes: int | None = None,
        device: torch.device | None = None,
        rows: tuple[int, int] | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"feature mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.store = store
        layout = store.layout
        self.lo, self.hi = rows if rows is not None else (0, store.n)
        if not (0 <= self.lo < self.hi <= store.n) and store.n:
            raise ValueError(f"row range [{self.lo}, {self.hi}) is not within the index's {store.n} rows")
        if self.lo % layout.chunk_rows or (self.hi % layout.chunk_rows and self.hi != store.n):
            raise ValueError(f"row range [{self.lo}, {self.hi}) is not aligned to chunks of {layout.chunk_rows} rows")
        self.chunks = range(self.lo // layout.chunk_rows, math.ceil(self.hi / layout.chunk_rows))
        self.n, self.dim = self.hi - self.lo, store.dim
        self.stored_dtype = store.dtype.name
        self.n_checkpoints = checkpoints
        self.device = device or torch.device("cpu")
        self.budget = budget_bytes if budget_bytes is not None else default_budget()
        sl = slice(self.lo, self.hi)
        self.sq_norm = [store.sq_norm(c, sl) for c in range(checkpoints)]
        self.feat_norm = [store.feat_norm(c, sl) for c in range(checkpoints)]
        self.scale = [store.scale(c, sl) for c in range(checkpoints)]
        # every index row's leverage f_cᵀ P_c f_c under the stored preconditioner (set by the opened index)
        self.leverage_source: Callable[[int, str], np.ndarray] | None = None
        self._leverage: dict[tuple[int, str], np.ndarray] = {}
        gpu = self.device.type == "cuda"
        # memory mode holds int8 codes as they are (CPU or GPU), everything else as float32
        per_value = 1 if self.stored_dtype == "int8" else 4
        memory_bytes = self.n * self.dim * checkpoints * per_value
        int8_bytes = self.n * self.dim * checkpoints
        if gpu and budget_bytes is None:
            free, _ = torch.cuda.mem_get_info(self.device)
            self.budget = int(free * 0.5)
        if mode == "auto":
            if memory_bytes <= self.budget:
                mode = "memory"
            elif self.stored_dtype != "int8" and int8_bytes <= self.budget:
                mode = "quantized"
            else:
                mode = "stream"
        if mode == "quantized" and self.stored_dtype == "int8":
            mode = "memory"  # int8 is already the quantized form
        self.mode = mode
        # resident[c]: int8 codes [n, width] or float32 rows [n, dim] (CPU or GPU); None when streamed
        self.width = -(-self.dim // COL_ALIGN) * COL_ALIGN
        self.resident: list[torch.Tensor | None] = [None] * checkpoints
        self.resident_scale: list[np.ndarray | None] = [None] * checkpoints
        self.resident_norm: list[np.ndarray] = list(self.feat_norm)  # bound on ||resident row||
        self.residual: list[np.ndarray | None] = [None] * checkpoints  # bound on ||stored - resident||
        if mode != "stream":
            for c in range(checkpoints):
                self._load(c)

    # ------------------------------------------------------------------ loading
    def _load(self, c: int) -> None:
        """Read checkpoint ``c``'s features (every chunk checksum-verified) into the resident form."""
        st = self.store
        layout = st.layout
        if self.mode == "memory" and self.stored_dtype == "int8":
            codes = np.zeros((self.n, self.width), np.int8)
            for k in self.chunks:
                lo, hi = layout.chunk_range(k)
                codes[lo - self.lo : hi - self.lo, : self.dim] = st.feature_chunk(c, k)
            self.resident[c] = torch.from_numpy(codes).to(self.device)
            self.resident_scale[c] = self.scale[c]
            return
        if self.mode == "memory":
            rows = torch.empty((self.n, self.dim), dtype=torch.float32, device=self.device)
            for lo, block in st.iter_feature_chunks(c, self.chunks):
                rows[lo - self.lo : lo - self.lo + len(block)] = torch.from_numpy(block).to(self.device)
            self.resident[c] = rows
            return
        # quantized: int8 codes of the float features, with exact per-row error bounds
        codes = np.zeros((self.n, self.width), np.int8)
        scale = np.empty(self.n, np.float32)
        resid = np.empty(self.n, np.float64)
        rnorm = np.empty(self.n, np.float64)
        for first, block in st.iter_feature_chunks(c, self.chunks):
            lo = first - self.lo
            hi = lo + len(block)
            q, s = quantize_int8(block)
            codes[lo:hi, : self.dim], scale[lo:hi] = q, s
            approx = q.astype(np.float64) * s.astype(np.float64)[:, None]
            diff = block.astype(np.float64) - approx
            resid[lo:hi] = round_up_f32(np.sqrt(np.einsum("ij,ij->i", diff, diff))) * (1 + 1e-6)
            rnorm[lo:hi] = round_up_f32(np.sqrt(np.einsum("ij,ij->i", approx, approx))) * (1 + 1e-6)
        self.resident[c] = torch.from_numpy(codes).to(self.device)
        self.resident_scale[c] = scale
        self.residual[c] = resid
        self.resident_norm[c] = rnorm

    def row_sq_norm(self, c: int, precondition: str = "none") -> np.ndarray:
        """The rows' squared norms a scoring divides by: exact gradient norms, or (a preconditioner) their leverage."""
        if precondition == "none":
            return self.sq_norm[c]
        if (c, precondition) not in self._leverage:
            if self.leverage_source is None:
                raise ValueError(f"precondition={precondition!r}: these features have no stored preconditioner")
            got = np.asarray(self.leverage_source(c, precondition), np.float64)[self.lo : self.hi]
            self._leverage[(c, precondition)] = got
        return self._leverage[(c, precondition)]

    @property
    def resident_bytes(self) -> int:
        return sum(int(t.numel() * t.element_size()) for t in self.resident if t is not None)

    def describe(self) -> dict[str, object]:
        return {
            "mode": self.mode,
            "rows": [self.lo, self.hi],
            "budget_bytes": int(self.budget),
            "resident_bytes": self.resident_bytes,
            "stored_dtype": self.stored_dtype,
            "device": str(self.device),
            "rescoring": "from the store (stored precision)" if self.mode == "quantized" else "from the scanned rows",
        }

    # ------------------------------------------------------------------ scanning
    def kernel_kind(self) -> str:
        """``int8`` (exact integer products) or ``float`` (float32 products)."""
        if self.mode == "stream":
            return "int8" if self.stored_dtype == "int8" else "float"
        first = self.resident[0]
        return "int8" if first is not None and first.dtype == torch.int8 else "float"

    def row_scale(self, c: int) -> np.ndarray | None:
        """Per-row scale of the scanned int8 codes of checkpoint ``c`` (None for float rows)."""
        return self.resident_scale[c] if self.mode != "stream" else self.scale[c]

    def blocks(self, checkpoints: list[int]) -> Iterator[Block]:
        if self.mode != "stream":
            exact = self.mode == "memory"
            for lo in range(0, self.n, BLOCK_ROWS):
                hi = min(self.n, lo + BLOCK_ROWS)
                data = {}
                for c in checkpoints:
                    r = self.resident[c]
                    assert r is not None
                    data[c] = r[lo:hi]
                yield Block(lo, hi, data, exact)
            return
        yield from self._stream(checkpoints)

    def _read_chunks(
        self, checkpoints: list[int], ks: list[int], buffers: dict[int, np.ndarray] | None = None
    ) -> Block:
        """Consecutive feature chunks ``ks`` of every checkpoint as one block (checksums verified), read
        into ``buffers[c]`` when given (no copy between the read and the kernel for int8 codes)."""
        layout = self.store.layout
        lo, hi = layout.chunk_range(ks[0])[0], layout.chunk_range(ks[-1])[1]
        data = {}
        for c in checkpoints:
            buf = buffers.get(c) if buffers is not None else None
            raw = self.store.feature_chunks(c, range(ks[0], ks[-1] + 1), buf)
            data[c] = torch.from_numpy(raw if raw.dtype == np.int8 else raw.astype(np.float32, copy=False))
        return Block(lo - self.lo, hi - self.lo, data, True)

    def _stream(self, checkpoints: list[int]) -> Iterator[Block]:
        """Blocks of about BLOCK_ROWS rows (whole chunks), read ahead by READ_AHEAD threads while the scan computes.

        Each block is read into one of READ_AHEAD + 1 reused buffers per checkpoint (fresh buffers cost a
        page fault per 4 KiB on every block), so a block's arrays are valid until the next block is
        asked for: the scan uses each block before asking for the next. A reader's error (a damaged or
        missing chunk) is raised here, at its block; closing the generator early waits for the reads in
        flight and leaves no thread or file open."""
        chunks = list(self.chunks)
        rows = self.store.layout.chunk_rows
        per = max(1, BLOCK_ROWS // rows)
        groups = [chunks[i : i + per] for i in range(0, len(chunks), per)]
        dtype = self.store.dtype
        slots = [
            {c: np.empty((min(per, len(chunks)) * rows, self.dim), dtype) for c in checkpoints}
            for _ in range(min(len(groups), READ_AHEAD + 1))
        ]
        with ThreadPoolExecutor(max_workers=READ_AHEAD, thread_name_prefix="prefetch") as pool:
            ahead: list[Future[Block]] = []
            try:
                for i in range(min(READ_AHEAD, len(groups))):
                    ahead.append(pool.submit(self._read_chunks, checkpoints, groups[i], slots[i % len(slots)]))
                for i in range(len(groups)):
                    block = ahead.pop(0).result()
                    j = i + READ_AHEAD
                    if j < len(groups):  # into the buffer of block i - 1, which the scan is done with
                        ahead.append(pool.submit(self._read_chunks, checkpoints, groups[j], slots[j % len(slots)]))
                    yield block
            finally:
                for f in ahead:
                    f.cancel()

    # ------------------------------------------------------------------ exact rows
    def exact_rows(self, c: int, rows: np.ndarray, block: Block | None = None) -> np.ndarray:
        """Stored features of (local) ``rows`` as float64: from a block holding them, the resident copy,
        or the store's chunks (checksum-verified, through the chunk cache of a remote index)."""
        rows = np.asarray(rows, np.int64)
        if block is not None and block.exact:
            return self._scaled(c, rows, block.data[c], rows - block.lo)
        r = self.resident[c]
        if self.mode == "memory" and r is not None:
            return self._scaled(c, rows, r, rows)
        return self._rows_from_chunks(c, rows)

    def _scaled(self, c: int, rows: np.ndarray, data: torch.Tensor, at: np.ndarray) -> np.ndarray:
        """Rows ``at`` of ``data`` (held rows, possibly padded) as float64 stored values (int8 codes x scale).
        CPU rows are gathered by numpy: torch's indexing wakes its thread pool, milliseconds on a busy machine."""
        if data.device.type == "cpu":
            vals = data.numpy()[at, : self.dim].astype(np.float64)
        else:
            vals = data[torch.from_numpy(at).to(data.device), : self.dim].cpu().numpy().astype(np.float64)
        if data.dtype == torch.int8:
            sc = self.scale[c]
            assert sc is not None
            vals *= sc[rows].astype(np.float64)[:, None]
        return vals

    def _rows_from_chunks(self, c: int, rows: np.ndarray) -> np.ndarray:
        out = self.store.stored_values(c, rows + self.lo)
        sc = self.scale[c]
        if sc is not None and len(rows):
            out *= sc[rows].astype(np.float64)[:, None]
        return out
