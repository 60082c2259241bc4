"""The shared workload: normalisation against PyG's gcn_norm, files round trip, reuse."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from aires.data.graph import Graph

from bench.methods.workload import load_workload, workload_key, write_workload


def _reference_norm(adj: sp.csr_array) -> np.ndarray:
    """Dense float64 ``D^-1/2 (A + I) D^-1/2`` with remaining self loops of weight 1."""
    dense = (adj.toarray() != 0).astype(np.float64)
    np.fill_diagonal(dense, 1.0)
    dinv = 1.0 / np.sqrt(dense.sum(1))
    return dinv[:, None] * dense * dinv[None, :]


def test_normalised_adjacency_matches_dense_reference(
    workload_dir: Path, make_graph: Callable[..., Graph]
) -> None:
    graph = make_graph()
    workload = load_workload(workload_dir)
    got = workload.scipy_adjacency().toarray()
    np.testing.assert_allclose(got, _reference_norm(graph.adj), rtol=1e-6, atol=1e-7)
    assert workload.adj_indices.dtype == np.int32
    assert workload.describe() == {
        "name": "tiny", "nodes": 240, "edges": graph.adj.nnz, "features": 12,
    }


def test_existing_self_loops_are_kept_once(
    tmp_path: Path, make_graph: Callable[..., Graph]
) -> None:
    graph = make_graph(n=40)
    adj = graph.adj.tolil()
    adj[3, 3] = 1.0
    graph.adj = sp.csr_array(adj.tocsr())
    workload = load_workload(write_workload(graph, tmp_path / "loops"))
    np.testing.assert_allclose(
        workload.scipy_adjacency().toarray(), _reference_norm(graph.adj), rtol=1e-6
    )


def test_matches_pyg_gcn_norm(
    workload_dir: Path, make_graph: Callable[..., Graph]
) -> None:
    gcn_norm = pytest.importorskip("torch_geometric.nn.conv.gcn_conv").gcn_norm
    graph = make_graph()
    coo = graph.adj.tocoo()
    edge_index = torch.from_numpy(np.stack([coo.row, coo.col]).astype(np.int64))
    index, weight = gcn_norm(edge_index, num_nodes=graph.num_nodes)
    expected = sp.coo_array(
        (weight.numpy(), (index[1].numpy(), index[0].numpy())), shape=graph.adj.shape
    ).toarray()
    got = load_workload(workload_dir).scipy_adjacency().toarray()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_sparse_features_are_densified(
    tmp_path: Path, make_graph: Callable[..., Graph]
) -> None:
    graph = make_graph(n=30)
    dense = graph.x.numpy()
    graph.x = sp.csr_array(np.where(dense > 1.0, dense, 0.0))
    workload = load_workload(write_workload(graph, tmp_path / "sparse"))
    np.testing.assert_array_equal(workload.x, graph.x.toarray())


def test_directed_graph_is_made_undirected(
    tmp_path: Path, make_graph: Callable[..., Graph]
) -> None:
    graph = make_graph(n=30)
    graph.adj = sp.csr_array(sp.triu(graph.adj, k=1))
    graph.symmetric = False
    a = load_workload(write_workload(graph, tmp_path / "directed")).scipy_adjacency()
    assert abs(a - a.T).max() == 0


def test_missing_workload_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no prepared workload"):
        load_workload(tmp_path)


def test_workload_key_separates_scale_and_seed() -> None:
    keys = {workload_key("products", scale=s, seed=k) for s in (0.1, 1.0) for k in (0, 1)}
    assert len(keys) == 4
    assert workload_key("ogbn/products", scale=None, seed=0) == "ogbn_products-seed0"


def test_preset_workload_is_its_prepared_graph(tmp_path: Path) -> None:
    """No second copy: the workload directory only names the prepared graph, whose Â is
    gcn_norm's bit for bit; a second call reuses both."""
    from aires.data import synthetic
    from tests.data.test_prepare import assert_bitwise, reference

    from bench.methods.workload import prepare_workload

    path = prepare_workload("tiny", tmp_path, scale=0.5, seed=1)
    assert [p.name for p in path.iterdir()] == ["meta.json"]
    workload = load_workload(path)
    graph = synthetic("tiny", scale=0.5, seed=1, cache_dir=tmp_path / "ref", progress=False)
    assert_bitwise(workload.scipy_adjacency(), reference(graph.adj))
    np.testing.assert_array_equal(workload.x, graph.x.numpy())
    np.testing.assert_array_equal(workload.y, graph.y.numpy())
    np.testing.assert_array_equal(workload.train_idx, graph.train_idx.numpy())
    assert workload.describe() == {
        "name": graph.name, "nodes": graph.num_nodes, "edges": graph.adj.nnz, "features": 16,
    }
    assert not (tmp_path / "graphs").exists()
    prepared = list((tmp_path / "prepared").iterdir())
    assert prepare_workload("tiny", tmp_path, scale=0.5, seed=1) == path
    assert list((tmp_path / "prepared").iterdir()) == prepared
