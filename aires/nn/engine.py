"""Runs an epoch's :class:`~aires.nn.program.Program` under a :class:`~aires.nn.plan.Plan`.

Two kinds of pass, each over tensors kept by :class:`~aires.blocks.PanelTensor`:

- **Row-local** (:meth:`Engine.rows_pass`): row blocks flow through two buffer sets. While
  block ``b`` computes on the current stream, block ``b + 1``'s input panels are copied in on a
  copy stream (NVMe panels read into a pinned bounce buffer first) and block ``b - 1``'s output
  panels are copied out on a write-back stream (and written to NVMe by a writer thread once
  their copy lands). CUDA events order load, compute and write-back, so the device never waits
  for a copy that could have run earlier, and no buffer is reused before it is free.
- **Aggregation** (:meth:`Engine.aggregate`): for each column panel of the source, the panel is
  put on the device (its arena view, or one copy into the shared input-panel buffer) and the
  adjacency's :class:`~aires.scheduler.Scheduler` streams ``Â``'s tiles against it, writing the
  output panel straight into its tier (the arena, or pinned memory by the scheduler's own
  write-back stream; NVMe panels through a pinned staging panel). A rank of a distributed
  epoch puts its rows of the panel into an all-rows buffer and has the other ranks' rows
  filled in (the ``exchange`` hook, each piece of its rows sent while the next is copied in)
  before its own tiles stream against it, unless it holds the source whole (``Plan.whole``:
  the input ``x``, which every rank is given).

Nothing runs under autograd: a backward row pass recomputes a block's chain of ops and
back-propagates it by hand at once (:mod:`aires.nn.chain`), or, for a stage the plan keeps,
back-propagates the tape its forward pass recorded (:meth:`Engine.rows_pass`'s ``stable``
blocks).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aires.blocks import PanelTensor, Traffic
from aires.blocks.tensor import Arenas
from aires.blocks.sparse import SparseRows
from aires.nn.plan import Plan
from aires.scheduler import Scheduler
from aires.scheduler.transfer import pinned_empty

if TYPE_CHECKING:
    from aires.distributed.exchange import Exchange

__all__ = ["Engine"]

BlockFn = Callable[[int, int, list[torch.Tensor]], list[torch.Tensor]]
SideFn = Callable[[int, int], list[torch.Tensor]]
PanelMask = Callable[[torch.Tensor, int, int], None]


@dataclass
class _Buffers:
    """One in-flight row block's input and output buffers, and the events that free them."""

    inputs: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    bounce_in: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    bounce_out: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    side: list[torch.Tensor] = field(default_factory=list)
    loaded: Any = None
    consumed: Any = None
    written: Any = None
    flushes: list[Future] = field(default_factory=list)


class Engine:
    """The tensors of a plan, the adjacency's scheduler, and the passes over them.

    Args:
        plan: where everything lives.
        store: the tiled ``Â`` (symmetric).
        device: compute device.
        dtype: dtype of the dense tensors.
        directory: scratch directory for NVMe panels.
        reserve: device bytes the scheduler keeps for one call's output staging and workspace.
        sparse_x: the input features when they are sparse (kept as host CSR, not planned).
        scheduler_options: further :class:`~aires.scheduler.Scheduler` arguments.
        exchange: this process's share of a distributed epoch (:mod:`aires.distributed`):
            ``plan.rows`` of ``exchange.rows`` rows, from ``exchange.start``. Each aggregation's
            input panel then holds all the rows, this rank's copied in and the others' received
            (:meth:`~aires.distributed.Exchange.complete`). ``None``: one process, all rows.
    """

    def __init__(
        self,
        plan: Plan,
        store: Any,
        device: torch.device,
        dtype: torch.dtype,
        directory: Path,
        *,
        reserve: int,
        sparse_x: torch.Tensor | None = None,
        scheduler_options: dict[str, Any] | None = None,
        exchange: Exchange | None = None,
    ) -> None:
        self.plan = plan
        self.exchange = exchange
        self.device = device
        self.dtype = dtype
        self.cuda = device.type == "cuda"
        self.traffic = Traffic()
        clock = time.perf_counter()
        # The host arena is locked page by page (not by PyTorch's caching host allocator, which
        # rounds a block up to a power of two): the pinned bytes are those the budget counted.
        self.arenas = Arenas.allocate(device, plan.arena_bytes, plan.host_arena_bytes,
                                      plan.disk_bytes, directory,
                                      lambda n: pinned_empty(n, device))
        arenas = time.perf_counter() - clock
        slot = max((int(t.nbytes) for t in store.tiles), default=0)
        direct = not self.cuda or store.io_mode != "posix"
        try:
            self.scheduler = Scheduler(
                store,
                gpu_budget=plan.adjacency_gpu,
                host_budget=plan.adjacency_host + (0 if direct else slot),
                device=device,
                disk_workers=1,
                # The plan counts each tile on its own tier's path: no tile takes the other.
                dual=False,
                reserve_bytes=reserve,
                **(scheduler_options or {}),
            )
        except BaseException:
            self.arenas.close()
            raise
        self.scheduler.history = []
        #: Seconds of the set-up's steps: the arenas (the host one locked page by page) and the
        #: adjacency's scheduler (which places its tiles at its first call, in the first epoch).
        self.setup = {"arenas": arenas, "adjacency": time.perf_counter() - clock - arenas}
        self.tensors: dict[str, PanelTensor | SparseRows] = {
            name: PanelTensor(
                name,
                t.rows,
                t.cols,
                plan.panels(t.cols),
                t.tiers,
                t.offsets,
                dtype,
                device,
                self.arenas,
                self.traffic,
            )
            for name, t in plan.tensors.items()
        }
        if sparse_x is not None:
            self.tensors["x"] = SparseRows("x", sparse_x, device, self.traffic)
        panel_bytes = plan.rows * plan.panel_cols * plan.item
        any_disk = any("disk" in t.tiers for t in plan.tensors.values())
        # NVMe-bound aggregation outputs land in pinned memory first, and NVMe-held
        # aggregation inputs are read through two halves of a bounce buffer.
        self._staging = pinned_empty(panel_bytes, device) if any_disk else None
        if self.cuda:
            self._copy = torch.cuda.Stream(device)
            self._back = torch.cuda.Stream(device)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="aires-panel-writer")

    # ----------------------------------------------------------------- aggregation

    def aggregate(self, source: str, target: str, mask: PanelMask | None = None) -> None:
        """``target = Â · source``, one pass over ``Â`` per column panel. ``mask(panel, c0,
        c1)``: applied in place to each panel of ``source`` (columns ``[c0, c1)``, every row
        of the graph) once it is on the device, in the input-panel buffer (a dropout)."""
        src = self.tensors[source]
        if isinstance(src, SparseRows):
            self._spgemm(src, target)
            return
        dst = self.tensors[target]
        for p in range(len(src.panels)):
            x = self._panel_on_device(src, p, own=mask is not None)
            if mask is not None:
                mask(x, *src.panels[p])
            tier = dst.tiers[p]
            if tier == "gpu":
                self.scheduler.spmm(x, into=dst.device_panel(p))
            elif tier == "host":
                self.scheduler.spmm(x, out="host", into=dst.host_panel(p))
            else:
                staged = self._staging[: dst.panel_bytes(p)].view(self.dtype).view(dst.rows, -1)
                self.scheduler.spmm(x, out="host", into=staged)
                dst.flush(p, 0, dst.rows, self._staging)
            if tier != "gpu":
                self.traffic.add("d2h", dst.panel_bytes(p))

    def _spgemm(self, src: SparseRows, target: str) -> None:
        """``target = Â · src`` for sparse ``src`` (cuSPARSE SpGEMM per tile), a host CSR."""
        result = self.scheduler.spgemm(src.whole(), out="host")
        out = SparseRows(target, result, self.device, self.traffic)
        self.traffic.add("d2h", out.nbytes)
        self.tensors[target] = out

    def adjacency_calls(self) -> int:
        """Fold the scheduler calls made since the last fold into the traffic (waiting for
        their GPU work), and return how many there were."""
        self.scheduler.stats  # reduces every pending call into the history
        calls = self.scheduler.history
        for stats in calls:
            self.traffic.add("h2d", stats.bytes_h2d + stats.bytes_disk)
            self.traffic.add("disk_read", stats.bytes_disk)
        self.scheduler.history = []
        return len(calls)

    def _panel_on_device(self, src: PanelTensor, p: int, own: bool = False) -> torch.Tensor:
        """Panel ``p`` of ``src`` on the device, all the graph's rows: its arena view, or (when
        it lives elsewhere, is completed by an exchange, or ``own``: to be changed in place)
        the input-panel buffer."""
        ex = None if src.name in self.plan.whole else self.exchange
        if src.tiers[p] == "gpu" and ex is None and not own:
            return src.device_panel(p)
        rows, start = (src.rows, 0) if ex is None else (ex.rows, ex.start)
        offset = self.plan.panel_offsets[src.name]
        panel = self.arenas.device[offset : offset + src.panel_bytes(p, rows)]
        full = panel.view(self.dtype).view(rows, -1)

        def load(r0: int, r1: int) -> None:
            """This process's rows ``[r0, r1)`` of the panel (rows of ``full``) into place."""
            a, b = r0 - start, r1 - start
            if src.tiers[p] == "gpu":
                full[r0:r1].copy_(src.device_panel(p)[a:b])
            else:
                src.read_rows(p, a, b, full[r0:r1], self._staging)

        if ex is None:
            load(0, src.rows)
        else:
            self.traffic.add("exchange", ex.complete(full, load=load))
        return full

    # ----------------------------------------------------------------- row-local passes

    def rows_pass(
        self,
        sources: list[str],
        targets: list[str],
        fn: BlockFn,
        *,
        stable: bool = False,
        side: SideFn | None = None,
    ) -> None:
        """``targets = fn(sources)`` one row block at a time (see the module notes).

        ``fn(r0, r1, blocks)`` gets each source's rows ``[r0, r1)`` on the device and returns one
        ``(r1 - r0, cols)`` block per target. ``stable``: ``fn`` keeps its blocks past the pass
        (in a kept stage's tape), so each is handed over as a copy of its own: a device
        panel's bytes are reused by tensors that live later, a load buffer by the next blocks.
        ``side(r0, r1)``: host tensors (pinned on a GPU) the block needs beside its rows, copied
        to the device with them and handed to ``fn`` after them. A copy ``fn`` queued itself
        would wait behind the next block's load on the copy engine, and so would ``fn``: the
        loss pass on products at 2 GiB took its 15 blocks' copies and computes in series.
        """
        ins = [self.tensors[s] for s in sources]
        outs = [self.tensors[t] for t in targets]
        rows, step = self.plan.rows, self.plan.rows_for(sources + targets)
        blocks = [(r0, min(r0 + step, rows)) for r0 in range(0, rows, step)]
        if not self.cuda:
            for r0, r1 in blocks:
                inputs = [self._read_cpu(t, r0, r1) for t in ins]
                if stable:
                    inputs = [b.clone() for b in inputs]
                results = fn(r0, r1, inputs + (side(r0, r1) if side else []))
                for t, block in zip(outs, results, strict=True):
                    self._write_cpu(t, r0, block)
            return
        sets = [self._new_buffers(ins, outs, step) for _ in range(2)]
        current = torch.cuda.current_stream(self.device)
        self._load(ins, blocks[0], sets[0], side)
        for b, (r0, r1) in enumerate(blocks):
            if b + 1 < len(blocks):
                self._load(ins, blocks[b + 1], sets[(b + 1) % 2], side)
            s = sets[b % 2]
            current.wait_event(s.loaded)
            inputs = [self._assemble(i, t, r0, r1, s) for i, t in enumerate(ins)]
            if stable:
                inputs = [b.clone() for b in inputs]
            if s.written is not None:
                current.wait_event(s.written)
            for t in s.side:
                t.record_stream(current)  # allocated on the copy stream
            results = fn(r0, r1, inputs + s.side)
            s.side = []
            s.consumed = torch.cuda.Event()
            s.consumed.record(current)
            self._store(outs, r0, results, s, current)
        for s in sets:
            for f in s.flushes:
                f.result()
        torch.cuda.current_stream(self.device).wait_stream(self._back)

    def _new_buffers(self, ins: list[PanelTensor], outs: list[PanelTensor], step: int) -> _Buffers:
        s = _Buffers()
        for i, t in enumerate(ins):
            if isinstance(t, SparseRows):
                continue
            for p in range(len(t.panels)):
                if t.tiers[p] != "gpu":
                    s.inputs[(i, p)] = torch.empty((step, t.width(p)), dtype=self.dtype,
                                                   device=self.device)
                if t.tiers[p] == "disk":
                    s.bounce_in[(i, p)] = torch.empty(t.panel_bytes(p, step), dtype=torch.uint8,
                                                      pin_memory=True)
        for j, t in enumerate(outs):
            for p in t.on("disk"):
                s.bounce_out[(j, p)] = torch.empty(t.panel_bytes(p, step), dtype=torch.uint8,
                                                   pin_memory=True)
        return s

    def _load(
        self, ins: list[PanelTensor], block: tuple[int, int], s: _Buffers, side: SideFn | None
    ) -> None:
        r0, r1 = block
        with torch.cuda.stream(self._copy):
            if s.consumed is not None:
                self._copy.wait_event(s.consumed)
            if s.loaded is not None and s.bounce_in:
                s.loaded.synchronize()  # the last copy out of the bounce buffers is done
            for (i, p), buf in s.inputs.items():
                ins[i].read(p, r0, r1, buf[: r1 - r0], s.bounce_in.get((i, p)))
            if side is not None:
                s.side = [t.to(self.device, non_blocking=True) for t in side(r0, r1)]
            s.loaded = torch.cuda.Event()
            s.loaded.record(self._copy)

    def _assemble(
        self, i: int, t: PanelTensor | SparseRows, r0: int, r1: int, s: _Buffers
    ) -> torch.Tensor:
        """Source ``i``'s rows ``[r0, r1)`` on the device: arena views and loaded panels."""
        if isinstance(t, SparseRows):
            return t.block(r0, r1)
        parts = [
            t.device_panel(p)[r0:r1] if t.tiers[p] == "gpu" else s.inputs[(i, p)][: r1 - r0]
            for p in range(len(t.panels))
        ]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _store(
        self,
        outs: list[PanelTensor],
        r0: int,
        results: list[torch.Tensor],
        s: _Buffers,
        current: torch.cuda.Stream,
    ) -> None:
        for f in s.flushes:
            f.result()
        s.flushes = []
        pending = []
        for j, (t, block) in enumerate(zip(outs, results, strict=True)):
            for p, (c0, c1) in enumerate(t.panels):
                piece = block[:, c0:c1]
                if t.tiers[p] == "gpu":
                    t.write(p, r0, piece, None)
                    continue
                piece = piece.contiguous()
                pending.append((j, p, piece))
        if not pending:
            return
        self._back.wait_stream(current)
        with torch.cuda.stream(self._back):
            for j, p, piece in pending:
                outs[j].write(p, r0, piece, s.bounce_out.get((j, p)))
                piece.record_stream(self._back)
            s.written = torch.cuda.Event()
            s.written.record(self._back)
        for j, p, piece in pending:
            if outs[j].tiers[p] == "disk":
                event, rows = s.written, piece.shape[0]
                bounce = s.bounce_out[(j, p)]
                s.flushes.append(self._writer.submit(_flush, outs[j], p, r0, rows, bounce, event))

    # ----------------------------------------------------------------- CPU path

    def _read_cpu(self, t: PanelTensor | SparseRows, r0: int, r1: int) -> torch.Tensor:
        if isinstance(t, SparseRows):
            return t.block(r0, r1)
        parts = []
        for p in range(len(t.panels)):
            if t.tiers[p] == "gpu":
                parts.append(t.device_panel(p)[r0:r1])
            else:
                buf = torch.empty((r1 - r0, t.width(p)), dtype=self.dtype)
                t.read(p, r0, r1, buf, buf.view(torch.uint8).view(-1))
                parts.append(buf)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _write_cpu(self, t: PanelTensor, r0: int, block: torch.Tensor) -> None:
        for p, (c0, c1) in enumerate(t.panels):
            piece = block[:, c0:c1].contiguous()
            if t.tiers[p] == "disk":
                t.traffic.add("d2h", t.panel_bytes(p, piece.shape[0]))
                t.flush(p, r0, piece.shape[0], piece.view(torch.uint8).view(-1))
            else:
                t.write(p, r0, piece, None)

    # ----------------------------------------------------------------- lifetime

    def close(self) -> None:
        """Free the device arena, pinned panels and NVMe files; stop the scheduler."""
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self._writer.shutdown(wait=True)
        for t in self.tensors.values():
            t.close()
        self.scheduler.close()
        self.arenas.close()
        self._staging = None


def _flush(t: PanelTensor, p: int, r0: int, rows: int, bounce: torch.Tensor, event: Any) -> None:
    event.synchronize()
    t.flush(p, r0, rows, bounce)
