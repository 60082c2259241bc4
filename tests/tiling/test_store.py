"""Tile stores: bit-exact round trips, aligned fitting tiles, atomic builds, named corruption."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aires.tiling import TileCorruptError, TileStore, build_store
from aires.tiling import store as store_module
from aires.tiling._layout import array_offsets
from aires.tiling._manifest import MANIFEST_NAME

ROOT = Path(__file__).resolve().parents[2]


def random_csr(
    rng: np.random.Generator,
    shape: tuple[int, int],
    density: float,
    *,
    hubs: tuple[int, ...] = (),
    dtype: type = np.float32,
) -> sp.csr_array:
    """A random CSR with empty rows and columns (density < 1) and the given rows made dense.

    Built from numpy draws so it is the same on every scipy version.
    """
    rows, cols = shape
    cells = rng.choice(rows * cols, int(round(density * rows * cols)), replace=False)
    dense_cells = (np.asarray(hubs, dtype=np.int64)[:, None] * cols + np.arange(cols)).ravel()
    cells = np.union1d(cells, dense_cells).astype(np.int64)
    values = (rng.standard_normal(len(cells)) + 5.0).astype(dtype)
    return sp.csr_array((values, (cells // max(cols, 1), cells % max(cols, 1))), shape=shape)


def eye(n: int) -> sp.csr_array:
    return sp.csr_array(sp.identity(n, dtype=np.float32, format="csr"))


def assert_round_trip(store: TileStore, a: sp.csr_array) -> None:
    """``store`` holds exactly ``a`` (values cast to the store's dtype): bytes, tiles, layout."""
    b = store.to_scipy()
    assert b.shape == a.shape and store.nnz == a.nnz
    assert np.array_equal(b.indptr, a.indptr) and np.array_equal(b.indices, a.indices)
    expected = a.data.astype(store.value_dtype)
    if store.value_dtype == np.float16:  # scipy has no float16; to_scipy widens exactly
        expected = expected.astype(np.float32)
    assert b.data.dtype == expected.dtype
    assert b.data.tobytes() == expected.tobytes()  # bit-exact, not merely close
    partial_sum = {}
    for info in store.tiles:
        assert info.offset % store.alignment == 0 and info.nbytes % store.alignment == 0
        assert info.nbytes <= store.tile_bytes
        tile = store.read_tile(info.index)
        assert tile.indptr.dtype == tile.indices.dtype == store.index_dtype
        block = tile.to_scipy()
        if info.partial:
            partial_sum[info.row_start] = partial_sum.get(info.row_start, 0) + block.toarray()
        else:
            want = a[info.row_start : info.row_stop].toarray().astype(store.value_dtype)
            np.testing.assert_array_equal(block.toarray(), want.astype(block.dtype))
    for row, dense in partial_sum.items():
        want = a[[row]].toarray()[0].astype(store.value_dtype).astype(dense.dtype)
        np.testing.assert_array_equal(dense[0], want)


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(0, 60),
    cols=st.integers(0, 3000),
    density=st.floats(0, 0.3),
    hub=st.booleans(),
    tile_bytes=st.sampled_from([4096, 8192, 3 * 4096]),
    index_dtype=st.sampled_from([None, np.int32, np.int64]),
    value_dtype=st.sampled_from([None, np.float32, np.float64, np.float16]),
    seed=st.integers(0, 2**16),
)
def test_round_trip_is_bit_exact(
    rows: int,
    cols: int,
    density: float,
    hub: bool,
    tile_bytes: int,
    index_dtype: type | None,
    value_dtype: type | None,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    hubs = (rows // 2,) if hub and rows and cols else ()
    a = random_csr(rng, (rows, cols), density, hubs=hubs, dtype=np.float64)
    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(
            a,
            Path(tmp) / "s",
            tile_bytes=tile_bytes,
            index_dtype=index_dtype,
            value_dtype=value_dtype,
            progress=False,
        )
        with store:
            assert store.index_dtype == np.dtype(index_dtype or np.int32)
            assert store.value_dtype == np.dtype(value_dtype or np.float32)
            assert_round_trip(store, a)
            store.verify()


def input_forms(a: sp.csr_array, tmp_path: Path) -> dict[str, object]:
    """The same matrix in every accepted representation."""
    arrays = {}
    for name, arr in (
        ("indptr", a.indptr.astype(np.int64)),
        ("indices", a.indices),
        ("data", a.data),
    ):
        arrays[name] = np.lib.format.open_memmap(
            tmp_path / f"{name}.npy", "w+", arr.dtype, arr.shape
        )
        arrays[name][:] = arr
    dense = torch.from_numpy(a.toarray())
    return {
        "csr_array": a,
        "csr_matrix": sp.csr_matrix(a),
        "coo_array": a.tocoo(),
        "csc_matrix": sp.csc_matrix(a),
        "torch_csr": dense.to_sparse_csr(),
        "torch_coo": dense.to_sparse_coo(),
        "memmaps": (arrays["indptr"], arrays["indices"], arrays["data"], a.shape),
        "lists": (a.indptr.tolist(), a.indices.tolist(), a.data.tolist(), list(a.shape)),
    }


@pytest.mark.parametrize(
    "form",
    [
        "csr_array",
        "csr_matrix",
        "coo_array",
        "csc_matrix",
        "torch_csr",
        "torch_coo",
        "memmaps",
        "lists",
    ],
)
def test_every_input_form(tmp_path: Path, form: str) -> None:
    a = random_csr(np.random.default_rng(0), (300, 1000), 0.01, hubs=(7,))
    store = build_store(
        input_forms(a, tmp_path)[form], tmp_path / "s", tile_bytes=4096, progress=False
    )
    assert len(store) > 5 and any(t.partial for t in store.tiles)
    assert_round_trip(store, a)


def test_columns_past_int32_force_int64(tmp_path: Path) -> None:
    cols = 2**31 + 10
    indptr = np.array([0, 2, 2, 3], dtype=np.int64)
    indices = np.array([0, 2**31 + 4, 2**31 + 9], dtype=np.int64)
    data = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    store = build_store((indptr, indices, data, (3, cols)), tmp_path / "s", progress=False)
    assert store.index_dtype == np.int64 and store.shape == (3, cols)
    b = store.to_scipy()
    assert np.array_equal(b.indices, indices) and np.array_equal(b.indptr, indptr)
    tile = store.read_tile(0).to_torch()
    assert tile.shape == (3, cols) and tile.col_indices().tolist() == indices.tolist()
    with pytest.raises(ValueError, match="index_dtype=int32 cannot hold column indices"):
        build_store(
            (indptr, indices, data, (3, cols)), tmp_path / "t", index_dtype=np.int32, progress=False
        )


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (5, 0), (7, 9)])
def test_empty_matrices(tmp_path: Path, shape: tuple[int, int]) -> None:
    a = sp.csr_array(shape, dtype=np.float32)
    store = build_store(a, tmp_path / "s", progress=False)
    assert store.nnz == 0 and len(store) == (1 if shape[0] else 0)
    assert store.data_path.stat().st_size == sum(t.nbytes for t in store.tiles)
    assert_round_trip(store, a)
    store.verify()


def test_single_row_and_hub_many_times_a_tile(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    single = random_csr(rng, (1, 40), 0.5)
    assert_round_trip(build_store(single, tmp_path / "one", progress=False), single)
    a = random_csr(rng, (50, 20_000), 0.001, hubs=(0, 20, 21, 49))  # 160 KB rows, 4 KiB tiles
    store = build_store(a, tmp_path / "hub", tile_bytes=4096, progress=False)
    pieces = [t for t in store.tiles if t.partial]
    assert {t.row_start for t in pieces} == {0, 20, 21, 49} and len(pieces) >= 4 * 40
    assert_round_trip(store, a)


def test_memmap_input_is_streamed(tmp_path: Path) -> None:
    """A memmapped matrix is tiled with a few tiles of extra memory, not a copy of it."""
    rng = np.random.default_rng(2)
    rows, nnz = 100_000, 4_000_000
    indptr = np.lib.format.open_memmap(tmp_path / "p.npy", "w+", np.int64, (rows + 1,))
    indptr[:] = np.linspace(0, nnz, rows + 1).astype(np.int64)
    indices = np.lib.format.open_memmap(tmp_path / "i.npy", "w+", np.int64, (nnz,))
    indices[:] = rng.integers(0, rows, nnz)
    data = np.lib.format.open_memmap(tmp_path / "d.npy", "w+", np.float64, (nnz,))
    data[:] = rng.random(nnz)
    tracemalloc.start()
    try:
        store = build_store(
            (indptr, indices, data, (rows, rows)),
            tmp_path / "s",
            tile_bytes="256KiB",
            progress=False,
        )
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    matrix_bytes = indptr.nbytes + indices.nbytes + data.nbytes  # 64 MB
    assert peak < 24 * 256 * 1024, f"peak {peak} bytes while tiling a {matrix_bytes} byte matrix"
    assert len(store) > 100
    b = store.to_scipy()
    assert np.array_equal(b.indices, indices) and np.array_equal(b.data, data.astype(np.float32))


def test_progress_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build_store(eye(50), tmp_path / "s", progress=True)
    assert "tiling s" in capsys.readouterr().err


# ---------------------------------------------------------------------- reading into buffers
@pytest.fixture
def store(tmp_path: Path) -> TileStore:
    a = random_csr(np.random.default_rng(3), (400, 300), 0.05, hubs=(100,))
    return build_store(a, tmp_path / "s", tile_bytes=8192, progress=False)


def test_read_bytes_into_every_host_buffer(store: TileStore) -> None:
    raw = store.data_path.read_bytes()
    for info in store.tiles:
        want = raw[info.offset : info.offset + info.nbytes]
        numpy_out = np.zeros(store.tile_bytes + 100, dtype=np.uint8)
        torch_out = torch.zeros(store.tile_bytes, dtype=torch.uint8)
        assert store.read_bytes(info.index, numpy_out) == info.nbytes
        store.read_bytes(info.index, torch_out, verify=False)
        assert (
            numpy_out[: info.nbytes].tobytes() == want == torch_out[: info.nbytes].numpy().tobytes()
        )
        views = store.tile_arrays(info.index, torch_out)
        assert all(isinstance(v, torch.Tensor) for v in views)
        for v, w in zip(views, store.tile_arrays(info.index, numpy_out)):
            assert np.array_equal(v.numpy(), w)


def test_read_tile_into_caller_buffer(store: TileStore) -> None:
    slot = torch.empty(store.max_tile_nbytes, dtype=torch.uint8)
    a = store.to_scipy()
    tile = store.read_tile(0, out=slot)
    assert isinstance(tile.data, torch.Tensor) and tile.data.data_ptr() == slot.data_ptr() + (
        array_offsets(tile.shape[0], tile.nnz, 4, 4)[1]
    )
    np.testing.assert_array_equal(
        tile.to_torch().to_dense().numpy(), a[tile.row_start : tile.row_stop].toarray()
    )


@pytest.mark.parametrize(
    ("out", "error", "message"),
    [
        (np.zeros(10, np.uint8), ValueError, "out holds 10 bytes, but tile 0 needs"),
        (np.zeros(8192, np.int8), TypeError, "out must have dtype uint8"),
        (np.zeros(16384, np.uint8)[::2], ValueError, "out must be a contiguous, writable array"),
        (torch.zeros(8192, dtype=torch.float32), TypeError, "out must have dtype torch.uint8"),
        (bytearray(8192), TypeError, "out must be a numpy array or a torch tensor, got bytearray"),
    ],
)
def test_bad_out_buffers(store: TileStore, out: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        store.read_bytes(0, out)


def test_tile_index_checked(store: TileStore) -> None:
    with pytest.raises(IndexError, match=f"tile index {len(store)} out of range"):
        store.tile_info(len(store))
    with pytest.raises(IndexError, match="tile index -1 out of range"):
        store.read_tile(-1)
    with pytest.raises(TypeError, match="tile index must be an int"):
        store.tile_info(1.0)  # type: ignore[arg-type]


def test_reopen_describes_the_same_store(store: TileStore) -> None:
    again = TileStore.open(store.path)
    assert again.tiles == store.tiles and again.shape == store.shape and again.nnz == store.nnz
    assert again.io_mode in ("posix", "kvikio-compat", "gds")
    assert "TileStore(" in repr(again) and again.symmetric is None


# ---------------------------------------------------------------------- corruption and faults
@pytest.mark.parametrize("where", ["indptr", "indices", "data", "padding"])
def test_flipped_byte_names_the_tile(store: TileStore, where: str) -> None:
    isz, vsz = store.index_dtype.itemsize, store.value_dtype.itemsize
    path = store.data_path
    for info in store.tiles:
        indices_offset, data_offset, end = array_offsets(info.n_rows, info.nnz, isz, vsz)
        position = {
            "indptr": 1,
            "indices": indices_offset + max(info.nnz - 1, 0) * isz,
            "data": data_offset + max(info.nnz - 1, 0) * vsz,
            "padding": info.nbytes - 1,
        }[where]
        with open(path, "r+b") as f:
            f.seek(info.offset + position)
            byte = f.read(1)[0]
            f.seek(info.offset + position)
            f.write(bytes([byte ^ 0x10]))
        buf = np.empty(store.tile_bytes, np.uint8)
        with pytest.raises(
            TileCorruptError, match=rf"tile {info.index} of {path} is corrupt"
        ) as caught:
            store.read_bytes(info.index, buf)
        assert caught.value.tile == info.index and caught.value.path == path
        with pytest.raises(TileCorruptError, match=rf"tile {info.index} of "):
            store.verify()
        other = (info.index + 1) % len(store)
        store.read_bytes(other, buf)  # the other tiles still read
        store.read_bytes(info.index, buf, verify=False)  # opting out skips the check
        with open(path, "r+b") as f:
            f.seek(info.offset + position)
            f.write(bytes([byte]))
    store.verify()


def test_truncated_data_file(store: TileStore) -> None:
    path = store.data_path
    size = path.stat().st_size
    last = store.tiles[-1]
    os.truncate(path, size - 100)
    with pytest.raises(
        TileCorruptError, match=rf"tile {last.index} of {path}: the data file ends inside it"
    ):
        store.read_bytes(last.index, np.empty(store.tile_bytes, np.uint8))
    message = (
        rf"{path}: data file has {size - 100} bytes, expected {size} "
        rf"\(truncated, tile {last.index} onwards"
    )
    with pytest.raises(TileCorruptError, match=message) as caught:
        TileStore.open(store.path)
    assert caught.value.tile == last.index


def test_missing_pieces(store: TileStore) -> None:
    store.data_path.unlink()
    with pytest.raises(FileNotFoundError, match="data file missing"):
        TileStore.open(store.path)
    (store.path / MANIFEST_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="manifest missing"):
        TileStore.open(store.path)
    with pytest.raises(FileNotFoundError, match="no tile store at"):
        TileStore.open(store.path / "nothing")


def test_unknown_manifest_version(store: TileStore) -> None:
    manifest = store.path / MANIFEST_NAME
    obj = json.loads(manifest.read_bytes())
    manifest.write_text(json.dumps({**obj, "version": 7}))
    with pytest.raises(ValueError, match="tile store format version 7 is not supported"):
        TileStore.open(store.path)


KILLED_BUILD = """
import os, sys, time
import numpy as np
from aires.tiling import build_store

real_pwrite = os.pwrite
def pwrite_then_hang(fd, data, offset):
    written = real_pwrite(fd, data, offset)
    open(sys.argv[2], "w").close()
    time.sleep(120)
    return written
os.pwrite = pwrite_then_hang
rng = np.random.default_rng(0)
indptr = np.arange(0, 40_001, 20)
a = (indptr, rng.integers(0, 2000, 40_000), rng.random(40_000, dtype=np.float32), (2000, 2000))
build_store(a, sys.argv[1], tile_bytes=4096, progress=False)
"""


def kill_build_at_marker(script: str, target: Path, marker: Path, moment: str) -> None:
    """Run the build ``script`` (argv: target, marker) and SIGKILL it once ``marker`` exists.

    ``moment`` names what the marker stands for, in the failure messages.
    """
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(target), str(marker)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, f"the build subprocess died before {moment}"
            assert time.monotonic() < deadline, f"the build subprocess did not reach {moment} in 60 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()


def test_killed_build_leaves_no_store(tmp_path: Path) -> None:
    target, marker = tmp_path / "s", tmp_path / "written"
    kill_build_at_marker(KILLED_BUILD, target, marker, "writing a tile")
    assert not target.exists()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".s.tmp-")]
    assert len(leftovers) == 1 and (leftovers[0] / "tiles.bin").exists()
    with pytest.raises(FileNotFoundError):
        TileStore.open(target)
    a = random_csr(np.random.default_rng(0), (2000, 2000), 0.01)
    assert_round_trip(build_store(a, target, tile_bytes=4096, progress=False), a)
    assert not leftovers[0].exists()  # the rerun removed the dead build's directory


def test_existing_path_refused_unless_overwrite(tmp_path: Path) -> None:
    a = eye(10)
    b = random_csr(np.random.default_rng(0), (10, 10), 0.5)
    (tmp_path / "empty").mkdir()
    build_store(a, tmp_path / "empty", progress=False)  # an empty directory is fine
    (tmp_path / "file").write_text("precious")
    for path in (tmp_path / "empty", tmp_path / "file"):
        with pytest.raises(FileExistsError, match="exists and is not empty; pass overwrite=True"):
            build_store(b, path, progress=False)
    assert (tmp_path / "file").read_text() == "precious"
    assert_round_trip(TileStore.open(tmp_path / "empty"), a)
    for path in (tmp_path / "empty", tmp_path / "file"):
        assert_round_trip(build_store(b, path, overwrite=True, progress=False), b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file"]


def test_write_error_removes_the_partial_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full_disk(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(
        OSError, match=r"writing tile \d+ to .*tiles.bin failed: No space left on device"
    ) as caught:
        build_store(eye(100), tmp_path / "s", tile_bytes=4096, progress=False)
    assert caught.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_not_enough_space_is_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "statvfs", lambda _: mock.Mock(f_bavail=1, f_frsize=4096))
    with pytest.raises(
        OSError,
        match=r"not enough free space in .* for a tile store of \d+ bytes \(4096 bytes free\)",
    ):
        build_store(eye(10_000), tmp_path / "s", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_stale_temporary_directories_are_removed(tmp_path: Path) -> None:
    dead = tmp_path / ".s.tmp-4194999-abc"  # above Linux's largest pid: no such process
    alive = tmp_path / f".s.tmp-{os.getpid()}-keep"
    dead.mkdir()
    alive.mkdir()
    build_store(eye(3), tmp_path / "s", progress=False)
    assert not dead.exists() and alive.exists()


@pytest.mark.parametrize(
    ("matrix", "error", "message"),
    [
        (
            (np.array([0, 1, 2]), np.array([0, 5]), np.ones(2), (2, 5)),
            ValueError,
            r"matrix: column index 5 at position 1 is out of range \[0, 5\)",
        ),
        (
            (np.array([0, 1, 2]), np.array([0, -1]), np.ones(2), (2, 5)),
            ValueError,
            "column index -1 at position 1",
        ),
        (
            (np.array([0, 1, 2]), np.array([0, 1]), np.array([1.0, np.nan]), (2, 5)),
            ValueError,
            "value nan at position 1 is not finite as float32",
        ),
        (
            (np.array([0, 1, 2]), np.array([0, 1]), np.array([1.0, 1e300]), (2, 5)),
            ValueError,
            "value 1e[+]300 at position 1 is not finite as float32",
        ),
        (
            (np.array([0, 2, 1, 2]), np.array([0, 1]), np.ones(2), (3, 5)),
            ValueError,
            r"indptr decreases at row 1 \(2 -> 1\)",
        ),
        (
            (np.array([0, 1, 3]), np.array([0, 1]), np.ones(2), (2, 5)),
            ValueError,
            "indptr must run from 0 to nnz = 2",
        ),
        (
            (np.array([0, 1]), np.array([0, 1]), np.ones(2), (2, 5)),
            ValueError,
            "indptr has length 2, expected rows [+] 1 = 3",
        ),
        ((np.array([0, 2]), np.array([0, 1]), np.ones(3), (1, 5)), ValueError, "data has shape"),
        (
            (np.array([0, 2]), np.array([0.0, 1.0]), np.ones(2), (1, 5)),
            TypeError,
            "indices must have an integer dtype",
        ),
        (
            (np.array([0, 2]), np.array([0, 1]), np.ones(2, complex), (1, 5)),
            TypeError,
            "data must be real numbers",
        ),
        (
            (np.array([0, 2]), np.array([0, 1]), np.ones(2), (1, -5)),
            ValueError,
            "shape must be two non-negative ints",
        ),
        ((np.array([0, 2]), np.array([0, 1]), np.ones(2), 5), ValueError, "shape must be"),
        (torch.eye(3), TypeError, "dense torch tensor"),
        (np.eye(3), TypeError, "matrix must be a scipy sparse matrix"),
    ],
)
def test_invalid_matrices_leave_nothing(
    tmp_path: Path, matrix: object, error: type, message: str
) -> None:
    with pytest.raises(error, match=message):
        build_store(matrix, tmp_path / "s", tile_bytes=4096, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_bad_build_arguments(tmp_path: Path) -> None:
    a = eye(3)
    with pytest.raises(TypeError, match="symmetric must be True, False or None"):
        build_store(a, tmp_path / "s", symmetric="yes", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alignment must be a power of two"):
        build_store(a, tmp_path / "s", alignment=3000, progress=False)
    with pytest.raises(ValueError, match="io_threads must be positive"):
        TileStore.open(build_store(a, tmp_path / "s", progress=False).path, io_threads=0)


# ---------------------------------------------------------------------- transpose
def test_transpose_built_once_and_reopened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = random_csr(np.random.default_rng(4), (120, 90), 0.1)
    store = build_store(a, tmp_path / "s", tile_bytes=4096, progress=False)
    t = store.transpose()
    assert t.path == tmp_path / "s.T" and t.tile_bytes == store.tile_bytes
    assert_round_trip(t, sp.csr_array(a.T))
    monkeypatch.setattr(store_module, "_build", mock.Mock(side_effect=AssertionError("rebuilt")))
    assert store.transpose().tiles == t.tiles
    assert TileStore.open(store.path).transpose().path == t.path


def test_stale_transpose_is_rebuilt(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    a, b = random_csr(rng, (60, 40), 0.1), random_csr(rng, (60, 40), 0.1)
    build_store(a, tmp_path / "s", progress=False).transpose()
    store = build_store(b, tmp_path / "s", overwrite=True, progress=False)
    assert_round_trip(store.transpose(), sp.csr_array(b.T))


def test_symmetric_store_is_its_own_transpose(tmp_path: Path) -> None:
    half = random_csr(np.random.default_rng(6), (30, 30), 0.2)
    a = sp.csr_array(half + half.T)
    store = build_store(a, tmp_path / "s", symmetric=True, progress=False)
    assert store.symmetric is True and store.transpose() is store
    assert TileStore.open(tmp_path / "s").symmetric is True


def symmetric_csr(seed: int, n: int = 40, density: float = 0.15) -> sp.csr_array:
    """``H + H^T`` for a random ``H`` with a dense hub row (so tiles split it), plus the diagonal."""
    half = random_csr(np.random.default_rng(seed), (n, n), density, hubs=(3,))
    return sp.csr_array(half + half.T + eye(n))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    tile_bytes=st.sampled_from([768, 1024, 4096]),
    change=st.sampled_from(["value", "drop", "move", "none"]),
)
def test_symmetric_flag_is_checked(seed: int, tile_bytes: int, change: str) -> None:
    """build_store(symmetric=True) accepts exactly the matrices scipy finds equal to their
    transpose, whatever the tiling (hub rows split over tiles included), and leaves nothing on
    disk when it refuses one."""
    a = symmetric_csr(seed).tocoo()
    rng = np.random.default_rng(seed)
    off_diagonal = np.flatnonzero(a.row != a.col)
    k = int(rng.choice(off_diagonal)) if change == "value" else int(rng.integers(a.nnz))
    row, col, data = a.row.copy(), a.col.copy(), a.data.copy()
    if change == "value":
        data[k] = np.nextafter(data[k], np.float32(np.inf))  # one ulp: still a change
    elif change == "drop":
        row, col, data = np.delete(row, k), np.delete(col, k), np.delete(data, k)
    elif change == "move":
        col[k] = (col[k] + 1) % a.shape[1]
    b = sp.csr_array(sp.coo_array((data, (row, col)), shape=a.shape))
    b.sum_duplicates()
    expected_symmetric = (b != b.T).nnz == 0
    options = {"tile_bytes": tile_bytes, "alignment": 256, "progress": False}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "s"
        if expected_symmetric:
            store = build_store(b, path, symmetric=True, **options)
            assert store.symmetric is True
            assert_round_trip(store, b)
        else:
            with pytest.raises(ValueError, match="symmetric=True, but matrix is not symmetric"):
                build_store(b, path, symmetric=True, **options)
            assert list(Path(tmp).iterdir()) == []
    # The untouched matrix is symmetric; an off-diagonal value change never is.
    assert change != "none" or expected_symmetric
    assert change != "value" or not expected_symmetric


def test_symmetric_check_ignores_explicit_zeros_and_signed_zero(tmp_path: Path) -> None:
    """Values are compared as numbers: an explicit zero is no entry, and -0.0 equals 0.0."""
    rows, cols = np.array([0, 1, 2, 0, 1]), np.array([1, 0, 0, 0, 1])
    data = np.array([2.0, 2.0, 0.0, 0.0, -0.0], dtype=np.float32)
    a = sp.csr_array((data, (rows, cols)), shape=(3, 3))
    assert build_store(a, tmp_path / "s", symmetric=True, progress=False).symmetric is True


def test_symmetric_flag_on_a_non_square_matrix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"matrix has shape \(3, 4\): it is not square"):
        build_store(sp.csr_array((3, 4), dtype=np.float32), tmp_path / "s", symmetric=True)


def test_transpose_never_overwrites_other_stores(tmp_path: Path) -> None:
    a = eye(4)
    store = build_store(a, tmp_path / "s", progress=False)
    build_store(a, tmp_path / "other", progress=False)
    with pytest.raises(FileExistsError, match="holds a tile store that is not a transpose"):
        store.transpose(tmp_path / "other")


# ---------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_read_bytes_into_cuda_equals_posix(store: TileStore) -> None:
    """KvikIO (GDS or compatibility mode) or the pinned bounce path: the same bytes as POSIX."""
    host = np.empty(store.max_tile_nbytes, np.uint8)
    device = torch.empty(store.max_tile_nbytes, dtype=torch.uint8, device="cuda")
    for info in store.tiles:
        store.read_bytes(info.index, host)
        store.read_bytes(info.index, device)
        assert device[: info.nbytes].cpu().numpy().tobytes() == host[: info.nbytes].tobytes()
    print(f"io_mode={store.io_mode}")


@pytest.mark.gpu
def test_bounce_path_equals_posix(store: TileStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "_io_mode", "posix")
    test_read_bytes_into_cuda_equals_posix(store)


@pytest.mark.gpu
def test_tile_arrays_over_cuda_give_the_right_torch_csr(store: TileStore) -> None:
    a = store.to_scipy()
    slot = torch.empty(store.max_tile_nbytes, dtype=torch.uint8, device="cuda")
    for info in store.tiles:
        tile = store.read_tile(info.index, out=slot)
        assert tile.indptr.device.type == "cuda"
        dense = tile.to_torch().to_dense().cpu().numpy()
        if not info.partial:
            np.testing.assert_array_equal(dense, a[info.row_start : info.row_stop].toarray())
        np.testing.assert_array_equal(tile.to_scipy().toarray(), dense)


@pytest.mark.gpu
def test_cuda_corruption_is_caught(store: TileStore) -> None:
    info = store.tiles[1]
    with open(store.data_path, "r+b") as f:
        f.seek(info.offset + 3)
        f.write(b"\xff")
    slot = torch.empty(store.max_tile_nbytes, dtype=torch.uint8, device="cuda")
    with pytest.raises(TileCorruptError, match=f"tile 1 of {store.data_path}"):
        store.read_bytes(1, slot)
