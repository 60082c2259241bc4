"""The on-disk bucket sort and CSR builder, against scipy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from aires.data._external_sort import BucketFiles, CSRBuilder


def _build(
    tmp_path: Path,
    rows: np.ndarray,
    cols: np.ndarray,
    shape: tuple[int, int],
    chunk: int,
    batches: int,
) -> sp.csr_array:
    builder = CSRBuilder(
        tmp_path / "w",
        *shape,
        expected_entries=len(rows),
        chunk_size=chunk,
        device=torch.device("cpu"),
    )
    for r, c in zip(np.array_split(rows, batches), np.array_split(cols, batches)):
        builder.add(torch.from_numpy(r), torch.from_numpy(c))
    out: dict[str, np.ndarray] = {}

    def allocate(nnz: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        out["indptr"] = np.full(shape[0] + 1, -1, np.int64)
        out["indices"] = np.full(nnz, -1, np.int64)
        out["data"] = np.zeros(nnz, np.float32)
        return out["indptr"], out["indices"], out["data"]

    nnz = builder.finish(allocate)
    assert nnz == len(out["indices"])
    return sp.csr_array((out["data"], out["indices"], out["indptr"]), shape=shape)


@pytest.mark.parametrize(("chunk", "batches"), [(10**9, 1), (64, 7), (1, 3)])
def test_builder_equals_scipy_with_duplicates(
    tmp_path: Path, rng: np.random.Generator, chunk: int, batches: int
) -> None:
    shape = (97, 53)  # odd sizes; some rows empty
    rows = rng.integers(0, shape[0], 600)
    cols = rng.integers(0, shape[1], 600)
    rows[:50], cols[:50] = rows[50:100], cols[50:100]  # duplicates
    got = _build(tmp_path, rows, cols, shape, chunk, batches)
    want = sp.coo_array((np.ones(len(rows), np.float32), (rows, cols)), shape=shape).tocsr()
    want.sum_duplicates()
    want.data[:] = 1
    assert got.has_canonical_format
    np.testing.assert_array_equal(got.indptr, want.indptr)
    np.testing.assert_array_equal(got.indices, want.indices)
    np.testing.assert_array_equal(got.data, want.data)


def test_builder_empty_matrix(tmp_path: Path) -> None:
    got = _build(tmp_path, np.zeros(0, np.int64), np.zeros(0, np.int64), (5, 5), 1024, 1)
    assert got.nnz == 0 and got.indptr.tolist() == [0] * 6


def test_builder_removes_its_bucket_files(tmp_path: Path) -> None:
    _build(tmp_path, np.arange(10), np.arange(10), (10, 10), 2, 2)
    assert list((tmp_path / "w").iterdir()) == []


def test_bucket_files_keep_append_order(tmp_path: Path) -> None:
    buckets = BucketFiles(tmp_path, 3, 2)
    records = torch.arange(20).reshape(10, 2)
    buckets.append(torch.tensor([2, 0, 2, 1, 0, 2, 2, 1, 0, 0]), records)
    assert buckets.read(2)[:, 0].tolist() == [0, 4, 10, 12]
    assert buckets.size(0) == 4
    buckets.replace(0, np.zeros((1, 2), np.int64))
    assert buckets.size(0) == 1
