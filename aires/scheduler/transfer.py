"""The data paths: host DMA, NVMe reads, write-back, and the dispatcher between the two inputs.

- **Host path**: a phase-2 tile's pinned bytes are copied into a device slot with
  ``slot.copy_(pinned, non_blocking=True)`` on a dedicated copy stream (``cudaMemcpyAsync``),
  after the copy stream has waited, on the GPU, for the compute that last read the slot.
- **Disk path**: worker threads read whole aligned tiles with ``TileStore.read_bytes``. With
  KvikIO (GDS or its compatibility mode) the read lands straight in the worker's device slot;
  otherwise it lands in the worker's pinned bounce buffer and is copied to the slot on the
  disk path's own stream, so a slow disk never queues behind host copies.
- **Write-back**: outputs that must not stay on the device go device -> pinned host on a third
  stream, ordered after the compute that produced them.
- **Dispatcher**: a tile in pinned memory can travel either path (every tile is also in the
  tile file). The disk path takes the host queue's last tile when it would deliver it before
  the host path reaches it, judged from throughputs measured as the run goes (exponential
  moving averages), so both paths finish together. On a GPU both paths end on the same PCIe
  link (a bounce copy, or GDS's peer-to-peer write), which host DMA alone saturates, so there
  a pinned tile always takes the host path and the disk path carries the phase-3 tiles.

On the CPU (``device="cpu"``) the same objects run without streams: copies are ``memcpy``s and
the disk threads read with POSIX I/O, so CI exercises every rule.
"""

from __future__ import annotations

import mmap
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from aires.blocks.tensor import aligned_empty
from aires.scheduler.placement import round_up
from aires.scheduler.stats import Recorder
from aires.tiling import TileCorruptError

__all__ = [
    "Dispatcher",
    "HostPath",
    "DiskPath",
    "WriteBack",
    "pinned_empty",
    "pinned_nbytes",
    "copy_rate",
    "word_sum",
]

#: Prior for a disk path not yet measured: below the cold single-thread reads measured on the
#: benchmark machine (1.2 to 2.0 GB/s; DESIGN.md, "Physical limits"), so an unmeasured disk
#: takes a pinned tile only when even a cold read of it would beat the host path. Optimism
#: here cost a whole cold read (~13 ms for a 16 MiB tile) on a host queue due in 10 ms.
DISK_PRIOR = 1e9


class Dispatcher:
    """Chooses the path for each tile both paths can deliver, from measured throughput.

    Rates are bytes per second, one exponential moving average per path (``"host"``,
    ``"disk"``); ``update`` folds in a new measurement with weight ``smoothing`` and marks the
    path ``measured``. Until then a path's rate is its prior, which for the disk must be
    conservative (:data:`DISK_PRIOR`): a steal on an optimistic guess costs a whole slow read
    on the critical path. A scheduler keeps its dispatcher, so rates measured in one call
    carry to the next.

    The rule (:meth:`steal`): the host path works through its queue front to back; the disk
    path, whenever a worker is free and has no disk-only tile left, considers the host
    queue's *last* tile. The host path would deliver it after all ``host_remaining`` bytes,
    at ``host_remaining / rate["host"]``; the disk path in ``nbytes / rate["disk"]``. The tile
    goes to whichever is sooner. Since ``host_remaining`` only shrinks, once the disk path
    declines it never steals again in that call: the two paths end together.

    With ``shared_link`` the two paths end on one link that the host path's DMA already
    saturates (a GPU's PCIe link: the disk path's bytes cross it by a bounce copy, or by GDS's
    peer-to-peer write). A stolen tile then still costs the link its bytes, so the host path
    cannot end sooner, and a disk read that comes late makes the call later: measured on the
    H100, stealing from a cold disk made a host-streamed SpMM 9% slower, and stealing from the
    page cache made training epochs vary from 158 to 256 ms. Nothing is stolen over a shared
    link.

    Args:
        host_rate: Initial host-path throughput, bytes/s.
        disk_rate: Initial disk-path throughput per worker, bytes/s.
        smoothing: Weight of a new measurement, in (0, 1].
        shared_link: The disk path's bytes cross the link that host DMA saturates.
    """

    def __init__(
        self,
        host_rate: float,
        disk_rate: float = DISK_PRIOR,
        *,
        smoothing: float = 0.5,
        shared_link: bool = False,
    ) -> None:
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing!r}")
        for name, rate in (("host_rate", host_rate), ("disk_rate", disk_rate)):
            if not rate > 0:
                raise ValueError(f"{name} must be positive bytes/s, got {rate!r}")
        self.rates = {"host": float(host_rate), "disk": float(disk_rate)}
        self.measured: set[str] = set()
        self.smoothing = smoothing
        self.shared_link = shared_link
        self._lock = threading.Lock()

    def update(self, path: str, nbytes: int, seconds: float) -> None:
        """Fold a measured transfer of ``nbytes`` in ``seconds`` into ``path``'s rate."""
        if nbytes <= 0 or seconds <= 0:
            return
        with self._lock:
            old = self.rates[path]
            self.rates[path] = (1 - self.smoothing) * old + self.smoothing * (nbytes / seconds)
            self.measured.add(path)

    def prime(self, path: str, rate: float) -> None:
        """Set ``path``'s prior to ``rate`` unless the path has been measured already."""
        with self._lock:
            if path not in self.measured and rate > 0:
                self.rates[path] = float(rate)

    def eta(self, path: str, nbytes: int) -> float:
        """Seconds ``path`` needs for ``nbytes`` at its current rate."""
        return nbytes / self.rates[path]

    def steal(self, nbytes: int, host_remaining: int) -> bool:
        """Whether the disk path delivers an ``nbytes`` tile before the host path reaches it.

        Taking it shortens the call exactly when this holds: the host path would finish its
        queue at ``host_remaining / rate["host"]``, the disk path this tile at
        ``nbytes / rate["disk"]`` (a free worker starts it now).

        Args:
            nbytes: The candidate tile (the host queue's last).
            host_remaining: Host-path bytes not yet delivered, the candidate included.
        """
        if self.shared_link:
            return False
        return self.eta("disk", nbytes) < self.eta("host", host_remaining)


#: Host page size: page-locking works in whole pages.
PAGE = mmap.PAGESIZE
#: Transparent huge page size (x86-64 and arm64 with 4 KiB pages).
HUGE_PAGE = 2 << 20
#: Buffers from this size on are mapped in huge pages and faulted in by several threads
#: before they are locked: papers100M x0.3's 48 GiB host arena took 16.2 s to lock on the
#: H200 machine as torch.empty memory, faulted in 4 KiB at a time by the driver's one thread.
LARGE_PINNED = 256 << 20
#: Threads that fault a large buffer in.
FAULT_THREADS = 8


def pinned_nbytes(nbytes: int, device: torch.device) -> int:
    """Host bytes :func:`pinned_empty` locks for an ``nbytes`` buffer (0 off CUDA)."""
    return round_up(int(nbytes), PAGE) if device.type == "cuda" else 0


def pinned_empty(nbytes: int, device: torch.device) -> torch.Tensor:
    """A host byte buffer, page-locked when ``device`` is CUDA (DMA-able, allocated once).

    On CUDA the buffer is ordinary host memory whose page-aligned range of
    :func:`pinned_nbytes` bytes is locked with ``cudaHostRegister``, so the bytes locked are
    exactly those counted against ``host_budget``. ``pin_memory=True`` would go through
    PyTorch's caching host allocator, which rounds each block up to a power of two: up to
    twice the bytes, which no budget saw. The pages are unlocked when the returned tensor is
    collected (after the device is synchronised, so no copy still reads them); views of it
    must not outlive it.
    """
    if device.type != "cuda":
        return torch.empty(int(nbytes), dtype=torch.uint8)
    size = pinned_nbytes(nbytes, device)
    block = host_pages(size) if size >= LARGE_PINNED else aligned_empty(size, PAGE)
    cudart = torch.cuda.cudart()
    error = int(cudart.cudaHostRegister(block.data_ptr(), size, 0))
    if error:
        raise RuntimeError(
            f"cudaHostRegister of {size} bytes of host memory failed with CUDA error {error}"
        )
    out = block[: int(nbytes)]
    # Not at exit: the CUDA context may be gone by then, and the process's pages go with it.
    weakref.finalize(out, _unregister, cudart, block.data_ptr(), device).atexit = False
    return out


def host_pages(nbytes: int) -> torch.Tensor:
    """``nbytes`` of zeroed anonymous memory in transparent huge pages where the kernel gives
    them (``MADV_HUGEPAGE``), already faulted in by :data:`FAULT_THREADS` threads, so that
    locking it (:func:`pinned_empty`) finds every page present: one fault per 2 MiB instead
    of 512, spread over cores. Starts at a multiple of :data:`HUGE_PAGE`."""
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(area, dtype=torch.uint8)  # keeps ``area`` mapped while it lives
    skip = -raw.data_ptr() % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            area.madvise(mmap.MADV_HUGEPAGE)
        except OSError:  # no transparent huge pages here: 4 KiB pages, faulted the same way
            pass
    block = raw[skip : skip + nbytes]
    step = round_up(-(-nbytes // FAULT_THREADS), HUGE_PAGE)
    threads = [threading.Thread(target=block[at : at + step].fill_, args=(0,))
               for at in range(0, nbytes, step)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return block


def _unregister(cudart: Any, ptr: int, device: torch.device) -> None:
    # A copy queued from these pages may still run: wait for the device first.
    torch.cuda.synchronize(device)
    cudart.cudaHostUnregister(ptr)


def copy_rate(dst: torch.Tensor, src: torch.Tensor) -> float:
    """Bytes/s of one ``dst.copy_(src)`` (timed with CUDA events when either is on a GPU)."""
    nbytes = src.numel() * src.element_size()
    if dst.is_cuda or src.is_cuda:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        seconds = start.elapsed_time(end) / 1e3
    else:
        t0 = time.perf_counter()
        dst.copy_(src)
        seconds = time.perf_counter() - t0
    return nbytes / max(seconds, 1e-9)


class HostPath:
    """Pinned host tile -> device slot on a dedicated copy stream."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def load(self, slot: torch.Tensor, src: torch.Tensor, after: Any, rec: Recorder) -> Any:
        """Copy ``src`` into ``slot[:len(src)]`` once ``after`` (the slot's last reader) is done.

        Returns:
            The event that marks the copy's end (``None`` on the CPU, where it is done).
        """
        nbytes = src.numel()
        if self.stream is None:
            start = rec.mark()
            slot[:nbytes].copy_(src)
            end = rec.mark()
            rec.loads.append(("h2d", nbytes, start, end))
            return None
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            start = rec.mark(self.stream)
            slot[:nbytes].copy_(src, non_blocking=True)
            end = rec.mark(self.stream)
        rec.loads.append(("h2d", nbytes, start, end))
        return end

    def load_parts(
        self,
        slot: torch.Tensor,
        src: torch.Tensor,
        parts: Sequence[Sequence[tuple[int, int]]],
        after: Any,
        rec: Recorder,
    ) -> list[Any]:
        """Copy a tile in parts, each a list of ``(offset, length)`` byte ranges of ``src``
        copied to the same place in ``slot``, with an event after each part, so the compute of
        part ``k`` can start while part ``k + 1`` is still on the bus.

        Recorded as one load of ``src``'s length (the tile), like :meth:`load`.

        Returns:
            One event per part (``None`` each on the CPU, where the copies are done).
        """
        nbytes = src.numel()
        if self.stream is None:
            start = rec.mark()
            for ranges in parts:
                for offset, length in ranges:
                    slot[offset : offset + length].copy_(src[offset : offset + length])
            rec.loads.append(("h2d", nbytes, start, rec.mark()))
            return [None] * len(parts)
        ready = []
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            start = rec.mark(self.stream)
            for ranges in parts:
                for offset, length in ranges:
                    slot[offset : offset + length].copy_(
                        src[offset : offset + length], non_blocking=True
                    )
                ready.append(rec.mark(self.stream))
        rec.loads.append(("h2d", nbytes, start, ready[-1]))
        return ready


def word_sum(buf: torch.Tensor) -> int:
    """Sum mod 2**64 of ``buf``'s bytes read as 64-bit words: one pass, on ``buf``'s device.

    The cheap check of a tile read into GPU memory: any change confined to one word (a flipped
    byte, a torn sector's worth of zeros in a word) changes it, and a tile read from the
    wrong place or a store rewritten since gives another sum (but for a 2**-64 chance). The
    reduction allocates no tile-sized temporary.

    Args:
        buf: contiguous uint8 tensor, 8-byte aligned, a multiple of 8 bytes long (tiles and
            slots are: their lengths and offsets are multiples of the store's alignment).
    """
    return int(queued_word_sum(buf)) % (1 << 64)


def queued_word_sum(buf: torch.Tensor) -> torch.Tensor:
    """:func:`word_sum` as a 0-d int64 tensor on ``buf``'s device, queued on the current stream
    without waiting for it (two's complement: the same bits as the sum mod 2**64)."""
    if buf.numel() % 8 or buf.data_ptr() % 8:
        raise ValueError(
            f"buf must be 8-byte aligned and a multiple of 8 bytes long, got {buf.numel()} "
            f"bytes at address {buf.data_ptr():#x}"
        )
    return buf.view(torch.int64).sum()


class DiskPath:
    """Whole-tile reads from the tile file into a worker's device slot, each one checked.

    Worker ``k`` reads into the device slot it is handed and, unless reads go to the device
    directly, through its own pinned bounce buffer ``bounce[k]``. Calls for worker ``k`` come
    from one thread at a time.

    Checks: a read that lands in host memory (POSIX into a bounce buffer, or the CPU's slots)
    checks the tile's CRC-32, folded into the read for free, and a mismatch is a
    :class:`~aires.tiling.TileCorruptError` naming the tile and this path, raised before the
    tile reaches a computation. A KvikIO read into GPU memory would have to copy the tile back
    to the host for its CRC, so there a tile's first read does that, and takes the
    :func:`word_sum` of the checked bytes on the device; every later read of the tile is summed
    on the device just before the tile's compute, on the compute's stream
    (:meth:`queue_check`), and :meth:`verify` (at the end of the call) compares the sums with
    the first reads' at once. A mismatch is then the error, raised by the call instead of
    returning its product. (A worker waiting for each sum had cost the products SpMM 21% on
    the H200, and sums on a stream of their own that the computes waited for 6%: such a sum
    waits for the SpMM kernels running when it is queued.)

    Args:
        store: The tile store (``read_bytes``, ``tiles``).
        device: The compute device.
        bounce: One pinned buffer per worker, or ``None`` when reads go to the device directly.
        dispatcher: Receives the measured read throughput.
        crc_every_read: Check every read by CRC-32 (``True``) or only first reads, later ones
            by word sum (``False``); ``None``: CRC where reads land in host memory.
        checks: ``False`` (an ablation, see :class:`~aires.scheduler.Scheduler`): no check.
    """

    def __init__(
        self,
        store: Any,
        device: torch.device,
        bounce: Sequence[torch.Tensor] | None,
        dispatcher: Dispatcher,
        *,
        crc_every_read: bool | None = None,
        checks: bool = True,
    ) -> None:
        self.store = store
        self.checks = checks
        self.bounce = list(bounce) if bounce is not None else None
        self.dispatcher = dispatcher
        cuda = device.type == "cuda"
        direct = cuda and bounce is None
        self.crc_every_read = not direct if crc_every_read is None else crc_every_read
        if not cuda:
            self.via = "the disk path (POSIX read into host memory)"
        elif direct:
            self.via = f"the disk path (KvikIO, {store.io_mode}, read into GPU memory)"
        else:
            self.via = "the disk path (POSIX read into a pinned bounce buffer)"
        self.stream = torch.cuda.Stream(device) if cuda and bounce is not None else None
        # The word sums run apart from the computes, which may be queued on the default stream.
        self._check_stream = (
            torch.cuda.Stream(device) if cuda and not self.crc_every_read else None
        )
        self._sums: dict[int, int] = {}
        self._queued: list[tuple[int, torch.Tensor]] = []  # later reads' sums, on the device
        self._unchecked: dict[int, tuple[int, int]] = {}  # worker -> (tile, bytes) to sum
        self._bounce_free: list[Any] = [None] * (len(self.bounce) if self.bounce else 0)

    def _read(self, worker: int, tile: int, target: torch.Tensor) -> None:
        """Read ``tile`` into ``target`` and check it, or leave its check to
        :meth:`queue_check` (see the class notes)."""
        try:
            if self.crc_every_read or not self.checks:
                self.store.read_bytes(tile, target, verify=self.checks)
                return
            first = tile not in self._sums
            self.store.read_bytes(tile, target, verify=first)
            if self._check_stream is None:  # the CPU: host memory, and crc_every_read is off
                got = word_sum(target)
                if first:
                    self._sums[tile] = got
                else:
                    self._compare(tile, got)
            elif first:
                with torch.cuda.stream(self._check_stream):
                    self._sums[tile] = word_sum(target)
            else:
                self._unchecked[worker] = (tile, target.numel())
        except TileCorruptError as error:
            raise error.came_by(self.via) from error

    def queue_check(self, worker: int, slot: torch.Tensor) -> None:
        """Queue the sum of the tile worker ``worker`` last read into ``slot``, if its check
        was left to this, on the current stream: call it where the tile's compute is queued,
        just before it (:meth:`verify` compares the sums)."""
        pending = self._unchecked.pop(worker, None)
        if pending is not None:
            tile, nbytes = pending
            self._queued.append((tile, queued_word_sum(slot[:nbytes])))

    def _compare(self, tile: int, got: int) -> None:
        expected = self._sums[tile]
        if got != expected:
            data_path = self.store.data_path
            raise TileCorruptError(
                f"tile {tile} of {data_path} is corrupt: 64-bit word sum {got:#018x}, its "
                f"first (CRC-checked) read gave {expected:#018x}",
                path=data_path,
                tile=tile,
            )

    def checked(
        self, worker: int, compute: Callable[[int, torch.Tensor], None]
    ) -> Callable[[int, torch.Tensor], None]:
        """``compute(tile, slot)`` for worker ``worker``'s tiles, each preceded by
        :meth:`queue_check`."""

        def run(tile: int, slot: torch.Tensor) -> None:
            self.queue_check(worker, slot)
            compute(tile, slot)

        return run

    def verify(self) -> None:
        """Compare the sums queued by this call's reads with the tiles' first reads' (one
        wait for all of them); a mismatch is a ``TileCorruptError`` naming the tile and path."""
        queued, self._queued = self._queued, []
        if not queued:
            return
        sums = torch.stack([total for _, total in queued]).cpu().tolist()
        try:
            for (tile, _), got in zip(queued, sums, strict=True):
                self._compare(tile, got % (1 << 64))
        except TileCorruptError as error:
            raise error.came_by(self.via) from error

    def fetch(
        self, worker: int, tile: int, nbytes: int, slot: torch.Tensor, after: Any, rec: Recorder
    ) -> Any:
        """Read ``tile`` into ``slot`` once ``after`` (the slot's last reader) is done.

        Runs on the worker's thread and blocks it for the read.

        Returns:
            The event the compute must wait for (``None`` when the bytes are already there).
        """
        if self.bounce is None:
            # The read writes the slot from the host side: the slot's last reader must be done.
            if after is not None:
                after.synchronize()
            t0 = time.perf_counter()
            self._read(worker, tile, slot[:nbytes])
            t1 = time.perf_counter()
            ready = None
        else:
            bounce = self.bounce[worker]
            if self._bounce_free[worker] is not None:
                self._bounce_free[worker].synchronize()
            t0 = time.perf_counter()
            self._read(worker, tile, bounce[:nbytes])
            t1 = time.perf_counter()
            if self.stream is None:
                slot[:nbytes].copy_(bounce[:nbytes])
                ready = None
            else:
                with torch.cuda.stream(self.stream):
                    if after is not None:
                        self.stream.wait_event(after)
                    slot[:nbytes].copy_(bounce[:nbytes], non_blocking=True)
                    ready = rec.mark(self.stream)
                self._bounce_free[worker] = ready
        rec.disk_reads.append((nbytes, t0, t1))
        rec.loads.append(("disk", nbytes, None, None))
        self.dispatcher.update("disk", nbytes, t1 - t0)
        return ready


class WriteBack:
    """Device -> pinned host copies of outputs, on their own stream."""

    def __init__(self, device: torch.device) -> None:
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Any, rec: Recorder) -> Any:
        """``dst.copy_(src)`` once ``after`` (the compute that wrote ``src``) is done.

        Returns:
            The event that marks the copy's end; ``src`` may be reused after it.
        """
        nbytes = src.numel() * src.element_size()
        if self.stream is None:
            start = rec.mark()
            dst.copy_(src)
            rec.writebacks.append((nbytes, start, rec.mark()))
            return None
        with torch.cuda.stream(self.stream):
            if after is not None:
                self.stream.wait_event(after)
            start = rec.mark(self.stream)
            dst.copy_(src, non_blocking=True)
            end = rec.mark(self.stream)
        rec.writebacks.append((nbytes, start, end))
        return end
