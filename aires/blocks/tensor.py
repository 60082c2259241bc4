"""An ``(N, F)`` dense tensor stored as column panels, each on the device, in pinned host memory
or in a file on NVMe.

A panel holds all ``N`` rows of ``w`` columns, row-major, so rows ``[r0, r1)`` of a panel are one
contiguous range in every tier: a row block is read or written with one copy (or one ``pread``
/ ``pwrite``) per panel, and a whole panel with one. Host panels are page-locked (on a
GPU) so copies are DMA and asynchronous; NVMe panels start at 4 KiB-aligned offsets and are
read and written with ``O_DIRECT`` where the file system allows it (every 4 KiB-aligned
stretch of a transfer; its unaligned ends through the page cache), so an NVMe tier's bytes are
the disk's, not host memory's the budget did not count.

Panels are views of three :class:`Arenas` (a device buffer, a pinned buffer, a file), at
offsets planned so that tensors alive at the same time never overlap: tensors that live one
after the other share bytes on every tier. Every copy that crosses a path is counted in a
:class:`~aires.blocks.Traffic`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from aires.blocks.traffic import Traffic
from aires.checks import format_bytes

__all__ = ["Arenas", "PanelTensor", "PAGE_ROWS", "TIERS", "aligned_empty"]

TIERS = ("gpu", "host", "disk")
_ALIGN = 4096
#: Rows of any panel that fill whole 4 KiB pages (at elements of 4 bytes or more): row blocks
#: that start at multiples of it move by direct I/O on NVMe.
PAGE_ROWS = 1024


@dataclass
class Arenas:
    """The memory tensors' panels are carved from: one device buffer, one pinned host buffer
    and one file on NVMe, each shared (at planned offsets) by tensors that do not live at
    once."""

    device: torch.Tensor | None = None
    host: torch.Tensor | None = None
    path: Path | None = None
    fd: int | None = None
    direct_fd: int | None = None

    @classmethod
    def allocate(cls, device: torch.device, device_bytes: int, host_bytes: int,
                 disk_bytes: int, directory: Path | None,
                 pin: Callable[[int], torch.Tensor]) -> Arenas:
        """The three arenas; ``pin(nbytes)`` allocates the host one (page-locked on a GPU)."""
        arenas = cls()
        if disk_bytes:  # checked first: locking a large host arena takes seconds
            if directory is None:
                raise ValueError("NVMe panels need a directory")
            free = shutil.disk_usage(directory).free
            if free < disk_bytes:
                raise ValueError(
                    f"NVMe panels need {disk_bytes} bytes ({format_bytes(disk_bytes)}) in "
                    f"{directory}, which has {free} bytes ({format_bytes(free)}) free; give a "
                    f"larger host_budget or a scratch_dir on a larger disk"
                )
        if device_bytes:
            arenas.device = torch.empty(device_bytes, dtype=torch.uint8, device=device)
        if host_bytes:
            arenas.host = pin(host_bytes)
        if disk_bytes:
            arenas.path = Path(directory) / f"aires-panels-{os.getpid()}-{id(arenas)}.bin"
            arenas.fd = os.open(arenas.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(arenas.fd, disk_bytes)
            if hasattr(os, "O_DIRECT"):
                try:
                    arenas.direct_fd = os.open(arenas.path, os.O_RDWR | os.O_DIRECT)
                except OSError:  # tmpfs and some others refuse O_DIRECT
                    arenas.direct_fd = None
        return arenas

    @property
    def direct(self) -> bool:
        """Whether NVMe panels bypass the page cache."""
        return self.direct_fd is not None

    def sync(self) -> None:
        """Push the NVMe file's writes through to the disk (after filling panels at set-up, so
        that writes still in the page cache do not compete with the first epoch's reads)."""
        if self.fd is not None:
            os.fsync(self.fd)

    def close(self) -> None:
        """Release the buffers and remove the file."""
        self.device = self.host = None
        for fd in (self.fd, self.direct_fd):
            if fd is not None:
                os.close(fd)
        self.fd = self.direct_fd = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None


class PanelTensor:
    """Column panels of one tensor, each on its tier.

    Args:
        name: for messages.
        rows, cols: the shape.
        panels: ``(c0, c1)`` column range of each panel.
        tiers: each panel's tier (``"gpu"``, ``"host"``, ``"disk"``).
        offsets: each panel's byte offset in its tier's arena.
        dtype: element type.
        device: the compute device (``"gpu"`` panels live there; on the CPU, in host memory).
        arenas: the device buffer, pinned buffer and file the panels are views of.
        traffic: counts the bytes moved.
    """

    def __init__(
        self,
        name: str,
        rows: int,
        cols: int,
        panels: Sequence[tuple[int, int]],
        tiers: Sequence[str],
        offsets: Sequence[int],
        dtype: torch.dtype,
        device: torch.device,
        arenas: Arenas,
        traffic: Traffic,
    ) -> None:
        if not len(panels) == len(tiers) == len(offsets):
            raise ValueError(f"{name}: {len(panels)} panels, {len(tiers)} tiers, "
                             f"{len(offsets)} offsets")
        self.name, self.rows, self.cols = name, rows, cols
        self.panels = list(panels)
        self.tiers = list(tiers)
        self.dtype = dtype
        self.device = device
        self.item = torch.empty((), dtype=dtype).element_size()
        self.traffic = traffic
        self._cuda = device.type == "cuda"
        self._gpu: dict[int, torch.Tensor] = {}
        self._host: dict[int, torch.Tensor] = {}
        self._disk: dict[int, int] = {}  # panel -> byte offset in the file
        self._fd = arenas.fd
        self._direct_fd = arenas.direct_fd
        self.path = arenas.path
        for p, ((c0, c1), tier) in enumerate(zip(self.panels, self.tiers, strict=True)):
            nbytes = rows * (c1 - c0) * self.item
            if tier in ("gpu", "host"):
                arena = arenas.device if tier == "gpu" else arenas.host
                if arena is None:
                    raise ValueError(f"{name}: a {tier} panel needs a {tier} arena")
                view = arena[offsets[p] : offsets[p] + nbytes].view(dtype).view(rows, c1 - c0)
                (self._gpu if tier == "gpu" else self._host)[p] = view
            elif tier == "disk":
                if self._fd is None:
                    raise ValueError(f"{name}: an NVMe panel needs a file")
                self._disk[p] = offsets[p]
            else:
                raise ValueError(f"{name}: tier must be one of {TIERS}, got {tier!r}")

    # ----------------------------------------------------------------- shape

    def width(self, p: int) -> int:
        c0, c1 = self.panels[p]
        return c1 - c0

    def panel_bytes(self, p: int, rows: int | None = None) -> int:
        return (self.rows if rows is None else rows) * self.width(p) * self.item

    def on(self, tier: str) -> list[int]:
        """Panels on ``tier``."""
        return [p for p, t in enumerate(self.tiers) if t == tier]

    # ----------------------------------------------------------------- device panels

    def device_panel(self, p: int) -> torch.Tensor:
        """Panel ``p`` itself, on the device (``"gpu"`` panels only)."""
        return self._gpu[p]

    def host_panel(self, p: int) -> torch.Tensor:
        """Panel ``p`` itself, in (pinned) host memory (``"host"`` panels only)."""
        return self._host[p]

    # ----------------------------------------------------------------- row blocks in

    def read(
        self, p: int, r0: int, r1: int, dst: torch.Tensor, bounce: torch.Tensor | None
    ) -> None:
        """Rows ``[r0, r1)`` of panel ``p`` into the device tensor ``dst`` on the current stream.

        ``"disk"`` panels are read with ``pread`` into ``bounce`` (pinned host bytes the caller
        owns and no copy still reads) first; the call returns once that read is done and the
        copy to the device is queued.
        """
        tier = self.tiers[p]
        if tier == "gpu":
            dst.copy_(self._gpu[p][r0:r1])
            return
        nbytes = self.panel_bytes(p, r1 - r0)
        if tier == "host":
            src = self._host[p][r0:r1]
        else:
            assert bounce is not None, "a disk panel is read through a bounce buffer"
            src = bounce[:nbytes].view(self.dtype).view(r1 - r0, self.width(p))
            self._pread(p, r0, src)
            self.traffic.add("disk_read", nbytes)
        self.traffic.add("h2d", nbytes)
        dst.copy_(src, non_blocking=True)

    def read_rows(
        self, p: int, r0: int, r1: int, dst: torch.Tensor, bounce: torch.Tensor | None
    ) -> None:
        """Rows ``[r0, r1)`` of panel ``p``, any number of them, into the device tensor ``dst``
        on the current stream.

        A ``"disk"`` panel is read in pieces through the two halves of ``bounce``, each half
        reused once the copy out of it has completed, so the disk and the copy overlap; the
        call returns once the last copy out of ``bounce`` is done, so the next may reuse it.
        """
        if self.tiers[p] != "disk":
            self.read(p, r0, r1, dst, None)
            return
        assert bounce is not None, "a disk panel is read through a bounce buffer"
        halves = 2 if self._cuda else 1
        half = bounce.numel() // halves // _ALIGN * _ALIGN or bounce.numel() // halves
        step = max(1, half // self.panel_bytes(p, 1))
        step = step // PAGE_ROWS * PAGE_ROWS or step  # whole pages: direct reads
        done: list[torch.cuda.Event | None] = [None] * halves
        for k, a in enumerate(range(r0, r1, step)):
            h = k % halves
            if done[h] is not None:
                done[h].synchronize()
            b = min(a + step, r1)
            self.read(p, a, b, dst[a - r0 : b - r0], bounce[h * half : (h + 1) * half])
            if self._cuda:
                done[h] = torch.cuda.Event()
                done[h].record()
        for event in done:
            if event is not None:
                event.synchronize()

    # ----------------------------------------------------------------- row blocks out

    def write(self, p: int, r0: int, src: torch.Tensor, bounce: torch.Tensor | None) -> None:
        """``src`` (device rows ``[r0, r0 + len(src))`` of panel ``p``) to the panel's tier, on
        the current stream; ``"disk"`` panels are copied into ``bounce`` here and written by
        :meth:`flush` once that copy is done."""
        tier = self.tiers[p]
        r1 = r0 + src.shape[0]
        if tier == "gpu":
            self._gpu[p][r0:r1].copy_(src)
            return
        nbytes = self.panel_bytes(p, r1 - r0)
        self.traffic.add("d2h", nbytes)
        if tier == "host":
            self._host[p][r0:r1].copy_(src, non_blocking=True)
            return
        assert bounce is not None, "a disk panel is written through a bounce buffer"
        stage = bounce[:nbytes].view(self.dtype).view(r1 - r0, self.width(p))
        stage.copy_(src, non_blocking=True)

    def flush(self, p: int, r0: int, rows: int, bounce: torch.Tensor) -> None:
        """Write ``rows`` rows staged in ``bounce`` to panel ``p`` at row ``r0`` (the copy into
        ``bounce`` must be complete)."""
        nbytes = self.panel_bytes(p, rows)
        view = bounce[:nbytes].view(self.dtype).view(rows, self.width(p))
        self._pwrite(p, r0, view)
        self.traffic.add("disk_write", nbytes)

    def write_host(self, p: int, r0: int, src: torch.Tensor) -> None:
        """Host rows (already in host memory) into panel ``p``: filling a tensor at set-up."""
        tier = self.tiers[p]
        r1 = r0 + src.shape[0]
        if tier == "gpu":
            self._gpu[p][r0:r1].copy_(src)
        elif tier == "host":
            self._host[p][r0:r1].copy_(src)
        else:
            # Through page-aligned memory, so that the file's aligned stretches go direct.
            staged = aligned_empty(src.numel() * self.item).view(self.dtype).view(src.shape)
            staged.copy_(src)
            self._pwrite(p, r0, staged)

    def to_host(self) -> torch.Tensor:
        """The whole tensor in host memory (for results and tests)."""
        out = torch.empty((self.rows, self.cols), dtype=self.dtype)
        for p, (c0, c1) in enumerate(self.panels):
            tier = self.tiers[p]
            if tier == "gpu":
                out[:, c0:c1] = self._gpu[p].cpu()
            elif tier == "host":
                out[:, c0:c1] = self._host[p]
            else:
                part = torch.empty((self.rows, c1 - c0), dtype=self.dtype)
                self._pread(p, 0, part)
                out[:, c0:c1] = part
        return out

    def close(self) -> None:
        """Drop the views of the arenas (which their owner releases)."""
        self._gpu.clear()
        self._host.clear()
        self._fd = self._direct_fd = None

    def __repr__(self) -> str:
        return f"PanelTensor({self.name!r}, ({self.rows}, {self.cols}), tiers={self.tiers})"

    # ----------------------------------------------------------------- file I/O

    def _pread(self, p: int, r0: int, dst: torch.Tensor) -> None:
        offset = self._disk[p] + r0 * self.width(p) * self.item
        for fd, view, at in _pieces(self._fd, self._direct_fd, _bytes(dst), offset):
            done = 0
            while done < view.size:
                n = os.preadv(fd, [view[done:]], at + done)
                if n <= 0:
                    raise OSError(f"{self.path}: short read of panel {p} at byte {at + done}")
                done += n

    def _pwrite(self, p: int, r0: int, src: torch.Tensor) -> None:
        offset = self._disk[p] + r0 * self.width(p) * self.item
        for fd, view, at in _pieces(self._fd, self._direct_fd, _bytes(src), offset):
            done = 0
            while done < view.size:
                done += os.pwritev(fd, [view[done:]], at + done)


def aligned_empty(nbytes: int, align: int = _ALIGN) -> torch.Tensor:
    """``nbytes`` of host memory starting at a multiple of ``align`` (``O_DIRECT`` needs 4 KiB,
    ``cudaHostRegister`` whole pages)."""
    raw = torch.empty(nbytes + align, dtype=torch.uint8)
    skip = -raw.data_ptr() % align
    return raw[skip : skip + nbytes]


def _pieces(
    fd: int, direct_fd: int | None, view: np.ndarray, offset: int
) -> list[tuple[int, np.ndarray, int]]:
    """``(fd, bytes, file offset)`` pieces of a transfer of ``view`` at ``offset``: its
    4 KiB-aligned middle through ``direct_fd`` (``O_DIRECT`` needs the memory address, the
    offset and the length aligned), the ends, or all of it when the address and the offset
    are not aligned alike, through the page cache."""
    if direct_fd is None or (view.ctypes.data - offset) % _ALIGN:
        pieces = [(fd, view, offset)]
    else:
        head = min(-offset % _ALIGN, view.size)
        middle = (view.size - head) // _ALIGN * _ALIGN
        pieces = [(fd, view[:head], offset),
                  (direct_fd, view[head : head + middle], offset + head),
                  (fd, view[head + middle :], offset + head + middle)]
    return [(f, v, at) for f, v, at in pieces if v.size]


def _bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous host tensor's bytes as a writable numpy view (no copy)."""
    assert t.is_contiguous() and t.device.type == "cpu"
    return t.view(torch.uint8).reshape(-1).numpy()
