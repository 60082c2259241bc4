"""load_graph() dispatch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from aires.data import load_graph, save_graph, synthetic


def test_dispatch(tmp_path: Path, planetoid_dir: Path) -> None:
    cora = load_graph("cora", planetoid_dir)
    assert cora.name == "cora"
    assert load_graph(str(planetoid_dir / "cora.npz")).num_nodes == 2708
    saved = save_graph(cora, tmp_path / "cora")
    back = load_graph(saved)
    assert np.array_equal(back.adj.indices, cora.adj.indices) and back.provenance["path"] == str(
        saved
    )
    tiny = load_graph("tiny", cache_dir=tmp_path / "cache", progress=False)
    assert tiny.num_nodes == 1000
    assert tiny.num_edges == synthetic("tiny", cache_dir=tmp_path / "cache").num_edges


def test_unknown_name_lists_choices(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match="cora, citeseer.*ogbn-arxiv.*tiny, arxiv, products, papers100M"
    ):
        load_graph(str(tmp_path / "nothing-here"))
    with pytest.raises(ValueError, match="takes no extra options"):
        load_graph("cora", scale=2.0)
