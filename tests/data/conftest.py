"""Fixtures of the data tests: small OGB datasets, written offline the way ogb writes them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

TOY_NODES, TOY_FEATURES, TOY_CLASSES = 120, 8, 3


def toy_graph(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges (directed, mostly within a class), features (class centroid + noise), labels."""
    rng = np.random.default_rng(seed)
    n, f, c = TOY_NODES, TOY_FEATURES, TOY_CLASSES
    y = rng.integers(0, c, n)
    centroids = rng.normal(size=(c, f)) * 2
    x = (centroids[y] + rng.normal(size=(n, f))).astype(np.float32)
    src = rng.integers(0, n, 600)
    same = [rng.choice(np.flatnonzero(y == y[s])) for s in src[:450]]
    dst = np.concatenate([same, rng.integers(0, n, 150)])
    keep = src != dst
    return np.stack([src[keep], dst[keep]]), x, y


@pytest.fixture(scope="session")
def ogb_saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """A custom dataset written by ``ogb.io.DatasetSaver``: (meta_dict, submission directory)."""
    pytest.importorskip("ogb", reason="needs the ogb package (pip install aires[ogb])")
    from ogb.io import DatasetSaver

    base = tmp_path_factory.mktemp("ogb")
    edges, x, y = toy_graph(0)
    saver = DatasetSaver("ogbn-toy", is_hetero=False, version=1, root=str(base / "submission"))
    graph = {"edge_index": edges, "num_nodes": TOY_NODES, "node_feat": x, "edge_feat": None}
    saver.save_graph_list([graph])
    saver.save_target_labels(y[:, None])
    perm = np.random.default_rng(1).permutation(TOY_NODES)
    saver.save_split({"train": perm[:60], "valid": perm[60:90], "test": perm[90:]}, "random")
    (base / "mapping").mkdir()
    (base / "mapping" / "README.md").write_text("toy mapping\n")
    saver.copy_mapping_dir(str(base / "mapping"))
    saver.save_task_info("multiclass classification", "acc", num_classes=TOY_CLASSES)
    return saver.get_meta_dict(), Path(saver.submission_dir)


def _write_csv(path: Path, rows: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, header=False, index=False, compression="gzip")


@pytest.fixture
def arxiv_root(tmp_path: Path) -> Path:
    """An OGB root holding a stand-in ogbn-arxiv in OGB's csv layout (as the download unpacks)."""
    edges, x, y = toy_graph(2)
    d = tmp_path / "ogb" / "ogbn_arxiv"
    d.mkdir(parents=True)
    (d / "RELEASE_v1.txt").write_text("# Release note for ogbn-arxiv\n")
    _write_csv(d / "raw" / "edge.csv.gz", edges.T)
    _write_csv(d / "raw" / "num-node-list.csv.gz", np.array([[TOY_NODES]]))
    _write_csv(d / "raw" / "num-edge-list.csv.gz", np.array([[edges.shape[1]]]))
    _write_csv(d / "raw" / "node-feat.csv.gz", x)
    _write_csv(d / "raw" / "node-label.csv.gz", y[:, None])
    _write_csv(d / "raw" / "node_year.csv.gz", np.full((TOY_NODES, 1), 2020))
    split = {"train": np.arange(60), "valid": np.arange(60, 90), "test": np.arange(90, TOY_NODES)}
    for name, idx in split.items():
        _write_csv(d / "split" / "time" / f"{name}.csv.gz", idx[:, None])
    return tmp_path / "ogb"
