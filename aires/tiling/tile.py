"""One tile: where it lives in a store (:class:`TileInfo`) and its arrays (:class:`TileCSR`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse
import torch

__all__ = ["TileCSR", "TileInfo"]


@dataclass(frozen=True, slots=True)
class TileInfo:
    """Where tile ``index`` is and what it holds.

    Attributes:
        index: position of the tile in the store (tiles are in row order).
        row_start, row_stop: the tile holds rows ``[row_start, row_stop)`` of the matrix.
        nnz: nonzeros in the tile.
        offset: byte offset of the tile in the data file, a multiple of the store's alignment.
        nbytes: bytes to read: the tile rounded up to the alignment, ``<= tile_bytes``.
        checksum: CRC-32 (``zlib.crc32``) of those ``nbytes`` bytes.
        partial: the tile is one piece of a hub row split over several tiles; its products
            must be *summed* into output row ``row_start``, not assigned.
    """

    index: int
    row_start: int
    row_stop: int
    nnz: int
    offset: int
    nbytes: int
    checksum: int
    partial: bool

    @property
    def n_rows(self) -> int:
        """Rows in the tile (1 for a partial tile)."""
        return self.row_stop - self.row_start


@dataclass(frozen=True, slots=True)
class TileCSR:
    """A tile as a self-contained CSR block of rows ``[row_start, row_stop)``.

    The arrays are numpy arrays or torch tensors (on the device of the buffer the tile was read
    into), usually zero-copy views over that buffer: they stay valid only while it is not
    overwritten.

    Shapes:
        indptr: ``(n_rows + 1,)``, starting at 0; same dtype as ``indices``.
        indices, data: ``(nnz,)``.
    """

    indptr: np.ndarray | torch.Tensor
    indices: np.ndarray | torch.Tensor
    data: np.ndarray | torch.Tensor
    row_start: int
    row_stop: int
    n_cols: int
    partial: bool

    @property
    def shape(self) -> tuple[int, int]:
        """``(row_stop - row_start, n_cols)``."""
        return (self.row_stop - self.row_start, self.n_cols)

    @property
    def nnz(self) -> int:
        """Nonzeros in the tile."""
        return int(self.indices.shape[0])

    def to_scipy(self) -> scipy.sparse.csr_array:
        """The block as a scipy CSR array on the host (copies device tensors).

        scipy has no float16, so float16 values come back as float32 (exactly).
        """
        data, indices, indptr = (_host_numpy(a) for a in (self.data, self.indices, self.indptr))
        return scipy.sparse.csr_array((scipy_values(data), indices, indptr), shape=self.shape)

    def to_torch(self) -> torch.Tensor:
        """The block as a torch sparse CSR tensor on the arrays' device (zero-copy)."""
        indptr, indices, data = (
            torch.from_numpy(a) if isinstance(a, np.ndarray) else a
            for a in (self.indptr, self.indices, self.data)
        )
        return torch.sparse_csr_tensor(
            indptr, indices, data, size=self.shape, check_invariants=False
        )


def scipy_values(data: np.ndarray) -> np.ndarray:
    """``data`` in a dtype scipy.sparse supports: float16 widens to float32 (exactly)."""
    return data.astype(np.float32) if data.dtype == np.float16 else data


def _host_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    return array if isinstance(array, np.ndarray) else array.detach().cpu().numpy()
