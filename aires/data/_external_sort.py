"""External (on-disk) bucket sort, and the CSR builder made from it.

A graph with billions of edges is built without holding its edges in memory: entries are
appended to bucket files on disk (a bucket is a range of rows, or any partition of the keys),
then each bucket, small enough for memory, is loaded, sorted (on the GPU when there is one) and
written out. Memory stays around ``chunk_size`` entries whatever the size of the graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from aires.progress import progress_bar

from aires.data.storage import release_pages

__all__ = ["BucketFiles", "CSRBuilder"]


class BucketFiles:
    """``count`` append-only files of int64 records of ``width`` values each.

    Records keep the order in which they were appended inside each bucket (appends split a batch
    with a stable sort), which the edge sampler relies on to find first occurrences.
    """

    def __init__(self, directory: Path, count: int, width: int, prefix: str = "bucket") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.count = count
        self.width = width
        self._paths = [self.directory / f"{prefix}-{i:06d}.bin" for i in range(count)]
        for path in self._paths:
            path.touch()

    def append(self, bucket: torch.Tensor, records: torch.Tensor) -> None:
        """Append ``records`` (shape ``(n, width)``, int64) to the files named by ``bucket``."""
        if bucket.numel() == 0:
            return
        if self.count == 1:
            self._write(0, records.cpu().numpy(), "ab")
            return
        order = torch.sort(bucket, stable=True).indices
        counts = torch.bincount(bucket, minlength=self.count).cpu().numpy()
        rows = records[order].cpu().numpy()
        stop = np.cumsum(counts)
        for b in np.flatnonzero(counts):
            self._write(int(b), rows[stop[b] - counts[b] : stop[b]], "ab")

    def read(self, b: int) -> np.ndarray:
        """Bucket ``b`` as an array of shape ``(n, width)``."""
        return np.fromfile(self._paths[b], dtype=np.int64).reshape(-1, self.width)

    def replace(self, b: int, records: np.ndarray) -> None:
        """Overwrite bucket ``b`` with ``records``."""
        self._write(b, records, "wb")

    def size(self, b: int) -> int:
        """Number of records in bucket ``b``."""
        return self._paths[b].stat().st_size // (8 * self.width)

    def remove(self, b: int) -> None:
        """Delete bucket ``b``'s file (to give the disk space back as soon as it is consumed)."""
        self._paths[b].unlink(missing_ok=True)

    def _write(self, b: int, records: np.ndarray, mode: str) -> None:
        with open(self._paths[b], mode) as f:
            np.ascontiguousarray(records, dtype=np.int64).tofile(f)


class CSRBuilder:
    """Collects ``(row, col)`` entries in row-range buckets on disk and writes a CSR matrix.

    Entries are keyed ``row * num_cols + col``; each bucket is sorted by key, so the output has
    sorted column indices in every row, and duplicates are dropped (the matrix is unweighted:
    every stored value is 1.0).

    Args:
        workdir: where the bucket files go (deleted as they are consumed).
        num_rows, num_cols: the matrix shape (``num_rows * num_cols < 2**63``).
        expected_entries: about how many entries will be added, to size the buckets.
        chunk_size: about how many entries one bucket holds (the memory bound).
        device: where sorting runs.
    """

    def __init__(
        self,
        workdir: Path,
        num_rows: int,
        num_cols: int,
        *,
        expected_entries: int,
        chunk_size: int,
        device: torch.device,
    ) -> None:
        if num_rows * num_cols >= 2**63:
            raise ValueError(
                f"matrix shape ({num_rows}, {num_cols}) is too large for 64-bit entry keys"
            )
        self.num_rows = num_rows
        self.num_cols = num_cols
        self.device = device
        count = max(1, min(num_rows, math.ceil(expected_entries / chunk_size)))
        self._buckets = BucketFiles(workdir, count, 1, prefix="rows")

    def add(self, rows: torch.Tensor, cols: torch.Tensor) -> None:
        """Add entries (int64 tensors of equal length, any device)."""
        rows = rows.to(self.device, torch.int64)
        cols = cols.to(self.device, torch.int64)
        keys = rows * self.num_cols + cols
        bucket = rows * self._buckets.count // self.num_rows
        self._buckets.append(bucket, keys[:, None])

    def finish(
        self,
        allocate: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]],
        *,
        progress: bool = False,
    ) -> int:
        """Sort and deduplicate every bucket, then write the CSR arrays.

        Args:
            allocate: called with the final number of entries ``nnz``; returns the arrays to
                fill (e.g. memmaps): ``indptr`` (int64, ``num_rows + 1``), ``indices`` (int64,
                ``nnz``) and ``data`` (float32, ``nnz``).
            progress: show progress bars.

        Returns:
            The number of stored entries.
        """
        buckets = self._buckets
        nnz = 0
        for b in progress_bar(
            range(buckets.count), desc="sort rows", disable=not progress, leave=False
        ):
            keys = torch.from_numpy(buckets.read(b)[:, 0]).to(self.device)
            keys = torch.unique_consecutive(torch.sort(keys).values)
            buckets.replace(b, keys.cpu().numpy()[:, None])
            nnz += keys.numel()
        indptr, indices, data = allocate(nnz)
        indptr[0] = 0
        offset = 0
        for b in progress_bar(
            range(buckets.count), desc="write CSR", disable=not progress, leave=False
        ):
            keys = torch.from_numpy(buckets.read(b)[:, 0]).to(self.device)
            row_start = -(-b * self.num_rows // buckets.count)
            row_stop = -(-(b + 1) * self.num_rows // buckets.count)
            rows = keys // self.num_cols
            counts = torch.bincount(rows - row_start, minlength=row_stop - row_start)
            n = keys.numel()
            indptr[row_start + 1 : row_stop + 1] = (torch.cumsum(counts, 0) + offset).cpu().numpy()
            indices[offset : offset + n] = (keys - rows * self.num_cols).cpu().numpy()
            data[offset : offset + n] = 1.0
            offset += n
            buckets.remove(b)
            for array in (indptr, indices, data):
                release_pages(array)
        return nnz
