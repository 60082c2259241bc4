"""The on-disk graph format: round trips, memmaps, atomic writes and damaged directories."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from aires.data import Graph, GraphWriter, is_graph_dir, open_graph, save_graph


def _graph(rng: np.random.Generator, sparse: bool) -> Graph:
    n = 40
    a = sp.random_array((n, n), density=0.1, rng=rng, format="csr")
    adj = sp.csr_array(((a + a.T) > 0).astype(np.float32))
    x = rng.random((n, 6)).astype(np.float32)
    if sparse:
        x[x < 0.7] = 0
        x = sp.csr_array(x)
    y = torch.from_numpy(rng.integers(-1, 3, n))
    return Graph(
        name="g",
        num_nodes=n,
        adj=adj,
        x=x if sparse else torch.from_numpy(x),
        y=y,
        train_idx=torch.arange(10),
        val_idx=torch.arange(10, 20),
        test_idx=torch.arange(20, 40),
        num_classes=3,
        provenance={"source": "test", "params": {"k": 1}},
        symmetric=True,
    )


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("mmap", [True, False])
def test_round_trip(tmp_path: Path, rng: np.random.Generator, sparse: bool, mmap: bool) -> None:
    graph = _graph(rng, sparse)
    path = save_graph(graph, tmp_path / "g")
    assert is_graph_dir(path)
    back = open_graph(path, mmap=mmap)
    assert (back.name, back.num_nodes, back.num_classes, back.symmetric) == ("g", 40, 3, True)
    assert back.provenance["params"] == {"k": 1} and back.provenance["path"] == str(path)
    for name in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(back.adj, name), getattr(graph.adj, name))
    if sparse:
        assert isinstance(back.x, sp.csr_array)
        np.testing.assert_array_equal(back.x.toarray(), graph.x.toarray())
    else:
        assert torch.equal(back.x_torch(), graph.x)
    for field in ("y", "train_idx", "val_idx", "test_idx"):
        assert torch.equal(getattr(back, field), getattr(graph, field))
    assert back.describe()["degree"] == graph.describe()["degree"]


def test_open_is_memory_mapped_and_copy_on_write(tmp_path: Path, rng: np.random.Generator) -> None:
    path = save_graph(_graph(rng, False), tmp_path / "g")
    graph = open_graph(path)
    assert not graph.adj.indices.flags.writeable  # read-only view of the file
    before = (path / "x.npy").read_bytes()
    x = graph.x_torch()
    x.fill_(7.0)  # private pages: the file is untouched
    assert (path / "x.npy").read_bytes() == before
    assert isinstance(np.load(path / "adj_indices.npy", mmap_mode="r"), np.memmap)


def test_files_are_plain_npy(tmp_path: Path, rng: np.random.Generator) -> None:
    graph = _graph(rng, False)
    path = save_graph(graph, tmp_path / "g")
    manifest = json.loads((path / "graph.json").read_text())
    assert manifest["format"] == "aires-graph" and manifest["version"] == 1
    for name, spec in manifest["arrays"].items():
        arr = np.load(path / f"{name}.npy", allow_pickle=False)
        assert arr.dtype == np.dtype(spec["dtype"]) and list(arr.shape) == spec["shape"]


def test_exists_and_overwrite(tmp_path: Path, rng: np.random.Generator) -> None:
    save_graph(_graph(rng, False), tmp_path / "g")
    with pytest.raises(FileExistsError, match="overwrite"):
        save_graph(_graph(rng, True), tmp_path / "g")
    save_graph(_graph(rng, True), tmp_path / "g", overwrite=True)
    assert open_graph(tmp_path / "g").sparse_features
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g"]


def test_writer_failure_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="stop"):
        with GraphWriter(tmp_path / "g") as writer:
            writer.array("adj_indptr", (5,))
            raise RuntimeError("stop")
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_incomplete_graph_and_unknown_arrays(tmp_path: Path) -> None:
    with GraphWriter(tmp_path / "g") as writer:
        with pytest.raises(ValueError, match="unknown array name"):
            writer.array("weights", (3,))
        with pytest.raises(ValueError, match="were not written"):
            writer.commit(
                name="g", num_nodes=1, num_features=0, num_classes=0, symmetric=None, provenance={}
            )
    assert list(tmp_path.iterdir()) == []


def test_open_errors(tmp_path: Path, rng: np.random.Generator) -> None:
    with pytest.raises(FileNotFoundError, match="graph.json"):
        open_graph(tmp_path)
    path = save_graph(_graph(rng, False), tmp_path / "g")
    manifest = json.loads((path / "graph.json").read_text())

    (path / "graph.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(ValueError, match="version 99"):
        open_graph(path)
    (path / "graph.json").write_text(json.dumps(manifest))

    np.save(path / "y.npy", np.zeros(3, np.int64))  # wrong length
    with pytest.raises(ValueError, match="y.npy.*differs"):
        open_graph(path)

    (path / "y.npy").unlink()
    with pytest.raises(FileNotFoundError, match="y.npy"):
        open_graph(path)


@pytest.mark.parametrize("key", ["../y", "/etc/passwd", "sub/y", "passwd"])
def test_manifest_array_names_cannot_leave_the_directory(
    tmp_path: Path, rng: np.random.Generator, key: str
) -> None:
    path = save_graph(_graph(rng, False), tmp_path / "g")
    manifest = json.loads((path / "graph.json").read_text())
    manifest["arrays"][key] = {"dtype": "<i8", "shape": [40]}
    (path / "graph.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=rf"unknown array '{key}'; a graph holds only adj_indptr"):
        open_graph(path)


def test_array_file_linked_outside_is_refused(tmp_path: Path, rng: np.random.Generator) -> None:
    path = save_graph(_graph(rng, False), tmp_path / "g")
    outside = tmp_path / "elsewhere.npy"
    (path / "y.npy").rename(outside)
    (path / "y.npy").symlink_to(outside)
    with pytest.raises(ValueError, match=r"y.npy: a link to .*elsewhere.npy, outside the graph"):
        open_graph(path)


def _without(manifest: dict, key: str) -> dict:
    return {k: v for k, v in manifest.items() if k != key}


def _adj_data_as_float64(manifest: dict) -> dict:
    manifest["arrays"]["adj_data"]["dtype"] = "<f8"
    return manifest


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: b"{not json", "not a valid JSON manifest"),
        (lambda m: b"[1, 2]", "a JSON object expected"),
        (lambda m: {**m, "arrays": None}, r"malformed manifest, missing or invalid: \['arrays'\]"),
        (lambda m: _without(m, "num_nodes"), r"missing or invalid: \['num_nodes'\]"),
        (_adj_data_as_float64, r"array 'adj_data' must be listed with shape and dtype '<f4'"),
    ],
    ids=["not-json", "not-object", "arrays-null", "num-nodes-missing", "foreign-dtype"],
)
def test_malformed_manifest_is_a_value_error(
    tmp_path: Path, rng: np.random.Generator, edit: Callable[[dict], Any], message: str
) -> None:
    path = save_graph(_graph(rng, False), tmp_path / "g")
    changed = edit(json.loads((path / "graph.json").read_text()))
    raw = changed if isinstance(changed, bytes) else json.dumps(changed).encode()
    (path / "graph.json").write_bytes(raw)
    with pytest.raises(ValueError, match=message):
        open_graph(path)


def test_dense_features_start_page_aligned(tmp_path: Path) -> None:
    """x.npy's data begins at byte 4096 (the header is padded), and np.load still reads it."""
    graph = _graph(np.random.default_rng(5), sparse=False)
    save_graph(graph, tmp_path / "g")
    x = np.load(tmp_path / "g" / "x.npy", mmap_mode="r", allow_pickle=False)
    assert x.offset == 4096
    np.testing.assert_array_equal(x, graph.x.numpy())
    raw = np.fromfile(tmp_path / "g" / "x.npy", dtype=np.float32, offset=4096)
    np.testing.assert_array_equal(raw.reshape(x.shape), graph.x.numpy())
