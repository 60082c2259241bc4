"""A sparse ``(N, F)`` tensor kept in host memory as CSR, handed out a row block at a time.

Sparse input features (bag-of-words) and their aggregation ``Â X`` (an SpGEMM result) are held
this way: their size follows their nonzeros, which the dense planner cannot know in advance, and
a CSR row block is contiguous in each of its three arrays, so it crosses to the device with
three copies.
"""

from __future__ import annotations

import torch

from aires.blocks.traffic import Traffic

__all__ = ["SparseRows"]


class SparseRows:
    """Host CSR rows, served as device CSR blocks.

    Args:
        name: for messages.
        matrix: a torch sparse CSR (or COO) tensor, on any device (kept in host memory, pinned
            when ``device`` is a GPU).
        device: where blocks are handed out.
        traffic: counts the bytes copied to the device.
    """

    def __init__(
        self, name: str, matrix: torch.Tensor, device: torch.device, traffic: Traffic
    ) -> None:
        if matrix.layout == torch.sparse_coo:
            matrix = matrix.coalesce().to_sparse_csr()
        if matrix.layout != torch.sparse_csr:
            raise ValueError(f"{name}: expected a sparse CSR or COO tensor, got {matrix.layout}")
        cuda = device.type == "cuda"
        self.name = name
        self.rows, self.cols = (int(s) for s in matrix.shape)
        self.dtype = matrix.dtype
        self.device = device
        self.traffic = traffic
        self._cuda = cuda

        def host(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().to("cpu").contiguous()
            return t.pin_memory() if cuda else t

        # One index dtype for both arrays: torch's CSR constructor requires it.
        self.crow = host(matrix.crow_indices().to(torch.int64))
        self.col = host(matrix.col_indices().to(torch.int64))
        self.val = host(matrix.values())

    @property
    def nnz(self) -> int:
        return int(self.val.numel())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.crow, self.col, self.val))

    def block(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` as a sparse CSR tensor on the device (queued on the current stream)."""
        lo, hi = int(self.crow[r0]), int(self.crow[r1])
        crow = self.crow[r0 : r1 + 1] - lo
        col, val = self.col[lo:hi], self.val[lo:hi]
        self.traffic.add("h2d", sum(t.numel() * t.element_size() for t in (crow, col, val)))
        dev = self.device
        return torch.sparse_csr_tensor(
            crow.to(dev, non_blocking=True),
            col.to(dev, non_blocking=True),
            val.to(dev, non_blocking=True),
            (r1 - r0, self.cols),
        )

    def whole(self) -> torch.Tensor:
        """All rows on the device (an SpGEMM operand)."""
        return self.block(0, self.rows)

    def close(self) -> None:
        """Nothing on disk or the device to release; kept for the tensors' common surface."""
