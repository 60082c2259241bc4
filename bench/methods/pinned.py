"""``Â`` in pinned host memory, in row chunks: kept whole on the device, or streamed through two
chunk buffers with the copies on a stream of their own, overlapping the products.

The adjacency of :mod:`bench.methods.feature_cache`. Every array (chunk-local row pointers,
column indices, values, and for the aggregate-first gather pass its chunk-local column indices
and gather lists) lives in pinned host memory as one tensor; a chunk is a slice of each.

Streaming (CUDA): chunk ``i + 1`` is copied into buffer ``(i + 1) % 2`` on the copy stream while
chunk ``i`` is multiplied on the compute stream; a copy into a buffer waits for the product that
last read it (an event), and a product waits for its chunk's copy (an event), so the host never
waits for the GPU. On a CPU the same code copies synchronously (a smoke form).

Zero-copy view: with unified virtual addressing, memory from ``cudaHostAlloc`` (PyTorch's
pinned allocator) has the same address on host and GPU, so a pinned tensor's pointer, handed to
:func:`torch.as_tensor` through the CUDA Array Interface, gives a CUDA tensor whose kernels read
host memory. No copy is made; ``index_select`` on it is the UVA gather.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import pairwise
from typing import Any

import numpy as np
import torch

from bench.methods.chunks import csr_row_chunks, csr_tensor
from bench.methods.training import Traffic
from bench.methods.workload import Workload

__all__ = ["PinnedAdjacency", "gather_lists", "host_tensor", "uva_view"]


class _HostArray:
    """A pinned host tensor presented through the CUDA Array Interface (keeps it alive)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.__cuda_array_interface__: dict[str, Any] = {
            "shape": tuple(tensor.shape),
            "typestr": np.dtype(str(tensor.dtype).removeprefix("torch.")).str,
            "data": (tensor.data_ptr(), False),
            "strides": None,
            "version": 3,
        }


def uva_view(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor aliasing the pinned, contiguous host tensor ``host`` (zero-copy).

    Raises:
        ValueError: ``host`` is not pinned or not contiguous.
    """
    if not host.is_pinned() or not host.is_contiguous():
        raise ValueError("host must be a pinned, contiguous CPU tensor for a zero-copy view")
    view = torch.as_tensor(_HostArray(host), device=device)
    if view.data_ptr() != host.data_ptr():
        raise RuntimeError("the zero-copy view does not alias the pinned host tensor")
    return view


def host_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A copy of ``array`` in host memory, pinned when the computation runs on a GPU.

    Filled by blocks, so a memory-mapped array is never held twice in RAM.
    """
    dtype = torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype
    tensor = torch.empty(array.shape, dtype=dtype, pin_memory=device.type == "cuda")
    flat, target = array.reshape(-1), tensor.numpy().reshape(-1)
    step = 1 << 26
    for start in range(0, len(flat), step):
        target[start : start + step] = flat[start : start + step]
    return tensor


def gather_lists(
    indptr: np.ndarray, indices: np.ndarray, chunks: list[tuple[int, int]], slot: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
    """Per row chunk, the rows of ``X`` its product ``Â[r0:r1] X`` reads, cached ones first.

    Args:
        indptr, indices: ``Â``'s row pointer and column indices.
        chunks: row ranges.
        slot: cache slot of every node, ``-1`` where it is not cached.

    Returns:
        ``(local, slots, misses)``: ``Â``'s column indices renumbered per chunk into the rows of
        its gathered block (the cached rows first, then the others); per chunk the cache slots
        of the cached rows and the node ids of the others, so that ``Â[r0:r1] X`` equals
        ``local_chunk @ concat(cache[slots], X[misses])``.
    """
    local = np.empty(len(indices), dtype=indices.dtype)
    slots, misses = [], []
    # A chunk's distinct columns, sorted, and each entry's place among them, by marking a
    # node-sized array: linear in the chunk and the nodes, where np.unique sorts the chunk
    # (on products that sort was most of the feature cache's set-up).
    present = np.zeros(len(slot), dtype=bool)
    place = np.empty(len(slot), dtype=np.int64)
    for r0, r1 in chunks:
        s, e = int(indptr[r0]), int(indptr[r1])
        present[indices[s:e]] = True
        columns = np.flatnonzero(present)
        present[columns] = False
        place[columns] = np.arange(len(columns))
        inverse = place[indices[s:e]]
        hit = slot[columns] >= 0
        order = np.argsort(~hit, kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        local[s:e] = rank[inverse]
        slots.append(slot[columns[order[: hit.sum()]]])
        misses.append(columns[order[hit.sum() :]])
    return local, slots, misses


def _concat(parts: list[np.ndarray], dtype: type) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The parts end to end, and each part's ``(start, stop)``."""
    bounds = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    joined = np.concatenate(parts).astype(dtype) if parts else np.empty(0, dtype)
    return joined, [(int(a), int(b)) for a, b in pairwise(bounds)]


class PinnedAdjacency:
    """``Â`` in pinned host memory, multiplied chunk by chunk, cached whole or streamed.

    Args:
        workload: the problem.
        chunk_bytes: CSR bytes per row chunk.
        device: the compute device.
        traffic: counts the bytes copied to the device.
        gather: also keep the arrays of the gather pass ``Â X`` (:meth:`gather_spmm`).
    """

    def __init__(
        self,
        workload: Workload,
        chunk_bytes: int,
        device: torch.device,
        traffic: Traffic,
        gather: bool,
    ) -> None:
        self.indptr = np.asarray(workload.adj_indptr, dtype=np.int64)
        indices = np.asarray(workload.adj_indices)
        self.index_dtype = indices.dtype
        self.n = workload.num_nodes
        self.device = device
        self.traffic = traffic
        self.chunks = csr_row_chunks(
            self.indptr, chunk_bytes, indices.itemsize + np.dtype(np.float32).itemsize
        )
        entries = [(int(self.indptr[r0]), int(self.indptr[r1])) for r0, r1 in self.chunks]
        crow, crow_slices = _concat(
            [self.indptr[r0 : r1 + 1] - self.indptr[r0] for r0, r1 in self.chunks],
            self.index_dtype,
        )
        self.host = {
            "crow": host_tensor(crow, device),
            "col": host_tensor(indices, device),
            "val": host_tensor(np.asarray(workload.adj_data, dtype=np.float32), device),
        }
        self.slices = {"crow": crow_slices, "col": entries, "val": entries}
        self.resident: dict[str, torch.Tensor] | None = None
        self.whole: torch.Tensor | None = None
        self.gather = gather
        if gather:
            self.bind(np.full(self.n, -1, dtype=np.int64))
        # A chunk's gathered rows split between cache and misses as the cache says: each of
        # the two lists may hold all of them, so both buffers hold the most a chunk gathers.
        sizes = {name: max(b - a for a, b in slices) for name, slices in self.slices.items()}
        if gather:
            sizes["slots"] = sizes["misses"]
        self.buffers = {
            name: [torch.empty(sizes[name], dtype=tensor.dtype, device=device) for _ in range(2)]
            for name, tensor in self.host.items()
        }
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    @property
    def cached(self) -> bool:
        """Whether ``Â`` is held whole on the device."""
        return self.resident is not None

    @property
    def cache_bytes(self) -> int:
        """Device bytes of ``Â`` held whole (every array, and the whole-graph row pointer)."""
        whole_crow = self.indptr.size * self.index_dtype.itemsize
        return sum(t.nbytes for t in self.host.values()) + whole_crow

    @property
    def buffer_bytes(self) -> int:
        """Device bytes of the two chunk buffers of the streamed form."""
        return sum(b.nbytes for pair in self.buffers.values() for b in pair)

    def bind(self, slot: np.ndarray) -> None:
        """Make the gather pass's arrays for a feature cache with slot ``slot[node]`` (``-1``:
        not cached); the device copies too when ``Â`` is cached."""
        local, slots, misses = gather_lists(
            self.indptr, np.asarray(self.host["col"].numpy()), self.chunks, slot
        )
        index = np.int32 if self.n < 2**31 else np.int64
        slots_joined, slot_slices = _concat(slots, index)
        misses_joined, miss_slices = _concat(misses, index)
        for name, array, slices in (
            ("local", local, self.slices["col"]),
            ("slots", slots_joined, slot_slices),
            ("misses", misses_joined, miss_slices),
        ):
            if name in self.host and self.host[name].shape == array.shape:
                self.host[name].numpy()[:] = array  # same sizes: refill the pinned pages
            else:
                self.host[name] = host_tensor(array, self.device)
            self.slices[name] = slices
        if self.resident is not None:
            self.cache()

    def cache(self) -> None:
        """Hold ``Â`` whole on the device (the chunk buffers are released)."""
        self.buffers = {}
        self.resident = {name: t.to(self.device) for name, t in self.host.items()}
        self.whole = csr_tensor(
            torch.from_numpy(self.indptr.astype(self.index_dtype)).to(self.device),
            self.resident["col"], self.resident["val"], self.n,
        )

    def _load(self, i: int, names: tuple[str, ...], parity: int) -> list[torch.Tensor]:
        """Copy chunk ``i`` of ``names`` into buffer ``parity`` (on the current stream)."""
        views = []
        for name in names:
            a, b = self.slices[name][i]
            view = self.buffers[name][parity][: b - a]
            view.copy_(self.host[name][a:b], non_blocking=True)
            self.traffic.h2d += view.nbytes
            views.append(view)
        return views

    def _chunk_arrays(self, names: tuple[str, ...]) -> Iterator[list[torch.Tensor]]:
        """Chunk by chunk, the device arrays ``names`` (double-buffered when streamed)."""
        count = len(self.chunks)
        if self.resident is not None:
            for i in range(count):
                yield [self.resident[n][slice(*self.slices[n][i])] for n in names]
            return
        if self.copy_stream is None:
            for i in range(count):
                yield self._load(i, names, 0)
            return
        compute = torch.cuda.current_stream(self.device)
        released: list[torch.cuda.Event | None] = [None, None]

        def issue(i: int) -> tuple[list[torch.Tensor], torch.cuda.Event]:
            parity = i % 2
            with torch.cuda.stream(self.copy_stream):
                if released[parity] is not None:
                    self.copy_stream.wait_event(released[parity])
                views = self._load(i, names, parity)
                loaded = torch.cuda.Event()
                loaded.record(self.copy_stream)
            return views, loaded

        upcoming = issue(0)
        for i in range(count):
            views, loaded = upcoming
            if i + 1 < count:
                upcoming = issue(i + 1)
            compute.wait_event(loaded)
            yield views
            released[i % 2] = torch.cuda.Event()
            released[i % 2].record(compute)

    def spmm(self, dense: torch.Tensor) -> torch.Tensor:
        """``Â @ dense``. Shapes: ``(N, C) -> (N, C)``."""
        if self.whole is not None:
            return torch.sparse.mm(self.whole, dense)
        out = torch.empty(self.n, dense.shape[1], device=self.device, dtype=dense.dtype)
        arrays = self._chunk_arrays(("crow", "col", "val"))
        for (r0, r1), (crow, col, val) in zip(self.chunks, arrays):
            out[r0:r1] = torch.sparse.mm(csr_tensor(crow, col, val, self.n), dense)
        return out

    def gather_spmm(
        self, gather: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], columns: int
    ) -> torch.Tensor:
        """``Â @ X`` with ``X`` gathered per chunk (:meth:`bind`): ``gather(slots, misses)``
        returns the cache's rows at ``slots`` followed by ``X[misses]``.
        Shapes: ``() -> (N, columns)``.
        """
        out = torch.empty(self.n, columns, device=self.device)
        arrays = self._chunk_arrays(("crow", "local", "val", "slots", "misses"))
        for (r0, r1), (crow, local, val, slots, misses) in zip(self.chunks, arrays):
            block = gather(slots, misses)
            out[r0:r1] = torch.sparse.mm(csr_tensor(crow, local, val, len(block)), block)
        return out
