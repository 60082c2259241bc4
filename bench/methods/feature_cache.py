"""``feature-cache``: the adjacency and the hottest feature rows cached on the GPU, the rest of
``X`` read zero-copy from pinned host memory, whatever is copied overlapped with compute.

The baseline of GPU feature-caching systems (PaGraph, GNNLab, Data Tiering) in full-graph form,
as their best user would write it:

- the device memory left after the model and its activations goes first to ``Â`` (when it
  fits whole: every epoch reads it once per product, three or four times, against once or
  twice for ``X``, so a byte of ``Â`` saves the most traffic), then to the rows of ``X`` of the
  highest degree (PaGraph's rule: the rows aggregations read most);
- the other rows stay in pinned host memory; GPU kernels gather them directly over PCIe
  (zero-copy through unified virtual addressing, :func:`~bench.methods.pinned.uva_view`);
- an ``Â`` that does not fit is streamed in row chunks through two device buffers, the copy of
  the next chunk on a copy stream overlapping the product of this one
  (:class:`~bench.methods.pinned.PinnedAdjacency`);
- an aggregate-first first layer computes ``Â X`` chunk by chunk over only the rows of ``X``
  the chunk reads (cached ones from the cache, the others zero-copy); when every row is cached,
  ``X`` is kept in node order and ``Â X`` is one product.

Cache size: with ``budget_scope="process"`` one untimed pass with nothing cached measures what
training itself needs (chunk buffers included), and the caches get the rest of the budget less
a margin for allocator fragmentation; with ``"data"`` the caches get the budget (less the chunk
buffers while ``Â`` is streamed). With no budget (and on a CPU without one, where the same code
runs as a smoke form) half of the rows are cached and ``Â`` is streamed. The result says what
was cached: ``cached_rows``, ``cached_fraction``, ``adjacency_cached``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bench.methods.chunks import dense_row_chunks
from bench.methods.config import MethodConfig
from bench.methods.gcn import StreamedGCN
from bench.methods.pinned import PinnedAdjacency, host_tensor, uva_view
from bench.methods.result import MethodResult
from bench.methods.training import (
    Traffic,
    initial_parameters,
    layer_dims,
    layer_orders,
    peak_of_one_pass,
    train,
)
from bench.methods.workload import Workload

__all__ = ["CachedFeatures", "Split", "run", "split_room"]

_MARGIN_BYTES = 128 << 20


class CachedFeatures:
    """``X`` with a device cache of the highest-degree rows; misses read zero-copy from pinned
    host memory.

    Args:
        workload: the problem.
        chunk_bytes: rows gathered per step of ``X W`` and ``Xᵀ G`` (bytes of ``X``).
        device: the compute device.
        traffic: counts the rows read from host memory.
    """

    def __init__(
        self, workload: Workload, chunk_bytes: int, device: torch.device, traffic: Traffic
    ) -> None:
        self.host = host_tensor(np.asarray(workload.x, dtype=np.float32), device)
        self.remote = uva_view(self.host, device) if device.type == "cuda" else self.host
        self.hottest = np.argsort(-np.diff(np.asarray(workload.adj_indptr)), kind="stable")
        self.row_bytes = self.host[0:1].nbytes
        self.chunks = dense_row_chunks(len(self.host), self.row_bytes, chunk_bytes)
        self.device = device
        self.traffic = traffic
        self.fill(0)

    @property
    def cached_rows(self) -> int:
        """Rows held on the device."""
        return len(self.cache)

    @property
    def whole(self) -> bool:
        """Whether every row is cached (then in node order)."""
        return self.cached_rows == len(self.host)

    def fill(self, rows: int) -> None:
        """Cache the ``rows`` highest-degree rows (replacing the cache)."""
        n = len(self.host)
        rows = max(0, min(n, rows))
        self.cache = torch.empty(0)  # release the old cache before allocating the new one
        self.slot = np.full(n, -1, dtype=np.int64)
        if rows == n:
            self.cache = self.host.to(self.device)
            self.slot[:] = np.arange(n)
            self.plan: list[tuple[torch.Tensor, ...]] = []
            return
        hot = self.hottest[:rows]
        self.cache = self.host.index_select(0, torch.from_numpy(hot)).to(self.device)
        self.slot[hot] = np.arange(rows)
        slot = torch.from_numpy(self.slot)
        # Per chunk: (rows of the chunk hit, their cache slots, rows missed, their node ids).
        self.plan = []
        for r0, r1 in self.chunks:
            local = slot[r0:r1]
            hit = torch.nonzero(local >= 0).squeeze(1)
            miss = torch.nonzero(local < 0).squeeze(1)
            self.plan.append(
                tuple(t.to(self.device) for t in (hit, local[hit], miss, miss + r0))
            )

    def _rows(self, i: int) -> torch.Tensor:
        """Rows of chunk ``i`` of ``X`` on the device."""
        r0, r1 = self.chunks[i]
        hit, slots, miss, nodes = self.plan[i]
        rows = torch.empty(r1 - r0, self.host.shape[1], device=self.device)
        # index_copy_ with int64 indices: no host synchronisation (a boolean mask would).
        rows.index_copy_(0, hit, self.cache.index_select(0, slots))
        rows.index_copy_(0, miss, self.remote.index_select(0, nodes))
        self.traffic.h2d += len(nodes) * self.row_bytes
        return rows

    def gather(self, slots: torch.Tensor, misses: torch.Tensor) -> torch.Tensor:
        """The cache's rows at ``slots``, then ``X[misses]`` read zero-copy.
        Shapes: ``(h,), (m,) -> (h + m, F)``."""
        block = torch.empty(len(slots) + len(misses), self.host.shape[1], device=self.device)
        torch.index_select(self.cache, 0, slots, out=block[: len(slots)])
        torch.index_select(self.remote, 0, misses, out=block[len(slots) :])
        self.traffic.h2d += len(misses) * self.row_bytes
        return block

    def matmul(self, weight: torch.Tensor) -> torch.Tensor:
        """``X @ weight``. Shapes: ``(F, C) -> (N, C)``."""
        if self.whole:
            return self.cache @ weight
        out = torch.empty(len(self.host), weight.shape[1], device=self.device)
        for i, (r0, r1) in enumerate(self.chunks):
            out[r0:r1] = self._rows(i) @ weight
        return out

    def t_matmul(self, grad: torch.Tensor) -> torch.Tensor:
        """``Xᵀ @ grad``. Shapes: ``(N, C) -> (F, C)``."""
        if self.whole:
            return self.cache.T @ grad
        out = torch.zeros(self.host.shape[1], grad.shape[1], device=self.device)
        for i, (r0, r1) in enumerate(self.chunks):
            out += self._rows(i).T @ grad[r0:r1]
        return out

    def aggregate(self, adjacency: PinnedAdjacency) -> torch.Tensor:
        """``Â @ X``: one product when ``X`` is cached whole, else gathered chunk by chunk."""
        if self.whole:
            return adjacency.spmm(self.cache)
        return adjacency.gather_spmm(self.gather, self.host.shape[1])


@dataclass(frozen=True)
class Split:
    """What the caches hold: ``Â`` whole or not, and the feature rows."""

    adjacency: bool
    rows: int


def split_room(room: int, adjacency_bytes: int, buffer_bytes: int, row_bytes: int) -> Split:
    """Share ``room`` device bytes: ``Â`` first if it fits whole, the rest to feature rows.

    Args:
        room: bytes for the caches and, while ``Â`` is streamed, its chunk buffers.
        adjacency_bytes: bytes of ``Â`` held whole.
        buffer_bytes: bytes of the chunk buffers of streamed ``Â``.
        row_bytes: bytes of one row of ``X``.
    """
    cached = adjacency_bytes <= room
    rest = room - (adjacency_bytes if cached else buffer_bytes)
    return Split(adjacency=cached, rows=max(0, rest // row_bytes))


def run(workload: Workload, config: MethodConfig) -> MethodResult:
    """Train with ``Â`` and the hottest feature rows cached; report times, traffic and what
    was cached."""
    device = config.torch_device()
    traffic = Traffic()
    orders = layer_orders(workload, config)
    features = CachedFeatures(workload, config.tile_bytes, device, traffic)
    adjacency = PinnedAdjacency(workload, config.tile_bytes, device, traffic,
                                gather=orders[0] == "aggregate_first")
    model = StreamedGCN(initial_parameters(layer_dims(workload, config), config.seed), features,
                        adjacency, device, orders)
    budget = config.gpu_budget
    if budget is None:
        split = Split(adjacency=False, rows=workload.num_nodes // 2)
    else:
        room = budget
        if config.budget_scope == "process":
            peak = peak_of_one_pass(model, list(model.parameters()), workload, device)
            room = budget - (peak - adjacency.buffer_bytes) - max(_MARGIN_BYTES, budget // 20)
        split = split_room(room, adjacency.cache_bytes, adjacency.buffer_bytes,
                           features.row_bytes)
    if split.adjacency:
        adjacency.cache()
    features.fill(split.rows)
    if adjacency.gather and not features.whole:
        adjacency.bind(features.slot)
    log = train(model, list(model.parameters()), workload, config, device, traffic)
    return log.result(
        device,
        cached_rows=features.cached_rows,
        cached_fraction=features.cached_rows / max(1, workload.num_nodes),
        adjacency_cached=adjacency.cached,
        order=config.order,
        orders=orders,
    )
