"""The three-phase scheduler: ``Y = A @ X`` over a tiled ``A`` under hard memory budgets.

One :class:`Scheduler` serves one tile store on one device. It places the tiles once
(:func:`~aires.scheduler.placement.place`), allocates everything it needs once (a ring of
device slots, the phase-1 tiles, pinned phase-2 tiles, the disk path's buffers), and then runs
each product as a pipeline:

1. The disk workers start first (the slowest path), each reading tiles into its own slot.
2. The host path queues its first copies (one per ring slot) on the copy stream.
3. Phase-1 (resident) tiles are computed in even shares between the host path's tiles (one
   share first, while the first copy is in flight, unless it was prefetched), so each host
   tile's compute frees its slot for the next copy without waiting behind every resident one.
4. The host path's steady state: compute the oldest loaded slot, then queue the next copy into
   it; the copy stream waits, on the GPU, for that compute. The CPU keeps at most two
   computes ahead of the GPU so the disk path's computes interleave instead of queueing
   behind every host tile.
5. For a dense product the host path's first tile (:data:`HEAD_PARTS`) and its last tiles
   (:data:`TAIL_TILES`, :data:`TAIL_PARTS` each) are copied and computed in row parts: the
   compute starts after a part of the first tile instead of all of it, and the compute still
   owed when the last copy lands shrinks from a tile and a half to about a part's.
6. Once the last compute is queued, the copies of the next call's first host tiles are queued
   into the ring slots that free first (:meth:`Scheduler._prefetch`). Every call streams the
   host tiles in the same order, so the next call finds them on the device: it computes at
   once while its first streamed copy starts into the remaining slot, and the copies that used
   to open each call run in the copy engine's idle time (this call's tail, or whatever the
   caller does in between). The next call's stats count them as ``bytes_prefetched``.

All computes go to one stream (the caller's current stream), so results are ordered for the
caller with no extra synchronisation; they are issued under one lock, so pieces of a hub row
split over tiles (``TileInfo.partial``) accumulate in a fixed order and never race. CUDA events
order load -> compute -> slot reuse. The steady state allocates nothing: the output comes from
the caching allocator at the same size each call, cuSPARSE's buffer likewise. The previous
call's statistics are reduced once this call's last compute is queued, while the GPU works
through the computes the CPU is ahead by: earlier, that CPU work delayed a compute the ring
was waiting for, and the copy stream stalled behind it.

Two switches exist for ablations (what the ring and the overlap are worth): ``prealloc=False``
gives every tile a fresh device buffer (freed once its compute is done, so the budget still
holds) instead of a ring slot, and ``overlap=False`` runs each tile's load and compute one
after the other, waiting for each, with one tile in flight.

Kernels never record autograd history (``torch.no_grad`` here and in every disk thread, where
grad mode is on by default): gradients come from ``aires.matmul``'s autograd function.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch

from aires.checks import check_positive_int, parse_size
from aires.scheduler.kernels import (
    BYTES_PER_PRODUCT,
    SpgemmOperand,
    concat_rows,
    narrow_indices,
    narrowable,
    spgemm_tile,
    spmm_into,
    sum_pieces,
    tile_csr,
)
from aires.scheduler.placement import (
    MIN_SLOTS,
    Placement,
    default_gpu_budget,
    default_host_budget,
    format_bytes,
    place,
)
from aires.scheduler.stats import Recorder, RunStats, begin_peak
from aires.scheduler.transfer import (
    DISK_PRIOR,
    PAGE,
    DiskPath,
    Dispatcher,
    HostPath,
    WriteBack,
    copy_rate,
    pinned_empty,
    pinned_nbytes,
)
from aires.tiling import TileCorruptError

__all__ = ["Scheduler", "resolve_device", "spmm_reserve"]

#: Device bytes kept for cuSPARSE's SpMM buffer and small temporaries (CUDA only: the CPU
#: kernel needs no buffer).
SPMM_WORKSPACE = 16 << 20
#: The least SpGEMM workspace planned for on CUDA: cuSPARSE sizes its SpGEMM buffers itself,
#: and the per-product model (``BYTES_PER_PRODUCT``) was measured on large products only.
SPGEMM_WORKSPACE = 16 << 20
#: How many computes the CPU may run ahead of the GPU on the host path.
LAG = 2
#: Write-back staging buffers (compute into one while the other is copied out).
STAGES = 2
#: Calls whose marks wait to be reduced to stats (each holds a few CUDA events per tile).
MAX_PENDING = 4
#: Tiles read, checked and placed at once when a scheduler allocates its tiers.
PLACE_WORKERS = 8
#: Row parts the first host-path tile of a dense product is copied and computed in: the compute
#: of a part starts while the next part is still on the bus, so the compute starts a part's copy
#: after the first copy instead of a tile's, and the ring's first slot is free sooner.
HEAD_PARTS = 4
#: The last host-path tiles of a dense product are copied and computed in :data:`TAIL_PARTS`
#: row parts each. With whole tiles, when the last copy lands the compute still owes that tile
#: and most of the one before (a tile's compute takes about 0.8x its copy on the H100). Parts
#: let it catch up during the last copies: on the H100 what is owed fell from about 425 to 270
#: us a call, and two parts over three tiles did best in a model of that pipeline (a per-part
#: launch cost makes finer parts lose).
TAIL_TILES = 3
TAIL_PARTS = 2
_IO_MODES = ("gds", "kvikio-compat", "posix")
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class _Queues:
    """Tiles still to load, shared by the main thread (host path) and the disk workers."""

    host: deque[int]
    disk: deque[int]
    nbytes: list[int]
    dispatcher: Dispatcher
    dual: bool
    host_bytes: int = 0
    stolen: int = 0
    stop: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.host_bytes = sum(self.nbytes[t] for t in self.host)

    def take_host(self) -> int | None:
        with self.lock:
            return None if self.stop or not self.host else self.host.popleft()

    def delivered_host(self, tile: int) -> None:
        with self.lock:
            self.host_bytes -= self.nbytes[tile]

    def could_steal(self) -> bool:
        """Whether the disk path would take the host queue's last tile now."""
        with self.lock:
            return (
                self.dual
                and bool(self.host)
                and self.dispatcher.steal(self.nbytes[self.host[-1]], self.host_bytes)
            )

    def take_disk(self) -> int | None:
        with self.lock:
            if self.stop:
                return None
            if self.disk:
                return self.disk.popleft()
            if self.dual and self.host:
                tile = self.host[-1]
                if self.dispatcher.steal(self.nbytes[tile], self.host_bytes):
                    self.host.pop()
                    self.host_bytes -= self.nbytes[tile]
                    self.stolen += 1
                    return tile
            return None


@dataclass
class _Memory:
    """Everything a placement allocated; dropped as a whole when the placement changes.

    ``ring`` and ``disk_slots`` are views of one slab, or (``prealloc=False``) the buffer each
    slot holds now, ``None`` before its first tile.
    """

    ring: list[torch.Tensor | None]
    disk_slots: list[torch.Tensor | None]
    resident: dict[int, torch.Tensor]
    host: dict[int, torch.Tensor]
    keep: list[torch.Tensor]


@dataclass(frozen=True)
class _Part:
    """Rows ``[r0, r1)`` of a tile, their nonzeros ``[lo, hi)``, and the ``(offset, length)``
    byte ranges of the tile they need (row pointer, column indices, values)."""

    r0: int
    r1: int
    lo: int
    hi: int
    ranges: tuple[tuple[int, int], ...]


class Scheduler:
    """Out-of-core ``A @ X`` for one tile store under device and host memory budgets.

    Args:
        store: A ``TileStore`` (``aires.tiling``).
        gpu_budget: Device bytes (int or size string such as ``"8GiB"``) the scheduler may
            allocate: slots, resident tiles, output, staging and kernel workspace. ``None``:
            the free device memory less a margin (a quarter of the available RAM on the CPU).
        host_budget: Pinned host bytes for phase-2 tiles and the disk path's bounce buffers.
            ``None``: half of the available RAM. ``0`` puts every tile on NVMe.
        device: Where the products run. ``None``: the current CUDA device if any, else CPU.
        slots: Device slots in the host path's ring (at least 3).
        disk_workers: Concurrent tile reads on the disk path (each with its own slot).
        dual: Let the disk path also carry tiles that sit in pinned memory when it would
            deliver them sooner (dual-way transfer). ``False`` uses it for phase-3 tiles only.
            On a GPU it never would: both paths end on the PCIe link that host DMA saturates
            (:class:`~aires.scheduler.transfer.Dispatcher`), so there the disk path carries
            phase-3 tiles, concurrently with the host path, and reserves no slot otherwise.
        prealloc: Preallocate the device slots (a ring for the host path, one slot per disk
            worker). ``False`` (ablation) allocates a fresh device buffer for every streamed
            tile and frees it once its compute is done (same budget, allocator traffic and a
            CPU wait per tile).
        overlap: Overlap loads with computes. ``False`` (ablation) loads a tile, waits,
            computes it, waits, then moves to the next: no copy/compute overlap and no
            concurrency between the host and disk paths.
        checks: Check every tile that reaches a computation (at placement, and on every disk
            read). ``False`` (ablation, to measure what the checks cost: ``bench.spmm``'s
            ``-unchecked`` variants) skips them.
        reserve_bytes: Device bytes to keep for the output and kernel workspace from the
            start, e.g. :func:`spmm_reserve` for the first call, so that a budget that is too
            small is refused here with the minimum that call really needs.

    Raises:
        ValueError: a budget is below the minimum working set (the message states it), or an
            argument is out of range.
        TypeError: ``store`` is not a tile store.

    Without ``reserve_bytes`` the output and workspace reserve is sized by the first call (an
    SpMM output of ``rows x F``); a later call that needs more re-places the tiles once, moving
    phase-1 tiles out to make room. The budget is never exceeded: a call that cannot fit raises
    ``ValueError`` before touching memory.
    """

    def __init__(
        self,
        store: Any,
        *,
        gpu_budget: int | str | None = None,
        host_budget: int | str | None = None,
        device: torch.device | str | None = None,
        slots: int = MIN_SLOTS,
        disk_workers: int = 2,
        dual: bool = True,
        prealloc: bool = True,
        overlap: bool = True,
        checks: bool = True,
        reserve_bytes: int = 0,
    ) -> None:
        for attr in ("tiles", "shape", "read_bytes", "tile_arrays", "io_mode"):
            if not hasattr(store, attr):
                raise TypeError(
                    f"store must be an aires.tiling.TileStore, got {type(store).__name__} "
                    f"(no attribute {attr!r})"
                )
        self.store = store
        self.device = resolve_device(device)
        self._cuda = self.device.type == "cuda"
        self.gpu_budget = (
            default_gpu_budget(self.device)
            if gpu_budget is None
            else parse_size(gpu_budget, "gpu_budget")
        )
        self.host_budget = (
            default_host_budget()
            if host_budget is None
            else parse_size(host_budget, "host_budget", allow_zero=True)
        )
        for name, flag in (("dual", dual), ("prealloc", prealloc), ("overlap", overlap),
                           ("checks", checks)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {flag!r}")
        if self._cuda:
            if store.io_mode not in _IO_MODES:
                raise ValueError(f"store.io_mode must be one of {_IO_MODES}, got {store.io_mode!r}")
            self.io_mode: str = store.io_mode
        else:
            self.io_mode = "cpu"
        # Disk reads land in device slots directly with KvikIO, and on the CPU (whose "device"
        # memory is host memory); POSIX reads for a GPU go through pinned bounce buffers.
        self._direct = not self._cuda or self.io_mode != "posix"
        self._slots = slots
        self._disk_workers = disk_workers
        # On a GPU both paths end on one PCIe link: the dispatcher steals nothing there.
        # The host rate is primed by a timed copy once tiles are pinned (_materialise).
        self.dispatcher = Dispatcher(
            host_rate=DISK_PRIOR, disk_rate=DISK_PRIOR, shared_link=self._cuda
        )
        # Pinned tiles may travel the disk path only where the dispatcher would send them.
        self._steals = dual and not self.dispatcher.shared_link
        self._prealloc = prealloc
        self._overlap = overlap
        self._checks = checks
        self._tiles = list(store.tiles)
        self._nbytes = [int(t.nbytes) for t in self._tiles]
        self._nnz = sum(int(t.nnz) for t in self._tiles)
        self._n_rows, self._n_cols = (int(s) for s in store.shape)
        self._max_rows = max((t.row_stop - t.row_start for t in self._tiles), default=0)
        self._groups, self._uncovered = _row_groups(self._tiles, self._n_rows)
        self._group_of = {t: g for g, (_, _, ts) in enumerate(self._groups) for t in ts}
        self._acc_rows = sum(stop - start for start, stop, _ in self._groups)
        self._slot_bytes = max(self._nbytes, default=0)
        self.placement: Placement = self._place(
            parse_size(reserve_bytes, "reserve_bytes", allow_zero=True)
        )
        self._mem: _Memory | None = None
        self._host_path = HostPath(self.device)
        self._writeback = WriteBack(self.device)
        self._disk: DiskPath | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._ring_free: list[Any] = []
        self._disk_free: list[Any] = []
        self._ring_next = 0
        # The next call's first host tiles, already queued into ring slots: (tile, slot, ready)
        # and the recorder holding their copies' marks.
        self._prefetched: list[tuple[int, int, Any]] = []
        self._prefetch_rec: Recorder | None = None
        self._stage: torch.Tensor | None = None
        self._stage_free: list[Any] = [None] * STAGES
        self._lock = threading.Lock()
        self._views: dict[tuple[int, int], Any] = {}
        self._parts: dict[tuple[int, int], list[_Part] | None] = {}
        self._pending: list[Recorder] = []
        self._stats: RunStats | None = None
        self._pinned_bytes = 0
        self._peak_base = 0
        #: When a list, every call's stats are appended to it as they are reduced (a caller
        #: that runs many calls reads them once, without waiting after each call).
        self.history: list[RunStats] | None = None

    # ------------------------------------------------------------------ public surface

    @property
    def min_gpu_bytes(self) -> int:
        """The minimum working set: the device slots plus the current output/workspace reserve."""
        return self.placement.min_gpu_bytes

    @property
    def stats(self) -> RunStats | None:
        """The last call's :class:`RunStats` (waits for that call's GPU work to finish)."""
        self._collect(block=True)
        return self._stats

    @torch.no_grad()
    def spmm(
        self, x: torch.Tensor, *, out: str | None = None, into: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``A @ X`` for a dense ``X`` (cuSPARSE SpMM per tile).

        The result carries no autograd history (``aires.matmul`` is the differentiable entry).

        Args:
            x: Dense ``(A.shape[1], F)`` float tensor on the scheduler's device.
            out: ``None`` returns ``Y`` on the device; ``"host"`` returns it in (pinned) host
                memory, each tile's rows written back as soon as they are computed, so the
                device never holds the whole output.
            into: A contiguous ``(A.shape[0], F)`` tensor of ``x``'s dtype to write ``Y`` into
                (on the device, or in pinned host memory with ``out="host"``) instead of a new
                one; a device ``into`` is the caller's memory, so the reserve leaves it out.

        Returns:
            ``Y`` of shape ``(A.shape[0], F)`` and ``x``'s dtype.

        Raises:
            ValueError, TypeError: bad ``x`` or ``out``; the output does not fit the budget.
        """
        x = self._check_dense(x)
        to_host = _check_out(out)
        self._begin_call()
        f = int(x.shape[1])
        item = x.element_size()
        reserve = self.spmm_reserve(f, x.dtype, out=out)
        if into is not None:
            _check_into(into, (self._n_rows, f), x.dtype, "cpu" if to_host else self.device.type)
            if not to_host:
                reserve -= self._n_rows * f * item
        self._prepare(reserve, "an SpMM output" if not to_host else "write-back staging")
        rec = self._recorder("spmm")
        held = self.placement.working_gpu_bytes + self.placement.resident_bytes
        if to_host:
            y = into if into is not None else torch.empty(
                (self._n_rows, f), dtype=x.dtype, pin_memory=self._cuda
            )
            stage_bytes = STAGES * self._max_rows * f * item
            acc = self._staging(stage_bytes + self._acc_rows * f * item)
            stages = [
                acc[k * self._max_rows * f * item : (k + 1) * self._max_rows * f * item]
                .view(x.dtype)
                .view(self._max_rows, f)
                for k in range(STAGES)
            ]
            acc_rows = acc[stage_bytes:].view(x.dtype).view(self._acc_rows, f)
            acc_rows.zero_()
            rec.planned_bytes = held + acc.numel()
        else:
            y = into if into is not None else torch.empty(
                (self._n_rows, f), dtype=x.dtype, device=self.device
            )
            if self._cuda:
                # cuSPARSE does not promise to ignore C's contents when beta is 0 (0 * NaN is
                # NaN): one memset, which overlaps the first tile copies.
                y.zero_()
            else:
                for start, stop, _ in self._groups:
                    y[start:stop].zero_()
            rec.planned_bytes = held + y.numel() * item
        for start, stop in self._uncovered:
            y[start:stop].zero_()
        offsets = _offsets(self._groups)
        stage_next = [0]

        def compute(tile: int, buf: torch.Tensor) -> None:
            info = self._tiles[tile]
            a = self._csr(tile, buf, x.dtype)
            group = self._group_of.get(tile)
            if group is not None:
                g_start = self._groups[group][0]
                row = (offsets[group] if to_host else g_start) + info.row_start - g_start
                target = (acc_rows if to_host else y)[row : row + a.shape[0]]
                spmm_into(a, x, target, accumulate=True)
                return
            if not to_host:
                spmm_into(a, x, y[info.row_start : info.row_stop], accumulate=False)
                return
            k = stage_next[0]
            stage_next[0] = (k + 1) % STAGES
            free = self._stage_free[k]
            if free is not None and self._cuda:
                torch.cuda.current_stream().wait_event(free)
            target = stages[k][: a.shape[0]]
            if self._cuda:
                target.zero_()  # see the memset of y above
            spmm_into(a, x, target, accumulate=False)
            done = rec.mark(torch.cuda.current_stream()) if self._cuda else None
            self._stage_free[k] = self._writeback.copy(
                y[info.row_start : info.row_stop], target, done, rec
            )

        def compute_rows(tile: int, buf: torch.Tensor, part: _Part) -> None:
            row = self._tiles[tile].row_start
            a = self._csr_rows(tile, buf, x.dtype, part)
            spmm_into(a, x, y[row + part.r0 : row + part.r1], accumulate=False)

        self._run(compute, rec, None if to_host else compute_rows)
        if to_host:
            done = rec.mark(torch.cuda.current_stream()) if self._cuda else None
            for g, (start, stop, _) in enumerate(self._groups):
                src = acc_rows[offsets[g] : offsets[g] + stop - start]
                self._writeback.copy(y[start:stop], src, done, rec)
            if self._cuda:
                rec.end = rec.mark(self._writeback.stream)
                rec.end.synchronize()
        self._close_call(rec)
        return y

    def spmm_reserve(
        self, f: int, dtype: torch.dtype = torch.float32, *, out: str | None = None
    ) -> int:
        """Device bytes an :meth:`spmm` with ``F = f`` columns keeps beside the tiles.

        The output (``rows x f``), or with ``out="host"`` two write-back staging buffers of the
        largest tile's rows plus an accumulator for hub rows; and the kernel workspace (16 MiB
        for cuSPARSE's buffer on CUDA, plus room to cast tile values when the store's value
        dtype differs from ``dtype``). The minimum device budget for such a call is
        ``(slots + disk workers) * slot_bytes`` plus this.
        """
        return _spmm_reserve(
            f,
            dtype,
            out,
            cuda=self._cuda,
            value_dtype=self.store.value_dtype,
            slot_bytes=self._slot_bytes,
            n_rows=self._n_rows,
            max_rows=self._max_rows,
            acc_rows=self._acc_rows,
        )

    def spgemm_reserve(self, x: torch.Tensor, *, out: str | None = None) -> int:
        """Device bytes an :meth:`spgemm` with this ``X`` keeps beside the tiles.

        What the call allocates for ``X`` (an int32 copy of its indices when they are int64,
        ``|values|``, three vectors over its rows); a quarter of the budget (at least two slots'
        worth, and 16 MiB on CUDA) for the SpGEMM workspace and the result pieces kept on the
        device; and, unless ``out="host"``, room for the assembled result at its largest
        (``min(rows * F, nnz(A) * longest row of X)`` entries, plus its row pointer). Resident
        tiles make room for it when needed; a budget that cannot hold it is a ``ValueError``
        before any work. The minimum device budget for such a call is
        ``(slots + disk workers) * slot_bytes`` plus this.
        """
        x = self._check_sparse(x)
        to_host = _check_out(out)
        result = 0 if to_host else self._spgemm_result_bytes(x)
        return _operand_bytes(x) + self._spgemm_workspace() + result

    def _spgemm_workspace(self) -> int:
        floor = SPGEMM_WORKSPACE if self._cuda else 0
        return max(self.gpu_budget // 4, 2 * self.placement.slot_bytes, floor)

    def _spgemm_result_bytes(self, x: torch.Tensor, nnz: int | None = None) -> int:
        """Device bytes of the result assembled on the device (``nnz`` entries, or the most
        there can be: ``min(rows * F, nnz(A) * max row length of X)``).

        The column indices and values, the row pointer in int64 while it is summed plus its
        final copy, and one piece's row counts in flight (``concat_rows``).
        """
        f = int(x.shape[1])
        if nnz is None:
            crow = x.crow_indices()
            longest = int((crow[1:] - crow[:-1]).max()) if x.shape[0] else 0
            nnz = min(self._n_rows * f, self._nnz * longest)
        index = 8 if nnz >= 2**31 or f >= 2**31 else 4
        item = x.element_size()
        return nnz * (index + item) + (self._n_rows + 1) * (8 + index) + (self._max_rows + 1) * 8

    @torch.no_grad()
    def spgemm(self, x: torch.Tensor, *, out: str | None = None) -> torch.Tensor:
        """``A @ X`` for a sparse ``X`` (cuSPARSE SpGEMM per tile), a sparse CSR result.

        Each tile's product is cut into row pieces whose intermediate products fit the
        workspace allowance (what the budget leaves after slots, resident tiles, the prepared
        ``X`` and the result's room), retried in halves if cuSPARSE still runs out of
        resources, and checked by row sums. Pieces stay on the device while they fit a quarter
        of the allowance and move to host memory after that; pieces of hub rows are summed in
        host memory; the result is assembled once at its exact size, into the room reserved for
        it (:meth:`spgemm_reserve`), so the budget holds by construction.

        Args:
            x: Sparse CSR (or COO) ``(A.shape[1], F)`` float tensor on the scheduler's device.
            out: ``None`` for a result on the device, ``"host"`` for one in host memory.

        Returns:
            Sparse CSR ``(A.shape[0], F)`` with ``x``'s dtype (int32 indices when they fit).

        Raises:
            ValueError, TypeError: bad ``x`` or ``out``; the workspace, or the result's room on
                the device, does not fit the budget (the message says so; ``out="host"`` needs
                no room for the result).
            RuntimeError: a single row's product still fails.
        """
        x = self._check_sparse(x)
        to_host = _check_out(out)
        self._begin_call()
        op_bytes = _operand_bytes(x)
        room = 0 if to_host else self._spgemm_result_bytes(x)
        reserve = op_bytes + self._spgemm_workspace() + room
        x = narrow_indices(x)
        what = "an SpGEMM workspace" if to_host else (
            f"an SpGEMM workspace and the result's room ({format_bytes(room)}; out='host' "
            "needs none)"
        )
        self._prepare(max(reserve, self.placement.reserve_bytes), what)
        rec = self._recorder("spgemm")
        operand = SpgemmOperand.build(x)
        held_fixed = self.placement.gpu_bytes - self.placement.reserve_bytes + op_bytes
        avail = self.gpu_budget - held_fixed - room
        max_products = max(avail // 2 // BYTES_PER_PRODUCT, 1)
        keep_limit = avail // 4
        pieces: list[tuple[int, int, torch.Tensor]] = []
        kept = [0]
        peak = [held_fixed]

        def compute(tile: int, buf: torch.Tensor) -> None:
            info = self._tiles[tile]
            a = self._csr(tile, buf, x.dtype)
            for offset, piece in spgemm_tile(a, operand, max_products=max_products):
                nbytes = _tensor_bytes(piece)
                if kept[0] + nbytes > keep_limit:
                    # On the CPU the piece already is in host memory: only the rule runs.
                    if self._cuda:
                        t0 = rec.mark(torch.cuda.current_stream())
                        piece = piece.to("cpu")
                        rec.writebacks.append((nbytes, t0, rec.mark(torch.cuda.current_stream())))
                else:
                    kept[0] += nbytes
                    peak[0] = max(peak[0], held_fixed + kept[0] + avail // 2)
                pieces.append((tile, info.row_start + offset, piece))

        self._run(compute, rec)
        grouped: dict[int, list[tuple[int, torch.Tensor]]] = {}
        final: list[tuple[int, torch.Tensor]] = []
        for tile, row, piece in pieces:
            group = self._group_of.get(tile)
            if group is None:
                final.append((row, piece))
            else:
                # Hub-row pieces are a few rows: summing them in host memory keeps the
                # coalescing temporaries off the device.
                grouped.setdefault(group, []).append((row, piece.to("cpu")))
        final.extend(sum_pieces(parts) for parts in grouped.values())
        target = torch.device("cpu") if to_host else self.device
        result = concat_rows(final, (self._n_rows, int(x.shape[1])), device=target, dtype=x.dtype)
        if self._cuda:
            rec.end = rec.mark(torch.cuda.current_stream())
        total = 0 if to_host else self._spgemm_result_bytes(x, result._nnz())
        rec.planned_bytes = max(peak[0], held_fixed + kept[0] + total)
        rec.extra["max_products"] = int(max_products)
        rec.extra["pieces"] = len(pieces)
        self._close_call(rec)
        return result

    def close(self) -> None:
        """Free device and pinned memory and stop the disk threads (the object stays usable)."""
        self._collect(block=True)
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._cuda:
            torch.cuda.synchronize(self.device)
        self._mem = None
        self._pinned_bytes = 0
        self._disk = None
        self._stage = None
        self._views.clear()
        self._parts.clear()

    def __enter__(self) -> Scheduler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        p = self.placement
        return (
            f"Scheduler(tiles={len(self._tiles)}, device={self.device}, io_mode={self.io_mode}, "
            f"resident={len(p.resident)}, host={len(p.host)}, disk={len(p.disk)}, "
            f"gpu_budget={format_bytes(self.gpu_budget)}, "
            f"host_budget={format_bytes(self.host_budget)})"
        )

    # ------------------------------------------------------------------ placement, memory

    def _place(self, reserve: int) -> Placement:
        return place(
            self._nbytes,
            gpu_budget=self.gpu_budget,
            host_budget=self.host_budget,
            slots=self._slots,
            disk_workers=self._disk_workers,
            direct_disk=self._direct,
            reserve_bytes=reserve,
            dual=self._steals,
            pinned_page=PAGE if self._cuda else 1,
        )

    def _prepare(self, reserve: int, what: str) -> None:
        """Make sure the placement reserves ``reserve`` device bytes and memory is allocated."""
        if reserve > self.placement.reserve_bytes:
            try:
                placement = self._place(reserve)
            except ValueError as error:
                raise ValueError(f"{what} does not fit: {error}") from None
            if _layout(placement) != _layout(self.placement):
                self.close()
            self.placement = placement
        if self._mem is None:
            self._materialise()

    def _materialise(self) -> None:
        p = self.placement
        dev = self.device
        n_ring = p.n_slots + p.n_disk
        keep: list[torch.Tensor] = []
        views: list[torch.Tensor | None] = [None] * n_ring
        if self._prealloc:
            slab = torch.empty(n_ring * p.slot_bytes, dtype=torch.uint8, device=dev)
            views = [slab[k * p.slot_bytes : (k + 1) * p.slot_bytes] for k in range(n_ring)]
            keep.append(slab)
        resident: dict[int, torch.Tensor] = {}
        host: dict[int, torch.Tensor] = {}
        # Placed tiles are CRC-checked once, as they are read into their tier; from there only
        # DMA (host) or nothing (resident) stands between them and every compute.
        io = "POSIX" if self.io_mode in ("cpu", "posix") else f"KvikIO {self.io_mode}"
        jobs: list[tuple[int, torch.Tensor, str]] = []
        if p.resident:
            block = torch.empty(p.resident_bytes, dtype=torch.uint8, device=dev)
            keep.append(block)
            resident = dict(zip(p.resident, _split(block, p.resident, self._nbytes), strict=True))
            via = f"placement in device memory (phase 1, {io} read)"
            jobs += [(tile, view, via) for tile, view in resident.items()]
        if p.host:
            block = pinned_empty(p.host_bytes, dev)
            keep.append(block)
            host = dict(zip(p.host, _split(block, p.host, self._nbytes, p.pinned_page),
                            strict=True))
            via = "placement in host memory (phase 2, POSIX read)"
            jobs += [(tile, view, via) for tile, view in host.items()]
        self._place_tiles(jobs)
        bounce = None
        if p.n_disk and not p.direct_disk:
            block = pinned_empty(p.staging_host_bytes, dev)
            keep.append(block)
            stride = p.pinned_slot_bytes
            bounce = [block[k * stride : k * stride + p.slot_bytes] for k in range(p.n_disk)]
        self._pinned_bytes = sum(pinned_nbytes(t.numel(), dev) for t in keep if not t.is_cuda)
        self._mem = _Memory(views[: p.n_slots], views[p.n_slots :], resident, host, keep)
        # The host path's prior: one timed host -> device slot copy. The disk keeps its
        # conservative prior (the loads above mostly hit the page cache, which says nothing
        # about a cold read) until a streamed read measures it; measured rates are kept.
        source = next(iter(host.values()), None)
        if source is not None and "host" not in self.dispatcher.measured:
            probe = views[0] if views[0] is not None else self._fresh_slot()
            self.dispatcher.prime("host", copy_rate(probe[: source.numel()], source))
            del probe
        self._ring_free = [None] * p.n_slots
        self._disk_free = [None] * p.n_disk
        self._ring_next = 0
        self._prefetched = []
        if p.n_disk:
            self._disk = DiskPath(self.store, dev, bounce, self.dispatcher, checks=self._checks)
            self._pool = ThreadPoolExecutor(p.n_disk, thread_name_prefix="aires-disk")

    def _begin_call(self) -> None:
        """Start the call's measurement of device memory (CUDA), before it allocates anything:
        what others hold stays out of its peak, the scheduler's own buffers stay in."""
        if self._cuda:
            self._peak_base = begin_peak(self.device) - self._device_bytes_held()

    def _device_bytes_held(self) -> int:
        """Device bytes of the buffers this scheduler keeps between calls, as the caching
        allocator counts them (sizes rounded up to its 512-byte blocks)."""
        held: list[torch.Tensor | None] = [self._stage]
        if self._mem is not None:
            # Fresh slots (prealloc=False) live between calls too; ring views share the slab.
            held += self._mem.keep + self._mem.ring + self._mem.disk_slots
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in held
            if t is not None and t.is_cuda
        }
        return sum(-(-n // 512) * 512 for n in storages.values())

    def _place_tiles(self, jobs: list[tuple[int, torch.Tensor, str]]) -> None:
        """:meth:`_place_tile` for every ``(tile, view, via)``, :data:`PLACE_WORKERS` at once:
        the reads, checksums and copies release the GIL, and one thread placed papers100M
        x0.3's 8 GB of tiles at the speed of one CRC-32. The first failure raises."""
        if not jobs:
            return

        def place(tile: int, view: torch.Tensor, via: str) -> None:
            if self._cuda:
                torch.cuda.set_device(self.device)  # a new thread starts on device 0
            self._place_tile(tile, view, via)

        with ThreadPoolExecutor(min(PLACE_WORKERS, len(jobs)),
                                thread_name_prefix="aires-place") as pool:
            for done in [pool.submit(place, *job) for job in jobs]:
                done.result()

    def _place_tile(self, tile: int, view: torch.Tensor, via: str) -> None:
        """Read ``tile`` into ``view``, CRC-checked; a bad tile's error names ``via``."""
        try:
            if view.is_cuda and self.io_mode == "posix":
                # The store's own POSIX path to the GPU pins a bounce buffer outside
                # host_budget; placement happens once, so a pageable copy does.
                host = np.empty(view.numel(), dtype=np.uint8)
                self.store.read_bytes(tile, host, verify=self._checks)
                view.copy_(torch.from_numpy(host))
            else:
                self.store.read_bytes(tile, view, verify=self._checks)
        except TileCorruptError as error:
            raise error.came_by(via) from error

    def _fresh_slot(self) -> torch.Tensor:
        """A new device buffer of one slot (``prealloc=False``)."""
        return torch.empty(self.placement.slot_bytes, dtype=torch.uint8, device=self.device)

    def _staging(self, nbytes: int) -> torch.Tensor:
        """A device byte buffer for write-back staging, kept and grown only when needed.

        The previous call waited for its write-back, so growing cannot free a buffer that a
        copy still reads.
        """
        if self._stage is None or self._stage.numel() < nbytes:
            self._stage = None
            self._stage = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            self._stage_free = [None] * STAGES
        return self._stage[:nbytes]

    def _csr(self, tile: int, buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Tile ``tile`` held in ``buf`` as sparse CSR with values in ``dtype``.

        The views (and the CSR tensor over them, when no cast is needed) are cached per tile
        and buffer: they stay valid while the buffer is refilled, which keeps the per-tile
        Python work to a dictionary lookup. Fresh per-tile buffers (``prealloc=False``) are
        never cached: a cached view would keep its buffer alive past the budget.
        """
        key = (tile, buf.data_ptr())
        cached = self._views.get(key) if self._prealloc else None
        if cached is None:
            indptr, indices, data = self.store.tile_arrays(tile, buf)
            if data.dtype != dtype or not self._prealloc:
                return tile_csr(indptr, indices, data, self._n_cols, dtype)
            cached = self._views[key] = tile_csr(indptr, indices, data, self._n_cols)
        if cached.dtype != dtype:
            return tile_csr(
                cached.crow_indices(), cached.col_indices(), cached.values(), self._n_cols, dtype
            )
        return cached

    def _csr_rows(
        self, tile: int, buf: torch.Tensor, dtype: torch.dtype, part: _Part
    ) -> torch.Tensor:
        """Rows ``[part.r0, part.r1)`` of tile ``tile`` held in ``buf``, as sparse CSR.

        The row pointer slice is rebased to start at 0 (one small device op, on the stream the
        compute runs on); the column indices and values are views.
        """
        indptr, indices, data = self.store.tile_arrays(tile, buf)
        crow = indptr[part.r0 : part.r1 + 1]
        if part.lo:
            crow = crow - part.lo
        lo, hi = part.lo, part.hi
        return tile_csr(crow, indices[lo:hi], data[lo:hi], self._n_cols, dtype)

    def _row_parts(self, tile: int, n: int) -> list[_Part] | None:
        """``n`` row parts of host tile ``tile`` of about equal nonzeros, with the byte ranges
        each needs; ``None`` when the tile is not split (fewer than ``n`` rows, a piece of a
        summed row group, or on CUDA a row pointer too long for the kernel workspace's room for
        the rebased copy). Computed once per tile and ``n`` from its pinned bytes."""
        if (tile, n) in self._parts:
            return self._parts[tile, n]
        assert self._mem is not None
        info = self._tiles[tile]
        rows = info.row_stop - info.row_start
        src = self._mem.host[tile]
        indptr, indices, data = self.store.tile_arrays(tile, src)
        isz, vsz = indptr.element_size(), data.element_size()
        parts: list[_Part] | None = None
        small = not self._cuda or (rows + 1) * isz <= SPMM_WORKSPACE // 4
        if rows >= n and tile not in self._group_of and small:
            ip = indptr.numpy()
            nnz = int(ip[-1])
            cuts = [0]
            for k in range(1, n):
                r = int(np.searchsorted(ip, nnz * k // n, side="left"))
                cuts.append(min(max(r, cuts[-1] + 1), rows - (n - k)))
            cuts.append(rows)
            base = src.data_ptr()
            o_ip, o_ix, o_v = (t.data_ptr() - base for t in (indptr, indices, data))
            parts = []
            for r0, r1 in itertools.pairwise(cuts):
                lo, hi = int(ip[r0]), int(ip[r1])
                # Row pointer entries r0..r1; entry r0 came with the part before (no byte is
                # written twice while a compute may read it).
                first = r0 if r0 == 0 else r0 + 1
                ranges = [(o_ip + first * isz, (r1 - first + 1) * isz)]
                if hi > lo:
                    count = hi - lo
                    ranges += [(o_ix + lo * isz, count * isz), (o_v + lo * vsz, count * vsz)]
                parts.append(_Part(r0, r1, lo, hi, tuple(ranges)))
        self._parts[tile, n] = parts
        return parts

    # ------------------------------------------------------------------ the pipeline

    def _run(
        self,
        compute: Callable[[int, torch.Tensor], None],
        rec: Recorder,
        compute_rows: Callable[[int, torch.Tensor, _Part], None] | None = None,
    ) -> None:
        """Load every tile once over its path and ``compute(tile, buffer)`` on it.

        With ``compute_rows`` (a product whose tiles can be computed a row part at a time), the
        host path's first tile is copied and computed in :data:`HEAD_PARTS` parts and its last
        :data:`TAIL_TILES` tiles in :data:`TAIL_PARTS` parts each.
        """
        if not self._overlap:
            self._run_serial(compute, rec)
            return
        mem = self._mem
        assert mem is not None
        p = self.placement
        stream = torch.cuda.current_stream(self.device) if self._cuda else None
        ready = self._take_prefetched(rec)
        queues = _Queues(
            deque(p.host[len(ready) :]), deque(p.disk), self._nbytes, self.dispatcher, self._steals
        )
        rec.start = rec.mark(stream)
        futures: list[Future[None]] = []
        # Disk workers only when they have tiles or could steal one now (the host queue only
        # shrinks, so a path that would lose its first candidate loses every later one): an
        # idle dual path then costs nothing.
        if self._pool is not None and (queues.disk or queues.could_steal()):
            futures = [
                self._pool.submit(self._disk_worker, k, queues, compute, rec, stream)
                for k in range(p.n_disk)
            ]
        # With prefetched tiles to compute first, the first copy needs no row parts.
        first = not ready

        def load(tile: int) -> tuple[int, int, Any]:
            nonlocal first
            parts = None
            if compute_rows is not None:
                if first:
                    parts = HEAD_PARTS
                elif len(queues.host) < TAIL_TILES:
                    parts = TAIL_PARTS
            first = False
            return self._load_host(tile, rec, parts=parts)

        # The resident tiles are computed in shares between the host path's tiles: all of them
        # first would hold every ring slot's next copy behind them (the copy engine idled 4 ms
        # of each 14 ms pass on products at 2 GiB). With no tile prefetched, the first share
        # covers the first copy.
        shares = _shares(len(p.resident), len(p.host) + (0 if ready else 1))
        done = 0

        def residents(upto: int) -> None:
            nonlocal done
            for tile in p.resident[done:upto]:
                rec.loads.append(("resident", self._nbytes[tile], None, None))
                self._compute(tile, mem.resident[tile], None, compute, rec, "resident", stream)
            done = max(done, upto)

        try:
            pending: deque[tuple[int, int, Any]] = deque(ready)
            while len(pending) < p.n_slots and (tile := queues.take_host()) is not None:
                pending.append(load(tile))
            if not ready:
                residents(next(shares))
            inflight: deque[Any] = deque()
            while pending:
                tile, slot, ready = pending.popleft()
                buf = mem.ring[slot]
                assert buf is not None
                if isinstance(ready, list):
                    assert compute_rows is not None
                    for part, part_ready in ready:
                        end = self._compute(
                            tile, buf, part_ready, partial(compute_rows, part=part), rec,
                            "stream", stream,
                        )
                else:
                    end = self._compute(tile, buf, ready, compute, rec, "stream", stream)
                self._ring_free[slot] = end
                queues.delivered_host(tile)
                nxt = queues.take_host()
                if nxt is not None:
                    pending.append(load(nxt))
                if self._cuda:
                    inflight.append(end)
                    if len(inflight) > LAG:
                        inflight.popleft().synchronize()
                residents(next(shares))
            residents(len(p.resident))
            if self._prealloc:
                self._prefetch()
            # Everything is queued and the GPU is up to LAG computes behind: reduce earlier
            # calls' marks now, off the critical path.
            self._collect(block=False)
        except BaseException:
            queues.stop = True
            wait(futures)
            raise
        for future in futures:
            future.result()
        rec.stolen = queues.stolen
        if self._cuda:
            rec.end = rec.mark(stream)
            if futures:
                rec.end.synchronize()
                rec.wall_end = time.perf_counter()
        else:
            rec.end = rec.mark()
        if self._disk is not None:
            self._disk.verify()

    def _prefetch(self) -> None:
        """Queue the next call's first host tiles into the ring slots that free first.

        All slots but one: the slot of this call's last tile stays free, so the next call's
        first streamed copy can start at once. Each copy waits on the GPU for its slot's last
        compute, like any load; slot memory is the ring's, so the budget is unchanged.
        """
        host = self.placement.host
        rec = self._recorder("prefetch")
        self._prefetched = [self._load_host(t, rec) for t in host[: self.placement.n_slots - 1]]
        self._prefetch_rec = rec

    def _take_prefetched(self, rec: Recorder) -> list[tuple[int, int, Any]]:
        """The prefetched ``(tile, slot, ready)`` loads, their marks moved into ``rec``.

        They are always the placement's first host tiles: a placement with other host tiles
        has another memory layout, and allocating it (:meth:`_materialise`) drops them.
        """
        ready, self._prefetched = self._prefetched, []
        if ready:
            assert [t for t, _, _ in ready] == list(self.placement.host[: len(ready)])
            assert self._prefetch_rec is not None
            rec.loads += [("prefetch", n, a, b) for _, n, a, b in self._prefetch_rec.loads]
        return ready

    def _run_serial(self, compute: Callable[[int, torch.Tensor], None], rec: Recorder) -> None:
        """``overlap=False``: one tile at a time, each load and compute waited for."""
        mem = self._mem
        assert mem is not None
        p = self.placement
        stream = torch.cuda.current_stream(self.device) if self._cuda else None
        self._collect(block=False)
        rec.start = rec.mark(stream)

        def run(tile: int, buf: torch.Tensor, ready: Any, phase: str,
                fn: Callable[[int, torch.Tensor], None] = compute) -> None:
            if ready is not None:
                ready.synchronize()
            self._compute(tile, buf, ready, fn, rec, phase, stream)
            if self._cuda:
                torch.cuda.synchronize(self.device)  # the compute and any write-back it queued

        for tile in p.resident:
            rec.loads.append(("resident", self._nbytes[tile], None, None))
            run(tile, mem.resident[tile], None, "resident")
        for tile in p.host:
            _, slot, ready = self._load_host(tile, rec)
            buf = mem.ring[slot]
            assert buf is not None
            run(tile, buf, ready, "stream")
            self._ring_free[slot] = None
        if p.disk:
            assert self._disk is not None
            for tile in p.disk:
                buf, ready = self._load_disk(0, tile, rec)
                run(tile, buf, ready, "stream", self._disk.checked(0, compute))
                self._disk_free[0] = None
            rec.wall_end = time.perf_counter()
            self._disk.verify()
        rec.end = rec.mark(stream)

    def _load_host(
        self, tile: int, rec: Recorder, *, parts: int | None = None
    ) -> tuple[int, int, Any]:
        """Queue the copy of host tile ``tile`` into the next ring slot.

        Returns:
            ``(tile, slot, ready)``: ``ready`` is the copy's event, or with ``parts`` (when the
            tile splits into that many, :meth:`_row_parts`) a list of ``(part, event)``.
        """
        assert self._mem is not None
        slot = self._ring_next
        self._ring_next = (slot + 1) % len(self._mem.ring)
        after = self._ring_free[slot]
        if not self._prealloc:
            # The slot's last reader must be done before its memory goes back to the
            # allocator; then the new buffer needs no GPU-side wait.
            if after is not None:
                after.synchronize()
            after = None
            self._mem.ring[slot] = None
            self._mem.ring[slot] = self._fresh_slot()
        buf = self._mem.ring[slot]
        assert buf is not None
        src = self._mem.host[tile]
        pieces = self._row_parts(tile, parts) if parts else None
        if pieces is not None:
            events = self._host_path.load_parts(buf, src, [q.ranges for q in pieces], after, rec)
            return tile, slot, list(zip(pieces, events, strict=True))
        return tile, slot, self._host_path.load(buf, src, after, rec)

    def _load_disk(self, worker: int, tile: int, rec: Recorder) -> tuple[torch.Tensor, Any]:
        """Read ``tile`` into worker ``worker``'s slot; returns the slot and its ready event."""
        assert self._mem is not None and self._disk is not None
        after = self._disk_free[worker]
        if not self._prealloc:
            if after is not None:
                after.synchronize()
            after = None
            self._mem.disk_slots[worker] = None
            self._mem.disk_slots[worker] = self._fresh_slot()
        buf = self._mem.disk_slots[worker]
        assert buf is not None
        ready = self._disk.fetch(worker, tile, self._nbytes[tile], buf, after, rec)
        return buf, ready

    def _disk_worker(
        self,
        worker: int,
        queues: _Queues,
        compute: Callable[[int, torch.Tensor], None],
        rec: Recorder,
        stream: Any,
    ) -> None:
        if self._cuda:
            # A new thread starts on device 0: work on the scheduler's device.
            torch.cuda.set_device(self.device)
        checked = self._disk.checked(worker, compute)
        while (tile := queues.take_disk()) is not None:
            try:
                buf, ready = self._load_disk(worker, tile, rec)
                end = self._compute(tile, buf, ready, checked, rec, "stream", stream)
            except BaseException:
                queues.stop = True
                raise
            self._disk_free[worker] = end

    def _compute(
        self,
        tile: int,
        buf: torch.Tensor,
        ready: Any,
        compute: Callable[[int, torch.Tensor], None],
        rec: Recorder,
        phase: str,
        stream: Any,
    ) -> Any:
        """Run ``compute`` on ``tile`` after ``ready``; return the event marking its end.

        Grad mode is thread-local and on by default in the disk threads: kernels write into
        buffers with ``out=``, which autograd refuses, so every compute runs without it.
        """
        with self._lock, torch.no_grad():
            if stream is None:
                start = rec.mark()
                compute(tile, buf)
                rec.computes.append((phase, start, rec.mark()))
                return None
            with torch.cuda.stream(stream):
                if ready is not None:
                    stream.wait_event(ready)
                start = rec.mark(stream)
                compute(tile, buf)
                end = rec.mark(stream)
            rec.computes.append((phase, start, end))
        return end

    # ------------------------------------------------------------------ bookkeeping

    def _recorder(self, op: str) -> Recorder:
        return Recorder(op, self.device, self.io_mode, len(self._tiles))

    def _close_call(self, rec: Recorder) -> None:
        """Measure the call's peaks and queue ``rec`` for reduction (during a later call or on
        ``stats``)."""
        rec.pinned_bytes = self._pinned_bytes
        if self._cuda:
            # The allocator's peak is host-side bookkeeping, final once the call has queued
            # its work: no need to wait for the GPU.
            rec.measured_peak = torch.cuda.max_memory_allocated(self.device) - self._peak_base
        self._pending.append(rec)
        while len(self._pending) > MAX_PENDING:
            self._finish_oldest()

    def _collect(self, *, block: bool) -> None:
        """Turn finished calls' marks into stats and feed the host rate to the dispatcher."""
        while self._pending and (block or self._pending[0].done()):
            self._finish_oldest()

    def _finish_oldest(self) -> None:
        stats = self._pending.pop(0).finish()
        self.dispatcher.update("host", stats.bytes_h2d - stats.bytes_prefetched, stats.t_h2d_s)
        self._stats = stats
        if self.history is not None:
            self.history.append(stats)

    def _check_dense(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"X must be a torch.Tensor, got {type(x).__name__}")
        if x.layout != torch.strided:
            raise TypeError(f"X must be dense for spmm (use spgemm for sparse X), got {x.layout}")
        self._check_common(x)
        return x.contiguous()

    def _check_sparse(self, x: Any) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"X must be a torch.Tensor, got {type(x).__name__}")
        if x.layout == torch.sparse_coo:
            x = x.to_sparse_csr()
        if x.layout != torch.sparse_csr:
            raise TypeError(f"X must be a sparse CSR or COO tensor for spgemm, got {x.layout}")
        self._check_common(x)
        return x

    def _check_common(self, x: torch.Tensor) -> None:
        if x.dim() != 2:
            raise ValueError(f"X must be 2-D, got shape {tuple(x.shape)}")
        if x.shape[0] != self._n_cols:
            raise ValueError(
                f"A has shape {(self._n_rows, self._n_cols)} and X has shape {tuple(x.shape)}: "
                f"A.shape[1] ({self._n_cols}) must equal X.shape[0] ({x.shape[0]})"
            )
        if x.dtype not in _FLOAT:
            raise TypeError(f"X must have a floating dtype, got {x.dtype}")
        if x.device != self.device:
            raise ValueError(f"X is on {x.device} but this scheduler runs on {self.device}")


def spmm_reserve(
    store: Any,
    f: int,
    dtype: torch.dtype = torch.float32,
    *,
    device: torch.device | str | None = None,
    out: str | None = None,
) -> int:
    """:meth:`Scheduler.spmm_reserve` without a scheduler: from the store's tile table alone.

    Places nothing and allocates nothing, so callers can size a budget, or pass the first
    call's reserve to :class:`Scheduler` (``reserve_bytes``), before any scheduler exists.

    Args:
        store: The tile store.
        f: Columns of ``X`` (positive).
        dtype: ``X``'s dtype.
        device: Where the product runs (``None``: CUDA when available, else CPU).
        out: ``None`` or ``"host"``, as for :meth:`Scheduler.spmm`.

    Returns:
        Device bytes of the output (or write-back staging) and kernel workspace.

    Raises:
        ValueError: ``f`` is not positive, ``out`` or ``device`` is not valid.
    """
    tiles = list(store.tiles)
    n_rows = int(store.shape[0])
    groups, _ = _row_groups(tiles, n_rows)
    return _spmm_reserve(
        f,
        dtype,
        out,
        cuda=resolve_device(device).type == "cuda",
        value_dtype=store.value_dtype,
        slot_bytes=max((int(t.nbytes) for t in tiles), default=0),
        n_rows=n_rows,
        max_rows=max((t.row_stop - t.row_start for t in tiles), default=0),
        acc_rows=sum(stop - start for start, stop, _ in groups),
    )


def _spmm_reserve(
    f: int,
    dtype: torch.dtype,
    out: str | None,
    *,
    cuda: bool,
    value_dtype: np.dtype,
    slot_bytes: int,
    n_rows: int,
    max_rows: int,
    acc_rows: int,
) -> int:
    f = check_positive_int(f, "f")
    to_host = _check_out(out)
    item = torch.empty((), dtype=dtype).element_size()
    cast = value_dtype != _numpy_dtype(dtype)
    workspace = (SPMM_WORKSPACE if cuda else 0) + (slot_bytes * item // 4 if cast else 0)
    if to_host:
        return (STAGES * max_rows + acc_rows) * f * item + workspace
    return n_rows * f * item + workspace


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a ``torch.device``: ``None`` is CUDA when visible (else the CPU), and CUDA
    gets the current index; CUDA without a visible GPU, or another kind, is a ``ValueError``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device: cannot use {device!r} ({error})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but no CUDA device is visible")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    return dev


def _check_into(into: Any, shape: tuple[int, int], dtype: torch.dtype, device_type: str) -> None:
    """``into`` is a contiguous tensor of ``shape`` and ``dtype`` on ``device_type``."""
    if (
        not isinstance(into, torch.Tensor)
        or tuple(into.shape) != shape
        or into.dtype != dtype
        or into.device.type != device_type
        or not into.is_contiguous()
    ):
        got = (
            f"{tuple(into.shape)} {into.dtype} on {into.device}"
            if isinstance(into, torch.Tensor)
            else type(into).__name__
        )
        raise ValueError(
            f"into must be a contiguous {shape} {dtype} tensor on {device_type}, got {got}"
        )


def _check_out(out: Any) -> bool:
    if out is not None and out != "host":
        raise ValueError(f"out must be None or 'host', got {out!r}")
    return out == "host"


def _row_groups(
    tiles: list[Any], n_rows: int
) -> tuple[list[tuple[int, int, list[int]]], list[tuple[int, int]]]:
    """Rows computed by accumulation, and rows no tile covers.

    A tile is summed into its rows (not assigned) when it is a hub-row piece
    (``partial``) or its rows overlap another tile's; overlapping such tiles form one group
    ``(row_start, row_stop, tiles)`` whose rows start at zero each call.
    """
    order = sorted(range(len(tiles)), key=lambda t: (tiles[t].row_start, tiles[t].row_stop))
    overlap: set[int] = set()
    reach, owner = -1, -1
    for t in order:
        if tiles[t].row_start < reach:
            overlap.update((t, owner))
        if tiles[t].row_stop > reach:
            reach, owner = tiles[t].row_stop, t
    acc = [t for t in order if tiles[t].partial or t in overlap]
    groups: list[tuple[int, int, list[int]]] = []
    for t in acc:
        start, stop = tiles[t].row_start, tiles[t].row_stop
        if groups and start < groups[-1][1]:
            g0, g1, members = groups[-1]
            groups[-1] = (g0, max(g1, stop), members + [t])
        else:
            groups.append((start, stop, [t]))
    uncovered = []
    cursor = 0
    for t in order:
        if tiles[t].row_start > cursor:
            uncovered.append((cursor, tiles[t].row_start))
        cursor = max(cursor, tiles[t].row_stop)
    if cursor < n_rows:
        uncovered.append((cursor, n_rows))
    return groups, uncovered


def _shares(n: int, parts: int) -> Iterator[int]:
    """Where each of ``parts`` even shares of ``n`` items ends, then ``n`` for ever."""
    for k in range(1, parts + 1):
        yield round(k * n / parts)
    yield from itertools.repeat(n)


def _layout(p: Placement) -> tuple[Any, ...]:
    """What a placement allocates: equal layouts share memory, whatever their reserves."""
    return (p.slot_bytes, p.n_slots, p.n_disk, p.direct_disk, p.resident, p.host, p.disk)


def _offsets(groups: list[tuple[int, int, list[int]]]) -> list[int]:
    out, total = [], 0
    for start, stop, _ in groups:
        out.append(total)
        total += stop - start
    return out


def _split(
    block: torch.Tensor, tiles: tuple[int, ...], nbytes: list[int], granularity: int = 1
) -> list[torch.Tensor]:
    """Views of ``block`` for ``tiles``, each starting at a multiple of ``granularity``."""
    views, offset = [], 0
    for tile in tiles:
        views.append(block[offset : offset + nbytes[tile]])
        offset += -(-nbytes[tile] // granularity) * granularity
    return views


def _tensor_bytes(t: torch.Tensor) -> int:
    if t.layout == torch.sparse_csr:
        parts = (t.crow_indices(), t.col_indices(), t.values())
        return sum(p.numel() * p.element_size() for p in parts)
    return t.numel() * t.element_size()


def _operand_bytes(x: torch.Tensor) -> int:
    """Device bytes :meth:`Scheduler.spgemm` allocates for sparse CSR ``x``."""
    nbytes = x._nnz() * x.element_size() + 3 * x.shape[0] * 8
    if narrowable(x):
        nbytes += (x.shape[0] + 1 + x._nnz()) * 4
    return nbytes


def _numpy_dtype(dtype: torch.dtype) -> np.dtype | None:
    return {
        torch.float16: np.dtype(np.float16),
        torch.float32: np.dtype(np.float32),
        torch.float64: np.dtype(np.float64),
    }.get(dtype)
