"""File readers: every path returns the file's bytes exactly, at odd sizes and offsets."""

from __future__ import annotations

import importlib.util
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from aires.tiling.reader import KvikioReader, PosixReader, io_mode

HAS_KVIKIO = importlib.util.find_spec("kvikio") is not None
needs_kvikio = pytest.mark.skipif(not HAS_KVIKIO, reason="KvikIO is not installed")

# (offset, nbytes): aligned, odd, spanning many tasks, empty, the whole file's tail.
SPANS = [(0, 4096), (1, 1), (12_345, 300_001), (0, 0), (4096 * 7, 1_000_003 - 4096 * 7)]


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, bytes]:
    raw = np.random.default_rng(0).integers(0, 256, 1_000_003, dtype=np.uint8).tobytes()
    path = tmp_path / "blob.bin"
    path.write_bytes(raw)
    return path, raw


@pytest.mark.parametrize("threads", [1, 4])
@pytest.mark.parametrize("task_size", [4097, 1 << 20])
def test_posix_read_is_exact(blob: tuple[Path, bytes], threads: int, task_size: int) -> None:
    path, raw = blob
    reader = PosixReader(path, threads=threads, task_size=task_size)
    try:
        for offset, nbytes in SPANS:
            out = np.full(nbytes + 5, 7, dtype=np.uint8)
            crc = reader.read(offset, nbytes, out, checksum=True)
            assert out[:nbytes].tobytes() == raw[offset : offset + nbytes]
            assert (out[nbytes:] == 7).all()
            assert crc == zlib.crc32(raw[offset : offset + nbytes])
            assert reader.read(offset, nbytes, out) is None
    finally:
        reader.close()


@pytest.mark.parametrize("task_size", [4097, 1 << 20])
def test_posix_read_past_end_names_the_file(blob: tuple[Path, bytes], task_size: int) -> None:
    path, raw = blob
    reader = PosixReader(path, threads=4, task_size=task_size)
    out = np.empty(200_000, dtype=np.uint8)
    with pytest.raises(EOFError, match=f"{path}: file ends at byte {len(raw)}"):
        reader.read(len(raw) - 100_000, 200_000, out)
    reader.close()


def test_bad_reader_arguments(blob: tuple[Path, bytes]) -> None:
    with pytest.raises(ValueError, match="threads must be positive, got 0"):
        PosixReader(blob[0], threads=0)
    with pytest.raises(TypeError, match="task_size must be an int"):
        PosixReader(blob[0], task_size=1.5)  # type: ignore[arg-type]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_io_mode_without_cuda_is_posix() -> None:
    assert io_mode() == "posix"


@pytest.mark.skipif(HAS_KVIKIO, reason="checks the message shown when KvikIO is missing")
def test_kvikio_reader_without_kvikio_names_the_extra(blob: tuple[Path, bytes]) -> None:
    with pytest.raises(ImportError, match=r"pip install aires\[gpu\]"):
        KvikioReader(blob[0])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_posix_bounce_read_is_exact(blob: tuple[Path, bytes], device: str) -> None:
    path, raw = blob
    reader = PosixReader(path, threads=4, task_size=4097)
    try:
        for offset, nbytes in SPANS:  # the bounce buffer grows twice and is reused between
            out = torch.zeros(nbytes + 5, dtype=torch.uint8, device=device)
            crc = reader.read_to_tensor(offset, nbytes, out, checksum=True)
            assert out[:nbytes].cpu().numpy().tobytes() == raw[offset : offset + nbytes]
            assert crc == zlib.crc32(raw[offset : offset + nbytes])
    finally:
        reader.close()


@pytest.mark.gpu
@needs_kvikio
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_kvikio_read_is_exact(blob: tuple[Path, bytes], device: str) -> None:
    path, raw = blob
    reader = KvikioReader(path, threads=8)
    try:
        for offset, nbytes in SPANS:
            if nbytes == 0:
                continue
            out = torch.zeros(nbytes, dtype=torch.uint8, device=device)
            reader.read(offset, nbytes, out if device == "cuda" else out.numpy())
            assert out.cpu().numpy().tobytes() == raw[offset : offset + nbytes]
    finally:
        reader.close()
    assert io_mode() in ("gds", "kvikio-compat")


@pytest.mark.gpu
@needs_kvikio
def test_kvikio_threads_set_while_open_and_restored(blob: tuple[Path, bytes]) -> None:
    import gc

    import kvikio.defaults

    gc.collect()  # readers of stores earlier tests dropped give their requests back first
    before = kvikio.defaults.get("num_threads")
    wanted = before + 3
    first = KvikioReader(blob[0], threads=wanted)
    second = KvikioReader(blob[0], threads=wanted)
    assert kvikio.defaults.get("num_threads") == wanted
    first.close()
    assert kvikio.defaults.get("num_threads") == wanted  # still in use by ``second``
    second.close()
    second.close()  # closing twice is harmless
    assert kvikio.defaults.get("num_threads") == before


class _FakeDefaults:
    """``kvikio.defaults`` of KvikIO >= 24.12: ``set`` applies at once and returns a context."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.sets: list[int] = []

    def get(self, name: str) -> int:
        assert name == "num_threads"
        return self.threads

    def set(self, config: dict[str, int]) -> None:
        self.threads = config["num_threads"]
        self.sets.append(self.threads)


class _FakeCuFile:
    def __init__(self, path: Path, mode: str) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_kvikio(monkeypatch: pytest.MonkeyPatch) -> _FakeDefaults:
    from types import SimpleNamespace

    from aires.tiling import reader

    defaults = _FakeDefaults(threads=1)
    module = SimpleNamespace(defaults=defaults, CuFile=_FakeCuFile)
    monkeypatch.setattr(reader, "_import_kvikio", lambda required: module)
    # Real readers (stores other tests opened on a GPU machine) are not this fake's business.
    monkeypatch.setattr(reader, "_THREADS", reader._ThreadRequests())
    return defaults


def test_kvikio_threads_follow_the_largest_open_request(
    blob: tuple[Path, bytes], fake_kvikio: _FakeDefaults
) -> None:
    # The GPU log's failure: a reader already open at 16 threads (a store left open) made a
    # later reader asking for 19 keep 16.
    first = KvikioReader(blob[0], threads=16)
    second = KvikioReader(blob[0], threads=19)
    assert fake_kvikio.threads == 19
    third = KvikioReader(blob[0], threads=4)
    assert fake_kvikio.threads == 19
    second.close()  # out of order: the largest request still open wins
    assert fake_kvikio.threads == 16
    first.close()
    first.close()  # closing twice is harmless
    assert fake_kvikio.threads == 4
    third.close()
    assert fake_kvikio.threads == 1  # the value before the first reader opened


def test_kvikio_reader_dropped_without_close_gives_its_threads_back(
    blob: tuple[Path, bytes], fake_kvikio: _FakeDefaults
) -> None:
    import gc

    reader = KvikioReader(blob[0], threads=7)
    assert fake_kvikio.threads == 7
    del reader
    gc.collect()
    assert fake_kvikio.threads == 1
    assert fake_kvikio.sets == [7, 1]  # no needless pool resets
