"""TileInfo and TileCSR: conversions agree with a dense reference."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from aires.tiling import TileCSR, TileInfo


def make_tile(as_torch: bool) -> TileCSR:
    indptr = np.array([0, 2, 2, 3], dtype=np.int32)
    indices = np.array([4, 0, 2], dtype=np.int32)
    data = np.array([1.5, -2.0, 3.25], dtype=np.float32)
    if as_torch:
        indptr, indices, data = (torch.from_numpy(a) for a in (indptr, indices, data))
    return TileCSR(indptr, indices, data, row_start=10, row_stop=13, n_cols=5, partial=False)


DENSE = np.array([[-2.0, 0, 0, 0, 1.5], [0, 0, 0, 0, 0], [0, 0, 3.25, 0, 0]])


@pytest.mark.parametrize("as_torch", [False, True])
def test_conversions_match_dense(as_torch: bool) -> None:
    tile = make_tile(as_torch)
    assert tile.shape == (3, 5) and tile.nnz == 3
    np.testing.assert_array_equal(tile.to_scipy().toarray(), DENSE)
    sparse = tile.to_torch()
    assert sparse.layout == torch.sparse_csr and sparse.shape == (3, 5)
    np.testing.assert_array_equal(sparse.to_dense().numpy(), DENSE)


def test_tile_info_is_frozen() -> None:
    info = TileInfo(0, 0, 4, 10, 0, 4096, 123, False)
    assert info.n_rows == 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.nnz = 3  # type: ignore[misc]
