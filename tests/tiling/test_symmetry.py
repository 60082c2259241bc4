"""The symmetry hashes: torch's (a GPU's, in preparation) equal numpy's bit for bit, and a
build hashing on a device accepts and refuses exactly what scipy finds (a)symmetric."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aires.tiling import TileStore
from aires.tiling import store as store_module
from aires.tiling._symmetry import _torch_hashes, entry_hashes
from tests.tiling.test_store import assert_round_trip, symmetric_csr

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def entries(seed: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random entries with indices up to 2**40, explicit zeros and negative zeros among them."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(0, 1 << 40, n, dtype=np.int64)
    cols = rng.integers(0, 1 << 40, n, dtype=np.int64)
    values = rng.standard_normal(n).astype(np.float32)
    values[rng.random(n) < 0.1] = 0.0
    values[rng.random(n) < 0.1] = -0.0
    return rows, cols, values


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.sampled_from([0, 1, 7, 1000, 300_000]))
def test_torch_hashes_equal_numpys(device: str, seed: int, n: int) -> None:
    rows, cols, values = entries(seed, n)
    on = [torch.from_numpy(a).to(device) for a in (rows, cols, values)]
    assert _torch_hashes(*on) == entry_hashes(rows, cols, values)
    # The transpose's hashes are the forward's of the swapped entries.
    assert _torch_hashes(on[1], on[0], on[2])[0] == entry_hashes(rows, cols, values)[1]


def build(matrix: sp.csr_array, path: Path, tile_bytes: int, device: str) -> TileStore:
    return store_module._build(
        store_module._as_source(matrix), path, tile_bytes=tile_bytes, alignment=256,
        index_dtype=None, value_dtype=None, overwrite=False, progress=False, symmetric=True,
        extra={}, hash_device=torch.device(device),
    )


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    tile_bytes=st.sampled_from([768, 1024, 4096]),
    change=st.sampled_from(["value", "move", "none"]),
)
def test_hashing_on_a_device_checks_symmetry(
    device: str, seed: int, tile_bytes: int, change: str
) -> None:
    """Tiles hashed from their packed bytes on ``device`` (hub rows split over tiles) decide
    as scipy does, and a refusal leaves nothing on disk."""
    a = symmetric_csr(seed).tocoo()
    row, col, data = a.row.copy(), a.col.copy(), a.data.copy()
    k = int(np.flatnonzero(row != col)[seed % int((row != col).sum())])
    if change == "value":
        data[k] = np.nextafter(data[k], np.float32(np.inf))
    elif change == "move":
        col[k] = (col[k] + 1) % a.shape[1]
    b = sp.csr_array(sp.coo_array((data, (row, col)), shape=a.shape))
    b.sum_duplicates()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s"
        if (b != b.T).nnz == 0:
            assert change != "value"
            assert_round_trip(build(b, path, tile_bytes, device), b)
        else:
            with pytest.raises(ValueError, match="symmetric=True, but matrix is not symmetric"):
                build(b, path, tile_bytes, device)
            assert list(Path(tmp).iterdir()) == []
