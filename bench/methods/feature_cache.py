"""``feature-cache``: hot feature rows cached on the GPU, the rest read through unified addressing.

The baseline of GPU feature-caching systems (PaGraph, GNNLab, Data Tiering) in full-graph form:

- the features of the highest-degree nodes are cached on the GPU, as many rows as the budget
  leaves room for;
- the other rows stay in pinned host memory and GPU kernels read them directly over PCIe
  (zero-copy through unified virtual addressing), gathered chunk by chunk for ``X W`` and
  ``Xᵀ G``;
- the adjacency stays in pinned host memory and is copied a row chunk at a time into one
  preallocated GPU buffer for every product, on the compute stream: each copy waits for the
  previous chunk's product (these systems do not pipeline it), but the host never waits for
  the GPU, so the kernels are queued back to back.

Zero-copy view: with unified virtual addressing, memory from ``cudaHostAlloc`` (PyTorch's
pinned allocator) has the same address on host and GPU, so a pinned tensor's pointer, handed to
:func:`torch.as_tensor` through the CUDA Array Interface, gives a CUDA tensor whose kernels read
host memory. No copy is made; ``index_select`` on it is the UVA gather.

Cache size: with ``budget_scope="process"`` one untimed pass with an empty cache measures what
training itself needs, and the cache gets the rest of the budget (less a margin for allocator
fragmentation); with ``"data"`` the cache gets the budget less the adjacency buffer. With no
budget (and on a CPU, where the same code runs as a smoke form) half of the rows are cached.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from bench.methods.chunks import csr_row_chunks, csr_tensor, dense_row_chunks
from bench.methods.config import MethodConfig
from bench.methods.gcn import StreamedGCN
from bench.methods.result import MethodResult
from bench.methods.training import (
    Traffic,
    initial_parameters,
    layer_dims,
    peak_of_one_pass,
    train,
)
from bench.methods.workload import Workload

__all__ = ["CachedFeatures", "PinnedAdjacency", "run", "uva_view"]

_MARGIN_BYTES = 128 << 20


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


def _host_tensor(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A copy of ``array`` in host memory, pinned when the computation runs on a GPU.

    Filled by row blocks, so a memory-mapped array is never held twice in RAM.
    """
    dtype = torch.from_numpy(np.empty(0, dtype=array.dtype)).dtype
    tensor = torch.empty(array.shape, dtype=dtype, pin_memory=device.type == "cuda")
    flat, target = array.reshape(-1), tensor.numpy().reshape(-1)
    step = 1 << 26
    for start in range(0, len(flat), step):
        target[start : start + step] = flat[start : start + step]
    return tensor


class CachedFeatures:
    """``X`` with a GPU cache of the highest-degree rows; misses read from pinned host memory.

    Args:
        workload: the problem.
        chunk_bytes: rows gathered per step (bytes of ``X``).
        device: the compute device.
        traffic: counts the rows read from host memory.
    """

    def __init__(
        self, workload: Workload, chunk_bytes: int, device: torch.device, traffic: Traffic
    ) -> None:
        self.host = _host_tensor(np.asarray(workload.x, dtype=np.float32), device)
        self.remote = uva_view(self.host, device) if device.type == "cuda" else self.host
        self.degree = np.diff(np.asarray(workload.adj_indptr))
        self.row_bytes = self.host[0:1].nbytes
        self.chunks = dense_row_chunks(len(self.host), self.row_bytes, chunk_bytes)
        self.device = device
        self.traffic = traffic
        self.fill(0)

    @property
    def cached_rows(self) -> int:
        """Rows held on the device."""
        return len(self.cache)

    def fill(self, rows: int) -> None:
        """Cache the ``rows`` highest-degree rows (replacing the cache)."""
        n = len(self.host)
        rows = max(0, min(n, rows))
        hot = torch.from_numpy(np.argsort(-self.degree, kind="stable")[:rows].astype(np.int64))
        self.cache = torch.empty(0)  # release the old cache before allocating the new one
        self.cache = self.host.index_select(0, hot).to(self.device)
        slot = torch.full((n,), -1, dtype=torch.int64)
        slot[hot] = torch.arange(rows)
        # Per chunk: (rows of the chunk hit, their cache slots, rows missed, their node ids).
        self.plan = []
        for r0, r1 in self.chunks:
            local = slot[r0:r1]
            hit = torch.nonzero(local >= 0).squeeze(1)
            miss = torch.nonzero(local < 0).squeeze(1)
            self.plan.append(
                tuple(t.to(self.device) for t in (hit, local[hit], miss, miss + r0))
            )

    def _gather(self, i: int) -> torch.Tensor:
        r0, r1 = self.chunks[i]
        hit, slots, miss, nodes = self.plan[i]
        rows = torch.empty(r1 - r0, self.host.shape[1], device=self.device)
        # index_copy_ with int64 indices: no host synchronisation (a boolean mask would).
        rows.index_copy_(0, hit, self.cache.index_select(0, slots))
        rows.index_copy_(0, miss, self.remote.index_select(0, nodes))
        self.traffic.h2d += len(nodes) * self.row_bytes
        return rows

    def matmul(self, weight: torch.Tensor) -> torch.Tensor:
        """``X @ weight``. Shapes: ``(F, C) -> (N, C)``."""
        out = torch.empty(len(self.host), weight.shape[1], device=self.device)
        for i, (r0, r1) in enumerate(self.chunks):
            out[r0:r1] = self._gather(i) @ weight
        return out

    def t_matmul(self, grad: torch.Tensor) -> torch.Tensor:
        """``Xᵀ @ grad``. Shapes: ``(N, C) -> (F, C)``."""
        out = torch.zeros(self.host.shape[1], grad.shape[1], device=self.device)
        for i, (r0, r1) in enumerate(self.chunks):
            out += self._gather(i).T @ grad[r0:r1]
        return out


class PinnedAdjacency:
    """``Â`` in pinned host memory, copied row chunk by row chunk into one preallocated buffer."""

    def __init__(
        self, workload: Workload, chunk_bytes: int, device: torch.device, traffic: Traffic
    ) -> None:
        self.indptr = np.asarray(workload.adj_indptr, dtype=np.int64)
        self.indices = _host_tensor(np.asarray(workload.adj_indices), device)
        self.data = _host_tensor(np.asarray(workload.adj_data), device)
        entry = self.indices.element_size() + self.data.element_size()
        self.chunks = csr_row_chunks(self.indptr, chunk_bytes, entry)
        # Chunk-local row pointers, made once: chunk i's is local_crow[r0 + i : r1 + i + 1].
        self.local_crow = _host_tensor(
            np.concatenate(
                [self.indptr[r0 : r1 + 1] - self.indptr[r0] for r0, r1 in self.chunks]
            ).astype(self.indices.numpy().dtype),
            device,
        )
        max_rows = max(r1 - r0 for r0, r1 in self.chunks)
        max_nnz = max(int(self.indptr[r1] - self.indptr[r0]) for r0, r1 in self.chunks)
        self.buffers = (
            torch.empty(max_rows + 1, dtype=self.indices.dtype, device=device),
            torch.empty(max_nnz, dtype=self.indices.dtype, device=device),
            torch.empty(max_nnz, dtype=self.data.dtype, device=device),
        )
        self.n = workload.num_nodes
        self.device = device
        self.traffic = traffic

    @property
    def buffer_bytes(self) -> int:
        """GPU bytes of the chunk buffer."""
        return sum(b.nbytes for b in self.buffers)

    def spmm(self, dense: torch.Tensor) -> torch.Tensor:
        """``Â @ dense``, chunk by chunk through the buffer. Shapes: ``(N, C) -> (N, C)``."""
        out = torch.empty(self.n, dense.shape[1], device=self.device, dtype=dense.dtype)
        crow_buf, col_buf, val_buf = self.buffers
        for i, (r0, r1) in enumerate(self.chunks):
            s, e = int(self.indptr[r0]), int(self.indptr[r1])
            crow, col, val = crow_buf[: r1 - r0 + 1], col_buf[: e - s], val_buf[: e - s]
            # Pinned sources: asynchronous copies, ordered after the previous chunk's product
            # (which read the same buffer) by the stream.
            crow.copy_(self.local_crow[r0 + i : r1 + i + 1], non_blocking=True)
            col.copy_(self.indices[s:e], non_blocking=True)
            val.copy_(self.data[s:e], non_blocking=True)
            self.traffic.h2d += crow.nbytes + col.nbytes + val.nbytes
            out[r0:r1] = torch.sparse.mm(csr_tensor(crow, col, val, self.n), dense)
        return out


def run(workload: Workload, config: MethodConfig) -> MethodResult:
    """Train with a degree-ordered feature cache; report times, traffic and the cache size."""
    device = config.torch_device()
    traffic = Traffic()
    features = CachedFeatures(workload, config.tile_bytes, device, traffic)
    adjacency = PinnedAdjacency(workload, config.tile_bytes, device, traffic)
    model = StreamedGCN(
        initial_parameters(layer_dims(workload, config), config.seed), features, adjacency, device
    )
    budget = config.gpu_budget if device.type == "cuda" else None
    if budget is None:
        rows = workload.num_nodes // 2
    elif config.budget_scope == "process":
        room = budget - peak_of_one_pass(model, list(model.parameters()), workload, device)
        rows = (room - max(_MARGIN_BYTES, budget // 20)) // features.row_bytes
    else:
        rows = (budget - adjacency.buffer_bytes) // features.row_bytes
    features.fill(int(rows))
    log = train(model, list(model.parameters()), workload, config, device, traffic)
    return log.result(
        device,
        cached_rows=features.cached_rows,
        cached_fraction=features.cached_rows / max(1, workload.num_nodes),
    )
