"""Row chunks of a CSR matrix and of a dense matrix, as the chunked baselines move them."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["csr_row_chunks", "dense_row_chunks", "csr_tensor", "on_device"]

#: Bytes of an array read and copied to the device at a time by :func:`on_device`.
COPY_CHUNK_BYTES = 256 << 20


def csr_row_chunks(indptr: np.ndarray, chunk_bytes: int, entry_bytes: int) -> list[tuple[int, int]]:
    """Row ranges whose CSR bytes (``entry_bytes`` per entry, 8 per row) stay under ``chunk_bytes``.

    Boundaries come from the prefix sums of the row lengths; a row larger than a chunk is a
    chunk of its own (the baselines do not split rows).
    """
    n = len(indptr) - 1
    row_cost = np.asarray(indptr, dtype=np.int64) * entry_bytes + np.arange(n + 1) * 8
    bounds = [0]
    while bounds[-1] < n:
        r0 = bounds[-1]
        r1 = int(np.searchsorted(row_cost, row_cost[r0] + chunk_bytes, side="right")) - 1
        bounds.append(min(n, max(r1, r0 + 1)))
    return list(zip(bounds[:-1], bounds[1:]))


def dense_row_chunks(rows: int, row_bytes: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Row ranges of a dense matrix with at most ``chunk_bytes`` per range (at least one row)."""
    step = max(1, chunk_bytes // max(1, row_bytes))
    return [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]


def on_device(array: np.ndarray, dtype: type, device: torch.device) -> torch.Tensor:
    """``array`` (a memory map, say) as ``dtype`` in a tensor on ``device``, allocated first and
    filled :data:`COPY_CHUNK_BYTES` at a time: a tensor beyond the budget runs out of memory
    before a byte of it is read (papers100M x0.3's in-core baselines had spent their sweep
    time reading 25 GB, then ran out), and the host holds a chunk of it, not a copy."""
    out = torch.empty(array.shape, dtype=torch.from_numpy(np.empty(0, dtype=dtype)).dtype,
                      device=device)
    row_bytes = max(1, out[0].numel() * out.element_size()) if len(out) else 1
    for r0, r1 in dense_row_chunks(len(out), row_bytes, COPY_CHUNK_BYTES):
        out[r0:r1].copy_(torch.from_numpy(np.asarray(array[r0:r1], dtype=dtype)))
    return out


def csr_tensor(
    crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, n_cols: int
) -> torch.Tensor:
    """A torch sparse CSR tensor over the given arrays (no copy, no invariant check)."""
    return torch.sparse_csr_tensor(
        crow, col, val, (crow.numel() - 1, n_cols), check_invariants=False
    )
