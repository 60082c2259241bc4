"""Row-block boundaries of a CSR matrix, chosen from prefix sums so every tile fits one slot.

A tile holding rows ``[s, e)`` of a CSR matrix has the *payload*

.. math::

    P(s, e) = (e - s + 1)\\,i + (\\text{indptr}[e] - \\text{indptr}[s])\\,(i + v)
            = C(e) - C(s) + i, \\qquad C(r) = r\\,i + \\text{indptr}[r]\\,(i + v)

for index and value itemsizes ``i`` and ``v``. ``C`` is a non-decreasing prefix sum, so the row
block that starts at ``s`` and fits a payload budget ends at a ``searchsorted`` over ``C``:
boundaries cost one binary search per *tile*, never a Python step per row. ``C`` is computed
block-wise from the row pointer, which may be a memory map larger than RAM.

**Capacity.** A tile's length in the file is its end (payload plus at most
:func:`~aires.tiling._layout.padding_bound` bytes of inner padding) rounded up to
``alignment``; it fits when that is at most ``tile_bytes``, i.e. when
``P <= cap := floor(tile_bytes / alignment) * alignment - padding_bound()``.

**Hub rows.** A row whose own payload exceeds ``cap`` is split into the fewest pieces that fit,
with nonzero counts differing by at most one; each piece is a *partial* tile of that one row
(``row_stop = row_start + 1``) whose products the scheduler must sum, not assign.

**Balance.** The rows between hub rows form *runs*, partitioned independently. For a run of
total payload ``S`` (in ``C`` units) the tile count ``T`` is the minimum any partition into
fitting tiles can have (found by a backward greedy pass, which is optimal); boundaries then sit
at the row nearest to the targets ``C(a) + k S / T``, clamped into the window that keeps every
tile fitting and the rest of the run coverable by the remaining tiles. The guarantee, tested in
``tests/tiling/test_plan.py``: if the run's mean ``S/T`` plus its heaviest row ``w`` fits the
capacity (true unless rows are large next to a tile), no clamp binds and every tile's
``C``-cost is within ``w`` of ``S/T``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from aires.checks import check_positive_int, parse_size
from aires.tiling._layout import INDEX_DTYPES, VALUE_DTYPES, padding_bound, tile_nbytes

__all__ = ["DEFAULT_ALIGNMENT", "DEFAULT_TILE_BYTES", "TilePlan", "plan_tiles"]

DEFAULT_TILE_BYTES = 64 * 1024**2
DEFAULT_ALIGNMENT = 4096
INT32_MAX = np.iinfo(np.int32).max

_BLOCK = 4096  # rows per block of C loaded for one search: 32 KiB of int64 from a memmap
_SCAN = 1 << 22  # rows per chunk of the one full pass over indptr (a multiple of _BLOCK)


@dataclass(frozen=True)
class TilePlan:
    """Where each tile's rows and nonzeros come from, and where its bytes go.

    Tiles are in row order; arrays have one entry per tile (``int64`` unless noted).

    Attributes:
        shape: ``(rows, cols)`` of the matrix.
        nnz: nonzeros of the matrix.
        tile_bytes: capacity of a slot; every ``nbytes <= tile_bytes``.
        alignment: every ``offset`` and ``nbytes`` is a multiple of it.
        index_dtype: dtype of the tile-local ``indptr`` and of ``indices``.
        value_dtype: dtype of ``data``.
        row_start, row_stop: the tile holds rows ``[row_start, row_stop)``.
        nnz_start, nnz_stop: its nonzeros are ``indices[nnz_start:nnz_stop]`` of the matrix.
        partial: (bool) the tile is one piece of a hub row split over several tiles.
        nbytes: the tile's length in the data file.
        offset: the tile's byte offset in the data file (tiles are packed back to back).
    """

    shape: tuple[int, int]
    nnz: int
    tile_bytes: int
    alignment: int
    index_dtype: np.dtype
    value_dtype: np.dtype
    row_start: np.ndarray
    row_stop: np.ndarray
    nnz_start: np.ndarray
    nnz_stop: np.ndarray
    partial: np.ndarray
    nbytes: np.ndarray
    offset: np.ndarray

    def __len__(self) -> int:
        return len(self.row_start)

    @property
    def total_bytes(self) -> int:
        """Length of the data file."""
        return int(self.offset[-1] + self.nbytes[-1]) if len(self) else 0

    @property
    def tile_nnz(self) -> np.ndarray:
        """Nonzeros per tile."""
        return self.nnz_stop - self.nnz_start

    @property
    def payload(self) -> np.ndarray:
        """Bytes of array data per tile, without padding: ``(rows+1)*isz + nnz*(isz+vsz)``."""
        isz, vsz = self.index_dtype.itemsize, self.value_dtype.itemsize
        return (self.row_stop - self.row_start + 1) * isz + self.tile_nnz * (isz + vsz)


def plan_tiles(
    indptr: np.ndarray,
    *,
    n_cols: int,
    tile_bytes: int | str = DEFAULT_TILE_BYTES,
    alignment: int = DEFAULT_ALIGNMENT,
    index_dtype: np.dtype | type | str | None = None,
    value_dtype: np.dtype | type | str | None = None,
) -> TilePlan:
    """Split the rows of a CSR matrix into balanced row blocks that each fit ``tile_bytes``.

    Reads ``indptr`` once front to back in chunks (it may be a memory map larger than RAM) and
    then only the few blocks the boundary searches touch.

    Args:
        indptr: the matrix's row pointer, length ``rows + 1``, any integer dtype.
        n_cols: number of columns (decides whether int32 indices can hold every column).
        tile_bytes: capacity of one tile slot, bytes or a size string such as ``"64MiB"``.
        alignment: offset and length granularity of tiles in the data file, a power of two of
            at least 256 (4096 allows O_DIRECT and GPUDirect Storage reads of whole tiles).
        index_dtype: ``int32`` or ``int64``; ``None`` picks int32 unless ``n_cols`` or a tile's
            nonzero count needs int64.
        value_dtype: ``float16``, ``float32`` (``None``) or ``float64``.

    Returns:
        The plan; ``len(plan)`` is the number of tiles (0 for a matrix with no rows).

    Raises:
        ValueError: a bad argument, a row pointer that is not a CSR row pointer, or a
            ``tile_bytes`` too small to hold one nonzero.
        TypeError: ``indptr`` is not an integer array.
    """
    n_cols = _check_n_cols(n_cols)
    tile_bytes = parse_size(tile_bytes, "tile_bytes")
    alignment = _check_alignment(alignment)
    if tile_bytes < alignment:
        raise ValueError(f"tile_bytes ({tile_bytes}) must be at least alignment ({alignment})")
    value_dtype = _resolve_dtype(value_dtype, "value_dtype", VALUE_DTYPES, np.dtype("<f4"))
    forced = _resolve_dtype(index_dtype, "index_dtype", INDEX_DTYPES, None)
    if forced == np.dtype("<i4") and n_cols > INT32_MAX:
        raise ValueError(
            f"index_dtype=int32 cannot hold column indices of a matrix with {n_cols} columns; "
            "use int64 or None"
        )
    _check_indptr(indptr)
    index = forced if forced is not None else np.dtype("<i8" if n_cols > INT32_MAX else "<i4")
    plan = _plan(indptr, n_cols, tile_bytes, alignment, index, value_dtype)
    if index == np.dtype("<i4") and len(plan) and int(plan.tile_nnz.max()) > INT32_MAX:
        if forced is not None:
            raise ValueError(
                f"index_dtype=int32 cannot index a tile of {int(plan.tile_nnz.max())} nonzeros "
                f"with tile_bytes={tile_bytes}; use int64, None or smaller tiles"
            )
        plan = _plan(indptr, n_cols, tile_bytes, alignment, np.dtype("<i8"), value_dtype)
    return plan


def _plan(
    indptr: np.ndarray,
    n_cols: int,
    tile_bytes: int,
    alignment: int,
    index_dtype: np.dtype,
    value_dtype: np.dtype,
) -> TilePlan:
    isz, vsz = index_dtype.itemsize, value_dtype.itemsize
    n_rows = len(indptr) - 1
    # Budget in C units: a tile [s, e) fits iff C(e) - C(s) <= budget (see the module notes).
    budget = (tile_bytes // alignment) * alignment - padding_bound() - isz
    max_piece = (budget - isz) // (isz + vsz)  # most nonzeros of a one-row tile
    if max_piece < 1:
        raise ValueError(
            f"tile_bytes={tile_bytes} cannot hold even one nonzero with alignment={alignment}; "
            f"use at least {alignment * -(-(2 * isz + isz + vsz + padding_bound()) // alignment)}"
        )
    cost, hubs = _scan(indptr, isz, vsz, max_piece)

    starts = np.concatenate(([0], hubs + 1))
    stops = np.concatenate((hubs, [n_rows]))
    keep = stops > starts
    starts, stops = starts[keep], stops[keep]
    run_cost = cost.at(stops) - cost.at(starts)
    bounds = [np.stack((starts[run_cost <= budget], stops[run_cost <= budget]))]
    for a, b in zip(starts[run_cost > budget].tolist(), stops[run_cost > budget].tolist()):
        edges = _partition_run(cost, a, b, budget)
        bounds.append(np.stack((edges[:-1], edges[1:])))
    whole = np.concatenate(bounds, axis=1)
    w_start, w_stop = whole[0], whole[1]
    w_nnz_start = _gather(indptr, w_start)
    w_nnz_stop = _gather(indptr, w_stop)

    hub_start = _gather(indptr, hubs)
    hub_len = _gather(indptr, hubs + 1) - hub_start
    pieces = -(-hub_len // max_piece)
    piece_row = np.repeat(hubs, pieces)
    first = np.cumsum(pieces) - pieces
    j = np.arange(int(pieces.sum()), dtype=np.int64) - np.repeat(first, pieces)
    length, count, base = (
        np.repeat(hub_len, pieces),
        np.repeat(pieces, pieces),
        np.repeat(hub_start, pieces),
    )

    row_start = np.concatenate((w_start, piece_row)).astype(np.int64)
    row_stop = np.concatenate((w_stop, piece_row + 1)).astype(np.int64)
    nnz_start = np.concatenate((w_nnz_start, base + j * length // count)).astype(np.int64)
    nnz_stop = np.concatenate((w_nnz_stop, base + (j + 1) * length // count)).astype(np.int64)
    partial = np.concatenate((np.zeros(len(w_start), bool), np.ones(len(piece_row), bool)))
    order = np.lexsort((nnz_start, row_start))
    row_start, row_stop = row_start[order], row_stop[order]
    nnz_start, nnz_stop, partial = nnz_start[order], nnz_stop[order], partial[order]

    nbytes = tile_nbytes(row_stop - row_start, nnz_stop - nnz_start, isz, vsz, alignment)
    offset = np.cumsum(nbytes) - nbytes
    return TilePlan(
        shape=(n_rows, n_cols),
        nnz=int(indptr[-1]),
        tile_bytes=tile_bytes,
        alignment=alignment,
        index_dtype=index_dtype,
        value_dtype=value_dtype,
        row_start=row_start,
        row_stop=row_stop,
        nnz_start=nnz_start,
        nnz_stop=nnz_stop,
        partial=partial,
        nbytes=nbytes.astype(np.int64),
        offset=offset.astype(np.int64),
    )


def _partition_run(cost: _PrefixCost, a: int, b: int, budget: int) -> np.ndarray:
    """Boundaries ``[a, ..., b]`` of the balanced minimal partition of rows ``[a, b)``.

    Every row of the run fits alone (hub rows were taken out), so both greedy passes advance.
    """
    back = [b]
    while back[-1] > a:
        back.append(max(a, cost.first_ge(cost.at(back[-1]) - budget)))
    lowest = back[::-1]  # lowest[k]: the smallest boundary k leaving a coverable rest
    tiles = len(back) - 1
    c_a = cost.at(a)
    total = cost.at(b) - c_a
    edges = [a]
    for k in range(1, tiles):
        highest = min(b, cost.last_le(cost.at(edges[-1]) + budget))
        target = c_a + k * total // tiles
        row = cost.last_le(target)
        if row < b and cost.at(row + 1) - target < target - cost.at(row):
            row += 1
        edges.append(min(max(row, lowest[k]), highest))
    edges.append(b)
    return np.asarray(edges, dtype=np.int64)


class _PrefixCost:
    """``C(r) = r*isz + indptr[r]*(isz + vsz)`` searched in two levels.

    ``coarse`` holds ``C`` at rows ``0, B, 2B, ...`` and at the last row; a search finds the
    block there and then loads only that block (``B + 1`` entries) of a possibly memory-mapped
    ``indptr``. The few most recent blocks are cached, as the planner's passes walk in order.
    """

    def __init__(
        self,
        indptr: np.ndarray,
        isz: int,
        vsz: int,
        coarse_rows: np.ndarray,
        coarse_ptr: np.ndarray,
    ):
        self._indptr = indptr
        self._isz, self._stride = isz, isz + vsz
        self._rows = coarse_rows
        self._coarse = coarse_rows * isz + coarse_ptr * self._stride
        self._cache: dict[int, np.ndarray] = {}

    def at(self, rows: int | np.ndarray) -> int | np.ndarray:
        """``C`` at one row (an int) or at an array of rows (int64 array)."""
        if isinstance(rows, np.ndarray):
            return rows * self._isz + _gather(self._indptr, rows) * self._stride
        return rows * self._isz + int(self._indptr[rows]) * self._stride

    def last_le(self, value: int) -> int:
        """The largest row ``r`` with ``C(r) <= value`` (0 if none)."""
        j = int(np.searchsorted(self._coarse, value, side="right")) - 1
        if j < 0:
            return 0
        if j == len(self._coarse) - 1:
            return int(self._rows[-1])
        block = self._block(j)
        return int(self._rows[j]) + int(np.searchsorted(block, value, side="right")) - 1

    def first_ge(self, value: int) -> int:
        """The smallest row ``r`` with ``C(r) >= value`` (the last row if none)."""
        j = int(np.searchsorted(self._coarse, value, side="left"))
        if j == 0:
            return 0
        if j == len(self._coarse):
            return int(self._rows[-1])
        block = self._block(j - 1)
        return int(self._rows[j - 1]) + int(np.searchsorted(block, value, side="left"))

    def _block(self, j: int) -> np.ndarray:
        block = self._cache.get(j)
        if block is None:
            lo, hi = int(self._rows[j]), int(self._rows[j + 1])
            block = (
                np.arange(lo, hi + 1, dtype=np.int64) * self._isz
                + np.asarray(self._indptr[lo : hi + 1], dtype=np.int64) * self._stride
            )
            if len(self._cache) >= 8:
                self._cache.pop(next(iter(self._cache)))
            self._cache[j] = block
        return block


def _scan(indptr: np.ndarray, isz: int, vsz: int, max_piece: int) -> tuple[_PrefixCost, np.ndarray]:
    """One chunked pass over ``indptr``: check it never decreases, find hub rows, sample ``C``."""
    n_rows = len(indptr) - 1
    hubs, samples = [], []
    for start in range(0, n_rows, _SCAN):
        part = np.asarray(indptr[start : min(start + _SCAN, n_rows) + 1], dtype=np.int64)
        lengths = np.diff(part)
        bad = np.flatnonzero(lengths < 0)
        if bad.size:
            row = start + int(bad[0])
            raise ValueError(
                f"indptr decreases at row {row} ({int(part[bad[0]])} -> {int(part[bad[0] + 1])})"
            )
        hubs.append(np.flatnonzero(lengths > max_piece) + start)
        samples.append(part[:-1:_BLOCK])
    coarse_rows = np.append(np.arange(0, n_rows, _BLOCK, dtype=np.int64), n_rows)
    coarse_ptr = np.append(
        np.concatenate(samples) if samples else np.zeros(0, np.int64), int(indptr[-1])
    )
    hub_rows = np.concatenate(hubs).astype(np.int64) if hubs else np.zeros(0, np.int64)
    return _PrefixCost(indptr, isz, vsz, coarse_rows, coarse_ptr), hub_rows


def _gather(indptr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``indptr[rows]`` as int64 (fancy indexing reads only the touched pages of a memmap)."""
    return np.asarray(indptr[rows], dtype=np.int64)


def _check_indptr(indptr: np.ndarray) -> None:
    if not isinstance(indptr, np.ndarray):
        raise TypeError(f"indptr must be a numpy array (or memmap), got {type(indptr).__name__}")
    if indptr.ndim != 1 or len(indptr) == 0:
        raise ValueError(
            f"indptr must be one-dimensional with rows + 1 >= 1 entries, got shape {indptr.shape}"
        )
    if not np.issubdtype(indptr.dtype, np.integer):
        raise TypeError(f"indptr must have an integer dtype, got {indptr.dtype}")
    if int(indptr[0]) != 0:
        raise ValueError(f"indptr[0] must be 0, got {int(indptr[0])}")


def _check_n_cols(n_cols: int) -> int:
    if isinstance(n_cols, bool) or not isinstance(n_cols, (int, np.integer)):
        raise TypeError(f"n_cols must be an int, got {n_cols!r}")
    if n_cols < 0:
        raise ValueError(f"n_cols must be non-negative, got {n_cols!r}")
    return int(n_cols)


def _check_alignment(alignment: int) -> int:
    alignment = check_positive_int(alignment, "alignment")
    if alignment < 256 or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two >= 256, got {alignment}")
    return alignment


def _resolve_dtype(
    value: np.dtype | type | str | None,
    name: str,
    allowed: tuple[np.dtype, ...],
    default: np.dtype | None,
) -> np.dtype | None:
    """``value`` as a little-endian numpy dtype among ``allowed``, or ``default`` for ``None``."""
    if value is None:
        return default
    try:
        dtype = np.dtype(value).newbyteorder("<")
    except TypeError as error:
        raise TypeError(f"{name} must be a numpy dtype, got {value!r}") from error
    if dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        raise ValueError(f"{name} must be one of {names}, got {value!r}")
    return dtype
