"""AiresGCNConv against PyG's GCNConv: forward and every gradient, over every input form and
normalisation option, with the product forced out of core (4 KiB tiles, budgets of a few tiles).

Covers the cases of PyG's own ``test/nn/conv/test_gcn_conv.py`` (input forms, repr, caching,
sparse input features, static graphs, flow, gcn_norm gradients) plus the ones the issue lists.
"""

from __future__ import annotations

import copy
import gc
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import aires.gcn_conv as gcn_conv_module
from aires.gcn_conv import AiresGCNConv, choose_order, gcn_norm
from aires.matmul import clear_cache, matmul
from aires.scheduler.pipeline import SPMM_WORKSPACE

pyg_conv = pytest.importorskip(
    "torch_geometric.nn.conv.gcn_conv", reason="needs torch-geometric"
)
GCNConv = pyg_conv.GCNConv

NODES, EDGES, F_IN, F_OUT = 200, 3000, 12, 5
TILE = 4096


def out_of_core(
    columns: int = max(F_IN, F_OUT), nodes: int = NODES, cuda: bool = False
) -> dict[str, Any]:
    """Tiny tiles and budgets that force the product out of core.

    4 KiB tiles hold a few hundred nonzeros, so the test graphs span about 15 tiles. The device
    budget is the scheduler's minimum for an output of ``columns`` columns (the output, a ring
    of 3 slots and 2 disk slots, and on CUDA cuSPARSE's workspace) plus half a tile: the widest
    product keeps no tile resident. The host budget holds the disk path's 2 bounce buffers and
    2 tiles; every other tile is read from the store file on each product.
    """
    gpu = nodes * columns * 4 + 5 * TILE + TILE // 2 + (SPMM_WORKSPACE if cuda else 0)
    return {"tile_bytes": TILE, "gpu_budget": gpu, "host_budget": 4 * TILE}


OUT_OF_CORE = out_of_core()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach(), expected.detach()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def undirected_graph(
    seed: int = 0, nodes: int = NODES, edges: int = EDGES
) -> torch.Tensor:
    """Random symmetric ``edge_index`` without self loops or duplicates."""
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randint(0, nodes, (2, edges), generator=g)
    pairs = pairs[:, pairs[0] != pairs[1]]
    both = torch.cat([pairs, pairs.flip(0)], dim=1)
    return torch.unique(both, dim=1)


def directed_graph(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    pairs = torch.randint(0, NODES, (2, EDGES), generator=g)
    return torch.unique(pairs[:, pairs[0] != pairs[1]], dim=1)


def adj_t(
    edge_index: torch.Tensor,
    value: torch.Tensor | None,
    layout: torch.layout,
    nodes: int = NODES,
) -> torch.Tensor:
    """The torch sparse ``adj_t`` (rows are targets) of ``edge_index``."""
    if value is None:
        value = torch.ones(edge_index.size(1))
    adj = torch.sparse_coo_tensor(edge_index.flip(0), value, (nodes, nodes)).coalesce()
    return adj.to_sparse_csr() if layout == torch.sparse_csr else adj


def pair(
    in_channels: int,
    out_channels: int,
    *,
    batch: int = 1,
    nodes: int = NODES,
    device: str = "cpu",
    columns: int | None = None,
    **kwargs: Any,
) -> tuple[torch.nn.Module, AiresGCNConv]:
    """A PyG GCNConv and an out-of-core AiresGCNConv with the same weights (random bias).

    The budgets fit a dense product with ``columns`` columns (default: the widest the layer
    can run, whichever order it picks).
    """
    torch.manual_seed(0)
    columns = batch * max(in_channels, out_channels) if columns is None else columns
    budgets = out_of_core(columns, nodes, cuda=device != "cpu")
    aires = AiresGCNConv(in_channels, out_channels, **kwargs, **budgets)
    args = (in_channels, out_channels)
    pyg = GCNConv(*args, **{k: v for k, v in kwargs.items() if k not in ("order",)})
    if aires.bias is not None:
        torch.nn.init.normal_(aires.bias)
    pyg.load_state_dict(aires.state_dict())
    return pyg.to(device), aires.to(device)


def features(seed: int = 2, nodes: int = NODES, channels: int = F_IN) -> torch.Tensor:
    return torch.randn(nodes, channels, generator=torch.Generator().manual_seed(seed))


def check_parity(
    pyg: torch.nn.Module,
    aires: AiresGCNConv,
    x: torch.Tensor,
    pyg_args: tuple,
    aires_args: tuple | None = None,
) -> torch.Tensor:
    """Forward and all gradients (x, weight, bias) agree to a relative error below 1e-5."""
    aires_args = pyg_args if aires_args is None else aires_args
    x_pyg = x.clone().requires_grad_(x.layout == torch.strided)
    x_aires = x.clone().requires_grad_(x.layout == torch.strided)
    expected = pyg(x_pyg if x.layout == torch.strided else x.to_dense(), *pyg_args)
    actual = aires(x_aires, *aires_args)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < 1e-5
    g = torch.Generator().manual_seed(3)
    upstream = torch.randn(expected.shape, generator=g).to(expected.device)
    (expected * upstream).sum().backward()
    (actual * upstream).sum().backward()
    assert relative_error(aires.lin.weight.grad, pyg.lin.weight.grad) < 1e-5
    if aires.bias is not None:
        assert relative_error(aires.bias.grad, pyg.bias.grad) < 1e-5
    if x.layout == torch.strided:
        assert relative_error(x_aires.grad, x_pyg.grad) < 1e-5
    return actual.detach()


FORMS = ["edge_index", "coo", "csr"]


def graph_args(
    form: str, edge_index: torch.Tensor, weight: torch.Tensor | None, nodes: int = NODES
) -> tuple:
    if form == "edge_index":
        return (edge_index,) if weight is None else (edge_index, weight)
    return (
        adj_t(
            edge_index,
            weight,
            torch.sparse_coo if form == "coo" else torch.sparse_csr,
            nodes,
        ),
    )


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("order", ["auto", "aggregate_first", "transform_first"])
@pytest.mark.parametrize("form", FORMS)
def test_parity_per_input_form(form: str, order: str) -> None:
    pyg, aires = pair(F_IN, F_OUT, order=order)
    args = graph_args(form, undirected_graph(), None)
    check_parity(pyg, aires, features(), args)


@pytest.mark.parametrize("form", FORMS)
def test_edge_weights(form: str) -> None:
    edge_index = undirected_graph()
    weight = (
        torch.rand(edge_index.size(1), generator=torch.Generator().manual_seed(4)) + 0.1
    )
    pyg, aires = pair(F_IN, F_OUT)
    check_parity(pyg, aires, features(), graph_args(form, edge_index, weight))


@pytest.mark.parametrize("form", FORMS)
def test_improved_with_weights(form: str) -> None:
    edge_index = undirected_graph()
    weight = (
        torch.rand(edge_index.size(1), generator=torch.Generator().manual_seed(4)) + 0.1
    )
    pyg, aires = pair(F_IN, F_OUT, improved=True)
    check_parity(pyg, aires, features(), graph_args(form, edge_index, weight))


@pytest.mark.parametrize("form", FORMS + ["sparse_tensor"])
@pytest.mark.parametrize("weighted", [False, True])
def test_improved_matches_installed_pyg(form: str, weighted: bool) -> None:
    """improved=True gives PyG's numbers for every input form, including an edge_index without
    weights, where PyG 2.8 computes A + I (not the A + 2I it documents)."""
    edge_index = undirected_graph()
    weight = (
        torch.rand(edge_index.size(1), generator=torch.Generator().manual_seed(4)) + 0.1
        if weighted
        else None
    )
    pyg, aires = pair(F_IN, F_OUT, improved=True)
    if form == "sparse_tensor":
        args = (sparse_tensor(edge_index, weight),)
    else:
        args = graph_args(form, edge_index, weight)
    check_parity(pyg, aires, features(), args)
    plain = AiresGCNConv(F_IN, F_OUT, **OUT_OF_CORE)
    plain.load_state_dict(aires.state_dict())
    # The improved flag changes the numbers exactly where PyG's does.
    with torch.no_grad():
        differs = relative_error(plain(features(), *args), aires(features(), *args)) > 1e-3
    assert differs == (form != "edge_index" or weighted)


@pytest.mark.parametrize("form", FORMS)
def test_without_self_loops(form: str) -> None:
    pyg, aires = pair(F_IN, F_OUT, add_self_loops=False)
    check_parity(pyg, aires, features(), graph_args(form, undirected_graph(), None))


@pytest.mark.parametrize("form", FORMS)
def test_without_normalisation(form: str) -> None:
    edge_index = directed_graph()
    weight = torch.rand(edge_index.size(1), generator=torch.Generator().manual_seed(5))
    pyg, aires = pair(F_IN, F_OUT, normalize=False)
    check_parity(pyg, aires, features(), graph_args(form, edge_index, weight))


@pytest.mark.parametrize("form", FORMS)
def test_without_bias(form: str) -> None:
    pyg, aires = pair(F_IN, F_OUT, bias=False)
    assert aires.bias is None and "bias" not in aires.state_dict()
    check_parity(pyg, aires, features(), graph_args(form, undirected_graph(), None))


@pytest.mark.parametrize("form", FORMS)
def test_isolated_nodes(form: str) -> None:
    """Nodes 150.. have no edges at all, and the last ones are beyond every edge_index entry."""
    edge_index = undirected_graph(nodes=150)
    pyg, aires = pair(F_IN, F_OUT)
    check_parity(pyg, aires, features(), graph_args(form, edge_index, None))


@pytest.mark.parametrize("normalize", [True, False])
def test_isolated_nodes_without_self_loops(normalize: bool) -> None:
    """Degree-0 nodes get coefficient 0 (PyG masks the infinite 1/sqrt(0))."""
    pyg, aires = pair(F_IN, F_OUT, add_self_loops=False, normalize=normalize)
    check_parity(pyg, aires, features(), (undirected_graph(nodes=150),))


@pytest.mark.parametrize("form", FORMS)
def test_duplicate_edges_are_summed(form: str) -> None:
    edge_index = undirected_graph()
    duplicated = torch.cat([edge_index, edge_index[:, ::3]], dim=1)
    weight = (
        torch.rand(duplicated.size(1), generator=torch.Generator().manual_seed(6)) + 0.1
    )
    pyg, aires = pair(F_IN, F_OUT)
    if form == "edge_index":
        check_parity(pyg, aires, features(), (duplicated, weight))
    else:
        layout = torch.sparse_coo if form == "coo" else torch.sparse_csr
        # An uncoalesced COO adj_t (duplicates summed by coalescing) against PyG on the same.
        adj = torch.sparse_coo_tensor(duplicated.flip(0), weight, (NODES, NODES))
        adj = adj if layout == torch.sparse_coo else adj.coalesce().to_sparse_csr()
        check_parity(pyg, aires, features(), (adj,))


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("improved", [False, True])
def test_existing_self_loops(form: str, improved: bool) -> None:
    """Loops on some nodes, with their own weights: an edge_index keeps them (PyG's
    add_remaining_self_loops), a torch sparse adj_t adds the fill to them (PyG's add_self_loops)."""
    edge_index = undirected_graph()
    loops = torch.arange(0, NODES, 3).repeat(2, 1)
    with_loops = torch.cat([edge_index, loops], dim=1)
    weight = (
        torch.rand(with_loops.size(1), generator=torch.Generator().manual_seed(7)) + 0.5
    )
    pyg, aires = pair(F_IN, F_OUT, improved=improved)
    check_parity(pyg, aires, features(), graph_args(form, with_loops, weight))


@pytest.mark.parametrize("form", FORMS)
def test_directed_graph(form: str, builds: list[Any]) -> None:
    """out[i] sums over edges j -> i; the store is not symmetric, so backward uses A^T."""
    pyg, aires = pair(F_IN, F_OUT)
    check_parity(pyg, aires, features(), graph_args(form, directed_graph(), None))
    assert len(builds) == 1 and builds[0].symmetric is False


def test_undirected_graph_store_is_symmetric(builds: list[Any]) -> None:
    _, aires = pair(F_IN, F_OUT)
    aires(features(), undirected_graph())
    assert len(builds) == 1 and builds[0].symmetric is True


def sparse_columns(order: str, f_in: int = 64) -> int:
    """Budget width for a layer with sparse x of ``f_in`` features: its dense SpMM (``F_OUT``
    columns) when it transforms first; else room for SpGEMM, which keeps a quarter of the
    budget as workspace beside room for a result of up to twice the dense size."""
    return F_OUT if order == "transform_first" else 4 * f_in


@pytest.mark.parametrize("order", ["auto", "aggregate_first", "transform_first"])
@pytest.mark.parametrize("layout", [torch.sparse_csr, torch.sparse_coo])
def test_sparse_features(layout: torch.layout, order: str) -> None:
    """Bag-of-words x (about 10% dense) as a torch sparse matrix: the SpGEMM path."""
    g = torch.Generator().manual_seed(8)
    dense = (torch.rand(NODES, 64, generator=g) < 0.1).float() * torch.rand(
        NODES, 64, generator=g
    )
    x = dense.to_sparse_csr() if layout == torch.sparse_csr else dense.to_sparse()
    pyg, aires = pair(64, F_OUT, order=order, columns=sparse_columns(order))
    check_parity(pyg, aires, x, (undirected_graph(),))


@pytest.mark.parametrize("form", FORMS)
def test_float64(form: str) -> None:
    """float64 features keep float64 tiles: agreement far below float32 rounding."""
    pyg, aires = pair(F_IN, F_OUT)
    pyg.double()
    aires.double()
    args = graph_args(form, directed_graph(), None)
    args = tuple(
        a.double() if a.is_floating_point() or a.is_sparse else a for a in args
    )
    x = features().double()
    with torch.no_grad():
        assert relative_error(aires(x, *args), pyg(x, *args)) < 1e-12


def test_sparse_features_like_pyg_test() -> None:
    """PyG's test_gcn_conv_with_sparse_input_feature: a sparse COO x with two nonzeros."""
    x = torch.sparse_coo_tensor(
        torch.tensor([[0, 0], [0, 1]]), torch.tensor([1.0, 1.0]), (4, 16)
    )
    edge_index = torch.tensor([[0, 0, 0, 1, 2, 3], [1, 2, 3, 0, 0, 0]])
    conv = AiresGCNConv(16, 32, **out_of_core(32, nodes=4))
    assert conv(x, edge_index).size() == (4, 32)


def test_static_graph_batched_features() -> None:
    """PyG's test_static_gcn_conv: x of shape (B, N, F) over one graph."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(3, NODES, F_IN, generator=g)
    pyg, aires = pair(F_IN, F_OUT, batch=3)
    out = check_parity(pyg, aires, x, (undirected_graph(),))
    assert out.shape == (3, NODES, F_OUT)


def test_flow_target_to_source() -> None:
    """PyG's test_gcn_conv_norm: a flipped edge_index with the other flow gives the same output."""
    edge_index = directed_graph()
    x = features()
    forward = AiresGCNConv(F_IN, F_OUT, flow="source_to_target", **OUT_OF_CORE)
    backward = AiresGCNConv(F_IN, F_OUT, flow="target_to_source", **OUT_OF_CORE)
    backward.load_state_dict(forward.state_dict())
    with torch.no_grad():
        assert (
            relative_error(backward(x, edge_index.flip(0)), forward(x, edge_index))
            < 1e-6
        )
    pyg = GCNConv(F_IN, F_OUT, flow="target_to_source")
    pyg.load_state_dict(backward.state_dict())
    check_parity(pyg, backward, x, (edge_index.flip(0),))


def test_all_input_forms_agree_like_pyg_test() -> None:
    """PyG's test_gcn_conv on its own 4-node graph: edge_index, adj_t in CSR, values."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(10))
    edge_index = torch.tensor([[0, 0, 0, 1, 2, 3], [1, 2, 3, 0, 0, 0]])
    value = torch.rand(edge_index.size(1), generator=torch.Generator().manual_seed(11))
    conv = AiresGCNConv(16, 32, **out_of_core(32, nodes=4))
    assert str(conv) == "AiresGCNConv(16, 32)"
    with torch.no_grad():
        out1 = conv(x, edge_index)
        assert out1.size() == (4, 32)
        assert torch.allclose(
            conv(x, adj_t(edge_index, None, torch.sparse_csr, 4)), out1, atol=1e-6
        )
        out2 = conv(x, edge_index, value)
        assert torch.allclose(
            conv(x, adj_t(edge_index, value, torch.sparse_csr, 4)), out2, atol=1e-6
        )
        assert not torch.allclose(out1, out2)


def sparse_tensor(
    edge_index: torch.Tensor, value: torch.Tensor | None, nodes: int = NODES
) -> Any:
    """The ``SparseTensor`` ``adj_t`` of ``edge_index`` (transposed: rows are targets)."""
    torch_sparse = pytest.importorskip(
        "torch_sparse", reason="torch-sparse is not installed"
    )
    return torch_sparse.SparseTensor.from_edge_index(
        edge_index, value, (nodes, nodes)
    ).t()


def graph_with_loops(seed: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """A directed graph with loops on every third node, and positive weights."""
    edge_index = directed_graph()
    loops = torch.arange(0, NODES, 3).repeat(2, 1)
    with_loops = torch.cat([edge_index, loops], dim=1)
    value = torch.rand(with_loops.size(1), generator=torch.Generator().manual_seed(seed))
    return with_loops, value + 0.5


@pytest.mark.parametrize("order", ["aggregate_first", "transform_first"])
@pytest.mark.parametrize("valued", [False, True])
def test_sparse_tensor_input(valued: bool, order: str) -> None:
    """A real torch_sparse.SparseTensor adj_t, with and without values, against GCNConv."""
    edge_index, value = graph_with_loops()
    adj = sparse_tensor(edge_index, value if valued else None)
    pyg, aires = pair(F_IN, F_OUT, order=order)
    check_parity(pyg, aires, features(), (adj,))


def test_sparse_tensor_transposed_is_the_other_direction() -> None:
    """adj (rows are sources) and adj_t give PyG's two results: the layer reads rows as targets."""
    edge_index, value = graph_with_loops()
    adj_t = sparse_tensor(edge_index, value)
    adj = adj_t.t()
    pyg, aires = pair(F_IN, F_OUT)
    check_parity(pyg, aires, features(), (adj,))
    with torch.no_grad():
        assert relative_error(aires(features(), adj), aires(features(), adj_t)) > 1e-2


def test_sparse_tensor_cached(builds: list[Any]) -> None:
    edge_index, value = graph_with_loops()
    pyg, aires = pair(F_IN, F_OUT, cached=True)
    adj = sparse_tensor(edge_index, value)
    first = check_parity(pyg, aires, features(), (adj,))
    pyg.zero_grad()
    aires.zero_grad()
    assert torch.equal(first, check_parity(pyg, aires, features(), (adj,)))
    assert len(builds) == 1


def check_value_gradients(
    pyg_args: tuple, aires_args: tuple, pyg_value: torch.Tensor, aires_value: torch.Tensor,
    **kwargs: Any,
) -> None:
    """Forward, x/weight/bias gradients and the graph values' gradient agree with PyG."""
    pyg, aires = pair(F_IN, F_OUT, **kwargs)
    check_parity(pyg, aires, features(), pyg_args, aires_args)
    assert pyg_value.grad is not None and aires_value.grad is not None
    assert pyg_value.grad.abs().sum() > 0
    assert relative_error(aires_value.grad, pyg_value.grad) < 1e-5


def leaf(value: torch.Tensor) -> torch.Tensor:
    return value.clone().requires_grad_()


ORDERS = ["aggregate_first", "transform_first"]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("improved", [False, True])
def test_edge_weight_gradients(order: str, improved: bool) -> None:
    """What an explainer (GNNExplainer's edge mask) needs: d loss / d edge_weight."""
    edge_index, value = graph_with_loops()
    theirs, ours = leaf(value), leaf(value)
    check_value_gradients(
        (edge_index, theirs), (edge_index, ours), theirs, ours,
        order=order, improved=improved,
    )


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("layout", [torch.sparse_coo, torch.sparse_csr])
def test_sparse_adj_t_value_gradients(layout: torch.layout, order: str) -> None:
    """Gradients reach the values of a torch sparse adj_t. PyG 2.8 cannot differentiate a COO
    adj_t (no derivative for coalesce), so COO is checked against PyG's CSR result, which is the
    same matrix with the values in the same (coalesced) order."""
    edge_index, value = graph_with_loops()
    theirs, ours = leaf(value), leaf(value)
    check_value_gradients(
        (adj_t(edge_index, theirs, torch.sparse_csr),),
        (adj_t(edge_index, ours, layout),),
        theirs, ours, order=order,
    )


@pytest.mark.parametrize("order", ORDERS)
def test_sparse_tensor_value_gradients(order: str) -> None:
    edge_index, value = graph_with_loops()
    theirs, ours = leaf(value), leaf(value)
    check_value_gradients(
        (sparse_tensor(edge_index, theirs),), (sparse_tensor(edge_index, ours),),
        theirs, ours, order=order,
    )


def test_csc_adj_t_with_value_gradients_is_refused_by_name() -> None:
    edge_index, value = graph_with_loops()
    adj = adj_t(edge_index, leaf(value), torch.sparse_coo).to_sparse_csc()
    with pytest.raises(NotImplementedError, match="sparse CSC edge_index is not supported"):
        AiresGCNConv(F_IN, F_OUT, **OUT_OF_CORE)(features(), adj)


def test_value_gradients_with_batched_and_sparse_features() -> None:
    """Batched x (batches become columns) and sparse x (the product runs transform-first)."""
    edge_index, value = graph_with_loops()
    for x in (
        torch.randn(3, NODES, F_IN, generator=torch.Generator().manual_seed(21)),
        (features() > 1).float().to_sparse_csr(),
    ):
        theirs, ours = leaf(value), leaf(value)
        pyg, aires = pair(F_IN, F_OUT, batch=x.size(0) if x.dim() == 3 else 1)
        dense = x.to_dense() if x.layout != torch.strided else x
        (pyg(dense, edge_index, theirs) ** 2).sum().backward()
        (aires(x, edge_index, ours) ** 2).sum().backward()
        assert relative_error(ours.grad, theirs.grad) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("graph_on_gpu", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_parity_on_gpu(form: str, graph_on_gpu: bool) -> None:
    """x on the GPU; the graph there too, or left on the host (it is tiled on the host)."""
    pyg, aires = pair(F_IN, F_OUT, device="cuda")
    args = graph_args(form, directed_graph(), None)
    on_gpu = tuple(a.cuda() for a in args)
    check_parity(
        pyg, aires, features().cuda(), on_gpu, on_gpu if graph_on_gpu else args
    )


@pytest.mark.gpu
@pytest.mark.parametrize("order", ["aggregate_first", "transform_first"])
def test_sparse_features_on_gpu(order: str) -> None:
    g = torch.Generator().manual_seed(8)
    dense = (torch.rand(NODES, 64, generator=g) < 0.1).float()
    pyg, aires = pair(
        64, F_OUT, order=order, device="cuda", columns=sparse_columns(order)
    )
    check_parity(pyg, aires, dense.to_sparse_csr().cuda(), (undirected_graph().cuda(),))


# --------------------------------------------------------------------------- caching, sharing


@pytest.mark.parametrize("form", FORMS)
def test_cached_second_call_does_not_retile(form: str, builds: list[Any]) -> None:
    pyg, aires = pair(F_IN, F_OUT, cached=True)
    args = graph_args(form, undirected_graph(), None)
    first = check_parity(pyg, aires, features(), args)
    pyg.zero_grad()
    aires.zero_grad()
    second = check_parity(pyg, aires, features(), args)
    assert torch.equal(first, second)
    assert len(builds) == 1


def test_cached_ignores_a_new_graph_like_pyg(builds: list[Any]) -> None:
    """With cached=True the first graph is used for every later call (PyG's semantics)."""
    pyg, aires = pair(F_IN, F_OUT, cached=True)
    x = features()
    first_graph, other_graph = undirected_graph(0), undirected_graph(5)
    with torch.no_grad():
        expected = pyg(x, first_graph)
        aires(x, first_graph)
        assert relative_error(aires(x, other_graph), pyg(x, other_graph)) < 1e-5
        assert relative_error(aires(x, other_graph), expected) < 1e-5
    assert len(builds) == 1
    aires.reset_parameters()
    with torch.no_grad():
        aires(x, other_graph)
    assert len(builds) == 2


def test_uncached_layer_reuses_tiles_for_the_same_graph(builds: list[Any]) -> None:
    _, aires = pair(F_IN, F_OUT)
    edge_index, x = undirected_graph(), features()
    with torch.no_grad():
        aires(x, edge_index)
        aires(x, edge_index)
        aires(
            x, edge_index.clone()
        )  # equal contents, new object: found by content hash
    assert len(builds) == 1
    edge_index[0, 0] = (edge_index[0, 0] + 1) % NODES  # in place: a new graph
    with torch.no_grad():
        aires(x, edge_index)
    assert len(builds) == 2


def test_two_layer_model_tiles_the_graph_once(builds: list[Any]) -> None:
    first = AiresGCNConv(F_IN, 16, **out_of_core(16))
    second = AiresGCNConv(16, F_OUT, **OUT_OF_CORE)
    adj = adj_t(undirected_graph(), None, torch.sparse_csr)
    for _ in range(3):
        out = second(first(features(), adj).relu(), adj)
        out.sum().backward()
    assert len(builds) == 1
    assert first.lin.weight.grad is not None


def test_different_normalisations_tile_separately(builds: list[Any]) -> None:
    edge_index, x = undirected_graph(), features()
    with torch.no_grad():
        AiresGCNConv(F_IN, F_OUT, **OUT_OF_CORE)(x, edge_index)
        AiresGCNConv(F_IN, F_OUT, improved=True, **OUT_OF_CORE)(x, edge_index)
        AiresGCNConv(F_IN, F_OUT, add_self_loops=False, **OUT_OF_CORE)(x, edge_index)
    assert len(builds) == 3


def test_store_dir_is_reused_across_processes(tmp_path: Any, builds: list[Any]) -> None:
    edge_index, x = undirected_graph(), features()
    conv = AiresGCNConv(F_IN, F_OUT, store_dir=tmp_path, **OUT_OF_CORE)
    with torch.no_grad():
        expected = conv(x, edge_index)
    assert len(builds) == 1 and len(list(tmp_path.glob("gcn-*"))) == 1
    gcn_conv_module._STORES.clear()  # as in a new process
    gcn_conv_module._DIGESTS.clear()
    with torch.no_grad():
        assert torch.allclose(conv(x, edge_index), expected)
    assert len(builds) == 1


def test_temporary_store_is_removed_with_its_last_holder(builds: list[Any]) -> None:
    conv = AiresGCNConv(F_IN, F_OUT, cached=True, **OUT_OF_CORE)
    with torch.no_grad():
        conv(features(), undirected_graph())
    path = builds[0].path
    builds.clear()
    assert path.exists()
    gcn_conv_module._STORES.clear()
    assert path.exists()  # the cached layer still holds it
    conv.reset_parameters()
    clear_cache()  # matmul's schedulers hold their store too
    gc.collect()
    assert not path.exists()


def test_out_of_core_product_streams_many_tiles(builds: list[Any]) -> None:
    """The budgets above really leave tiles to the host and disk tiers."""
    _, aires = pair(F_IN, F_OUT)
    x, edge_index = features(), undirected_graph()
    store = aires.adjacency_store(x, edge_index)
    assert len(store) >= 12
    _, stats = matmul(
        store,
        x,
        gpu_budget=aires.gpu_budget,
        host_budget=aires.host_budget,
        device=x.device,
        return_stats=True,
    )
    # Two tiles are pinned in host memory, but the dual-way dispatcher balances the host and
    # disk paths as it measures them: what is fixed is that none is resident and that the
    # disk path carries most of them.
    assert stats.tiles_resident == 0
    assert stats.tiles_h2d + stats.tiles_disk == len(store)
    assert stats.tiles_disk >= len(store) // 2 and stats.bytes_disk > 0


# --------------------------------------------------------------------------- module behaviour


def test_state_dict_round_trip_both_ways() -> None:
    pyg = GCNConv(F_IN, F_OUT)
    aires = AiresGCNConv(F_IN, F_OUT)
    assert list(aires.state_dict()) == list(pyg.state_dict()) == ["bias", "lin.weight"]
    torch.nn.init.normal_(pyg.bias)
    aires.load_state_dict(pyg.state_dict())
    assert all(
        torch.equal(aires.state_dict()[k], v) for k, v in pyg.state_dict().items()
    )
    aires.reset_parameters()
    pyg.load_state_dict(aires.state_dict())
    assert all(
        torch.equal(pyg.state_dict()[k], v) for k, v in aires.state_dict().items()
    )


def test_initialisation_matches_pyg() -> None:
    """Glorot weight and zero bias, drawn exactly as PyG draws them."""
    torch.manual_seed(13)
    pyg = GCNConv(F_IN, F_OUT)
    torch.manual_seed(13)
    aires = AiresGCNConv(F_IN, F_OUT)
    assert torch.equal(aires.lin.weight, pyg.lin.weight)
    assert torch.equal(aires.bias, torch.zeros(F_OUT))
    bound = (6 / (F_IN + F_OUT)) ** 0.5
    aires.reset_parameters()
    assert aires.lin.weight.abs().max() <= bound and not torch.equal(
        aires.lin.weight, pyg.lin.weight
    )


def test_repr() -> None:
    assert repr(AiresGCNConv(16, 32)) == "AiresGCNConv(16, 32)"


def test_deepcopy_and_pickle() -> None:
    """PyG's decomposed-layers test deep-copies a conv; copies drop (and re-find) the tiles."""
    conv = AiresGCNConv(F_IN, F_OUT, cached=True, **OUT_OF_CORE)
    x, edge_index = features(), undirected_graph()
    with torch.no_grad():
        expected = conv(x, edge_index)
        for clone in (copy.deepcopy(conv), pickle.loads(pickle.dumps(conv))):
            assert torch.equal(clone(x, edge_index), expected)


def test_value_gradients_are_refused_with_cached() -> None:
    """A cached layer keeps its first graph as a constant: a gradient w.r.t. the weights would
    be silently wrong for a later graph, so it is refused (fine without autograd)."""
    conv = AiresGCNConv(F_IN, F_OUT, cached=True)
    edge_index = undirected_graph()
    weight = torch.rand(edge_index.size(1), requires_grad=True)
    with pytest.raises(NotImplementedError, match="cached=False"):
        conv(features(), edge_index, weight)
    with pytest.raises(NotImplementedError, match="cached=False"):
        conv(features(), sparse_tensor(edge_index, weight))
    with torch.no_grad():
        conv(features(), edge_index, weight)


# --------------------------------------------------------------------------- gcn_norm


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("improved", [False, True])
@pytest.mark.parametrize("add_self_loops", [False, True])
def test_gcn_norm_matches_pyg_on_edge_index(
    improved: bool, add_self_loops: bool, weighted: bool
) -> None:
    edge_index = torch.cat(
        [directed_graph(), torch.tensor([[3, 3, 7], [3, 3, 7]])], dim=1
    )
    weight = (
        torch.rand(edge_index.size(1), generator=torch.Generator().manual_seed(14))
        if weighted
        else None
    )
    ours = gcn_norm(edge_index, weight, NODES, improved, add_self_loops)
    theirs = pyg_conv.gcn_norm(edge_index, weight, NODES, improved, add_self_loops)
    assert torch.equal(ours[0], theirs[0])
    assert relative_error(ours[1], theirs[1]) < 1e-6


@pytest.mark.parametrize("layout", [torch.sparse_coo, torch.sparse_csr])
def test_gcn_norm_matches_pyg_on_sparse(layout: torch.layout) -> None:
    loops = torch.tensor([[3, 7], [3, 7]])
    edge_index = torch.cat([directed_graph(), loops], dim=1)
    adj = adj_t(edge_index, torch.rand(edge_index.size(1)), layout)
    ours, none = gcn_norm(adj, improved=True)
    theirs, _ = pyg_conv.gcn_norm(adj, improved=True)
    assert none is None and ours.layout == layout
    assert relative_error(ours.to_dense(), theirs.to_dense()) < 1e-6


@pytest.mark.parametrize("requires_grad", [False, True])
def test_gcn_norm_gradient(requires_grad: bool) -> None:
    """PyG's test_gcn_norm_gradient (COO): the values' requires_grad survives normalisation,
    and gradients reach the edge weights of an edge_index."""
    edge_index = torch.tensor([[0, 0, 0, 1, 2, 3], [1, 2, 3, 0, 0, 0]])
    edge_weight = torch.ones(edge_index.size(1), requires_grad=requires_grad)
    adj = torch.sparse_coo_tensor(edge_index, edge_weight, (4, 4)).coalesce()
    assert gcn_norm(adj)[0].requires_grad == requires_grad
    if requires_grad:
        gcn_norm(edge_index, edge_weight)[1].sum().backward()
        assert edge_weight.grad is not None and edge_weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- order cost model


def test_order_examples() -> None:
    common = {"nnz": 10_000, "num_nodes": 1_000}
    # Kipf & Welling on Cora: wide bag-of-words in, 16 out.
    assert (
        choose_order(**common, in_columns=1433, out_columns=16, x_nnz=18_000)
        == "transform_first"
    )
    # ogbn-products first layer: 100 dense features in, 256 hidden, input needs no gradient.
    assert choose_order(**common, in_columns=100, out_columns=256) == "aggregate_first"
    # A hidden layer whose input needs a gradient, narrowing: transform first (PyG's order).
    assert (
        choose_order(**common, in_columns=256, out_columns=47, x_requires_grad=True)
        == "transform_first"
    )


@given(
    f_in=st.integers(1, 4096),
    f_out=st.integers(1, 4096),
    x_grad=st.booleans(),
    w_grad=st.booleans(),
)
def test_order_by_passes_over_the_tiles(
    f_in: int, f_out: int, x_grad: bool, w_grad: bool
) -> None:
    """Dense x: aggregate first exactly when it makes fewer (or narrower) passes over A."""
    order = choose_order(
        nnz=5_000,
        num_nodes=500,
        in_columns=f_in,
        out_columns=f_out,
        x_requires_grad=x_grad,
        weight_requires_grad=w_grad,
    )
    aggregate = (f_in + 128) * (1 + x_grad)
    transform = (f_out + 128) * (1 + (x_grad or w_grad))
    assert (order == "aggregate_first") == (aggregate < transform)
    if not (x_grad or w_grad):  # inference: the narrower side is aggregated
        assert (order == "aggregate_first") == (f_in < f_out)


# --------------------------------------------------------------------------- input checks


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (
            lambda: AiresGCNConv(4, 4, add_self_loops=True, normalize=False),
            ValueError,
            "add_self_loops",
        ),
        (lambda: AiresGCNConv(0, 4), ValueError, "in_channels"),
        (lambda: AiresGCNConv(4, "8"), TypeError, "out_channels"),
        (lambda: AiresGCNConv(4, 4, order="fastest"), ValueError, "order"),
        (lambda: AiresGCNConv(4, 4, flow="up"), ValueError, "flow"),
        (lambda: AiresGCNConv(4, 4, gpu_budget="lots"), ValueError, "gpu_budget"),
        (lambda: AiresGCNConv(-1, 4), NotImplementedError, "in_channels"),
    ],
)
def test_constructor_checks(make: Callable[[], Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        make()


def test_forward_checks() -> None:
    conv = AiresGCNConv(F_IN, F_OUT, **OUT_OF_CORE)
    x, edge_index = features(), undirected_graph()
    with pytest.raises(ValueError, match="tuple"):
        conv((x, x), edge_index)
    with pytest.raises(ValueError, match="in_channels"):
        conv(features(channels=3), edge_index)
    with pytest.raises(ValueError, match=r"\[2, E\]"):
        conv(x, edge_index[0])
    with pytest.raises(ValueError, match="outside"):
        conv(x, edge_index + NODES)
    with pytest.raises(ValueError, match="edge_weight"):
        conv(x, edge_index, torch.ones(3))
    with pytest.raises(NotImplementedError, match="float32"):
        conv(x.half(), edge_index)
    adj = adj_t(edge_index, None, torch.sparse_coo)
    with pytest.raises(ValueError, match="edge_weight"):
        conv(x, adj, torch.ones(adj._nnz()))
    with pytest.raises(ValueError, match="nodes"):
        conv(features(nodes=NODES + 1), adj)
    with pytest.raises(NotImplementedError, match="CSC"):
        conv(x, adj.to_sparse_csc())
    with pytest.raises(ValueError, match="flow"):
        AiresGCNConv(F_IN, F_OUT, flow="target_to_source")(x, adj)
    with pytest.raises(TypeError, match="edge_index"):
        conv(x, edge_index.numpy())
