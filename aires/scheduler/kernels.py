"""Per-tile sparse products: SpMM into an output row slice, SpGEMM with bounded workspace.

Every tile arrives as three zero-copy views ``(indptr, indices, data)`` over a byte slot
(``TileStore.tile_arrays``). They are wrapped as a torch sparse CSR tensor without a copy or an
invariant check (the store verified the bytes), so on CUDA the product is one cuSPARSE call:
``cusparseSpMM`` for a dense right-hand side, ``cusparseSpGEMM`` (default algorithm, the only
one PyTorch exposes) for a sparse one.

The kernels write into caller buffers (``out=``), which autograd refuses for inputs that
require grad, so each runs under ``torch.no_grad``: gradients are ``aires.matmul``'s business.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

__all__ = [
    "tile_csr",
    "spmm_into",
    "SpgemmOperand",
    "spgemm_tile",
    "sum_pieces",
    "concat_rows",
    "is_resource_error",
    "BYTES_PER_PRODUCT",
    "narrowable",
    "narrow_indices",
]

#: Device bytes one intermediate product of cuSPARSE's default SpGEMM costs, workspace and
#: output bound together. Measured on the H100: 19.9 GB of workspace for 754M products
#: (~26 B each); 32 B plus the output's index and value leave a margin.
BYTES_PER_PRODUCT = 40

_RESOURCE_MESSAGES = (
    "insufficient resources",
    "insufficient_resources",
    "out of memory",
    "alloc_failed",
    "cudaerrormemoryallocation",
)


def tile_csr(
    indptr: torch.Tensor,
    indices: torch.Tensor,
    data: torch.Tensor,
    n_cols: int,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A sparse CSR tensor over a tile's arrays, sharing their memory.

    Args:
        indptr, indices, data: The tile's row pointer (from 0), column indices and values,
            as returned by ``TileStore.tile_arrays`` on a torch buffer.
        n_cols: Columns of the whole matrix.
        dtype: Value dtype wanted; the values are cast (one copy) only if they differ.

    Returns:
        A ``torch.sparse_csr`` tensor of shape ``(len(indptr) - 1, n_cols)``.
    """
    if dtype is not None and data.dtype != dtype:
        data = data.to(dtype)
    return torch.sparse_csr_tensor(
        indptr, indices, data, (indptr.numel() - 1, n_cols), check_invariants=False
    )


@torch.no_grad()
def spmm_into(a: torch.Tensor, x: torch.Tensor, out: torch.Tensor, *, accumulate: bool) -> None:
    """``out = a @ x`` (or ``out += a @ x``) in place, with no temporary.

    ``out`` is a contiguous row slice of the output. ``torch.addmm`` with ``out=`` hands the
    slice itself to cuSPARSE as the row-major ``C`` matrix (no copy, no allocation beyond the
    cached SpMM buffer); ``beta=0`` overwrites what ``out`` held (callers on CUDA zero it
    first: cuSPARSE does not promise that ``0 * NaN`` is skipped), ``beta=1`` sums pieces of a
    hub row split over several tiles.

    Shapes:
        a: ``(m, k)`` sparse CSR; x: ``(k, f)`` dense row-major; out: ``(m, f)``.
    """
    torch.addmm(out, a, x, beta=1 if accumulate else 0, out=out)


def is_resource_error(error: BaseException) -> bool:
    """Whether ``error`` says the kernel ran out of memory or cuSPARSE resources."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and any(m in text for m in _RESOURCE_MESSAGES)


def _csr_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """One sparse x sparse product (cuSPARSE SpGEMM on CUDA). Tests replace it to fail."""
    return a @ b


@dataclass(frozen=True)
class SpgemmOperand:
    """The sparse right-hand side ``X`` of a call, with the vectors its checks need.

    Attributes:
        x: ``X`` as sparse CSR on the compute device.
        row_nnz: Nonzeros per row of ``X`` (int64): the products a tile row costs is the sum of
            ``row_nnz`` over its column indices.
        row_sum: ``X @ 1``: a correct product ``P = A X`` has ``P @ 1 == A @ (X @ 1)``.
        abs_row_sum: ``|X| @ 1``: scales the tolerance of that check to the row's magnitude.
        rtol: Relative tolerance of the row-sum check for ``X``'s dtype.
    """

    x: torch.Tensor
    row_nnz: torch.Tensor
    row_sum: torch.Tensor
    abs_row_sum: torch.Tensor
    rtol: float

    @classmethod
    @torch.no_grad()
    def build(cls, x: torch.Tensor) -> SpgemmOperand:
        """Prepare sparse CSR ``x`` (one pass over its values)."""
        crow = x.crow_indices()
        ones = torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
        abs_x = torch.sparse_csr_tensor(
            crow, x.col_indices(), x.values().abs(), x.shape, check_invariants=False
        )
        rtol = 1e-9 if x.dtype == torch.float64 else 1e-3
        return cls(
            x=x,
            row_nnz=(crow[1:] - crow[:-1]).to(torch.int64),
            row_sum=torch.mv(x, ones),
            abs_row_sum=torch.mv(abs_x, ones),
            rtol=rtol,
        )

    @property
    def n_cols(self) -> int:
        return int(self.x.shape[1])


def _row_slice(crow: np.ndarray, a: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """Rows ``[r0, r1)`` of CSR ``a`` as a CSR tensor (row pointer rebased: one small copy)."""
    lo, hi = int(crow[r0]), int(crow[r1])
    indptr = a.crow_indices()[r0 : r1 + 1] - lo
    return torch.sparse_csr_tensor(
        indptr,
        a.col_indices()[lo:hi],
        a.values()[lo:hi],
        (r1 - r0, a.shape[1]),
        check_invariants=False,
    )


def _check_rows(a: torch.Tensor, product: torch.Tensor, op: SpgemmOperand) -> bool:
    """Cheap check that ``product == a @ X``: compare row sums against ``a @ (X @ 1)``.

    Catches the silent all-zero (or garbage) products reported for large SpGEMMs
    (cupy/cupy#10033) at the cost of three sparse x vector products (``torch.mv``, cuSPARSE
    SpMV on CUDA).
    """
    if a.shape[0] == 0:
        return True
    ones = torch.ones(op.n_cols, dtype=product.dtype, device=product.device)
    got = torch.mv(product, ones)
    expected = torch.mv(a, op.row_sum)
    abs_a = torch.sparse_csr_tensor(
        a.crow_indices(), a.col_indices(), a.values().abs(), a.shape, check_invariants=False
    )
    bound = torch.mv(abs_a, op.abs_row_sum)
    tiny = torch.finfo(product.dtype).tiny
    return bool(((got - expected).abs() <= op.rtol * bound + tiny).all())


@torch.no_grad()
def spgemm_tile(
    a: torch.Tensor,
    op: SpgemmOperand,
    *,
    max_products: int,
    matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> list[tuple[int, torch.Tensor]]:
    """``a @ X`` for one tile as row pieces, each small enough for the workspace allowance.

    The tile's rows are cut where the running count of intermediate products (the sum of
    ``X``'s row lengths over each row's column indices, computed exactly in int64) would pass
    ``max_products``. Each piece is one SpGEMM; if cuSPARSE still reports insufficient
    resources or out of memory, or the product fails the row-sum check, the piece is halved
    and retried, down to single rows.

    Args:
        a: The tile as sparse CSR, values in ``X``'s dtype.
        op: The prepared right-hand side.
        max_products: Intermediate products per SpGEMM call (>= 1).
        matmul: The sparse product to use (default: ``a @ b``); tests inject failures here.

    Returns:
        ``(row_offset, piece)`` pairs in row order, each piece a sparse CSR tensor of shape
        ``(rows, X.shape[1])`` covering tile rows ``row_offset ...``.

    Raises:
        RuntimeError: a single row still fails (out of resources or a wrong product).
    """
    multiply = matmul or _csr_matmul
    rows = a.shape[0]
    crow = a.crow_indices().to(torch.int64)
    crow_host = crow.cpu().numpy()
    if a._nnz() == 0 or rows == 0:
        return [(0, _empty_csr(rows, op.n_cols, a))]
    # Products per row boundary in one tile-sized int64 temporary (no int64 copy of the
    # column indices, an in-place running sum), freed before the first SpGEMM.
    running = torch.index_select(op.row_nnz, 0, a.col_indices()).cumsum_(0)
    at = running[(crow - 1).clamp_min(0)]
    cum = torch.where(crow > 0, at, torch.zeros_like(at)).cpu().numpy()
    del running, at
    bounds = _cut_rows(cum, max(int(max_products), 1))

    def multiply_rows(r0: int, r1: int) -> list[tuple[int, torch.Tensor]]:
        part = _row_slice(crow_host, a, r0, r1)
        reason = ""
        try:
            product = multiply(part, op.x)
            if _check_rows(part, product, op):
                return [(r0, product)]
            reason = "its row sums do not match A @ (X @ 1) (a silently wrong product)"
        except (RuntimeError, torch.OutOfMemoryError) as error:
            if not is_resource_error(error):
                raise
            reason = f"it ran out of resources ({error})"
        if r1 - r0 == 1:
            raise RuntimeError(
                f"SpGEMM of a single row failed: {reason}; the row has "
                f"{int(cum[r1] - cum[r0])} intermediate products"
            )
        mid = (r0 + r1) // 2
        return multiply_rows(r0, mid) + multiply_rows(mid, r1)

    pieces: list[tuple[int, torch.Tensor]] = []
    for r0, r1 in bounds:
        pieces.extend(multiply_rows(r0, r1))
    return pieces


def _cut_rows(cum: np.ndarray, limit: int) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` whose products (``cum[r1] - cum[r0]``) stay within ``limit``.

    ``cum`` is the running product count at each row boundary (length rows + 1). A row with
    more products than ``limit`` gets a range of its own.
    """
    rows = len(cum) - 1
    bounds = []
    r0 = 0
    while r0 < rows:
        r1 = int(np.searchsorted(cum, cum[r0] + limit, side="right")) - 1
        r1 = min(max(r1, r0 + 1), rows)
        bounds.append((r0, r1))
        r0 = r1
    return bounds


def _empty_csr(rows: int, n_cols: int, like: torch.Tensor) -> torch.Tensor:
    index = like.crow_indices()
    return torch.sparse_csr_tensor(
        torch.zeros(rows + 1, dtype=index.dtype, device=index.device),
        torch.zeros(0, dtype=index.dtype, device=index.device),
        torch.zeros(0, dtype=like.dtype, device=index.device),
        (rows, n_cols),
        check_invariants=False,
    )


def sum_pieces(pieces: list[tuple[int, torch.Tensor]]) -> tuple[int, torch.Tensor]:
    """Sum row pieces that overlap (pieces of a hub row split over tiles) into one piece.

    Args:
        pieces: ``(row_start, csr)`` pairs, in absolute rows.

    Returns:
        ``(row_start, csr)`` covering the union of their rows, duplicates summed.
    """
    if len(pieces) == 1:
        return pieces[0]
    start = min(r for r, _ in pieces)
    stop = max(r + p.shape[0] for r, p in pieces)
    rows, cols, vals = [], [], []
    for r, p in pieces:
        coo = p.to_sparse_coo()
        idx = coo.indices()
        rows.append(idx[0] + (r - start))
        cols.append(idx[1])
        vals.append(coo.values())
    n_cols = pieces[0][1].shape[1]
    total = torch.sparse_coo_tensor(
        torch.stack([torch.cat(rows), torch.cat(cols)]),
        torch.cat(vals),
        (stop - start, n_cols),
    ).coalesce()
    return start, total.to_sparse_csr()


def concat_rows(
    pieces: list[tuple[int, torch.Tensor]],
    shape: tuple[int, int],
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """One CSR matrix from non-overlapping row pieces: sizes first, then one fill.

    The row pointer comes from every piece's row lengths; the column indices and values are
    allocated once at their exact total and each piece is copied into its slice (pieces may
    live on the host and the result on the device, or the other way round). Rows no piece
    covers are empty. Indices are int32 unless the total or the column count needs int64.

    Args:
        pieces: ``(row_start, csr)`` pairs, disjoint in rows.
        shape: ``(rows, cols)`` of the result.
        device, dtype: Where the result lives and its value dtype.

    Returns:
        A sparse CSR tensor of ``shape``.
    """
    n_rows, n_cols = shape
    pieces = sorted(pieces, key=lambda rp: rp[0])
    total = sum(p._nnz() for _, p in pieces)
    wide = total >= 2**31 or n_cols >= 2**31
    index_dtype = torch.int64 if wide else torch.int32
    # Row lengths go straight into the row pointer, summed in place: the only temporaries
    # are one piece's lengths and the final narrowing copy.
    indptr = torch.zeros(n_rows + 1, dtype=torch.int64, device=device)
    for r, p in pieces:
        crow = p.crow_indices()
        indptr[r + 1 : r + 1 + p.shape[0]] = crow[1:] - crow[:-1]
    indptr.cumsum_(0)
    indices = torch.empty(total, dtype=index_dtype, device=device)
    values = torch.empty(total, dtype=dtype, device=device)
    offset = 0
    for _, p in pieces:
        n = p._nnz()
        indices[offset : offset + n].copy_(p.col_indices())
        values[offset : offset + n].copy_(p.values())
        offset += n
    return torch.sparse_csr_tensor(
        indptr.to(index_dtype), indices, values, shape, check_invariants=False
    )


def narrowable(x: torch.Tensor) -> bool:
    """Whether sparse CSR ``x`` has 64-bit indices whose values all fit in 32 bits."""
    return x.crow_indices().dtype != torch.int32 and x._nnz() < 2**31 and max(x.shape) < 2**31


def narrow_indices(x: torch.Tensor) -> torch.Tensor:
    """``x`` with int32 indices when they fit: cuSPARSE SpGEMM takes only 32-bit indices and
    PyTorch would otherwise convert ``X`` again for every tile."""
    if not narrowable(x):
        return x
    return torch.sparse_csr_tensor(
        x.crow_indices().to(torch.int32),
        x.col_indices().to(torch.int32),
        x.values(),
        x.shape,
        check_invariants=False,
    )
