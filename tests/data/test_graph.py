"""The Graph type: validation, conversions and describe(), against scipy and numpy."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aires.data import Graph


def _graph(adj: sp.csr_array, *, x: object = None, **kw: object) -> Graph:
    n = adj.shape[0]
    fields = dict(
        name="g",
        num_nodes=n,
        adj=adj,
        x=torch.ones(n, 3) if x is None else x,
        y=torch.zeros(n, dtype=torch.long),
        train_idx=torch.arange(min(n, 2)),
        val_idx=torch.tensor([], dtype=torch.long),
        test_idx=torch.tensor([], dtype=torch.long),
        num_classes=2,
    )
    fields.update(kw)
    return Graph(**fields)


def _random_adj(rng: np.random.Generator, n: int = 30, density: float = 0.1) -> sp.csr_array:
    a = sp.random_array((n, n), density=density, rng=rng, format="csr")
    a = ((a + a.T) > 0).astype(np.float32)
    a.setdiag(0)
    a.eliminate_zeros()
    return sp.csr_array(a)


def test_edge_index_matches_scipy_coo(rng: np.random.Generator) -> None:
    adj = _random_adj(rng)
    ei = _graph(adj).edge_index()
    coo = adj.tocoo()
    assert ei.dtype == torch.long and ei.shape == (2, adj.nnz)
    assert ei[0].tolist() == coo.row.tolist() and ei[1].tolist() == coo.col.tolist()


def test_x_torch_dense_and_sparse(rng: np.random.Generator) -> None:
    adj = _random_adj(rng)
    dense = rng.random((30, 5)).astype(np.float32)
    dense[dense < 0.6] = 0
    xs = _graph(adj, x=sp.csr_array(dense)).x_torch()
    assert xs.layout == torch.sparse_csr and xs.crow_indices().dtype == torch.int64
    np.testing.assert_array_equal(xs.to_dense().numpy(), dense)
    xd = _graph(adj, x=dense).x_torch()
    assert xd.dtype == torch.float32 and np.array_equal(xd.numpy(), dense)


def test_describe_counts_loops_and_bytes() -> None:
    # 0 - 1, 1 - 2, loop at 2; node 3 isolated.
    rows, cols = [0, 1, 1, 2, 2], [1, 0, 2, 1, 2]
    adj = sp.csr_array((np.ones(5, np.float32), (rows, cols)), shape=(4, 4))
    info = _graph(adj, symmetric=True).describe()
    assert info["edges"] == 5 and info["self_loops"] == 1 and info["undirected_edges"] == 3
    assert info["degree"] == {"min": 0, "mean": 1.25, "max": 2, "p99": 2}
    assert info["bytes"]["adjacency"] == adj.indptr.nbytes + adj.indices.nbytes + adj.data.nbytes
    assert info["bytes"]["features"] == 4 * 3 * 4
    assert info["features"] == {"dim": 3, "kind": "dense", "density": 1.0}
    assert _graph(adj).describe()["undirected_edges"] is None  # symmetry unknown


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 40), min_size=1, max_size=60))
def test_describe_degree_statistics_match_numpy(degrees: list[int]) -> None:
    n = len(degrees)
    deg = np.array(degrees, dtype=np.int64)
    indptr = np.concatenate([[0], np.cumsum(deg)])
    rng = np.random.default_rng(0)
    indices = np.concatenate([np.sort(rng.choice(41, d, replace=False)) for d in deg]).astype(
        np.int64
    )
    adj = sp.csr_array((np.ones(len(indices), np.float32), indices, indptr), shape=(n, 41))
    g = _graph(
        sp.csr_array((adj.data, adj.indices % n if n else adj.indices, adj.indptr), shape=(n, n))
    )
    info = g.describe()["degree"]
    assert info["min"] == deg.min() and info["max"] == deg.max()
    assert info["mean"] == pytest.approx(deg.mean())
    assert info["p99"] == int(np.percentile(deg, 99, method="inverted_cdf"))


def test_int32_adjacency_becomes_int64(rng: np.random.Generator) -> None:
    adj = _random_adj(rng)
    adj32 = sp.csr_array(
        (adj.data, adj.indices.astype(np.int32), adj.indptr.astype(np.int32)), shape=adj.shape
    )
    g = _graph(adj32)
    assert g.adj.indptr.dtype == np.int64 and g.adj.indices.dtype == np.int64


def test_split_index() -> None:
    g = _graph(sp.csr_array((3, 3), dtype=np.float32), val_idx=torch.tensor([2]))
    assert g.split_index("valid").tolist() == [2] == g.split_index("val").tolist()
    with pytest.raises(ValueError, match="split must be one of"):
        g.split_index("dev")


@pytest.mark.parametrize(
    ("kw", "error", "match"),
    [
        ({"adj": np.eye(3)}, TypeError, "adj must be"),
        ({"adj": sp.csr_array((4, 4), dtype=np.float32)}, ValueError, "adj has shape"),
        ({"x": torch.ones(2, 3)}, ValueError, "x has shape"),
        ({"x": [[1.0]] * 3}, TypeError, "x must be"),
        ({"y": torch.zeros(3)}, TypeError, "y must be"),
        ({"y": torch.zeros(4, dtype=torch.long)}, ValueError, "y has shape"),
        ({"train_idx": torch.zeros(2, dtype=torch.int32)}, TypeError, "train_idx"),
        ({"num_classes": 0}, ValueError, "num_classes"),
        ({"num_classes": 2.5}, TypeError, "num_classes"),
    ],
)
def test_validation(kw: dict, error: type[Exception], match: str) -> None:
    fields = dict(
        name="g",
        num_nodes=3,
        adj=sp.csr_array((3, 3), dtype=np.float32),
        x=torch.ones(3, 2),
        y=torch.zeros(3, dtype=torch.long),
        train_idx=torch.zeros(0, dtype=torch.long),
        val_idx=torch.zeros(0, dtype=torch.long),
        test_idx=torch.zeros(0, dtype=torch.long),
        num_classes=2,
    )
    fields.update(kw)
    with pytest.raises(error, match=match):
        Graph(**fields)


def test_graph_without_features_or_labels() -> None:
    g = Graph(
        name="e",
        num_nodes=2,
        adj=sp.csr_array((2, 2), dtype=np.float32),
        x=None,
        y=None,
        train_idx=torch.zeros(0, dtype=torch.long),
        val_idx=torch.zeros(0, dtype=torch.long),
        test_idx=torch.zeros(0, dtype=torch.long),
        num_classes=0,
    )
    assert g.num_features == 0 and g.describe()["features"]["kind"] == "none"
    with pytest.raises(ValueError, match="no node features"):
        g.x_torch()


def test_describe_scans_in_blocks(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    import aires.data.graph as graph_module

    adj = _random_adj(rng, n=50, density=0.2)
    adj.setdiag(1)
    g = _graph(sp.csr_array(adj), symmetric=True)
    whole = g.describe()
    monkeypatch.setattr(graph_module, "_SCAN", 3)  # blocks of 3 rows or 3 entries
    assert g.describe() == whole
    assert whole["self_loops"] == 50


def test_row_blocks_bound_rows_and_entries() -> None:
    from aires.data.graph import _row_blocks

    indptr = np.array([0, 5, 5, 30, 31, 40])
    assert list(_row_blocks(indptr, 10)) == [(0, 2), (2, 3), (3, 5)]
    assert list(_row_blocks(indptr, 100)) == [(0, 5)]
    assert list(_row_blocks(np.array([0]), 4)) == []
