"""A rank's share of ``Â``: contiguous row ranges on tile boundaries, and a view of its tiles.

The tiler already cuts ``Â`` into row blocks, so a split of the rows over ``P`` ranks costs
nothing when it falls on a tile boundary: each rank then owns whole tiles, streams them under
its own budgets, and multiplies them against the whole of an input panel to get its own rows of
the output. :func:`row_ranges` picks those boundaries so that each rank holds about ``nnz / P``
nonzeros (the work of an aggregation pass is in proportion to them); :class:`RowRangeStore`
shows a :class:`~aires.tiling.TileStore` restricted to one range, in the range's own row
numbers, to the scheduler (which reads nothing else of a store).
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any

import numpy as np

from aires.checks import check_positive_int
from aires.tiling import TileInfo

__all__ = ["RowRangeStore", "row_ranges", "tile_cuts"]


def tile_cuts(tiles: list[TileInfo]) -> tuple[np.ndarray, np.ndarray]:
    """The rows where a split may fall, and the nonzeros above each.

    A row ``r`` is a cut when a tile starts there and no earlier tile reaches past it: the
    pieces of a hub row split over several tiles (``partial``) share their row, so no cut falls
    inside them.

    Returns:
        ``(rows, nnz_before)``, both increasing, one entry per interior cut.
    """
    rows, before = [], []
    reach = total = 0
    for info in sorted(tiles, key=lambda t: (t.row_start, t.index)):
        if info.row_start >= reach and info.row_start > 0:
            rows.append(info.row_start)
            before.append(total)
        reach = max(reach, info.row_stop)
        total += info.nnz
    return np.asarray(rows, dtype=np.int64), np.asarray(before, dtype=np.int64)


def row_ranges(tiles: list[TileInfo], rows: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous row ranges covering ``[0, rows)``, cut on tile boundaries, each
    holding as close to ``nnz / parts`` of the tiles' nonzeros as the cuts allow.

    Raises:
        ValueError: fewer tile boundaries than ``parts - 1`` (smaller tiles give more).
    """
    parts = check_positive_int(parts, "parts")
    cuts, before = tile_cuts(tiles)
    if len(cuts) < parts - 1:
        raise ValueError(
            f"parts={parts}: the adjacency's {len(tiles)} tiles give only {len(cuts)} row "
            f"boundaries to split at; use smaller tiles (tile_bytes) or fewer processes"
        )
    total = sum(int(t.nnz) for t in tiles)
    chosen: list[int] = []
    lo = 0
    for k in range(1, parts):
        hi = len(cuts) - (parts - 1 - k)  # leave a cut for every later range
        target = total * k / parts
        i = lo + int(np.argmin(np.abs(before[lo:hi] - target)))
        chosen.append(int(cuts[i]))
        lo = i + 1
    bounds = [0, *chosen, rows]
    return list(itertools.pairwise(bounds))


class RowRangeStore:
    """Rows ``[start, stop)`` of a tile store, as a store of its own.

    The tiles whose rows fall in the range, numbered from 0, their rows counted from ``start``;
    the columns are all of the matrix's. Reads go to the underlying store by its own tile
    numbers, so an error names the tile as the store knows it.

    Args:
        store: a :class:`~aires.tiling.TileStore` (or anything with its reading surface).
        start, stop: the range, on tile boundaries (:func:`row_ranges`).
    """

    def __init__(self, store: Any, start: int, stop: int) -> None:
        if not 0 <= start < stop <= store.shape[0]:
            raise ValueError(f"rows [{start}, {stop}) are not a range of the store's "
                             f"{store.shape[0]} rows")
        self.store, self.start, self.stop = store, start, stop
        mine = [t for t in store.tiles if start <= t.row_start < stop]
        if any(t.row_stop > stop for t in mine):
            raise ValueError(f"rows [{start}, {stop}) cut a tile of {store.path}")
        self._global = [t.index for t in mine]
        self.tiles: list[TileInfo] = [
            dataclasses.replace(t, index=i, row_start=t.row_start - start,
                                row_stop=t.row_stop - start)
            for i, t in enumerate(mine)
        ]
        self.nnz = sum(int(t.nnz) for t in mine)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.stop - self.start, int(self.store.shape[1]))

    @property
    def path(self) -> Path:
        return self.store.path

    @property
    def data_path(self) -> Path:
        return self.store.data_path

    @property
    def io_mode(self) -> str:
        return self.store.io_mode

    @property
    def value_dtype(self) -> np.dtype:
        return self.store.value_dtype

    @property
    def index_dtype(self) -> np.dtype:
        return self.store.index_dtype

    @property
    def symmetric(self) -> bool | None:
        """The whole matrix's flag: a rank's rows of ``Âᵀ · G`` are its tiles times ``G``."""
        return self.store.symmetric

    def __len__(self) -> int:
        return len(self.tiles)

    def __repr__(self) -> str:
        return f"RowRangeStore({self.store!r}, rows=[{self.start}, {self.stop}))"

    def read_bytes(self, i: int, out: Any, *, verify: bool = True) -> int:
        """Tile ``i`` of the range's bytes (see :meth:`TileStore.read_bytes`)."""
        return self.store.read_bytes(self._global[i], out, verify=verify)

    def tile_arrays(self, i: int, buf: Any) -> tuple[Any, Any, Any]:
        """Tile ``i`` of the range's arrays (see :meth:`TileStore.tile_arrays`)."""
        return self.store.tile_arrays(self._global[i], buf)
