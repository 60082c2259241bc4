"""Synthetic RMAT graphs (aires/data/generator.py): exact sizes, determinism, chunking, caching."""

from __future__ import annotations

import os
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

import aires.data.generator as generator_module
from aires.data import PRESETS, Graph, synthetic


def _arrays(graph: Graph) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(Path(graph.provenance["path"]).glob("*.npy"))}


def test_presets_have_the_ogb_sizes() -> None:
    sizes = {
        name: (p.num_nodes, p.num_edges, p.num_features, p.num_classes)
        for name, p in PRESETS.items()
    }
    assert sizes["arxiv"] == (169_343, 1_166_243, 128, 40)
    assert sizes["products"] == (2_449_029, 61_859_140, 100, 47)
    assert sizes["papers100M"] == (111_059_956, 1_615_685_872, 128, 172)
    assert PRESETS["papers100M"].sizes(0.1) == (11_105_996, 161_568_587)


@pytest.mark.parametrize(
    ("preset", "scale"), [("tiny", 1.0), ("arxiv", 0.01), ("products", 0.0005)]
)
def test_exact_counts_symmetric_simple(tmp_path: Path, preset: str, scale: float) -> None:
    graph = synthetic(preset, scale=scale, cache_dir=tmp_path, progress=False)
    n, m = PRESETS[preset].sizes(scale)
    assert graph.num_nodes == n and graph.adj.shape == (n, n)
    assert graph.num_edges == 2 * m
    info = graph.describe()
    assert info["undirected_edges"] == m and info["self_loops"] == 0
    adj = graph.adj
    assert (adj != adj.T).nnz == 0
    assert adj.diagonal().sum() == 0
    assert adj.has_canonical_format  # sorted, no duplicates
    assert graph.x.shape == (n, PRESETS[preset].num_features)
    assert graph.symmetric is True


def test_degree_is_skewed(tmp_path: Path) -> None:
    info = synthetic("arxiv", scale=0.02, cache_dir=tmp_path, progress=False).describe()
    assert info["degree"]["max"] > 10 * info["degree"]["mean"]
    assert info["degree"]["p99"] > 3 * info["degree"]["mean"]


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = synthetic("tiny", seed=4, cache_dir=tmp_path / "a", progress=False)
    b = synthetic("tiny", seed=4, cache_dir=tmp_path / "b", progress=False)
    c = synthetic("tiny", seed=5, cache_dir=tmp_path / "c", progress=False)
    assert _arrays(a) == _arrays(b)
    assert not np.array_equal(a.adj.indices, c.adj.indices)
    assert not torch.equal(a.x_torch(), c.x_torch())


@pytest.mark.parametrize("density", [None, 0.2])
def test_chunked_equals_one_shot(tmp_path: Path, density: float | None) -> None:
    one = synthetic(
        "arxiv",
        scale=0.01,
        feature_density=density,
        cache_dir=tmp_path / "one",
        chunk_size=1 << 24,
        progress=False,
    )
    many = synthetic(
        "arxiv",
        scale=0.01,
        feature_density=density,
        cache_dir=tmp_path / "many",
        chunk_size=1024,
        progress=False,
    )
    assert many.provenance["generation"]["chunk_size"] == 1024
    assert _arrays(one) == _arrays(many)


def test_sparse_features_are_masked_dense_features(tmp_path: Path) -> None:
    dense = synthetic("tiny", cache_dir=tmp_path, progress=False)
    sparse = synthetic("tiny", feature_density=0.1, cache_dir=tmp_path, progress=False)
    x = sparse.x
    assert isinstance(x, sp.csr_array) and x.shape == dense.x.shape
    assert abs(x.nnz / (x.shape[0] * x.shape[1]) - 0.1) < 0.01
    assert x.has_canonical_format
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    np.testing.assert_array_equal(x.data, dense.x_torch().numpy()[rows, x.indices])
    assert np.array_equal(sparse.adj.indices, dense.adj.indices)  # features do not move edges


def test_features_left_out_are_what_feature_rows_gives(tmp_path: Path) -> None:
    """Without features the graph is the same graph; :func:`feature_rows` then gives the
    features the generator writes, bit for bit (what a preparation writes after its tiles)."""
    full = synthetic("tiny", seed=5, cache_dir=tmp_path / "a", progress=False)
    bare = synthetic("tiny", seed=5, cache_dir=tmp_path / "b", progress=False, features=False)
    assert bare.x is None and bare.num_features == 0
    assert (full.adj != bare.adj).nnz == 0
    assert torch.equal(full.y, bare.y) and torch.equal(full.train_idx, bare.train_idx)
    rows = generator_module.feature_rows("tiny", 5, torch.device("cpu"))
    n = full.num_nodes
    got = torch.cat([rows(a, min(a + 77, n), full.y[a : a + 77].numpy()) for a in range(0, n, 77)])
    assert torch.equal(got, full.x)
    with pytest.raises(ValueError, match="features=False leaves out dense features only"):
        synthetic("tiny", cache_dir=tmp_path / "c", feature_density=0.1, features=False)


def test_labels_balanced_and_split_disjoint(tmp_path: Path) -> None:
    graph = synthetic("arxiv", scale=0.01, cache_dir=tmp_path, progress=False)
    counts = np.bincount(graph.y.numpy(), minlength=graph.num_classes)
    assert counts.max() - counts.min() <= 1
    parts = [graph.split_index(s).numpy() for s in ("train", "val", "test")]
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined) and joined.max() < graph.num_nodes
    for part, frac in zip(parts, PRESETS["arxiv"].split):
        assert abs(len(part) / graph.num_nodes - frac) < 0.05
        assert np.all(np.diff(part) > 0)


def test_features_predict_labels(tmp_path: Path) -> None:
    graph = synthetic("tiny", cache_dir=tmp_path, progress=False)
    x, y = graph.x_torch().double(), graph.y
    train, test = graph.train_idx, graph.test_idx
    centroids = torch.stack([x[train][y[train] == c].mean(0) for c in range(graph.num_classes)])
    pred = torch.cdist(x[test], centroids).argmin(1)
    assert float((pred == y[test]).double().mean()) > 2.0 / graph.num_classes


def test_cache_hit_and_overwrite(tmp_path: Path) -> None:
    first = synthetic("tiny", seed=1, cache_dir=tmp_path, progress=False)
    path = Path(first.provenance["path"])
    stamp = (path / "graph.json").stat().st_mtime_ns
    again = synthetic("tiny", seed=1, cache_dir=tmp_path, progress=False)
    assert Path(again.provenance["path"]) == path
    assert (path / "graph.json").stat().st_mtime_ns == stamp
    assert path.parent == tmp_path and path.name.startswith("tiny-x1-s1-")
    synthetic("tiny", seed=1, cache_dir=tmp_path, overwrite=True, progress=False)
    assert (path / "graph.json").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temporaries left


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIRES_CACHE", str(tmp_path / "env"))
    graph = synthetic("tiny", progress=False)
    assert Path(graph.provenance["path"]).parent == tmp_path / "env"


def test_out_directory(tmp_path: Path) -> None:
    graph = synthetic("tiny", out=tmp_path / "g", progress=False)
    assert Path(graph.provenance["path"]) == tmp_path / "g"
    assert synthetic("tiny", out=tmp_path / "g", progress=False).num_edges == graph.num_edges
    with pytest.raises(FileExistsError, match="overwrite"):
        synthetic("tiny", seed=9, out=tmp_path / "g", progress=False)


def test_failure_leaves_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(generator_module, "_write_dense_features", boom)
    with pytest.raises(RuntimeError, match="boom"):
        synthetic("tiny", cache_dir=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_not_enough_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(generator_module.shutil, "disk_usage", lambda p: usage(10, 9, 1))
    with pytest.raises(OSError, match="GB are free"):
        synthetic("tiny", cache_dir=tmp_path, progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"preset": "nope"}, "valid presets: tiny, arxiv, products, papers100M"),
        ({"preset": "tiny", "scale": -1.0}, "scale"),
        ({"preset": "tiny", "scale": 0}, "scale"),
        ({"preset": "tiny", "scale": float("nan")}, "scale"),
        ({"preset": "tiny", "scale": True}, "scale"),
        ({"preset": "tiny", "seed": -1}, "seed"),
        ({"preset": "tiny", "feature_density": 0.0}, "feature_density"),
        ({"preset": "tiny", "feature_density": 1.5}, "feature_density"),
        ({"preset": "tiny", "chunk_size": 10}, "chunk_size"),
        ({"preset": "tiny", "scale": 0.01}, "10% of all pairs"),
    ],
)
def test_bad_input(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        synthetic(cache_dir=tmp_path, progress=False, **kwargs)
    assert list(tmp_path.iterdir()) == []


def test_preset_names_are_case_blind(tmp_path: Path) -> None:
    assert synthetic("TINY", cache_dir=tmp_path, progress=False).num_nodes == 1000


@pytest.mark.gpu
@pytest.mark.parametrize("density", [None, 0.05])
def test_gpu_generates_the_same_bytes_as_cpu(tmp_path: Path, density: float | None) -> None:
    cpu = synthetic(
        "arxiv",
        scale=0.05,
        feature_density=density,
        cache_dir=tmp_path / "cpu",
        device="cpu",
        progress=False,
    )
    gpu = synthetic(
        "arxiv",
        scale=0.05,
        feature_density=density,
        cache_dir=tmp_path / "gpu",
        device="cuda",
        progress=False,
    )
    assert gpu.provenance["generation"]["device"].startswith("cuda")
    assert _arrays(cpu) == _arrays(gpu)


def test_no_progress_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    synthetic("tiny", cache_dir=tmp_path, progress=False)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert os.listdir(tmp_path)


def test_concurrent_cache_writers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = generator_module._generate

    def racing(*args: object) -> dict:
        monkeypatch.setattr(generator_module, "_generate", original)
        synthetic("tiny", cache_dir=tmp_path, progress=False)  # another process finishes first
        return original(*args)

    monkeypatch.setattr(generator_module, "_generate", racing)
    graph = synthetic("tiny", cache_dir=tmp_path, progress=False)
    assert graph.num_edges == 16_000
    assert len(list(tmp_path.iterdir())) == 1
