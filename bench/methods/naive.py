"""``naive``: the adjacency and features copied to the GPU in row chunks, one at a time.

What a first out-of-core attempt does: every chunk of rows is copied from ordinary (pageable)
host memory into a fresh GPU tensor, synchronously, then computed; nothing is preallocated,
aligned or overlapped. Chunks hold ``tile_bytes`` of CSR, like AIRES tiles. The fresh tensors
come from PyTorch's caching allocator, so the allocation cost is the one PyTorch users pay.
On a CPU the copies are plain memory copies (a smoke form of the same code).
"""

from __future__ import annotations

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
    layer_orders,
    train,
)
from bench.methods.workload import Workload

__all__ = ["NaiveAdjacency", "NaiveFeatures", "run"]


class NaiveAdjacency:
    """``Â`` in pageable host memory, copied a row chunk at a time for every product."""

    def __init__(
        self, workload: Workload, chunk_bytes: int, device: torch.device, traffic: Traffic
    ) -> None:
        self.indptr = np.array(workload.adj_indptr)
        self.indices = np.array(workload.adj_indices)
        self.data = np.array(workload.adj_data)
        entry = self.indices.itemsize + self.data.itemsize
        self.chunks = csr_row_chunks(self.indptr, chunk_bytes, entry)
        self.n = workload.num_nodes
        self.device = device
        self.traffic = traffic

    def spmm(self, dense: torch.Tensor) -> torch.Tensor:
        """``Â @ dense``, chunk by chunk. Shapes: ``(N, C) -> (N, C)``."""
        out = torch.empty(self.n, dense.shape[1], device=self.device, dtype=dense.dtype)
        for r0, r1 in self.chunks:
            s, e = int(self.indptr[r0]), int(self.indptr[r1])
            crow = torch.from_numpy((self.indptr[r0 : r1 + 1] - s).astype(self.indices.dtype))
            parts = [crow, torch.from_numpy(self.indices[s:e]), torch.from_numpy(self.data[s:e])]
            parts = [p.to(self.device, copy=True) for p in parts]
            self.traffic.h2d += sum(p.nbytes for p in parts)
            out[r0:r1] = torch.sparse.mm(csr_tensor(*parts, self.n), dense)
        return out


class NaiveFeatures:
    """``X`` in pageable host memory, copied a row chunk at a time for every product."""

    def __init__(
        self, workload: Workload, chunk_bytes: int, device: torch.device, traffic: Traffic
    ) -> None:
        self.x = np.array(workload.x, dtype=np.float32)
        self.chunks = dense_row_chunks(len(self.x), self.x[0:1].nbytes, chunk_bytes)
        self.device = device
        self.traffic = traffic

    def _chunk(self, r0: int, r1: int) -> torch.Tensor:
        rows = torch.from_numpy(self.x[r0:r1]).to(self.device, copy=True)
        self.traffic.h2d += rows.nbytes
        return rows

    def matmul(self, weight: torch.Tensor) -> torch.Tensor:
        """``X @ weight``. Shapes: ``(F, C) -> (N, C)``."""
        out = torch.empty(len(self.x), weight.shape[1], device=self.device)
        for r0, r1 in self.chunks:
            out[r0:r1] = self._chunk(r0, r1) @ weight
        return out

    def t_matmul(self, grad: torch.Tensor) -> torch.Tensor:
        """``Xᵀ @ grad``. Shapes: ``(N, C) -> (F, C)``."""
        out = torch.zeros(self.x.shape[1], grad.shape[1], device=self.device)
        for r0, r1 in self.chunks:
            out += self._chunk(r0, r1).T @ grad[r0:r1]
        return out

    def aggregate(self, adjacency: NaiveAdjacency) -> torch.Tensor:
        """``Â @ X``: ``X`` copied whole to the device, chunk by chunk, then multiplied."""
        x = torch.empty(self.x.shape, device=self.device)
        for r0, r1 in self.chunks:
            x[r0:r1] = self._chunk(r0, r1)
        return adjacency.spmm(x)


def run(workload: Workload, config: MethodConfig) -> MethodResult:
    """Train with naive chunked copies; report epoch times and bytes copied per epoch."""
    device = config.torch_device()
    traffic = Traffic()
    model = StreamedGCN(
        initial_parameters(layer_dims(workload, config), config.seed),
        NaiveFeatures(workload, config.tile_bytes, device, traffic),
        NaiveAdjacency(workload, config.tile_bytes, device, traffic),
        device,
        layer_orders(workload, config),
    )
    log = train(model, list(model.parameters()), workload, config, device, traffic)
    return log.result(device, chunks=len(model.adjacency.chunks), order=config.order,
                      orders=model.orders, memory="pageable host, synchronous copies")
