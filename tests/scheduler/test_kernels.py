"""Per-tile kernels against scipy: SpMM into a slice, SpGEMM with splitting, assembling."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from aires.scheduler.kernels import (
    SpgemmOperand,
    concat_rows,
    is_resource_error,
    spgemm_tile,
    spmm_into,
    sum_pieces,
    tile_csr,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def random_csr(shape: tuple[int, int], density: float, seed: int) -> sp.csr_array:
    m = sp.random_array(shape, density=density, random_state=np.random.default_rng(seed))
    return sp.csr_array(m)


def as_torch(
    m: sp.csr_array, index: torch.dtype = torch.int32, device: str = "cpu"
) -> torch.Tensor:
    return tile_csr(
        torch.tensor(m.indptr, dtype=index, device=device),
        torch.tensor(m.indices, dtype=index, device=device),
        torch.tensor(m.data, dtype=torch.float64, device=device),
        m.shape[1],
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index", [torch.int32, torch.int64])
def test_spmm_into_assigns_and_accumulates_in_a_row_slice(device: str, index: torch.dtype) -> None:
    a = random_csr((7, 9), 0.4, 0)
    x = torch.tensor(np.random.default_rng(1).standard_normal((9, 5)), device=device)
    out = torch.full((12, 5), 7.0, dtype=torch.float64, device=device)
    spmm_into(as_torch(a, index, device), x, out[3:10], accumulate=False)
    expected = a @ x.cpu().numpy()
    np.testing.assert_allclose(out[3:10].cpu().numpy(), expected, rtol=1e-13)
    spmm_into(as_torch(a, index, device), x, out[3:10], accumulate=True)
    np.testing.assert_allclose(out[3:10].cpu().numpy(), 2 * expected, rtol=1e-13)
    assert (out[:3] == 7).all() and (out[10:] == 7).all()


def test_tile_csr_shares_memory_and_casts_on_request() -> None:
    indptr = torch.tensor([0, 1, 1], dtype=torch.int32)
    indices = torch.tensor([2], dtype=torch.int32)
    data = torch.tensor([3.0], dtype=torch.float32)
    a = tile_csr(indptr, indices, data, 4)
    assert a.shape == (2, 4) and a.values().data_ptr() == data.data_ptr()
    b = tile_csr(indptr, indices, data, 4, torch.float64)
    assert b.dtype == torch.float64 and b.crow_indices().data_ptr() == indptr.data_ptr()


def operand(
    shape: tuple[int, int], density: float, seed: int, device: str = "cpu"
) -> tuple[sp.csr_array, SpgemmOperand]:
    x = random_csr(shape, density, seed)
    return x, SpgemmOperand.build(torch.tensor(x.toarray(), device=device).to_sparse_csr())


def assemble(pieces: list[tuple[int, torch.Tensor]], shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape)
    for r, p in pieces:
        d = p.cpu().to_dense().numpy()
        out[r : r + d.shape[0]] += d
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("max_products", [1, 7, 50, 10**9])
def test_spgemm_tile_cuts_rows_by_product_count(device: str, max_products: int) -> None:
    a = random_csr((40, 30), 0.2, 0)
    x, op = operand((30, 8), 0.4, 1, device)
    pieces = spgemm_tile(as_torch(a, device=device), op, max_products=max_products)
    np.testing.assert_allclose(assemble(pieces, (40, 8)), (a @ x).toarray(), rtol=1e-13)
    # Products of a row: the lengths of X's rows its nonzeros pick.
    per_row = (a != 0).astype(np.int64) @ np.diff(x.indptr)
    assert [r for r, _ in pieces] == sorted(r for r, _ in pieces)
    for r, p in pieces:
        assert p.shape[0] == 1 or per_row[r : r + p.shape[0]].sum() <= max_products
    if max_products == 10**9:
        assert len(pieces) == 1


def test_spgemm_tile_halves_a_piece_that_runs_out_of_resources() -> None:
    a = random_csr((16, 12), 0.3, 0)
    x, op = operand((12, 5), 0.5, 1)
    calls: list[int] = []

    def flaky(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        calls.append(left.shape[0])
        if left.shape[0] > 4:
            raise RuntimeError("CUSPARSE_STATUS_INSUFFICIENT_RESOURCES when calling workEstimation")
        return left @ right

    pieces = spgemm_tile(as_torch(a), op, max_products=10**9, matmul=flaky)
    np.testing.assert_allclose(assemble(pieces, (16, 5)), (a @ x).toarray(), rtol=1e-13)
    assert calls[:3] == [16, 8, 4] and len(pieces) == 4


def test_spgemm_tile_retries_a_silently_wrong_product() -> None:
    a = random_csr((10, 12), 0.5, 0)
    x, op = operand((12, 5), 0.5, 1)

    def zeroing(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        product = left @ right
        if left.shape[0] > 2:  # the reported failure: an all-zero product, no error
            return torch.sparse_csr_tensor(
                product.crow_indices(),
                product.col_indices(),
                torch.zeros_like(product.values()),
                product.shape,
            )
        return product

    pieces = spgemm_tile(as_torch(a), op, max_products=10**9, matmul=zeroing)
    np.testing.assert_allclose(assemble(pieces, (10, 5)), (a @ x).toarray(), rtol=1e-13)


def test_spgemm_tile_gives_up_on_a_single_row() -> None:
    a = random_csr((4, 6), 0.9, 0)
    _, op = operand((6, 3), 0.9, 1)

    def broken(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="SpGEMM of a single row failed.*ran out of resources"):
        spgemm_tile(as_torch(a), op, max_products=10**9, matmul=broken)


def test_spgemm_tile_lets_other_errors_through() -> None:
    a = random_csr((4, 6), 0.9, 0)
    _, op = operand((6, 3), 0.9, 1)

    def wrong(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        spgemm_tile(as_torch(a), op, max_products=10**9, matmul=wrong)


def test_spgemm_tile_of_an_empty_tile() -> None:
    a = sp.csr_array((3, 6))
    _, op = operand((6, 4), 0.5, 1)
    [(r, p)] = spgemm_tile(as_torch(a), op, max_products=10)
    assert r == 0 and p.shape == (3, 4) and p._nnz() == 0


def test_is_resource_error() -> None:
    assert is_resource_error(RuntimeError("CUSPARSE_STATUS_INSUFFICIENT_RESOURCES"))
    assert is_resource_error(RuntimeError("cusparse: insufficient resources"))
    assert is_resource_error(torch.OutOfMemoryError("CUDA out of memory"))
    assert not is_resource_error(RuntimeError("invalid argument"))
    assert not is_resource_error(ValueError("out of memory"))


def test_sum_pieces_adds_overlapping_rows() -> None:
    p1 = as_torch(random_csr((1, 6), 0.5, 0))
    p2 = as_torch(random_csr((1, 6), 0.5, 1))
    p3 = as_torch(random_csr((2, 6), 0.5, 2))
    start, total = sum_pieces([(5, p1), (5, p2), (4, p3)])
    expected = np.zeros((2, 6))
    expected[1] += p1.to_dense().numpy()[0] + p2.to_dense().numpy()[0]
    expected += p3.to_dense().numpy()
    assert start == 4
    np.testing.assert_allclose(total.to_dense().numpy(), expected, rtol=1e-14)
    assert sum_pieces([(3, p1)]) == (3, p1)


@pytest.mark.parametrize("device", DEVICES)
def test_concat_rows_fills_once_and_leaves_gaps_empty(device: str) -> None:
    m = random_csr((10, 7), 0.4, 0)
    pieces = [(6, as_torch(m[6:9])), (0, as_torch(m[0:3])), (3, as_torch(m[3:5]))]  # row 5, 9 empty
    out = concat_rows(pieces, (10, 7), device=torch.device(device), dtype=torch.float64)
    expected = m.toarray()
    expected[[5, 9]] = 0
    assert out.layout == torch.sparse_csr and out.crow_indices().dtype == torch.int32
    assert out.device.type == device
    np.testing.assert_array_equal(out.cpu().to_dense().numpy(), expected)
