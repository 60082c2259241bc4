"""Byte layout of one tile: aligned arrays, zero padding, views equal to the packed slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aires.tiling._layout import (
    ARRAY_ALIGNMENT,
    align_up,
    array_offsets,
    pack_tile,
    padding_bound,
    tile_nbytes,
    tile_views,
)


def test_offsets_are_aligned_and_bounded() -> None:
    n_rows = np.arange(0, 300)
    nnz = np.arange(0, 3000, 10)
    for isz, vsz in [(4, 4), (8, 4), (4, 8), (8, 8), (4, 2)]:
        indices_offset, data_offset, end = array_offsets(n_rows, nnz, isz, vsz)
        assert np.all(indices_offset % ARRAY_ALIGNMENT == 0) and np.all(
            data_offset % ARRAY_ALIGNMENT == 0
        )
        assert np.all(indices_offset >= (n_rows + 1) * isz)
        assert np.all(data_offset >= indices_offset + nnz * isz)
        payload = (n_rows + 1) * isz + nnz * (isz + vsz)
        assert np.all(end >= payload) and np.all(end <= payload + padding_bound())
        assert np.array_equal(tile_nbytes(n_rows, nnz, isz, vsz, 4096), align_up(end, 4096))


@pytest.mark.parametrize("index_dtype", [np.dtype("<i4"), np.dtype("<i8")])
@pytest.mark.parametrize("value_dtype", [np.dtype("<f2"), np.dtype("<f4"), np.dtype("<f8")])
def test_pack_then_view_round_trip(index_dtype: np.dtype, value_dtype: np.dtype) -> None:
    rng = np.random.default_rng(0)
    indptr = np.array([0, 3, 3, 10, 17, 20], dtype=np.int64)
    indices = rng.integers(0, 50, 20)
    data = rng.standard_normal(20)
    buf = np.full(8192, 0xAB, dtype=np.uint8)  # garbage from a previous tile must not survive
    nbytes = tile_nbytes(3, 14, index_dtype.itemsize, value_dtype.itemsize, 4096)
    tile = pack_tile(
        buf,
        indptr,
        indices,
        data,
        row_start=1,
        row_stop=4,
        nnz_start=3,
        nnz_stop=17,
        partial=False,
        nbytes=nbytes,
        index_dtype=index_dtype,
        value_dtype=value_dtype,
    )
    assert len(tile) == nbytes == 4096
    ip, ix, val = tile_views(buf, 3, 14, index_dtype, value_dtype)
    assert ip.dtype == ix.dtype == index_dtype and val.dtype == value_dtype
    assert ip.tolist() == [0, 0, 7, 14]
    assert np.array_equal(ix, indices[3:17]) and np.array_equal(val, data[3:17].astype(value_dtype))
    # Everything outside the three arrays is zero.
    mask = np.ones(nbytes, bool)
    for array in (ip, ix, val):
        start = array.__array_interface__["data"][0] - buf.__array_interface__["data"][0]
        mask[start : start + array.nbytes] = False
    assert not buf[:nbytes][mask].any()
    # torch views of the same bytes hold the same values.
    tp, tx, tv = tile_views(torch.from_numpy(buf), 3, 14, index_dtype, value_dtype)
    assert tp.tolist() == ip.tolist() and tx.tolist() == ix.tolist()
    assert np.array_equal(tv.numpy(), val)


def test_partial_tile_holds_a_slice_of_one_row() -> None:
    indptr = np.array([0, 2, 12], dtype=np.int64)
    indices, data = np.arange(12), np.arange(12, dtype=np.float32)
    buf = np.zeros(4096, np.uint8)
    i4, f4 = np.dtype("<i4"), np.dtype("<f4")
    pack_tile(
        buf,
        indptr,
        indices,
        data,
        row_start=1,
        row_stop=2,
        nnz_start=5,
        nnz_stop=9,
        partial=True,
        nbytes=4096,
        index_dtype=i4,
        value_dtype=f4,
    )
    ip, ix, val = tile_views(buf, 1, 4, i4, f4)
    assert ip.tolist() == [0, 4] and ix.tolist() == [5, 6, 7, 8] and val.tolist() == [5, 6, 7, 8]


def test_empty_tile_views() -> None:
    i8, f4 = np.dtype("<i8"), np.dtype("<f4")
    buf = np.zeros(4096, np.uint8)
    ip, ix, val = tile_views(buf, 2, 0, i8, f4)
    assert ip.tolist() == [0, 0, 0] and ix.size == 0 and val.size == 0
