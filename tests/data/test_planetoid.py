"""Planetoid npz loading, against the counts of the dataset README (and PyG)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from aires.data import load_planetoid


@pytest.mark.parametrize(
    ("name", "nodes", "edges", "features", "classes", "split"),
    [
        ("cora", 2708, 10556, 1433, 7, (140, 500, 1000)),
        ("citeseer", 3327, 9104, 3703, 6, (120, 500, 1000)),
    ],
)
def test_counts_match_readme(
    planetoid_dir: Path,
    name: str,
    nodes: int,
    edges: int,
    features: int,
    classes: int,
    split: tuple[int, int, int],
) -> None:
    graph = load_planetoid(name, planetoid_dir)
    info = graph.describe()
    assert (info["nodes"], info["edges"], info["features"]["dim"], info["classes"]) == (
        nodes,
        edges,
        features,
        classes,
    )
    assert tuple(info["split"].values()) == split
    assert info["self_loops"] == 0 and graph.symmetric is True
    assert isinstance(graph.x, sp.csr_array) and graph.x.dtype == np.float32
    assert 0.005 < info["features"]["density"] < 0.02
    assert graph.adj.has_canonical_format


def test_unlabelled_citeseer_nodes_are_minus_one_and_in_no_split(planetoid_dir: Path) -> None:
    graph = load_planetoid("citeseer", planetoid_dir)
    unlabelled = torch.nonzero(graph.y < 0).squeeze(1)
    assert len(unlabelled) == 15
    for split in ("train", "val", "test"):
        assert not bool(torch.isin(graph.split_index(split), unlabelled).any())


def test_by_path_by_default_root_and_by_root(planetoid_dir: Path, tmp_path: Path) -> None:
    import aires

    # The default root is the package's own copy: no environment, nothing outside the package.
    assert planetoid_dir.is_relative_to(Path(aires.__file__).parent)
    by_path = load_planetoid(planetoid_dir / "cora.npz")
    by_name = load_planetoid("Cora")
    assert np.array_equal(by_path.adj.indices, by_name.adj.indices)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "cora.npz")):
        load_planetoid("cora", tmp_path)


def test_bad_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cora, citeseer"):
        load_planetoid("pubmed-ish")
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        load_planetoid(tmp_path / "missing.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(ValueError, match="missing arrays"):
        load_planetoid(tmp_path / "other.npz")
