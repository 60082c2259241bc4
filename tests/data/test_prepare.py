"""Prepared graphs: Â bit for bit as in-core gcn_norm, features adopted or converted, reuse,
killed runs, refusals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from aires.data import Graph, load_ogb, save_graph, synthetic
from aires.data import _normalise as normalise_module
from aires.data import prepare as prepare_module
from aires.data.prepare import Synthetic, prepare
from aires.gcn_conv import gcn_norm

REPO = Path(__file__).resolve().parents[2]


def reference(adj: sp.csr_array) -> sp.csr_array:
    """``Â`` as in-core training gets it: ``gcn_norm`` of the ``edge_index`` of ``adj``."""
    coo = adj.tocoo()
    edge_index = torch.from_numpy(np.vstack([coo.col, coo.row]).astype(np.int64))
    edge_index, weight = gcn_norm(edge_index, num_nodes=adj.shape[0])
    target, source = edge_index[1].numpy(), edge_index[0].numpy()
    out = sp.csr_array((weight.numpy(), (target, source)), shape=adj.shape)
    out.sort_indices()
    return out


def assert_bitwise(got: sp.csr_array, want: sp.csr_array) -> None:
    np.testing.assert_array_equal(got.indptr, want.indptr)
    np.testing.assert_array_equal(got.indices, want.indices)
    assert got.data.dtype == want.data.dtype == np.float32
    np.testing.assert_array_equal(got.data.view(np.uint32), want.data.view(np.uint32))


def hub_graph(n: int = 3000, hub_degree: int = 2500, seed: int = 0, loops: int = 0) -> Graph:
    """A random symmetric graph whose node 7 links to ``hub_degree`` others (a row larger than
    a 4 KiB tile), with ``loops`` self loops, features, labels and a split."""
    rng = np.random.default_rng(seed)
    src = rng.integers(0, n, 6 * n)
    dst = rng.integers(0, n, 6 * n)
    keep = src != dst
    hub = rng.choice(np.setdiff1d(np.arange(n), [7]), hub_degree, replace=False)
    looped = rng.choice(n, loops, replace=False)
    rows = np.concatenate([src[keep], dst[keep], np.full(hub_degree, 7), hub, looped])
    cols = np.concatenate([dst[keep], src[keep], hub, np.full(hub_degree, 7), looped])
    adj = sp.csr_array((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, n))
    adj.sum_duplicates()
    adj.data[:] = 1.0
    return Graph(
        name="hub",
        num_nodes=n,
        adj=adj,
        x=torch.from_numpy(rng.standard_normal((n, 5)).astype(np.float32)),
        y=torch.from_numpy(rng.integers(-1, 4, n)),
        train_idx=torch.arange(0, 100),
        val_idx=torch.arange(100, 150),
        test_idx=torch.arange(150, 300),
        num_classes=4,
        symmetric=True,
    )


# The second: feature blocks of 7 rows (16 float32 features), so the last one is partial.
@pytest.mark.parametrize(("chunk_size", "feature_block"), [(1 << 24, 64 << 20), (1, 7 * 64)])
def test_synthetic_graph_gives_gcn_norm_bit_for_bit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunk_size: int, feature_block: int
) -> None:
    monkeypatch.setattr(prepare_module, "_FEATURE_BLOCK", feature_block)
    prepared = prepare(Synthetic("tiny", 1.0, 3), root=tmp_path / "prep", tile_bytes="8KiB",
                       chunk_size=chunk_size, progress=False)
    graph = synthetic("tiny", scale=1.0, seed=3, cache_dir=tmp_path / "ref", progress=False)
    assert prepared.adjacency.symmetric is True
    assert len(prepared.adjacency) > 1
    assert_bitwise(prepared.adjacency.to_scipy(), reference(graph.adj))
    np.testing.assert_array_equal(prepared.features, graph.x.numpy())
    np.testing.assert_array_equal(prepared.labels, graph.y.numpy())
    for split in ("train_idx", "val_idx", "test_idx"):
        np.testing.assert_array_equal(getattr(prepared, split), getattr(graph, split).numpy())
    assert (prepared.num_nodes, prepared.num_features, prepared.num_classes) == (1000, 16, 4)
    assert not prepared.reused and set(prepared.timings) >= {"source", "degrees", "tiles"}
    assert prepared.peak_rss_bytes > 0


@pytest.mark.parametrize("piece", [1, 1 << 21])
def test_hub_row_and_self_loops_against_scipy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, piece: int
) -> None:
    """A row of 2500 entries split over 4 KiB tiles, degree chunks and normalisation pieces of
    one row, self loops replaced by one of weight 1; checked against gcn_norm and, to float
    precision, scipy."""
    monkeypatch.setattr(normalise_module, "_PIECE", piece)
    graph = hub_graph(loops=40)
    save_graph(graph, tmp_path / "graph")
    prepared = prepare(tmp_path / "graph", root=tmp_path / "prep", tile_bytes=4096,
                       chunk_size=1, progress=False)
    assert any(t.partial for t in prepared.adjacency.tiles)
    got = prepared.adjacency.to_scipy()
    assert_bitwise(got, reference(graph.adj))
    pattern = sp.csr_array(graph.adj.astype(np.float64))
    pattern.setdiag(1.0)
    dinv = sp.diags_array(1 / np.sqrt(pattern.sum(axis=1)))
    np.testing.assert_allclose((got - dinv @ pattern @ dinv).toarray(), 0, atol=1e-7)
    np.testing.assert_array_equal(prepared.features, graph.x.numpy())
    assert (tmp_path / "graph" / "adj_indices.npy").is_file()  # a saved graph is left alone


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_normalising_on_a_device_gives_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: str
) -> None:
    """Rows normalised on a device (sorting each piece's entries and diagonal by key) equal
    numpy's (inserting the diagonal), bit for bit, in slices that split rows and pieces, with
    self loops and a hub row."""
    monkeypatch.setattr(normalise_module, "_PIECE", 3000)
    save_graph(hub_graph(loops=40), tmp_path / "graph")
    csr = normalise_module.RawCSR(tmp_path / "graph")
    degree, has_loop = normalise_module.degrees(csr, 1 << 12, 2, False)
    indptr = np.concatenate([[0], np.cumsum(degree)])
    dinv = torch.from_numpy(degree.astype(np.float32)).pow(-0.5).numpy()
    host = normalise_module.NormalisedRows(csr, indptr, dinv, has_loop)
    on = normalise_module.NormalisedRows(csr, indptr, dinv, has_loop, torch.device(device))
    bounds = np.unique(np.r_[0, np.random.default_rng(1).integers(0, indptr[-1], 12),
                             indptr[-1]])
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        want, got = host.entries(int(lo), int(hi)), on.entries(int(lo), int(hi))
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1].view(np.uint32), want[1].view(np.uint32))
    csr.close()


def test_ogb_layout_directory_gives_gcn_norm_bit_for_bit(arxiv_root: Path, tmp_path: Path) -> None:
    pytest.importorskip("ogb", reason="needs the ogb package (pip install aires[ogb])")
    source = arxiv_root / "ogbn_arxiv"
    prepared = prepare(source, root=tmp_path / "prep", tile_bytes=4096, progress=False)
    graph = load_ogb(source)
    assert_bitwise(prepared.adjacency.to_scipy(), reference(graph.adj))
    np.testing.assert_array_equal(prepared.features, graph.x.numpy())
    np.testing.assert_array_equal(prepared.labels, graph.y.numpy())
    assert not list(prepared.path.rglob("adj_*.npy"))  # the converted adjacency is gone


def test_features_are_aligned_and_stored_once(tmp_path: Path) -> None:
    prepared = prepare(Synthetic("tiny", 0.5, 0), root=tmp_path, progress=False)
    assert prepared.features_offset % 4096 == 0
    raw = np.fromfile(prepared.features_path, dtype=np.float32, offset=prepared.features_offset)
    np.testing.assert_array_equal(raw.reshape(prepared.features.shape), prepared.features)
    assert sorted(p.name for p in prepared.path.iterdir()) == [
        "adjacency", "features.npy", "labels.npy", "prepared.json", "test_idx.npy",
        "train_idx.npy", "val_idx.npy",
    ]
    report = prepared.report
    assert report["bytes"]["adjacency"] == prepared.adjacency.data_path.stat().st_size
    assert report["bytes"]["disk_ratio"] <= 1.3 or prepared.num_nodes < 10_000


@pytest.mark.parametrize(("name", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_features(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, dtype: torch.dtype
) -> None:
    monkeypatch.setattr(prepare_module, "_FEATURE_BLOCK", 3 * 5 * 2)  # blocks of 3 rows
    graph = hub_graph(n=500, hub_degree=10)
    save_graph(graph, tmp_path / "graph")
    prepared = prepare(tmp_path / "graph", root=tmp_path / "prep", feature_dtype=name,
                       progress=False)
    got = torch.from_numpy(np.array(prepared.features))
    if dtype == torch.bfloat16:
        got = got.view(torch.int16).view(torch.bfloat16)
    torch.testing.assert_close(got, graph.x.to(dtype), atol=0, rtol=0)
    assert prepared.feature_dtype == name and prepared.report["feature_dtype"] == name


def test_reuse_is_keyed_by_what_decides_the_bytes(tmp_path: Path) -> None:
    first = prepare(Synthetic("tiny", 0.5, 0), root=tmp_path, progress=False)
    again = prepare(Synthetic("tiny", 0.5, 0), root=tmp_path, progress=False)
    assert again.reused and again.path == first.path and set(again.timings) == {"open"}
    other_tiles = prepare(Synthetic("tiny", 0.5, 0), root=tmp_path, tile_bytes="8KiB",
                          progress=False)
    other_seed = prepare(Synthetic("tiny", 0.5, 1), root=tmp_path, progress=False)
    assert len({first.path, other_tiles.path, other_seed.path}) == 3
    assert not (other_tiles.reused or other_seed.reused)


def test_synthetic_features_are_written_after_the_raw_adjacency_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The disk holds at most two of the three large things at once: the generator's edges and
    raw CSR, then the raw CSR and the tiles, then the tiles and the features."""
    seen = []
    write = prepare_module._write_features

    def watched(graph_dir: Path, tmp: Path, *args, **kwargs) -> None:
        seen.append((graph_dir.exists(), (tmp / "adjacency").is_dir()))
        write(graph_dir, tmp, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "_write_features", watched)
    prepared = prepare(Synthetic("tiny", 1.0, 3), root=tmp_path, tile_bytes="8KiB",
                       progress=False)
    assert seen == [(False, True)]
    assert prepared.features.shape == (prepared.num_nodes, 16)


def test_papers100M_size_fits_the_two_gpu_machines_disk() -> None:
    """Full papers100M (1.6 billion edges, 57 GB of features) needs some 99 GB at its peak, under
    the 104 GB the two-GPU machine had free (features first, as before, needed 156 GB)."""
    _, _, params = prepare_module._describe(Synthetic("papers100M", 1.0, 0))
    params["feature_dtype"] = "float32"
    need = prepare_module._synthetic_need(params)
    assert 84e9 < need < 100e9  # at least the tiles and the features, together at the end


_KILLED = """
import os, signal, sys
from aires.data import prepare as module
def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)
module._write_features = die
module.prepare(module.Synthetic("tiny", 0.5, 0), root=sys.argv[1], progress=False)
"""


def test_a_killed_preparation_is_never_reused(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", _KILLED, str(tmp_path)], env=env)
    assert run.returncode == -signal.SIGKILL
    leftovers = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
    assert len(leftovers) == 1 and (leftovers[0] / "adjacency").is_dir()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" not in p.name]
    prepared = prepare(Synthetic("tiny", 0.5, 0), root=tmp_path, progress=False)
    assert not prepared.reused
    assert [p.name for p in tmp_path.iterdir()] == [prepared.path.name]


def test_disk_refusal_names_both_numbers_and_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prepare_module, "_disk_free", lambda path: 12345)
    with pytest.raises(OSError, match=r"needs [\d.]+ GB of disk, but .* has 0.00 GB free "
                                      r"\(\d+ > 12345 bytes\)") as info:
        prepare(Synthetic("products", 0.01, 0), root=tmp_path, progress=False)
    assert str(tmp_path) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_memory_refusal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepare_module, "memory_available", lambda: 1000)
    with pytest.raises(OSError, match=r"GB of host memory, but 0.00 GB are available "
                                      r"\(\d+ > 1000 bytes\)"):
        prepare(Synthetic("tiny", 1.0, 0), root=tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


_FSIZE = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
from aires.data.prepare import Synthetic, prepare
try:
    prepare(Synthetic("tiny", 1.0, 0), root=sys.argv[1], progress=False)
except OSError as error:
    print("refused:", error)
    sys.exit(3)
"""


def test_a_file_size_limit_fails_cleanly(tmp_path: Path) -> None:
    """RLIMIT_FSIZE stands in for a full disk: the write fails, nothing is left behind."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", _FSIZE, str(tmp_path)], env=env,
                         capture_output=True, text=True)
    assert run.returncode == 3, run.stderr
    assert "refused:" in run.stdout
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_name_the_value(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="feature_dtype must be one of .*'int8'"):
        prepare(Synthetic("tiny"), root=tmp_path, feature_dtype="int8")
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        prepare(Synthetic("nope"), root=tmp_path)
    with pytest.raises(ValueError, match="scale must be .* got -1"):
        prepare(Synthetic("tiny", -1), root=tmp_path)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1, got 0"):
        prepare(Synthetic("tiny"), root=tmp_path, chunk_size=0)
    with pytest.raises(ValueError, match="is neither a graph directory"):
        prepare(tmp_path / "missing", root=tmp_path)


def test_directed_graph_is_refused(tmp_path: Path) -> None:
    graph = hub_graph(n=200, hub_degree=5)
    graph.symmetric = None
    save_graph(graph, tmp_path / "graph")
    with pytest.raises(NotImplementedError, match="not marked symmetric"):
        prepare(tmp_path / "graph", root=tmp_path / "prep", progress=False)
    assert list((tmp_path / "prep").iterdir()) == []


def test_unsorted_rows_are_refused(tmp_path: Path) -> None:
    save_graph(hub_graph(n=200, hub_degree=5), tmp_path / "graph")
    indices = np.load(tmp_path / "graph" / "adj_indices.npy", mmap_mode="r+", allow_pickle=False)
    indices[:2] = indices[1::-1]
    indices.flush()
    with pytest.raises(ValueError, match="row 0 has unsorted column indices"):
        prepare(tmp_path / "graph", root=tmp_path / "prep", progress=False)


def test_cli_prepares_then_reuses_and_writes_the_report(tmp_path: Path) -> None:
    from aires.data.cli import main

    args = ["prepare", "--preset", "tiny", "--scale", "0.5", "--root", str(tmp_path / "r"),
            "--tile-bytes", "8KiB", "--quiet"]
    assert main([*args, "--json", str(tmp_path / "first.json")]) == 0
    assert main([*args, "--json", str(tmp_path / "second.json")]) == 0
    first = json.loads((tmp_path / "first.json").read_text())
    second = json.loads((tmp_path / "second.json").read_text())
    assert not first["reused"] and second["reused"]
    assert first["path"] == second["path"]
    assert set(first["timings"]) >= {"source", "degrees", "write_ceiling", "tiles", "features"}
    assert first["bytes"]["total_on_disk"] >= first["bytes"]["adjacency"]
    assert first["write_ceiling"]["bytes_per_second"] > 0 and first["peak_rss_bytes"] > 0
    assert first["feature_dtype"] == "float32" and first["tiles"] > 1


def test_edge_list_source(tmp_path: Path) -> None:
    """An edge list has no features or labels: the features are None, every label is -1."""
    from aires.data import convert_edge_list

    edges = REPO / "datasets" / "fixtures" / "karate.txt"
    prepared = prepare(edges, root=tmp_path / "prep", progress=False)
    graph = convert_edge_list(edges, tmp_path / "ref")
    assert_bitwise(prepared.adjacency.to_scipy(), reference(graph.adj))
    assert prepared.features is None and prepared.num_features == 0
    np.testing.assert_array_equal(prepared.labels, np.full(34, -1))
