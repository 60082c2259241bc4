"""Edge-list conversion against scipy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

import aires.data.edgelist as edgelist_module
from aires.data import convert_edge_list


def _reference(rows: np.ndarray, cols: np.ndarray, n: int) -> sp.csr_array:
    m = sp.coo_array((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, n)).tocsr()
    m.sum_duplicates()
    m.data[:] = 1
    return m


@pytest.mark.parametrize("undirected", [True, False])
def test_matches_scipy(
    tmp_path: Path, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch, undirected: bool
) -> None:
    monkeypatch.setattr(edgelist_module, "_LINES", 7)  # several read blocks
    src, dst = rng.integers(0, 30, 80), rng.integers(0, 30, 80)
    src[0] = dst[0] = 4  # a self loop, kept
    lines = (
        ["# a comment", "% another"] + [f"{s} {d}" for s, d in zip(src, dst)] + ["", "29\t3  1.5"]
    )
    (tmp_path / "e.txt").write_text("\n".join(lines) + "\n")
    src, dst = np.append(src, 29), np.append(dst, 3)
    graph = convert_edge_list(
        tmp_path / "e.txt", tmp_path / "g", undirected=undirected, chunk_size=16
    )
    rows, cols = (
        (np.concatenate([src, dst]), np.concatenate([dst, src])) if undirected else (src, dst)
    )
    want = _reference(rows, cols, 30)
    np.testing.assert_array_equal(graph.adj.indptr, want.indptr)
    np.testing.assert_array_equal(graph.adj.indices, want.indices)
    assert graph.name == "e" and graph.x is None and graph.y is None
    assert graph.symmetric is (True if undirected else None)
    assert graph.describe()["self_loops"] == int(want.diagonal().sum()) >= 1


def test_num_nodes_and_errors(tmp_path: Path) -> None:
    (tmp_path / "e.txt").write_text("0 1\n1 2\n")
    assert convert_edge_list(tmp_path / "e.txt", tmp_path / "g", num_nodes=10).num_nodes == 10
    with pytest.raises(ValueError, match="node id 2"):
        convert_edge_list(tmp_path / "e.txt", tmp_path / "h", num_nodes=2)
    (tmp_path / "bad.txt").write_text("0 1\n1 x\n")
    with pytest.raises(ValueError, match="lines 1-2"):
        convert_edge_list(tmp_path / "bad.txt", tmp_path / "h")
    (tmp_path / "neg.txt").write_text("0 -1\n")
    with pytest.raises(ValueError, match="negative"):
        convert_edge_list(tmp_path / "neg.txt", tmp_path / "h")
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        convert_edge_list(tmp_path / "nope.txt", tmp_path / "h")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt", "e.txt", "g", "neg.txt"]


def test_karate_fixture(tmp_path: Path) -> None:
    fixture = Path(__file__).resolve().parents[2] / "datasets" / "fixtures" / "karate.txt"
    info = convert_edge_list(fixture, tmp_path / "karate").describe()
    assert (info["nodes"], info["undirected_edges"], info["self_loops"]) == (34, 78, 0)
    assert (info["degree"]["min"], info["degree"]["max"]) == (1, 17)


def test_empty_edge_list_is_named(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("# only a comment\n")
    with pytest.raises(ValueError, match=r"empty.txt: the edge list holds no edges; pass num_nodes"):
        convert_edge_list(tmp_path / "empty.txt", tmp_path / "g")
    for bad, error in ((0, ValueError), (-3, ValueError), (2.5, TypeError)):
        with pytest.raises(error, match=rf"num_nodes must be .*got {bad}"):
            convert_edge_list(tmp_path / "empty.txt", tmp_path / "g", num_nodes=bad)
    assert not (tmp_path / "g").exists()
    isolated = convert_edge_list(tmp_path / "empty.txt", tmp_path / "g", num_nodes=3)
    assert isolated.num_nodes == 3 and isolated.num_edges == 0
