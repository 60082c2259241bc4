"""``AiresGCNConv``: PyG's ``GCNConv`` whose aggregation is an out-of-core tiled product.

The layer computes what ``torch_geometric.nn.GCNConv`` computes,

.. math::
    \\mathbf{X}' = \\hat{\\mathbf{D}}^{-1/2} \\hat{\\mathbf{A}} \\hat{\\mathbf{D}}^{-1/2}
    \\mathbf{X} \\mathbf{\\Theta} + \\mathbf{b},
    \\qquad \\hat{\\mathbf{A}} = \\mathbf{A} + \\mathbf{I}\\ (\\text{or } \\mathbf{A} + 2\\mathbf{I}),

(Kipf & Welling, "Semi-Supervised Classification with Graph Convolutional Networks",
https://arxiv.org/abs/1609.02907), but the normalised adjacency is tiled once into a
:class:`~aires.tiling.TileStore` and every product with it goes through :func:`aires.matmul.matmul`,
which streams the tiles from GPU, pinned host memory and NVMe within the given budgets. So the
graph never needs to fit on the GPU.

The module holds the normalisation (:func:`gcn_norm`, a vectorised re-implementation of PyG's),
the cost model that orders the product (:func:`choose_order`), the process-wide cache that lets
layers share one tiled adjacency, and the layer itself.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aires.checks import check_positive_int, parse_size
from aires.matmul import matmul
from aires.tiling import TileStore, build_store

__all__ = ["AiresGCNConv", "choose_order", "gcn_norm"]

Order = Literal["aggregate_first", "transform_first"]
_ORDERS = ("auto", "aggregate_first", "transform_first")
_FLOWS = ("source_to_target", "target_to_source")
_SPARSE_LAYOUTS = (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc)
_NUMPY_DTYPES = {
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
}

# Cost of one pass of the tiles over PCIe, in "gathered columns per nonzero". On the H100 we
# benchmark on, streaming a 58.9M-nonzero adjacency from pinned host took 8.8 ms against 7.15 ms
# for the in-core SpMM with 128 columns (DESIGN.md), so a pass costs about as much as 128 extra
# columns of compute. Passes over the tiles are what out of core makes expensive.
_PASS_COLUMNS = 128
# SpGEMM work per scalar product relative to one gathered column of SpMM (hash accumulation and
# a symbolic phase): an assumption, not a measurement; it only has to rank orders correctly.
_SPGEMM_PRODUCT_COST = 4
# Tiled adjacencies kept alive by the process-wide cache (each is a directory of tiles on disk;
# layers with ``cached=True`` keep theirs alive beyond this).
_MAX_SHARED = 4


# --------------------------------------------------------------------------- normalisation


def _is_sparse_tensor(obj: Any) -> bool:
    """Whether ``obj`` is a ``torch_sparse.SparseTensor`` (never imports torch-sparse)."""
    module = sys.modules.get("torch_sparse")
    return module is not None and isinstance(obj, module.SparseTensor)


def _add_remaining_self_loops(
    edge_index: Tensor, weight: Tensor, fill: float, num_nodes: int
) -> tuple[Tensor, Tensor]:
    """PyG's ``add_remaining_self_loops``: existing loops keep their weight, others get ``fill``."""
    is_loop = edge_index[0] == edge_index[1]
    loop_weight = torch.full(
        (num_nodes,), fill, dtype=weight.dtype, device=weight.device
    )
    loop_weight[edge_index[0, is_loop]] = weight[is_loop]
    nodes = torch.arange(num_nodes, device=edge_index.device)
    edge_index = torch.cat(
        [edge_index[:, ~is_loop], torch.stack([nodes, nodes])], dim=1
    )
    return edge_index, torch.cat([weight[~is_loop], loop_weight])


def _scale(target: Tensor, source: Tensor, weight: Tensor, num_nodes: int) -> Tensor:
    """``d_t^-1/2 * d_s^-1/2 * w`` with ``d`` the weighted in-degree of each target.

    The two degree factors are multiplied first so that the result is exactly symmetric whenever
    the weights are (``a * b == b * a`` in IEEE arithmetic), which lets a symmetric graph reuse its
    tiles for the backward pass. PyG multiplies in another order: the values differ by an ulp.
    """
    degree = torch.zeros(num_nodes, dtype=weight.dtype, device=weight.device)
    degree = degree.index_add(0, target, weight)
    inv_sqrt = degree.pow(-0.5)
    inv_sqrt = inv_sqrt.masked_fill(inv_sqrt == float("inf"), 0.0)
    return inv_sqrt[target] * inv_sqrt[source] * weight


def _compressed_triplets(adj_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(row, col, value)`` of a torch sparse COO or CSR matrix, duplicates kept, no sort."""
    if adj_t.layout == torch.sparse_csr:
        crow = adj_t.crow_indices()
        rows = torch.arange(adj_t.size(0), device=crow.device)
        row = torch.repeat_interleave(rows, crow.diff())
        return row, adj_t.col_indices().long(), adj_t.values()
    if not adj_t.is_coalesced():
        adj_t = adj_t.coalesce()
    row, col = adj_t.indices()
    return row, col, adj_t.values()


def _check_square(adj_t: Any, num_nodes: int | None, name: str) -> int:
    rows, cols = int(adj_t.size(0)), int(adj_t.size(1))
    if rows != cols:
        raise ValueError(
            f"{name} must be a square adjacency, got shape ({rows}, {cols})"
        )
    if num_nodes is not None and num_nodes != rows:
        raise ValueError(f"{name} has {rows} nodes but x has {num_nodes}")
    return rows


def _sparse_norm_triplets(
    adj_t: Any,
    num_nodes: int | None,
    *,
    improved: bool,
    add_self_loops: bool,
    normalize: bool,
    dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """``(target, source, value, n)`` of the normalised ``adj_t`` (torch sparse or SparseTensor).

    Self loops follow PyG input form by input form: a torch sparse ``adj_t`` gets ``fill`` *added*
    to its diagonal (PyG's ``add_self_loops``), a ``SparseTensor`` has its diagonal *replaced* by
    ``fill`` (``torch_sparse.fill_diag``).
    """
    fill = 2.0 if improved else 1.0
    n = _check_square(adj_t, num_nodes, "edge_index")
    if _is_sparse_tensor(adj_t):
        target, source, value = adj_t.coo()
        if value is None:
            value = torch.ones(
                target.numel(),
                dtype=dtype or torch.get_default_dtype(),
                device=target.device,
            )
        if normalize and add_self_loops:
            off_diagonal = target != source
            target, source, value = (
                target[off_diagonal],
                source[off_diagonal],
                value[off_diagonal],
            )
    else:
        target, source, value = _compressed_triplets(adj_t)
    if not normalize:
        return target, source, value, n
    if add_self_loops:
        nodes = torch.arange(n, device=target.device)
        target, source = torch.cat([target, nodes]), torch.cat([source, nodes])
        value = torch.cat(
            [value, torch.full((n,), fill, dtype=value.dtype, device=value.device)]
        )
    return target, source, _scale(target, source, value, n), n


def _check_edge_index(
    edge_index: Tensor, edge_weight: Tensor | None, num_nodes: int | None
) -> int:
    """Validate an ``edge_index`` (and its weights); return the number of nodes."""
    # bool passes is_floating_point() and would be read as node ids 0/1: a silently wrong graph.
    if (
        edge_index.dim() != 2
        or edge_index.size(0) != 2
        or edge_index.dtype == torch.bool
        or edge_index.is_floating_point()
        or edge_index.is_complex()
    ):
        raise ValueError(
            f"edge_index must be an integer tensor of shape [2, E], got {tuple(edge_index.shape)} "
            f"{edge_index.dtype}"
        )
    if num_nodes is None:
        num_nodes = int(edge_index.max()) + 1 if edge_index.numel() else 0
    if edge_index.numel() and (
        int(edge_index.min()) < 0 or int(edge_index.max()) >= num_nodes
    ):
        raise ValueError(
            f"edge_index holds node ids outside [0, {num_nodes}): min {int(edge_index.min())}, "
            f"max {int(edge_index.max())}"
        )
    if edge_weight is not None:
        if edge_weight.shape != (edge_index.size(1),):
            raise ValueError(
                f"edge_weight must have shape [{edge_index.size(1)}] (one per edge), "
                f"got {tuple(edge_weight.shape)}"
            )
        # Checked here, not when the normalised matrix is tiled, whose message would name
        # "matrix" and a position in the assembled matrix rather than the edge.
        finite = torch.isfinite(edge_weight)
        if not bool(finite.all()):
            edge = int((~finite).nonzero()[0, 0])
            raise ValueError(
                f"edge_weight must be finite, got {edge_weight[edge].item()} for edge {edge} "
                f"({int(edge_index[0, edge])} -> {int(edge_index[1, edge])})"
            )
    return num_nodes


def _unit_weights(edge_index: Tensor, dtype: torch.dtype | None) -> Tensor:
    return torch.ones(
        edge_index.size(1),
        dtype=dtype or torch.get_default_dtype(),
        device=edge_index.device,
    )


def _edge_norm(
    edge_index: Tensor,
    edge_weight: Tensor | None,
    num_nodes: int,
    improved: bool,
    add_self_loops: bool,
    flow: str,
    dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor]:
    """PyG's ``gcn_norm`` on a checked ``edge_index``: ``(edge_index, weight)``, loops appended."""
    if edge_weight is None:
        # Unit weights come before the self loops so that ``improved`` gives A + 2I, as documented
        # (PyG 2.8 adds the loops first and then overwrites every weight with 1).
        edge_weight = _unit_weights(edge_index, dtype)
    edge_index = edge_index.long()
    if add_self_loops:
        edge_index, edge_weight = _add_remaining_self_loops(
            edge_index, edge_weight, 2.0 if improved else 1.0, num_nodes
        )
    row, col = edge_index[0], edge_index[1]
    target, source = (col, row) if flow == "source_to_target" else (row, col)
    return edge_index, _scale(target, source, edge_weight, num_nodes)


def gcn_norm(
    edge_index: Any,
    edge_weight: Tensor | None = None,
    num_nodes: int | None = None,
    improved: bool = False,
    add_self_loops: bool = True,
    flow: str = "source_to_target",
    dtype: torch.dtype | None = None,
) -> Any:
    """The GCN normalisation ``D^-1/2 (A + fill I) D^-1/2``, with PyG's signature and results.

    A vectorised torch re-implementation of ``torch_geometric.nn.conv.gcn_conv.gcn_norm``:
    degrees are weighted in-degrees (``d_i = sum of the weights of the edges j -> i``, self loop
    included), nodes of degree 0 get coefficient 0, duplicate edges stay separate entries (so
    they sum in every product), and gradients flow to ``edge_weight`` / the sparse values.

    Args:
        edge_index: ``[2, E]`` LongTensor (``edge_index[0]`` the sources under the default
            ``flow``), a torch sparse COO/CSR ``adj_t`` (rows are targets), or a
            ``torch_sparse.SparseTensor`` ``adj_t``.
        edge_weight: weights of the ``E`` edges (``edge_index`` form only; default 1).
        num_nodes: number of nodes (default: ``max(edge_index) + 1`` or the matrix size).
        improved: add self loops of weight 2 instead of 1 (``A + 2I``).
        add_self_loops: add self loops. An ``edge_index`` keeps the weight of existing loops and
            adds the missing ones; a torch sparse matrix gets ``fill`` added to its whole
            diagonal; a ``SparseTensor`` gets its diagonal replaced (all three as in PyG).
        flow: ``"source_to_target"`` or ``"target_to_source"`` (``edge_index`` form only).
        dtype: dtype of the unit weights created when ``edge_weight`` is None.

    Returns:
        ``(edge_index, edge_weight)`` for an ``edge_index`` (non-loop edges first, then one loop
        per node); ``(adj_t, None)`` for a torch sparse matrix (same layout, coalesced); a
        ``SparseTensor`` for a ``SparseTensor``.

    Raises:
        ValueError: for a malformed ``edge_index``/``edge_weight``, a non-square matrix, or a
            sparse matrix with ``edge_weight`` (PyG silently ignores it: the matrix's values
            are the weights) or with ``flow="target_to_source"``.
        NotImplementedError: for a sparse CSC matrix (as PyG).

    Note:
        PyG 2.8 ignores ``improved`` for an ``edge_index`` without ``edge_weight`` (it overwrites
        the loop weights with ones); this function gives ``A + 2I`` there, as PyG documents and
        as PyG does for every other input form.
    """
    if flow not in _FLOWS:
        raise ValueError(f"flow must be one of {_FLOWS}, got {flow!r}")
    sparse_tensor = _is_sparse_tensor(edge_index)
    if sparse_tensor or (
        isinstance(edge_index, Tensor) and edge_index.layout in _SPARSE_LAYOUTS
    ):
        _check_sparse_form(edge_index, edge_weight, flow)
        target, source, value, n = _sparse_norm_triplets(
            edge_index,
            num_nodes,
            improved=improved,
            add_self_loops=add_self_loops,
            normalize=True,
            dtype=dtype,
        )
        if sparse_tensor:
            return type(edge_index)(
                row=target, col=source, value=value, sparse_sizes=(n, n)
            )
        adj = torch.sparse_coo_tensor(
            torch.stack([target, source]), value, (n, n)
        ).coalesce()
        return (
            adj.to_sparse_csr() if edge_index.layout == torch.sparse_csr else adj
        ), None
    if not isinstance(edge_index, Tensor):
        raise TypeError(
            "edge_index must be a [2, E] LongTensor, a torch sparse adj_t or a SparseTensor, got "
            f"{type(edge_index).__name__}"
        )
    num_nodes = _check_edge_index(edge_index, edge_weight, num_nodes)
    return _edge_norm(
        edge_index, edge_weight, num_nodes, improved, add_self_loops, flow, dtype
    )


# --------------------------------------------------------------------------- product order


def choose_order(
    *,
    nnz: int,
    num_nodes: int,
    in_columns: int,
    out_columns: int,
    x_nnz: int | None = None,
    x_requires_grad: bool = False,
    weight_requires_grad: bool = True,
) -> Order:
    """Order of ``A X W``: ``(A X) W`` (``"aggregate_first"``) or ``A (X W)`` (``"transform_first"``).

    The cost counted is the work over the tiles of ``A``, which is what streaming makes expensive
    (the dense ``n x F_in x F_out`` transform costs the same in both orders and is left out). One
    SpMM pass with ``F`` columns costs ``nnz * (F + 128)``: ``F`` gathered columns per nonzero plus
    the transfer of the tile, worth about 128 columns on an H100 over PCIe (DESIGN.md).

    - Dense ``X``. ``(A X) W`` runs one pass with ``F_in`` columns forward and, only if ``X``
      needs a gradient, one more backward (``dX = A^T (dY W)``); ``dW = (A X)^T dY`` needs no
      pass. ``A (X W)`` runs one pass with ``F_out`` columns forward and one backward as soon as
      anything before it needs a gradient (``d(XW) = A^T dY``). So a first layer whose input
      needs no gradient aggregates first unless ``F_in`` is much wider than ``F_out``.
    - Sparse ``X`` (SpGEMM). ``(A X)`` costs about ``nnz * nnz(X) / n`` scalar products (times 4,
      for SpGEMM's hash accumulation), its result has about ``min(n F_in, that)`` nonzeros, each
      multiplied by ``F_out`` columns of ``W`` forward and backward. ``A (X W)`` costs the
      sparse-dense ``X W`` (``nnz(X) F_out``) and dense SpMM passes with ``F_out`` columns. Wide
      bag-of-words features with a narrow ``F_out`` therefore transform first.

    Ties go to ``transform_first``, PyG's order.

    Args:
        nnz: nonzeros of the (normalised) adjacency.
        num_nodes: ``n``, rows of ``X``.
        in_columns: ``F_in`` (times the batch size for batched ``X``).
        out_columns: ``F_out`` (times the batch size).
        x_nnz: nonzeros of ``X`` when ``X`` is sparse, else None.
        x_requires_grad: whether a gradient w.r.t. ``X`` will be computed.
        weight_requires_grad: whether a gradient w.r.t. ``W`` will be computed.

    Returns:
        ``"aggregate_first"`` or ``"transform_first"``.
    """
    backward = x_requires_grad or weight_requires_grad

    def spmm(columns: int) -> int:
        return nnz * (columns + _PASS_COLUMNS)

    if x_nnz is None:
        aggregate = spmm(in_columns) * (1 + int(x_requires_grad))
        transform = spmm(out_columns) * (1 + int(backward))
    else:
        products = nnz * x_nnz / max(num_nodes, 1)
        ax_nnz = min(num_nodes * in_columns, products)
        aggregate = (
            _SPGEMM_PRODUCT_COST * products
            + nnz * _PASS_COLUMNS
            + ax_nnz * out_columns * (1 + int(weight_requires_grad))
        )
        transform = (x_nnz * out_columns + spmm(out_columns)) * (
            1 + int(weight_requires_grad)
        )
    return "aggregate_first" if aggregate < transform else "transform_first"


# --------------------------------------------------------------------------- shared tiles


# digest of (inputs, normalisation, tiling parameters) -> tiles, least recently used first
_STORES: OrderedDict[str, TileStore] = OrderedDict()
# identity of the input tensors -> their digest, so that a graph passed again as the same objects
# (every epoch, every layer) is not hashed again. Validated by weak references: an id is reused
# once its object dies.
_DIGESTS: dict[tuple, tuple[weakref.ref, weakref.ref | None, str]] = {}


def _components(adj: Any) -> list[Tensor]:
    """The tensors that hold an adjacency in any accepted form."""
    if _is_sparse_tensor(adj):
        row, col, value = adj.coo()
        return [row, col] + ([] if value is None else [value])
    if adj.layout == torch.sparse_csr:
        return [adj.crow_indices(), adj.col_indices(), adj.values()]
    if adj.layout == torch.sparse_coo:
        return [adj._indices(), adj._values()]
    return [adj]


def _identity(adj: Any, edge_weight: Tensor | None, params: tuple) -> tuple:
    """Key naming the input objects in their current state (ids and in-place versions)."""
    tensors = _components(adj) + ([] if edge_weight is None else [edge_weight])
    versions = tuple(t._version for t in tensors)
    return (id(adj), id(edge_weight), versions, params)


def _digest(adj: Any, edge_weight: Tensor | None, params: tuple) -> str:
    """Content hash of the adjacency, the weights and the parameters (one pass over the bytes)."""
    digest = hashlib.blake2b(repr(params).encode(), digest_size=16)
    sparse_tensor = _is_sparse_tensor(adj)
    kind = "sparse_tensor" if sparse_tensor else str(adj.layout)
    # torch_sparse's SparseTensor.size() needs a dim; sizes() is its whole shape.
    shape = tuple(adj.sizes() if sparse_tensor else adj.size())
    digest.update(f"{kind}{shape}".encode())
    for tensor in _components(adj) + ([] if edge_weight is None else [edge_weight]):
        flat = tensor.detach().reshape(-1).contiguous().cpu()
        digest.update(f"|{flat.dtype}:{flat.numel()}|".encode())
        # An empty tensor from numpy can keep stride 0, which .view(uint8) refuses even after
        # .contiguous(); it has no bytes to hash anyway.
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy())
    return digest.hexdigest()


def _lookup_digest(adj: Any, edge_weight: Tensor | None, params: tuple) -> str:
    key = _identity(adj, edge_weight, params)
    hit = _DIGESTS.get(key)
    if hit is not None:
        adj_ref, weight_ref, digest = hit
        if adj_ref() is adj and (weight_ref is None or weight_ref() is edge_weight):
            return digest
    for stale in [
        k for k, (a, w, _) in _DIGESTS.items() if a() is None or (w and w() is None)
    ]:
        del _DIGESTS[stale]
    digest = _digest(adj, edge_weight, params)
    _DIGESTS[key] = (
        weakref.ref(adj),
        None if edge_weight is None else weakref.ref(edge_weight),
        digest,
    )
    return digest


def _assemble(
    target: Tensor, source: Tensor, value: Tensor, n: int, dtype: np.dtype
) -> sp.csr_array:
    """Target-major CSR (``out = A @ h``), duplicate entries summed, indices sorted."""
    data = value.detach().cpu().numpy().astype(dtype, copy=False)
    rows, cols = target.cpu().numpy(), source.cpu().numpy()
    matrix = sp.coo_array((data, (rows, cols)), shape=(n, n)).tocsr()
    matrix.sum_duplicates()
    return matrix


def _is_symmetric(matrix: sp.csr_array) -> bool:
    """Same structure as its transpose and values equal up to a few ulps.

    Values can differ by rounding only where duplicate edges were summed in different orders;
    using ``A`` for ``A^T`` in the backward pass then costs at most that rounding.
    """
    transpose = matrix.T.tocsr()
    transpose.sort_indices()
    eps = np.finfo(matrix.dtype).eps
    return (
        np.array_equal(matrix.indptr, transpose.indptr)
        and np.array_equal(matrix.indices, transpose.indices)
        and np.allclose(matrix.data, transpose.data, rtol=4 * eps, atol=0.0)
    )


def _tile(
    matrix: sp.csr_array, digest: str, tile_bytes: int | None, store_dir: Path | None
) -> TileStore:
    """Tile ``matrix`` into ``store_dir/gcn-<digest>`` (reused if present) or a temporary dir.

    A temporary directory lives exactly as long as the store object: it is removed when the last
    holder (the shared cache, a ``cached`` layer, an autograd graph) drops the store.
    """
    options: dict[str, Any] = {} if tile_bytes is None else {"tile_bytes": tile_bytes}
    symmetric = _is_symmetric(matrix)
    if store_dir is not None:
        path = store_dir / f"gcn-{digest}"
        if path.exists():
            return TileStore.open(path)
        store_dir.mkdir(parents=True, exist_ok=True)
        return build_store(
            matrix,
            path,
            value_dtype=matrix.dtype,
            symmetric=symmetric,
            progress=False,
            **options,
        )
    workdir = tempfile.TemporaryDirectory(prefix="aires-gcn-")
    store = build_store(
        matrix,
        Path(workdir.name) / "adjacency",
        value_dtype=matrix.dtype,
        symmetric=symmetric,
        progress=False,
        **options,
    )
    weakref.finalize(store, workdir.cleanup)
    return store


def _check_sparse_form(adj: Any, edge_weight: Tensor | None, flow: str) -> None:
    """Reject what a sparse ``adj_t`` cannot be combined with (before any work is done on it)."""
    if isinstance(adj, Tensor) and adj.layout == torch.sparse_csc:
        raise NotImplementedError(
            "a sparse CSC edge_index is not supported (as in PyG's gcn_norm); pass adj_t in "
            "CSR or COO layout, rows being the target nodes"
        )
    if edge_weight is not None:
        raise ValueError(
            "edge_weight must be None when edge_index is a sparse matrix: its values are the "
            "edge weights"
        )
    if flow != "source_to_target":
        raise ValueError(
            f"flow={flow!r} is not supported for a sparse edge_index (as in PyG): transpose "
            "the matrix instead"
        )


def _shared_adjacency(
    adj: Any,
    edge_weight: Tensor | None,
    num_nodes: int,
    dtype: torch.dtype,
    *,
    improved: bool,
    add_self_loops: bool,
    normalize: bool,
    flow: str,
    tile_bytes: int | None,
    store_dir: Path | None,
) -> TileStore:
    """The tiled matrix ``A`` (``out = A @ h``) for this graph, from the cache or built now."""
    if not (isinstance(adj, Tensor) and adj.layout == torch.strided):
        _check_sparse_form(adj, edge_weight, flow)
    params = (
        num_nodes,
        str(dtype),
        improved,
        add_self_loops,
        normalize,
        flow,
        tile_bytes,
        None if store_dir is None else str(store_dir),
    )
    digest = _lookup_digest(adj, edge_weight, params)
    store = _STORES.get(digest)
    if store is not None:
        _STORES.move_to_end(digest)
        return store
    if isinstance(adj, Tensor) and adj.layout == torch.strided:
        n = _check_edge_index(adj, edge_weight, num_nodes)
        if normalize:
            edge_index, weight = _edge_norm(
                adj, edge_weight, n, improved, add_self_loops, flow, dtype
            )
        else:
            edge_index = adj.long()
            weight = _unit_weights(adj, dtype) if edge_weight is None else edge_weight
        row, col = edge_index[0], edge_index[1]
        target, source = (col, row) if flow == "source_to_target" else (row, col)
    else:
        target, source, weight, n = _sparse_norm_triplets(
            adj,
            num_nodes,
            improved=improved,
            add_self_loops=add_self_loops,
            normalize=normalize,
            dtype=dtype,
        )
    matrix = _assemble(target, source, weight, n, _NUMPY_DTYPES[dtype])
    store = _tile(matrix, digest, tile_bytes, store_dir)
    _STORES[digest] = store
    while len(_STORES) > _MAX_SHARED:
        _STORES.popitem(last=False)
    return store


# --------------------------------------------------------------------------- the layer


def _optional_size(
    value: int | str | None, name: str, *, allow_zero: bool = False
) -> int | None:
    return None if value is None else parse_size(value, name, allow_zero=allow_zero)


class AiresGCNConv(nn.Module):
    """The graph convolution of Kipf & Welling, with the aggregation streamed out of core.

    A drop-in for ``torch_geometric.nn.GCNConv``: same arguments, same results (see
    :func:`gcn_norm`), same ``state_dict`` keys (``lin.weight`` of shape
    ``[out_channels, in_channels]``, ``bias``), same glorot/zeros initialisation, so weights load
    either way. What differs is where the product runs: the normalised adjacency ``A`` (target
    rows, ``out = A @ (X W)``) is tiled once by :func:`aires.tiling.build_store` and multiplied
    by :func:`aires.matmul.matmul` within ``gpu_budget`` / ``host_budget``; tiles beyond those
    budgets are read from the store on NVMe. The store is marked symmetric when ``A`` is, so the
    backward pass (``A^T dY``) reuses the same tiles.

    Tiles are shared: layers given the same graph (the same tensors, or equal contents) with the
    same normalisation reuse one store through a process-wide cache, so the layers of a model do
    not tile the graph twice, and ``cached=True`` pins the store to the layer as in PyG (the
    graph passed on later calls is then ignored).

    The product order, ``(A X) W`` or ``A (X W)``, is chosen per call by :func:`choose_order`
    (PyG always transforms first); ``order`` forces one.

    Args:
        in_channels: size of each input feature vector.
        out_channels: size of each output feature vector.
        improved: use ``A + 2I`` instead of ``A + I``.
        cached: tile the normalised adjacency on the first call and use it for every later call
            (transductive learning only).
        add_self_loops: add self loops; default: ``normalize``. True with ``normalize=False`` is
            an error (as in PyG).
        normalize: apply the symmetric normalisation (else the adjacency is used as given).
        bias: learn an additive bias.
        flow: ``"source_to_target"`` (``out[i]`` sums over edges ``j -> i``) or
            ``"target_to_source"``, for an ``edge_index``.
        order: ``"auto"`` (cost model), ``"aggregate_first"`` or ``"transform_first"``.
        gpu_budget: GPU bytes for the product's tiles and buffers (``"8GiB"``), or None for
            :func:`aires.matmul.matmul`'s default.
        host_budget: pinned host bytes for tiles (0: every tile beyond the GPU budget is read
            from NVMe), or None for the default.
        tile_bytes: capacity of one tile (``"64MiB"``), or None for
            :func:`aires.tiling.build_store`'s default.
        store_dir: directory that keeps the tile stores (one ``gcn-<content hash>`` store per
            graph and normalisation, reused across runs); None: a temporary directory removed
            when the store is no longer used.

    Shapes:
        - input: node features ``(|V|, F_in)`` (dense, or torch sparse COO/CSR), or
          ``(B, |V|, F_in)`` dense; ``edge_index`` ``(2, |E|)`` or an ``adj_t``
          ``(|V|, |V|)`` (rows are targets); ``edge_weight`` ``(|E|)`` (optional).
        - output: node features ``(|V|, F_out)`` or ``(B, |V|, F_out)``.

    Raises:
        ValueError: invalid arguments (each message names the argument).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        improved: bool = False,
        cached: bool = False,
        add_self_loops: bool | None = None,
        normalize: bool = True,
        bias: bool = True,
        *,
        flow: str = "source_to_target",
        order: str = "auto",
        gpu_budget: int | str | None = None,
        host_budget: int | str | None = None,
        tile_bytes: int | str | None = None,
        store_dir: str | Path | None = None,
    ) -> None:
        super().__init__()
        if isinstance(in_channels, int) and in_channels == -1:
            raise NotImplementedError(
                "lazy initialisation (in_channels=-1) is not supported"
            )
        self.in_channels = check_positive_int(in_channels, "in_channels")
        self.out_channels = check_positive_int(out_channels, "out_channels")
        if add_self_loops is None:
            add_self_loops = normalize
        if add_self_loops and not normalize:
            raise ValueError(
                "add_self_loops=True needs normalize=True: AiresGCNConv (like GCNConv) does not "
                "add self loops to an unnormalised graph"
            )
        if flow not in _FLOWS:
            raise ValueError(f"flow must be one of {_FLOWS}, got {flow!r}")
        if order not in _ORDERS:
            raise ValueError(f"order must be one of {_ORDERS}, got {order!r}")
        self.improved = bool(improved)
        self.cached = bool(cached)
        self.add_self_loops = bool(add_self_loops)
        self.normalize = bool(normalize)
        self.flow = flow
        self.order = order
        self.gpu_budget = _optional_size(gpu_budget, "gpu_budget")
        # 0 is valid, as for matmul and the scheduler: no pinned tiles, every tile read from NVMe.
        self.host_budget = _optional_size(host_budget, "host_budget", allow_zero=True)
        self.tile_bytes = _optional_size(tile_bytes, "tile_bytes")
        self.store_dir = None if store_dir is None else Path(store_dir)
        self._cache: dict[str, TileStore] = {}
        self.lin = nn.Linear(self.in_channels, self.out_channels, bias=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.out_channels))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Glorot-uniform weight, zero bias (PyG's initialisation), and forget the cached tiles."""
        nn.init.xavier_uniform_(self.lin.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self._cache.clear()

    def __getstate__(self) -> dict[str, Any]:
        # Tiles live in files; a copy or a pickle re-acquires them through the shared cache.
        state = dict(self.__dict__)
        state["_cache"] = {}
        return state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.in_channels}, {self.out_channels})"

    def forward(
        self, x: Tensor, edge_index: Any, edge_weight: Tensor | None = None
    ) -> Tensor:
        """``A X W + b`` with ``A`` the (normalised) adjacency of ``edge_index``.

        Args:
            x: node features, dense ``(|V|, F_in)`` / ``(B, |V|, F_in)`` float32 or float64, or
                a torch sparse COO/CSR ``(|V|, F_in)`` matrix (SpGEMM path; no gradient w.r.t.
                a sparse ``x``).
            edge_index: ``[2, E]`` LongTensor, torch sparse COO/CSR ``adj_t`` or
                ``torch_sparse.SparseTensor`` ``adj_t``; may live on another device than ``x``
                (it is tiled on the host).
            edge_weight: ``(E,)`` weights for an ``edge_index``; no gradient flows to them.

        Returns:
            Dense ``(|V|, F_out)`` (or ``(B, |V|, F_out)``) on ``x``'s device.

        Raises:
            ValueError: bipartite ``x``, shapes that do not match, bad ``edge_index``.
            NotImplementedError: unsupported dtypes, or gradients w.r.t. ``edge_weight``,
                sparse ``x`` or sparse ``adj_t`` values.
        """
        if isinstance(x, (tuple, list)):
            raise ValueError(  # noqa: TRY004 (PyG's GCNConv raises ValueError here too)
                f"'{type(self).__name__}' received a tuple of node features; bipartite message "
                "passing is not supported"
            )
        self._check_x(x)
        for name, value in (("edge_weight", edge_weight), ("edge_index", edge_index)):
            if (
                isinstance(value, Tensor)
                and value.requires_grad
                and torch.is_grad_enabled()
            ):
                raise NotImplementedError(
                    f"gradients w.r.t. {name} are not supported: the adjacency is tiled as a "
                    "constant; detach it"
                )
        out = self._propagate(x, self.adjacency_store(x, edge_index, edge_weight))
        return out if self.bias is None else out + self.bias

    def _check_x(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
        if x.dtype not in _NUMPY_DTYPES:
            raise NotImplementedError(f"x must be float32 or float64, got {x.dtype}")
        if x.layout in (torch.sparse_coo, torch.sparse_csr):
            if x.dim() != 2:
                raise ValueError(
                    f"a sparse x must be 2-D (|V|, F_in), got shape {tuple(x.shape)}"
                )
            if x.requires_grad and torch.is_grad_enabled():
                raise NotImplementedError(
                    "gradients w.r.t. a sparse x are not supported"
                )
        elif x.layout != torch.strided or x.dim() < 2:
            raise ValueError(
                f"x must be a dense (..., |V|, F_in) or sparse COO/CSR (|V|, F_in) tensor, got "
                f"{x.layout} of shape {tuple(x.shape)}"
            )
        if x.size(-1) != self.in_channels:
            raise ValueError(
                f"x has {x.size(-1)} features per node but in_channels is {self.in_channels}"
            )

    def adjacency_store(
        self, x: Tensor, edge_index: Any, edge_weight: Tensor | None = None
    ) -> TileStore:
        """The tiled (normalised) adjacency ``A`` this layer multiplies by for these inputs.

        Built on first use and shared (see the class notes); useful to inspect the tiles or to
        call :func:`aires.matmul.matmul` with ``return_stats=True``.

        Args:
            x: the node features the layer is called with (their count and dtype matter).
            edge_index: as in :meth:`forward`.
            edge_weight: as in :meth:`forward`.

        Returns:
            The :class:`~aires.tiling.TileStore` of ``A``, target rows (``out = A @ h``).
        """
        slot = "sparse_tensor" if _is_sparse_tensor(edge_index) else "tensor"
        use_cache = self.cached and self.normalize
        if use_cache and slot in self._cache:
            return self._cache[slot]
        if not (_is_sparse_tensor(edge_index) or isinstance(edge_index, Tensor)):
            raise TypeError(
                "edge_index must be a [2, E] LongTensor, a torch sparse adj_t or a SparseTensor, "
                f"got {type(edge_index).__name__}"
            )
        store = _shared_adjacency(
            edge_index,
            edge_weight,
            x.size(-2),
            x.dtype,
            improved=self.improved,
            add_self_loops=self.add_self_loops,
            normalize=self.normalize,
            flow=self.flow,
            tile_bytes=self.tile_bytes,
            store_dir=self.store_dir,
        )
        if use_cache:
            self._cache[slot] = store
        return store

    def _matmul(self, store: TileStore, h: Tensor) -> Tensor:
        return matmul(
            store,
            h,
            gpu_budget=self.gpu_budget,
            host_budget=self.host_budget,
            device=h.device,
        )

    def _aggregate(self, store: TileStore, h: Tensor) -> Tensor:
        """``A @ h`` for ``h`` of shape ``(..., |V|, F)`` (batches become columns)."""
        if h.dim() == 2:
            return self._matmul(store, h)
        nodes_first = h.movedim(-2, 0)
        out = self._matmul(store, nodes_first.reshape(h.size(-2), -1))
        return out.reshape(nodes_first.shape[:-1] + (-1,)).movedim(0, -2)

    def _propagate(self, x: Tensor, store: TileStore) -> Tensor:
        weight = self.lin.weight
        sparse = x.layout != torch.strided
        if x.layout == torch.sparse_coo:
            x = x.coalesce().to_sparse_csr()
        order = self.order
        if order == "auto":
            batch = int(np.prod(x.shape[:-2])) if x.dim() > 2 else 1
            grad = torch.is_grad_enabled()
            order = choose_order(
                nnz=int(store.nnz),
                num_nodes=x.size(-2),
                in_columns=batch * self.in_channels,
                out_columns=batch * self.out_channels,
                x_nnz=int(x.values().numel()) if sparse else None,
                x_requires_grad=grad and x.requires_grad,
                weight_requires_grad=grad and weight.requires_grad,
            )
        if sparse:
            if order == "aggregate_first":
                return self._matmul(store, x) @ weight.t()
            return self._matmul(store, x @ weight.t())
        if order == "aggregate_first":
            return F.linear(self._aggregate(store, x), weight)
        return self._aggregate(store, F.linear(x, weight))
