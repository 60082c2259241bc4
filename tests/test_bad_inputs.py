"""A catalogue of bad inputs to the public API and the CLIs, each answered by a clear error.

Every row calls one entry point with one bad argument and expects an exception of one type whose
message matches a pattern naming the argument and the value received, never a crash deep inside
a kernel, a traceback from a command line, or a silently wrong result. CLI rows run
``main(argv)`` of ``aires`` / ``aires-bench`` and expect a non-zero exit whose last stderr line
(the whole message: one line) matches, with no traceback.

Rows marked ``xfail(strict=True)`` are known gaps in modules outside the input-check owner's
files; the reason says which file and what it should do. When one is fixed its row passes,
strict xfail turns that into a failure, and the mark is removed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from aires import TileStore, build_store, matmul
from aires.checks import parse_size
from aires.cli import main as aires_main
from aires.data import Graph, load_graph, open_graph, save_graph, synthetic
from aires.gcn_conv import AiresGCNConv
from bench.cli import main as bench_main


class CliError(Exception):
    """A command exited non-zero; the message is its last stderr line."""


@dataclass
class Ctx:
    """What a row's call may use: a scratch directory and the captured output."""

    tmp: Path
    capsys: pytest.CaptureFixture[str]

    def store(self) -> TileStore:
        """A small valid store (50 x 50), built once per test."""
        path = self.tmp / "store"
        if path.exists():
            return TileStore.open(path)
        return build_store(A, path, tile_bytes=4096, progress=False)

    def manifest(self, **changes: Any) -> Path:
        """A valid store whose manifest has ``changes`` applied; returns its directory."""
        store = self.store()
        path = store.path / "manifest.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
        return store.path

    def cli(self, main: Callable[[Sequence[str]], int], argv: list[str]) -> None:
        """Run a command's ``main``; raise :class:`CliError` unless it exits with status 0."""
        try:
            status = main(argv)
        except SystemExit as exit_:
            status = exit_.code
        err = self.capsys.readouterr().err
        if status in (0, None):
            return
        assert "Traceback" not in err, err
        lines = err.strip().splitlines()
        assert lines, f"exit status {status} with nothing on stderr"
        raise CliError(lines[-1])


A = sp.random_array((50, 50), density=0.1, format="csr", rng=0, dtype=np.float32)
X = torch.ones(50, 3)
EI = torch.tensor([[0, 1, 2, 3], [1, 2, 3, 4]])  # 5 nodes
XC = torch.randn(5, 4)  # 5 nodes, 4 features


def csr(indptr: list[int], indices: list[int], data: list[Any], shape: tuple[int, int]) -> tuple:
    """A ``build_store`` tuple input; 2 rows x 5 columns unless said otherwise."""
    return np.array(indptr), np.array(indices), np.array(data), shape


GOOD = ([0, 1, 2], [0, 1], [1.0, 2.0], (2, 5))


def bad_csr(**change: Any) -> tuple:
    parts = dict(zip(("indptr", "indices", "data", "shape"), GOOD))
    parts.update(change)
    return csr(**parts)


def build(matrix: Any, ctx: Ctx, **kw: Any) -> TileStore:
    return build_store(matrix, ctx.tmp / "new", progress=False, **kw)


def graph(n: int, f: int, train: int | None = None, name: str = "g") -> Graph:
    """A labelled graph of ``n`` nodes on a ring, ``f`` features, the first ``train`` in train."""
    ring = np.arange(n)
    adj = sp.csr_array(
        (np.ones(2 * n, np.float32), (np.r_[ring, (ring + 1) % n], np.r_[(ring + 1) % n, ring])),
        shape=(n, n),
    )
    idx = torch.arange(n if train is None else train)
    return Graph(
        name=name,
        num_nodes=n,
        adj=adj,
        x=torch.ones(n, f),
        y=torch.zeros(n, dtype=torch.long),
        train_idx=idx,
        val_idx=torch.arange(n),
        test_idx=torch.arange(n),
        num_classes=2,
    )


def train(g: Graph) -> Any:
    from aires.train import train as run

    return run(g, epochs=2, progress=False)


def conv(**kw: Any) -> AiresGCNConv:
    return AiresGCNConv(4, 2, **kw)


def sparse_adj(shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_coo_tensor(torch.tensor([[0], [1]]), torch.tensor([1.0]), shape)


def occupied(ctx: Ctx) -> Path:
    path = ctx.tmp / "occupied"
    path.mkdir()
    (path / "precious.txt").write_text("keep me")
    return path


def empty_file(ctx: Ctx) -> Path:
    path = ctx.tmp / "empty.txt"
    path.write_text("")
    return path


def graph_with_array_named(ctx: Ctx, key: str) -> Path:
    path = save_graph(graph(6, 2), ctx.tmp / "graph")
    manifest = json.loads((path / "graph.json").read_text())
    manifest["arrays"][key] = {"dtype": "<i8", "shape": [6]}
    (path / "graph.json").write_text(json.dumps(manifest))
    return path


NO_CUDA = torch.cuda.is_available()


# fmt: off
CASES = [
    # ---- malformed CSR into build_store (argument: matrix)
    pytest.param(lambda c: build(bad_csr(indptr=[0, 2, 1, 2], shape=(3, 5)), c), ValueError,
                 r"matrix: indptr decreases at row 1 \(2 -> 1\)", id="csr-indptr-not-monotone"),
    pytest.param(lambda c: build(bad_csr(indptr=[0, 2]), c), ValueError,
                 r"matrix: indptr has length 2, expected rows \+ 1 = 3", id="csr-indptr-short"),
    pytest.param(lambda c: build(bad_csr(indptr=[0, 1, 3]), c), ValueError,
                 r"matrix: indptr must run from 0 to nnz = 2, got 0 \.\. 3", id="csr-indptr-end"),
    pytest.param(lambda c: build(bad_csr(indices=[0, 5]), c), ValueError,
                 r"matrix: column index 5 at position 1 is out of range \[0, 5\)",
                 id="csr-index-out-of-range"),
    pytest.param(lambda c: build(bad_csr(indices=[0, -1]), c), ValueError,
                 r"matrix: column index -1 at position 1 is out of range", id="csr-index-negative"),
    pytest.param(lambda c: build(bad_csr(data=[1.0, np.nan]), c), ValueError,
                 r"matrix: value nan at position 1 is not finite", id="csr-value-nan"),
    pytest.param(lambda c: build(bad_csr(data=[np.inf, 1.0]), c), ValueError,
                 r"matrix: value inf at position 0 is not finite", id="csr-value-inf"),
    pytest.param(lambda c: build(bad_csr(data=[1.0, 1e300]), c), ValueError,
                 r"matrix: value 1e\+300 at position 1 is not finite as float32",
                 id="csr-value-overflows-float32"),
    pytest.param(lambda c: build(bad_csr(indices=[0.0, 1.0]), c), TypeError,
                 r"matrix: indices must have an integer dtype, got float64",
                 id="csr-indices-float"),
    pytest.param(lambda c: build(bad_csr(data=["a", "b"]), c), TypeError,
                 r"matrix: data must be real numbers, got dtype <U1", id="csr-data-strings"),
    pytest.param(lambda c: build(bad_csr(data=[None, None]), c), TypeError,
                 r"matrix: data must be real numbers, got dtype object", id="csr-data-objects"),
    pytest.param(lambda c: build(bad_csr(data=[1.0, 2.0, 3.0]), c), ValueError,
                 r"matrix: data has shape \(3,\), expected \(2,\) like indices",
                 id="csr-data-wrong-length"),
    pytest.param(lambda c: build(bad_csr(shape=(2, -5)), c), ValueError,
                 r"matrix: shape must be two non-negative ints, got \(2, -5\)", id="csr-shape"),
    pytest.param(lambda c: build(np.eye(3), c), TypeError,
                 r"matrix must be a scipy sparse matrix, .* got ndarray", id="csr-dense-array"),
    # ---- malformed CSR into matmul (argument: A)
    pytest.param(lambda c: matmul(csr([0, 1, 2], [0, 1], [1.0, np.nan], (2, 2)), torch.ones(2, 3)),
                 ValueError, r"^A: .*value nan at position 1", id="matmul-A-nan"),
    pytest.param(lambda c: matmul(csr([0, 1, 2], [0, 7], [1.0, 1.0], (2, 2)), torch.ones(2, 3)),
                 ValueError, r"^A: .*column index 7 at position 1", id="matmul-A-index-range"),
    pytest.param(lambda c: matmul(np.eye(3), torch.ones(3, 3)), TypeError,
                 r"^A must be .* got ndarray", id="matmul-A-dense"),
    pytest.param(lambda c: matmul("adjacency", X), TypeError,
                 r"A must be a TileStore or a matrix build_store accepts, got str",
                 id="matmul-A-string"),
    # ---- X and shapes in matmul
    pytest.param(lambda c: matmul(A, torch.ones(40, 3)), ValueError,
                 r"A has shape \(50, 50\) and X has shape \(40, 3\)", id="matmul-shape-mismatch"),
    pytest.param(lambda c: matmul(A, np.ones((50, 3))), TypeError,
                 r"X must be a torch.Tensor, got ndarray", id="matmul-X-numpy"),
    pytest.param(lambda c: matmul(A, torch.ones(50, 3, dtype=torch.long)), TypeError,
                 r"X must have a floating dtype, got torch.int64", id="matmul-X-integer"),
    pytest.param(lambda c: matmul(A, torch.ones(50)), ValueError,
                 r"X must be 2-D, got shape \(50,\)", id="matmul-X-1d"),
    pytest.param(lambda c: matmul(A, torch.ones(50, 0)), ValueError,
                 r"X .*\(50, 0\)", id="matmul-X-zero-features"),
    pytest.param(lambda c: matmul(A, X, out="gpu"), ValueError,
                 r"out must be None or 'host', got 'gpu'", id="matmul-out"),
    pytest.param(lambda c: matmul(A, X, device="cuda"), ValueError,
                 r"device.*cuda", id="matmul-device-without-cuda",
                 marks=pytest.mark.skipif(NO_CUDA, reason="needs a machine without CUDA")),
    # ---- budgets
    pytest.param(lambda c: matmul(A, X, gpu_budget=-1), ValueError,
                 r"gpu_budget must be positive, got -1", id="budget-negative"),
    pytest.param(lambda c: matmul(A, X, gpu_budget=0), ValueError,
                 r"gpu_budget must be positive, got 0", id="budget-zero"),
    pytest.param(lambda c: matmul(A, X, host_budget="-2GiB"), ValueError,
                 r"host_budget must be non-negative, got '-2GiB'", id="host-budget-negative"),
    pytest.param(lambda c: matmul(A, X, gpu_budget="8 GiBs"), ValueError,
                 r"gpu_budget: cannot parse '8 GiBs' as a size", id="budget-unparseable"),
    pytest.param(lambda c: matmul(A, X, gpu_budget=1000), ValueError,
                 r"gpu_budget=1000 bytes \(1000 B\) is below the minimum working set of \d+ "
                 r"bytes", id="budget-below-minimum"),
    pytest.param(lambda c: conv(gpu_budget="1000")(XC, EI), ValueError,
                 r"gpu_budget=1000 bytes .* below the minimum working set of \d+ bytes",
                 id="conv-budget-below-minimum"),
    # ---- size strings
    pytest.param(lambda c: parse_size("8 GiBs", "gpu_budget"), ValueError,
                 r"gpu_budget: cannot parse '8 GiBs' as a size", id="size-8-GiBs"),
    pytest.param(lambda c: parse_size("-1MB", "gpu_budget"), ValueError,
                 r"gpu_budget must be positive, got '-1MB'", id="size-negative"),
    pytest.param(lambda c: parse_size("abc", "host_budget"), ValueError,
                 r"host_budget: cannot parse 'abc' as a size", id="size-abc"),
    # ---- build_store arguments and destination
    pytest.param(lambda c: build(A, c, tile_bytes=1024), ValueError,
                 r"tile_bytes \(1024\) must be at least alignment \(4096\)",
                 id="tile-bytes-below-alignment"),
    pytest.param(lambda c: build(A, c, tile_bytes="abc"), ValueError,
                 r"tile_bytes: cannot parse 'abc' as a size", id="tile-bytes-unparseable"),
    pytest.param(lambda c: build(A, c, tile_bytes=0), ValueError,
                 r"tile_bytes must be positive, got 0", id="tile-bytes-zero"),
    pytest.param(lambda c: build(A, c, alignment=3000), ValueError,
                 r"alignment must be a power of two .*got 3000", id="alignment-not-power-of-two"),
    pytest.param(lambda c: build(A, c, index_dtype="int16"), ValueError,
                 r"index_dtype must be one of int32, int64, got 'int16'", id="index-dtype"),
    pytest.param(lambda c: build(A, c, value_dtype="complex64"), ValueError,
                 r"value_dtype must be one of float16, float32, float64, got 'complex64'",
                 id="value-dtype"),
    pytest.param(lambda c: build_store(A, occupied(c), progress=False), FileExistsError,
                 r"occupied exists and is not empty; pass overwrite=True", id="store-path-occupied"),
    # ---- opening stores
    pytest.param(lambda c: TileStore.open(c.tmp / "nowhere"), FileNotFoundError,
                 r"no tile store at .*nowhere: not a directory", id="store-missing"),
    pytest.param(lambda c: TileStore.open(c.tmp), FileNotFoundError,
                 r"manifest.json: manifest missing", id="store-without-manifest"),
    pytest.param(lambda c: TileStore.open(c.manifest(version=99)), ValueError,
                 r"manifest.json: tile store format version 99 is not supported",
                 id="store-unknown-version"),
    pytest.param(lambda c: TileStore.open(c.manifest(data_file="../x")), ValueError,
                 r"data_file must be a plain file name inside the store, got '\.\./x'",
                 id="store-data-file-parent"),
    pytest.param(lambda c: TileStore.open(c.manifest(data_file="/etc/passwd")), ValueError,
                 r"data_file must be a plain file name inside the store, got '/etc/passwd'",
                 id="store-data-file-absolute"),
    pytest.param(lambda c: TileStore.open(c.store().path, io_threads=0), ValueError,
                 r"io_threads must be positive, got 0", id="store-io-threads"),
    # ---- AiresGCNConv: adjacency, edge_index, edge weights, features
    pytest.param(lambda c: conv()(XC, sparse_adj((5, 6))), ValueError,
                 r"edge_index must be a square adjacency, got shape \(5, 6\)",
                 id="conv-adj-not-square"),
    pytest.param(lambda c: conv()(XC, sparse_adj((6, 6))), ValueError,
                 r"edge_index has 6 nodes but x has 5", id="conv-adj-size-vs-x"),
    pytest.param(lambda c: conv()(XC, torch.zeros(3, 4, dtype=torch.long)), ValueError,
                 r"edge_index must be an integer tensor of shape \[2, E\], got \(3, 4\)",
                 id="conv-edge-index-3-rows"),
    pytest.param(lambda c: conv()(XC, torch.zeros(4, dtype=torch.long)), ValueError,
                 r"edge_index must be an integer tensor of shape \[2, E\], got \(4,\)",
                 id="conv-edge-index-1d"),
    pytest.param(lambda c: conv()(XC, EI.float()), ValueError,
                 r"edge_index must be an integer tensor .* torch.float32",
                 id="conv-edge-index-float"),
    pytest.param(lambda c: conv()(XC, EI.bool()), ValueError,
                 r"edge_index must be an integer tensor .* torch.bool",
                 id="conv-edge-index-bool"),
    pytest.param(lambda c: conv()(XC, torch.tensor([[0, 7], [1, 2]])), ValueError,
                 r"edge_index holds node ids outside \[0, 5\): min 0, max 7",
                 id="conv-edge-index-out-of-range"),
    pytest.param(lambda c: conv()(XC, torch.tensor([[0, -1], [1, 2]])), ValueError,
                 r"edge_index holds node ids outside \[0, 5\): min -1",
                 id="conv-edge-index-negative"),
    pytest.param(lambda c: conv()(XC, EI, torch.ones(3)), ValueError,
                 r"edge_weight must have shape \[4\] \(one per edge\), got \(3,\)",
                 id="conv-edge-weight-length"),
    pytest.param(lambda c: conv()(XC, EI, torch.tensor([1.0, float("nan"), 1.0, 1.0])),
                 ValueError, r"edge_weight.* nan", id="conv-edge-weight-nan"),
    pytest.param(lambda c: conv()(torch.randn(5, 3), EI), ValueError,
                 r"x has 3 features per node but in_channels is 4", id="conv-x-width"),
    pytest.param(lambda c: conv()(torch.randn(5, 0), EI), ValueError,
                 r"x has 0 features per node but in_channels is 4", id="conv-x-zero-features"),
    pytest.param(lambda c: conv()(torch.randn(5), EI), ValueError,
                 r"x must be a dense .* got torch.strided of shape \(5,\)", id="conv-x-1d"),
    pytest.param(lambda c: AiresGCNConv(0, 2), ValueError,
                 r"in_channels must be positive, got 0", id="conv-zero-in-channels"),
    pytest.param(lambda c: conv(gpu_budget="abc"), ValueError,
                 r"gpu_budget: cannot parse 'abc' as a size", id="conv-budget-unparseable"),
    pytest.param(lambda c: conv(gpu_budget=-1), ValueError,
                 r"gpu_budget must be positive, got -1", id="conv-budget-negative"),
    pytest.param(lambda c: conv(tile_bytes=1024)(XC, EI), ValueError,
                 r"tile_bytes \(1024\) must be at least alignment \(4096\)",
                 id="conv-tile-bytes-below-alignment"),
    # ---- training: empty graphs, empty splits, zero features
    pytest.param(lambda c: train(graph(0, 3, name="empty")), ValueError,
                 r"graph 'empty' has no nodes", id="train-empty-graph"),
    pytest.param(lambda c: train(graph(6, 3, train=0, name="nosplit")), ValueError,
                 r"train_idx of graph 'nosplit' is empty", id="train-empty-split"),
    pytest.param(lambda c: train(graph(6, 0, name="zero")), ValueError,
                 r"graph 'zero' has 0 features", id="train-zero-features"),
    # ---- data: graphs on disk, names, generators
    pytest.param(lambda c: open_graph(c.tmp / "nowhere"), FileNotFoundError,
                 r"nowhere is not an on-disk graph: .*graph.json is missing", id="graph-missing"),
    pytest.param(lambda c: open_graph(graph_with_array_named(c, "../../etc/x")), ValueError,
                 r"graph.json: unknown array '\.\./\.\./etc/x'", id="graph-array-path-escape"),
    pytest.param(lambda c: load_graph("bogus"), ValueError,
                 r"name: cannot load 'bogus'", id="graph-unknown-name"),
    pytest.param(lambda c: synthetic("tiny", scale=0), ValueError,
                 r"scale must be a positive finite number, got 0", id="synthetic-scale-zero"),
    # ---- aires CLI
    pytest.param(lambda c: c.cli(aires_main, ["train", "--dataset", "tiny", "--gpu-budget", "abc"]),
                 CliError, r"^aires train: error: argument --gpu-budget: .*cannot parse 'abc'",
                 id="cli-train-budget-abc"),
    pytest.param(lambda c: c.cli(aires_main, ["train", "--dataset", "tiny", "--gpu-budget=-1MB"]),
                 CliError, r"^aires train: error: .*--gpu-budget must be positive, got '-1MB'",
                 id="cli-train-budget-negative"),
    pytest.param(lambda c: c.cli(aires_main, ["train", "--dataset", "tiny",
                                              "--gpu-budget", "8 GiBs"]),
                 CliError, r"^aires train: error: argument --gpu-budget: .*'8 GiBs'",
                 id="cli-train-budget-8-GiBs"),
    pytest.param(lambda c: c.cli(aires_main, ["train", "--dataset", "tiny", "--epochs", "0"]),
                 CliError, r"^aires train: error: argument --epochs: .*got '0'",
                 id="cli-train-epochs-zero"),
    pytest.param(lambda c: c.cli(aires_main, ["train", "--dataset", "/nonexistent"]),
                 CliError, r"^aires train: error: .*'/nonexistent'", id="cli-train-no-dataset"),
    pytest.param(lambda c: c.cli(aires_main, ["train", "--dataset", "tiny", "--epochs", "1",
                                              "--quiet", "--gpu-budget", "1KiB"]),
                 CliError, r"^aires train: error: .*gpu.budget=1024 bytes .*minimum working set "
                 r"of \d+ bytes", id="cli-train-budget-below-minimum"),
    pytest.param(lambda c: c.cli(aires_main, ["tile", "--matrix", "/nonexistent.npz"]),
                 CliError, r"^aires tile: error: .*/nonexistent\.npz", id="cli-tile-no-matrix"),
    pytest.param(lambda c: c.cli(aires_main, ["tile", "--nodes", "10", "--out", str(occupied(c))]),
                 CliError, r"^aires tile: error: .*occupied exists and is not empty",
                 id="cli-tile-out-occupied"),
    pytest.param(lambda c: c.cli(aires_main, ["tile", "--nodes", "10", "--tile-bytes", "1KiB"]),
                 CliError, r"^aires tile: error: .*tile_bytes \(1024\) must be at least "
                 r"alignment", id="cli-tile-bytes-below-alignment"),
    pytest.param(lambda c: c.cli(aires_main, ["data", "describe", "/nonexistent"]),
                 CliError, r"^aires data: error: name: cannot load '/nonexistent'",
                 id="cli-data-describe-missing"),
    pytest.param(lambda c: c.cli(aires_main, ["data", "convert", str(c.tmp / "no.txt"),
                                              "--out", str(c.tmp / "g")]),
                 CliError, r"^aires data: error: edge list .*no\.txt not found",
                 id="cli-data-convert-missing"),
    pytest.param(lambda c: c.cli(aires_main, ["data", "convert", str(empty_file(c)),
                                              "--out", str(c.tmp / "g")]),
                 CliError, r"^aires data: error: .*empty\.txt: the edge list holds no edges",
                 id="cli-data-convert-empty"),
    pytest.param(lambda c: c.cli(aires_main, ["data", "generate", "--preset", "bogus",
                                              "--out", str(c.tmp / "g")]),
                 CliError, r"^aires data: error: unknown preset 'bogus'",
                 id="cli-data-generate-preset"),
    # ---- aires-bench CLI
    pytest.param(lambda c: c.cli(bench_main, ["--methods", "bogus"]), CliError,
                 r"^aires-bench: --methods: .*'bogus'", id="cli-bench-methods-bogus"),
    pytest.param(lambda c: c.cli(bench_main, ["--gpu-budget", "abc"]), CliError,
                 r"^aires-bench: --gpu-budget: cannot parse 'abc'", id="cli-bench-budget-abc"),
    pytest.param(lambda c: c.cli(bench_main, ["--tile-bytes=-1MB"]), CliError,
                 r"^aires-bench: --tile-bytes must be positive, got '-1MB'",
                 id="cli-bench-tile-bytes-negative"),
    pytest.param(lambda c: c.cli(bench_main, ["--epochs", "0"]), CliError,
                 r"^aires-bench: --epochs must be positive, got 0", id="cli-bench-epochs-zero"),
]
# fmt: on


@pytest.fixture(autouse=True)
def graph_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Presets generated by CLI rows go to the test's directory, not ~/.cache."""
    monkeypatch.setenv("AIRES_CACHE", str(tmp_path / "graphs"))


@pytest.mark.parametrize(("call", "error", "message"), CASES)
def test_bad_input(
    call: Callable[[Ctx], object],
    error: type[BaseException],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(error) as caught:
        call(Ctx(tmp_path, capsys))
    text = str(caught.value)
    assert "\n" not in text, f"not a one-line message: {text!r}"
    assert re.search(message, text), f"{message!r} not in {text!r}"


def test_catalogue_is_large_and_ids_unique() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids)) >= 25


def test_the_stated_minimum_budget_is_enough() -> None:
    """A budget below the minimum working set names the minimum, and that minimum works."""
    with pytest.raises(ValueError, match=r"minimum working set of (\d+) bytes") as caught:
        matmul(A, X, gpu_budget=1000)
    minimum = int(re.search(r"minimum working set of (\d+) bytes", str(caught.value))[1])
    y = matmul(A, X, gpu_budget=minimum)
    np.testing.assert_allclose(y.numpy(), A.astype(np.float64) @ X.double().numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="below the minimum working set"):
        matmul(A, X, gpu_budget=minimum - 1)


def test_empty_graph_in_the_layer_gives_an_empty_output() -> None:
    """No nodes at the layer level is a valid degenerate input (as in PyG): an empty result."""
    out = conv()(torch.randn(0, 4), torch.zeros(2, 0, dtype=torch.long))
    assert out.shape == (0, 2)
    y = matmul(sp.csr_array((0, 0), dtype=np.float32), torch.ones(0, 3))
    assert y.shape == (0, 3)


def test_edgeless_adjacency_from_scipy_is_valid() -> None:
    empty = sp.csr_array((5, 5), dtype=np.float32)
    adj_t = torch.sparse_csr_tensor(
        torch.from_numpy(empty.indptr.astype(np.int64)),
        torch.from_numpy(empty.indices.astype(np.int64)),
        torch.from_numpy(empty.data),
        (5, 5),
    )
    layer = conv(bias=False)
    x = torch.randn(5, 4)
    torch.testing.assert_close(layer(x, adj_t), x @ layer.lin.weight.t())  # only self loops


def test_zero_host_budget_accepted_by_the_layer() -> None:
    layer = conv(host_budget=0)
    assert layer(XC, EI).shape == (5, 2)
