"""Byte layout of one tile: a self-contained CSR ``[indptr | indices | data]``.

A tile of ``n`` rows and ``m`` nonzeros is laid out as::

    0                 indices_offset        data_offset           end      nbytes
    | indptr (n+1)*isz | pad | indices m*isz | pad | data m*vsz | zeros... |

``indptr`` is tile-local (starts at 0), ``indices`` and ``indptr`` share one index dtype
(``isz`` bytes) and every array starts at a multiple of :data:`ARRAY_ALIGNMENT` bytes, so a tile
read into any 256-byte aligned slot (every CUDA allocation is) gives aligned typed views without
a copy. Padding is zero so a tile's checksum depends on its content only.

Because each of the two pads is at most ``ARRAY_ALIGNMENT - 1`` bytes, a tile's ``end`` is at most
its *payload* ``(n+1)*isz + m*(isz+vsz)`` plus :func:`padding_bound`; the planner uses that
bound to pick row blocks from prefix sums without laying out each candidate.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch

ARRAY_ALIGNMENT = 256
"""Every array inside a tile starts at a multiple of this many bytes (cuSPARSE wants 16; 256
matches CUDA's allocation granularity)."""

IntOrArray = TypeVar("IntOrArray", int, np.ndarray)

INDEX_DTYPES = (np.dtype("<i4"), np.dtype("<i8"))
VALUE_DTYPES = (np.dtype("<f2"), np.dtype("<f4"), np.dtype("<f8"))
TORCH_DTYPES = {
    np.dtype("<i4"): torch.int32,
    np.dtype("<i8"): torch.int64,
    np.dtype("<f2"): torch.float16,
    np.dtype("<f4"): torch.float32,
    np.dtype("<f8"): torch.float64,
}
"""The dtypes a tile may hold (always little-endian on disk) and their torch twins."""


def align_up(value: IntOrArray, alignment: int) -> IntOrArray:
    """``value`` rounded up to a multiple of ``alignment`` (ints or int64 arrays)."""
    return -(-value // alignment) * alignment


def padding_bound() -> int:
    """Most bytes the two inner pads can add to a tile's payload."""
    return 2 * (ARRAY_ALIGNMENT - 1)


def array_offsets(
    n_rows: IntOrArray, nnz: IntOrArray, index_itemsize: int, value_itemsize: int
) -> tuple[IntOrArray, IntOrArray, IntOrArray]:
    """Byte offsets of ``indices`` and ``data`` inside a tile, and the end of ``data``.

    Vectorised: ``n_rows`` and ``nnz`` may be int64 arrays (one entry per tile).

    Returns:
        ``(indices_offset, data_offset, end)``; ``indptr`` always starts at 0.
    """
    indices_offset = align_up((n_rows + 1) * index_itemsize, ARRAY_ALIGNMENT)
    data_offset = align_up(indices_offset + nnz * index_itemsize, ARRAY_ALIGNMENT)
    return indices_offset, data_offset, data_offset + nnz * value_itemsize


def tile_nbytes(
    n_rows: IntOrArray, nnz: IntOrArray, index_itemsize: int, value_itemsize: int, alignment: int
) -> IntOrArray:
    """Length of a tile in the data file: its ``end`` rounded up to ``alignment``."""
    return align_up(array_offsets(n_rows, nnz, index_itemsize, value_itemsize)[2], alignment)


def pack_tile(
    buf: np.ndarray,
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    *,
    row_start: int,
    row_stop: int,
    nnz_start: int,
    nnz_stop: int,
    partial: bool,
    nbytes: int,
    index_dtype: np.dtype,
    value_dtype: np.dtype,
) -> memoryview:
    """Serialise one tile of the global CSR ``(indptr, indices, data)`` into ``buf``.

    Reads only the tile's slices of the (possibly memory-mapped) global arrays and casts them
    straight into ``buf``, so packing needs no memory beyond ``buf``. A ``partial`` tile is the
    slice ``[nnz_start, nnz_stop)`` of the single row ``row_start``.

    Args:
        buf: uint8 scratch of at least ``nbytes`` bytes, reused between tiles.
        nbytes: the tile's length in the data file (from the plan).

    Returns:
        A memoryview of ``buf[:nbytes]`` holding the tile, zero-padded.
    """
    isz, vsz = index_dtype.itemsize, value_dtype.itemsize
    n_rows, nnz = row_stop - row_start, nnz_stop - nnz_start
    indices_offset, data_offset, end = array_offsets(n_rows, nnz, isz, vsz)
    local_indptr = buf[: (n_rows + 1) * isz].view(index_dtype)
    if partial:
        local_indptr[:] = (0, nnz)
    else:
        np.subtract(indptr[row_start : row_stop + 1], nnz_start, out=local_indptr, casting="unsafe")
    buf[(n_rows + 1) * isz : indices_offset] = 0
    np.copyto(
        buf[indices_offset : indices_offset + nnz * isz].view(index_dtype),
        indices[nnz_start:nnz_stop],
        casting="unsafe",
    )
    buf[indices_offset + nnz * isz : data_offset] = 0
    np.copyto(buf[data_offset:end].view(value_dtype), data[nnz_start:nnz_stop], casting="unsafe")
    buf[end:nbytes] = 0
    return memoryview(buf)[:nbytes]


def tile_views(
    buf: np.ndarray | torch.Tensor,
    n_rows: int,
    nnz: int,
    index_dtype: np.dtype,
    value_dtype: np.dtype,
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Zero-copy ``(indptr, indices, data)`` views over a byte buffer that starts with a tile.

    numpy in gives numpy out; a torch uint8 tensor (any device) gives torch tensors on the
    same device.
    """
    isz, vsz = index_dtype.itemsize, value_dtype.itemsize
    indices_offset, data_offset, end = array_offsets(n_rows, nnz, isz, vsz)
    spans = (
        (0, (n_rows + 1) * isz, index_dtype),
        (indices_offset, indices_offset + nnz * isz, index_dtype),
        (data_offset, end, value_dtype),
    )
    if isinstance(buf, np.ndarray):
        return tuple(buf[lo:hi].view(dtype) for lo, hi, dtype in spans)  # type: ignore
    return tuple(buf[lo:hi].view(TORCH_DTYPES[dtype]) for lo, hi, dtype in spans)  # type: ignore
