"""Tile store faults: every corrupted byte named, cut files, links out, full disks, kills, races.

The single-fault tests (a flipped byte in each array of each tile, a truncated data file, a
missing manifest or data file, a build killed by SIGKILL after its first write, a failed
``pwrite``) live in ``test_store.py``; these add the exhaustive and the multi-process ones.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from aires.tiling import TileCorruptError, TileStore, build_store

from .test_store import assert_round_trip, kill_build_at_marker, random_csr

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.fixture
def store(tmp_path: Path) -> TileStore:
    """Five 4 KiB tiles or so, one of them a piece of a split hub row."""
    a = random_csr(np.random.default_rng(7), (300, 1000), 0.008, hubs=(120,))
    return build_store(a, tmp_path / "s", tile_bytes=4096, progress=False)


def test_every_byte_of_every_tile_is_checked(store: TileStore) -> None:
    """A flip of any byte of the data file (arrays, padding) is caught and names its tile.

    CRC-32 catches every burst error of up to 32 bits, so this holds for any corruption of up to
    four consecutive bytes; the test tries every byte position.
    """
    tiles = store.tiles
    assert sum(t.nbytes for t in tiles) == store.data_path.stat().st_size  # no unchecked bytes
    assert len(tiles) >= 4 and any(t.partial for t in tiles)
    owner = np.repeat(np.arange(len(tiles)), [t.nbytes for t in tiles])
    buf = np.empty(store.max_tile_nbytes, np.uint8)
    fd = os.open(store.data_path, os.O_RDWR)
    try:
        for position in range(len(owner)):
            byte = os.pread(fd, 1, position)[0]
            os.pwrite(fd, bytes([byte ^ 0xA5]), position)
            tile = int(owner[position])
            with pytest.raises(TileCorruptError, match=rf"^tile {tile} of ") as caught:
                store.read_bytes(tile, buf)
            assert caught.value.tile == tile
            if position % 1021 == 0:  # verify() reads everything: a sample of positions
                with pytest.raises(TileCorruptError, match=rf"^tile {tile} of "):
                    store.verify()
            os.pwrite(fd, bytes([byte]), position)
    finally:
        os.close(fd)
    store.verify()


def test_truncation_at_every_tile_names_the_first_tile_cut(store: TileStore) -> None:
    whole = store.data_path.read_bytes()
    for info in store.tiles:
        store.data_path.write_bytes(whole[: info.offset + 1])
        with pytest.raises(TileCorruptError, match=rf"truncated, tile {info.index} onwards"):
            TileStore.open(store.path)
    store.data_path.write_bytes(whole + b"\0")
    with pytest.raises(TileCorruptError, match=r"\(trailing bytes\)"):
        TileStore.open(store.path)
    store.data_path.write_bytes(whole)
    TileStore.open(store.path).verify()


def test_data_file_linked_outside_the_store_is_refused(store: TileStore, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.bin"
    store.data_path.rename(outside)
    store.data_path.symlink_to(outside)
    with pytest.raises(ValueError, match=r"tiles.bin: data file is a link to .*elsewhere.bin"):
        TileStore.open(store.path)
    store.data_path.unlink()
    outside.rename(store.data_path)
    linked_dir = tmp_path / "linked"
    linked_dir.symlink_to(store.path)  # a link to the whole store is fine
    TileStore.open(linked_dir).verify()


DISK_FULL = """
import resource, signal, sys
import numpy as np
from aires.tiling import build_store
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so a write past the limit fails with EFBIG
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
rng = np.random.default_rng(0)
indptr = np.arange(0, 40_001, 20)
a = (indptr, rng.integers(0, 2000, 40_000), rng.random(40_000, dtype=np.float32), (2000, 2000))
build_store(a, sys.argv[1], tile_bytes=8192, progress=False)
"""


def test_disk_full_during_build_is_clear_and_leaves_nothing(tmp_path: Path) -> None:
    """A file size limit (``RLIMIT_FSIZE``) stands in for a full disk: the data file cannot grow.

    (A real full disk fails ``pwrite`` with ENOSPC instead: ``test_store.py::
    test_write_error_removes_the_partial_build``; the up-front free space check:
    ``test_not_enough_space_is_refused_up_front``.)
    """
    target = tmp_path / "s"
    done = subprocess.run(
        [sys.executable, "-c", DISK_FULL, str(target), str(64 * 1024)],
        check=False,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("OSError: [Errno 27] sizing "), last
    assert "tiles.bin to" in last and "File too large" in last and "ulimit" in last
    assert list(tmp_path.iterdir()) == []  # no store, no temporary directory
    rng = np.random.default_rng(0)
    a = random_csr(rng, (2000, 2000), 0.01)
    assert_round_trip(build_store(a, target, tile_bytes=8192, progress=False), a)


KILLED_AT_RENAME = """
import os, sys, time
import numpy as np
from aires.tiling import build_store

real_rename = os.rename
def rename_then_hang(src, dst):
    if os.path.basename(str(dst)) == "s":  # the finished store moving into place
        open(sys.argv[2], "w").close()
        time.sleep(120)
    return real_rename(src, dst)
os.rename = rename_then_hang
rng = np.random.default_rng(0)
indptr = np.arange(0, 40_001, 20)
a = (indptr, rng.integers(0, 2000, 40_000), rng.random(40_000, dtype=np.float32), (2000, 2000))
build_store(a, sys.argv[1], tile_bytes=4096, progress=False)
"""


def test_build_killed_with_everything_written_but_not_renamed(tmp_path: Path) -> None:
    """The last moment a kill can hit: data and manifest fsynced, rename not yet done.

    (A kill after the first tile write: ``test_store.py::test_killed_build_leaves_no_store``.)
    """
    target, marker = tmp_path / "s", tmp_path / "ready"
    kill_build_at_marker(KILLED_AT_RENAME, target, marker, "its rename")
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".s.tmp-")]
    assert not target.exists() and len(leftovers) == 1
    assert (leftovers[0] / "manifest.json").is_file()  # complete, but never readable as `s`
    with pytest.raises(FileNotFoundError, match="no tile store at"):
        TileStore.open(target)
    a = random_csr(np.random.default_rng(1), (500, 500), 0.02)
    assert_round_trip(build_store(a, target, tile_bytes=4096, progress=False), a)
    assert not leftovers[0].exists()


def _tile_digests(store: TileStore) -> list[int]:
    raw = store.data_path.read_bytes()
    return [zlib.crc32(raw[t.offset : t.offset + t.nbytes]) for t in store.tiles]


def test_concurrent_reader_threads(store: TileStore) -> None:
    """Eight threads read every tile, verified, in different orders, while verify() runs."""
    want = _tile_digests(store)
    errors: list[BaseException] = []
    barrier = threading.Barrier(9)

    def reader(seed: int) -> None:
        try:
            buf = np.empty(store.max_tile_nbytes, np.uint8)
            barrier.wait()
            for _ in range(20):
                for i in np.random.default_rng(seed).permutation(len(store)):
                    n = store.read_bytes(int(i), buf)
                    assert zlib.crc32(buf[:n]) == want[i]
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    def verifier() -> None:
        try:
            barrier.wait()
            for _ in range(20):
                store.verify()
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(8)]
    threads.append(threading.Thread(target=verifier))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


READER = """
import os, sys, time, zlib
from pathlib import Path
import numpy as np
from aires.tiling import TileStore
store = TileStore.open(sys.argv[1])
Path(sys.argv[2]).touch()  # ready
while not os.path.exists(sys.argv[3]):  # all start reading together
    time.sleep(0.01)
buf = np.empty(store.max_tile_nbytes, np.uint8)
rounds = []
for r in range(200):
    crcs = [0] * len(store)
    for i in np.random.default_rng(r).permutation(len(store)):
        n = store.read_bytes(int(i), buf)
        crcs[i] = zlib.crc32(buf[:n])
    if r % 50 == 0:
        store.verify()
    rounds.append(crcs)
assert all(r == rounds[0] for r in rounds)
print(" ".join(map(str, rounds[0])))
"""


def test_concurrent_reader_processes(store: TileStore, tmp_path: Path) -> None:
    """Four processes and the test process read every tile of one store at the same time."""
    want = _tile_digests(store)
    go = tmp_path / "go"
    ready = [tmp_path / f"ready-{k}" for k in range(4)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", READER, str(store.path), str(flag), str(go)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for flag in ready
    ]
    try:
        deadline = time.monotonic() + 120
        while not all(flag.exists() for flag in ready):
            assert all(p.poll() is None for p in procs), "a reader process died while starting"
            assert time.monotonic() < deadline, "the reader processes did not start in 120 s"
            time.sleep(0.02)
        go.touch()
        buf = np.empty(store.max_tile_nbytes, np.uint8)
        for _ in range(200):
            for info in store.tiles:
                n = store.read_bytes(info.index, buf)
                assert zlib.crc32(buf[:n]) == want[info.index]
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            assert [int(c) for c in out.split()] == want
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def test_overwrite_under_open_readers_is_never_silently_wrong(tmp_path: Path) -> None:
    """Rebuilding a store that others have open: an open reader keeps the old bytes (its file
    handle holds the old file); a store opened before but first read after the swap meets the
    new file under the old manifest, and every tile that differs is a checksum error."""
    rng = np.random.default_rng(5)
    a, b = random_csr(rng, (300, 300), 0.05), random_csr(rng, (300, 300), 0.05)
    reading = build_store(a, tmp_path / "s", tile_bytes=4096, progress=False)
    buf = np.empty(reading.max_tile_nbytes, np.uint8)
    reading.read_bytes(0, buf)  # opens the data file
    idle = TileStore.open(tmp_path / "s")  # opened, nothing read yet
    before = _tile_digests(reading)
    build_store(b, tmp_path / "s", tile_bytes=4096, overwrite=True, progress=False)
    for info in reading.tiles:
        n = reading.read_bytes(info.index, buf)
        assert zlib.crc32(buf[:n]) == before[info.index]
    with pytest.raises(TileCorruptError):
        idle.verify()
    assert_round_trip(TileStore.open(tmp_path / "s"), b)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
@pytest.mark.parametrize("what", ["store", "manifest", "data"])
def test_unreadable_store_is_a_permission_error_naming_the_path(
    store: TileStore, what: str
) -> None:
    target = {"store": store.path, "manifest": store.path / "manifest.json"}.get(
        what, store.data_path
    )
    mode = target.stat().st_mode
    target.chmod(0)
    try:
        with pytest.raises(PermissionError, match=re.escape(str(target))):
            TileStore.open(store.path).read_bytes(0, np.empty(store.tile_bytes, np.uint8))
    finally:
        target.chmod(mode)
