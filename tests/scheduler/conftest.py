"""Fixtures of the scheduler tests: small tile stores (see :mod:`.stores` for the matrix)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from aires.tiling import TileStore, build_store

from .stores import ALIGNMENT, TILE_BYTES, hub_matrix


@pytest.fixture
def make_store(tmp_path: Path) -> Callable[..., TileStore]:
    """Build a store of ``matrix`` (default :func:`hub_matrix`) with small tiles."""
    count = [0]

    def make(matrix: sp.csr_array | None = None, **kw: object) -> TileStore:
        count[0] += 1
        kw.setdefault("tile_bytes", TILE_BYTES)
        kw.setdefault("alignment", ALIGNMENT)
        kw.setdefault("value_dtype", np.float64)
        kw.setdefault("progress", False)
        m = hub_matrix() if matrix is None else matrix
        return build_store(m, tmp_path / f"store{count[0]}", **kw)

    return make
