"""Normalisation of a graph's CSR into the entries of ``Â = D^-1/2 (A + I) D^-1/2``, streamed.

:func:`degrees` is one pass over the source CSR (sortedness and range checks included);
:class:`NormalisedRows` then gives ``Â``'s column indices and values by position, computing the
rows a tile covers when the tiler asks for them, so the normalised matrix only ever exists as
tiles. The source is read with ``pread`` into buffers (not memory-mapped), so it sits in the
page cache and not in the process's resident set.

Semantics are PyG's ``gcn_norm`` on an ``edge_index`` with unit weights: loops replaced by one of
weight 1 per node, ``d`` the row lengths of ``A + I``, ``Â[i, j] = d_i^-1/2 * d_j^-1/2``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from aires.progress import progress_bar

__all__ = ["NormalisedRows", "RawCSR", "degrees"]

# Entries normalised at once: temporaries of at most 16 MiB stay under glibc's mmap threshold,
# so freed ones are reused instead of being page-faulted in afresh (minor faults dominated).
_PIECE = 1 << 21
#: Pieces normalised on a device at once (each holds some 60 bytes per entry there).
_DEVICE_PIECES = 4


class RawCSR:
    """The adjacency of an on-disk graph, read by ``pread`` (not mapped: RSS stays small)."""

    def __init__(self, graph_dir: Path) -> None:
        self._ptr = np.load(graph_dir / "adj_indptr.npy", mmap_mode="r", allow_pickle=False)
        self._idx = np.load(graph_dir / "adj_indices.npy", mmap_mode="r", allow_pickle=False)
        self.num_nodes = len(self._ptr) - 1
        self.nnz = len(self._idx)
        #: Stored entries of ``Â``; set by the degree pass.
        self.nnz_hat = 0
        self._fds = {
            name: os.open(arr.filename, os.O_RDONLY)
            for name, arr in (("ptr", self._ptr), ("idx", self._idx))
        }

    def indptr(self, start: int, stop: int) -> np.ndarray:
        """``indptr[start:stop]`` as int64."""
        return _pread(self._fds["ptr"], self._ptr, start, stop).astype(np.int64, copy=False)

    def indices(self, start: int, stop: int) -> np.ndarray:
        """``indices[start:stop]`` as int64."""
        return _pread(self._fds["idx"], self._idx, start, stop).astype(np.int64, copy=False)

    def close(self) -> None:
        """Close the file descriptors."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}


def _pread(fd: int, array: np.memmap, start: int, stop: int) -> np.ndarray:
    """Elements ``[start, stop)`` of a memory-mapped ``.npy`` read into a new array."""
    out = np.empty(max(0, stop - start), dtype=array.dtype)
    view = memoryview(out).cast("B")
    offset = array.offset + start * array.dtype.itemsize
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise EOFError(f"{array.filename}: ends at byte {offset + done}, inside the array")
        done += got
    return out


def _row_chunks(csr: RawCSR, chunk: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(r0, r1, indptr[r0:r1+1])`` for row ranges of about ``chunk`` entries (a longer row
    is a range alone), reading the row pointer in blocks."""
    block = max(1, min(chunk, 1 << 22))
    for b0 in range(0, csr.num_nodes, block):
        b1 = min(csr.num_nodes, b0 + block)
        ptr = csr.indptr(b0, b1 + 1)
        r = 0
        while r < b1 - b0:
            stop = int(np.searchsorted(ptr, ptr[r] + chunk, side="right")) - 1
            stop = min(b1 - b0, max(stop, r + 1))
            yield b0 + r, b0 + stop, ptr[r : stop + 1]
            r = stop


def degrees(
    csr: RawCSR, chunk: int, threads: int, progress: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``A + I`` after replacing self loops (``len(row) - loops + 1``) and which rows
    have loops; also checks that every row's columns are sorted and in range (the tiles are
    trusted afterwards)."""
    n = csr.num_nodes
    degree = np.empty(n, dtype=np.int64)
    has_loop = np.zeros(n, dtype=bool)

    def one(r0: int, r1: int, ptr: np.ndarray) -> int:
        cols = csr.indices(int(ptr[0]), int(ptr[-1]))
        lengths = np.diff(ptr)
        degree[r0:r1] = lengths + 1
        if not cols.size:
            return 0
        lo, hi = int(cols.min()), int(cols.max())
        if lo < 0 or hi >= n:
            raise ValueError(f"adjacency: column index {lo if lo < 0 else hi} is out of range "
                             f"[0, {n}) in rows {r0}..{r1 - 1}")
        rows = np.repeat(np.arange(r0, r1), lengths)
        unsorted = np.flatnonzero((cols[1:] < cols[:-1]) & (rows[1:] == rows[:-1]))
        if unsorted.size:
            raise ValueError(f"adjacency: row {int(rows[unsorted[0]])} has unsorted column indices")
        loop = cols == rows
        if not loop.any():
            return 0
        degree[r0:r1] -= np.bincount(rows[loop] - r0, minlength=r1 - r0)
        has_loop[rows[loop]] = True
        return int(loop.sum())

    bar = progress_bar(total=csr.nnz, desc="degrees", unit="entry", unit_scale=True,
               disable=not progress)
    loops_total = 0
    # numpy releases the GIL in these kernels and the reads, so chunks run side by side; at most
    # 2 * threads chunks are in memory.
    with bar, ThreadPoolExecutor(threads) as pool:
        pending: list[tuple[Future[int], int]] = []
        for r0, r1, ptr in _row_chunks(csr, chunk):
            pending.append((pool.submit(one, r0, r1, ptr), int(ptr[-1] - ptr[0])))
            if len(pending) >= 2 * threads:
                future, size = pending.pop(0)
                loops_total += future.result()
                bar.update(size)
        for future, size in pending:
            loops_total += future.result()
            bar.update(size)
    csr.nnz_hat = csr.nnz - loops_total + n
    return degree, has_loop


class NormalisedRows:
    """Entries of ``Â`` by position, computed from the raw CSR on demand (one tile at a time).

    :attr:`indices` and :attr:`data` are the views the tiler slices. Each thread normalises a
    tile into buffers it keeps (so a tile costs no fresh page faults), in pieces of
    :data:`_PIECE` entries, and serves the tiler's next requests for that tile from them.
    With a ``device`` (a GPU) each piece is normalised there, the same bytes: on the H200
    machine numpy took 21 ns an entry on one thread and the tiler's threads stopped scaling at
    8, so preparation tiled papers100M x0.3 at 1.75 times the disk's write time.
    """

    def __init__(
        self, csr: RawCSR, indptr: np.ndarray, dinv: np.ndarray, has_loop: np.ndarray,
        device: torch.device | None = None,
    ) -> None:
        self._csr = csr
        self._indptr = indptr
        self._dinv = dinv
        self._has_loop = has_loop
        self._device = device
        if device is not None:
            self._dinv_on = torch.from_numpy(dinv).to(device)
            self._on_device = threading.Semaphore(_DEVICE_PIECES)
        self._local = threading.local()
        self.indices = _Column(self, 0, np.dtype(np.int64), int(indptr[-1]))
        self.data = _Column(self, 1, np.dtype(np.float32), int(indptr[-1]))

    def entries(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """Column indices (int64) and values (float32) of ``Â``'s entries ``[lo, hi)``; views
        valid until this thread's next call."""
        local = self._local
        if getattr(local, "span", None) == (lo, hi):
            return local.block
        indptr = self._indptr
        r0 = int(np.searchsorted(indptr, lo, side="right")) - 1
        r1 = max(r0 + 1, int(np.searchsorted(indptr, hi, side="left")))
        base = int(indptr[r0])
        total = int(indptr[r1]) - base
        if getattr(local, "cols", None) is None or len(local.cols) < total:
            local.cols = np.empty(total, dtype=np.int64)
            local.values = np.empty(total, dtype=np.float32)
        a = r0
        while a < r1:
            b = int(np.searchsorted(indptr, indptr[a] + _PIECE, side="right")) - 1
            b = min(r1, max(b, a + 1))
            s, e = int(indptr[a]) - base, int(indptr[b]) - base
            if self._device is None:
                self._rows(a, b, local.cols[s:e], local.values[s:e])
            else:
                self._rows_on_device(a, b, local.cols[s:e], local.values[s:e])
            a = b
        local.span = (lo, hi)
        local.block = (local.cols[lo - base : hi - base], local.values[lo - base : hi - base])
        return local.block

    def _rows(self, r0: int, r1: int, cols_out: np.ndarray, values_out: np.ndarray) -> None:
        """Rows ``[r0, r1)`` of ``Â`` into the outputs: loops dropped, one diagonal entry in
        column order, values ``d_i^-1/2 * d_j^-1/2``."""
        ptr = self._csr.indptr(r0, r1 + 1)
        cols = self._csr.indices(int(ptr[0]), int(ptr[-1]))
        lengths = np.diff(ptr)
        if self._has_loop[r0:r1].any():
            rows = np.repeat(np.arange(r0, r1), lengths)
            keep = cols != rows
            cols = cols[keep]
            lengths = np.bincount(rows[keep] - r0, minlength=r1 - r0)
        # Rows ascend and columns ascend within a row, so ``row * N + col`` is sorted: each
        # diagonal's place is one binary search per row, not a pass over the entries.
        n = self._csr.num_nodes
        diagonal = np.arange(r0, r1)
        key = np.repeat(diagonal * n, lengths)
        key += cols
        at = np.searchsorted(key, diagonal * (n + 1))
        del key
        cols_out[:] = np.insert(cols, at, diagonal)
        own = np.repeat(self._dinv[r0:r1], np.diff(self._indptr[r0 : r1 + 1]))
        np.multiply(own, self._dinv[cols_out], out=values_out)

    def _rows_on_device(
        self, r0: int, r1: int, cols_out: np.ndarray, values_out: np.ndarray
    ) -> None:
        """:meth:`_rows` on the device: the entries and the diagonal sorted by ``row * N + col``
        (rows ascend, columns within a row too), the same float32 products."""
        ptr = self._csr.indptr(r0, r1 + 1)
        cols = self._csr.indices(int(ptr[0]), int(ptr[-1]))
        n, dev = self._csr.num_nodes, self._device
        with self._on_device:
            c = torch.from_numpy(cols).to(dev)
            rows = torch.repeat_interleave(torch.arange(r0, r1, device=dev),
                                           torch.from_numpy(np.diff(ptr)).to(dev))
            if self._has_loop[r0:r1].any():
                keep = c != rows
                c, rows = c[keep], rows[keep]
            diagonal = torch.arange(r0, r1, device=dev)
            key = torch.cat([rows * n + c, diagonal * (n + 1)]).sort().values
            rows, c = key // n, key % n
            values = self._dinv_on[rows] * self._dinv_on[c]
            cols_out[:] = c.cpu().numpy()
            values_out[:] = values.cpu().numpy()


class _Column:
    """A read-only, slice-only view of one array of :class:`NormalisedRows`."""

    ndim = 1

    def __init__(self, rows: NormalisedRows, which: int, dtype: np.dtype, length: int) -> None:
        self._rows = rows
        self._which = which
        self.dtype = dtype
        self.shape = (length,)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: slice | int) -> np.ndarray | np.generic:
        if isinstance(key, slice):
            lo, hi, step = key.indices(self.shape[0])
            if step != 1:
                raise NotImplementedError("normalised entries are read by contiguous slices")
            return self._rows.entries(lo, hi)[self._which]
        return self._rows.entries(int(key), int(key) + 1)[self._which][0]
