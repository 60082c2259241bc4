"""Order-independent hashes of a matrix's entries, which prove it symmetric as its tiles pass.

A matrix is symmetric exactly when its entries ``(row, col, value)`` equal its transpose's
``(col, row, value)`` as multisets, which (but for a 2**-64 chance) is when two sums agree: the
sum mod 2**64 of a mixed 64-bit hash of every entry, and the same of every entry transposed.
Sums add up tile by tile, so a build hashes each tile as it packs it, in any order.

Two implementations give the same sums bit for bit: numpy's (:func:`entry_hashes`, on the
tiler's threads) and torch's (:func:`tile_hashes_on`, on a GPU where one is present: on the
H200 machine numpy's hash cost 22 ns an entry, as much as normalising the entry, and its
threads stopped scaling at 8, so papers100M x0.3 tiled at 2.3 times the disk's write time).
"""

from __future__ import annotations

import numpy as np
import torch

from aires.tiling._layout import tile_views

__all__ = ["entry_hashes", "tile_hashes_on"]

# Odd 64-bit constants (golden ratio and splitmix64's).
_K_ROW, _K_COL, _K_VALUE = 0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_SHIFTS = (30, 27, 31)

#: Entries hashed at a time: the chunk's temporaries stay in cache (whole tiles cost 56 ns an
#: entry on this repository's CPU machine), and the chunks are few enough that a build's
#: threads seldom contend for the GIL, which each of a chunk's ~45 numpy calls takes. At 32K
#: entries, 32 threads hashed at 16.7 ns an entry in aggregate there against 7.8 for two; at
#: 256K, 6.5 against 4.8. (At 32K a 32-thread build on the H200 machine tiled at 272 MB/s,
#: no faster than this 2-core machine's 266 MB/s.)
_CHUNK = 1 << 18


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise and in place on uint64 (wrapping arithmetic)."""
    z ^= z >> np.uint64(_SHIFTS[0])
    z *= np.uint64(_M1)
    z ^= z >> np.uint64(_SHIFTS[1])
    z *= np.uint64(_M2)
    z ^= z >> np.uint64(_SHIFTS[2])
    return z


def entry_hashes(rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> tuple[int, int]:
    """The hashes of the entries ``(row, col, value)`` and ``(col, row, value)``.

    Zero values are left out (an explicit zero is no entry) and ``-0.0`` counts as ``0.0``.
    In place where it can be, a cache-sized chunk at a time: this runs over every entry of a
    build.
    """
    forward = transpose = 0
    for a in range(0, len(values), _CHUNK):
        f, t = _chunk_hashes(rows[a : a + _CHUNK], cols[a : a + _CHUNK], values[a : a + _CHUNK])
        forward, transpose = (forward + f) % 2**64, (transpose + t) % 2**64
    return forward, transpose


def _chunk_hashes(rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> tuple[int, int]:
    """:func:`entry_hashes` of one chunk."""
    v = values.astype(np.float64)
    v += 0.0  # -0.0 becomes 0.0
    keep = v != 0
    if not keep.all():
        rows, cols, v = rows[keep], cols[keep], v[keep]
    bits = v.view(np.uint64)
    bits *= np.uint64(_K_VALUE)
    r, c = rows.astype(np.uint64), cols.astype(np.uint64)
    forward = r * np.uint64(_K_ROW)
    forward ^= c * np.uint64(_K_COL)
    forward ^= bits
    transpose = c
    transpose *= np.uint64(_K_ROW)
    r *= np.uint64(_K_COL)
    transpose ^= r
    transpose ^= bits
    return (
        int(_mix(forward).sum(dtype=np.uint64)),
        int(_mix(transpose).sum(dtype=np.uint64)),
    )


def _signed(k: int) -> int:
    """The int64 with the bits of the uint64 ``k`` (torch multiplies int64 mod 2**64)."""
    return k - (1 << 64) if k >= 1 << 63 else k


def _torch_mix(z: torch.Tensor) -> torch.Tensor:
    """:func:`_mix` on int64 holding uint64 bits: shifts made logical by masking the sign's
    copies off."""
    for shift, k in zip(_SHIFTS, (_M1, _M2, None), strict=True):
        z ^= (z >> shift) & ((1 << (64 - shift)) - 1)
        if k is not None:
            z *= _signed(k)
    return z


def _torch_hashes(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor) -> tuple[int, int]:
    """:func:`entry_hashes` in torch, on the tensors' device."""
    v = values.to(torch.float64) + 0.0
    keep = v != 0
    if not bool(keep.all()):
        rows, cols, v = rows[keep], cols[keep], v[keep]
    bits = v.view(torch.int64) * _signed(_K_VALUE)
    r, c = rows.to(torch.int64), cols.to(torch.int64)
    forward = (r * _signed(_K_ROW)) ^ (c * _signed(_K_COL)) ^ bits
    transpose = (c * _signed(_K_ROW)) ^ (r * _signed(_K_COL)) ^ bits
    return (
        int(_torch_mix(forward).sum()) % 2**64,
        int(_torch_mix(transpose).sum()) % 2**64,
    )


def tile_hashes_on(
    tile: memoryview,
    row_start: int,
    n_rows: int,
    nnz: int,
    index_dtype: np.dtype,
    value_dtype: np.dtype,
    device: torch.device,
) -> tuple[int, int]:
    """:func:`entry_hashes` of a packed tile (``tile``, its bytes as written), computed on
    ``device`` from one copy of those bytes: the rows from the tile's own row pointer."""
    buf = torch.frombuffer(tile, dtype=torch.uint8).to(device)
    indptr, cols, values = tile_views(buf, n_rows, nnz, index_dtype, value_dtype)
    lengths = (indptr[1:] - indptr[:-1]).to(torch.int64)
    rows = torch.repeat_interleave(
        torch.arange(row_start, row_start + n_rows, dtype=torch.int64, device=device), lengths
    )
    return _torch_hashes(rows, cols, values)
