"""The on-disk tile store: build it from a CSR matrix, open it, read tiles back.

A store is a directory holding one data file of aligned tiles and a JSON manifest
(:mod:`aires.tiling._manifest`). It is built under a hidden temporary sibling name, fsynced and
renamed into place only when complete, so a store is either whole or absent: a killed build
leaves only a ``.<name>.tmp-<pid>-*`` directory, which the next build of the same path removes.
Every tile carries a CRC-32 checked on every read unless the caller opts out.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import tempfile
import threading
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse
import torch

from aires.checks import check_positive_int
from aires.progress import progress_bar
from aires.tiling._layout import pack_tile, tile_views
from aires.tiling._manifest import DATA_NAME, MANIFEST_NAME, Manifest, load_manifest
from aires.tiling._symmetry import entry_hashes, tile_hashes_on
from aires.tiling.plan import DEFAULT_ALIGNMENT, DEFAULT_TILE_BYTES, TilePlan, plan_tiles
from aires.tiling.reader import DEFAULT_THREADS, IoMode, KvikioReader, PosixReader, io_mode
from aires.tiling.tile import TileCSR, TileInfo, scipy_values
from aires.writeback import pwrite_all

__all__ = ["TileCorruptError", "TileStore", "build_store"]

_BUILD_THREADS = 4  # packing + CRC + pwrite run in parallel; more gains nothing at disk speed
#: Tiles hashed on the GPU at once: one takes milliseconds there, and each holds its bytes and
#: a few int64 temporaries per entry (some 300 MB for a 64 MiB tile) of device memory.
_DEVICE_HASHES = 4


class TileCorruptError(ValueError):
    """A tile, or the data file holding it, does not match the manifest.

    Attributes:
        path: the data file.
        tile: index of the first bad tile (``None`` when no single tile is to blame).
        via: the data path the tile came by (``None`` when read outside a product).
    """

    def __init__(
        self, message: str, *, path: Path, tile: int | None, via: str | None = None
    ) -> None:
        super().__init__(message)
        self.path = path
        self.tile = tile
        self.via = via

    def came_by(self, via: str) -> TileCorruptError:
        """This error, its message naming ``via``, the path the tile came by."""
        return TileCorruptError(f"{self} (read by {via})", path=self.path, tile=self.tile, via=via)


class TileStore:
    """An opened tile store (use :meth:`open` or :func:`build_store`).

    Reads are thread-safe. Open file handles are released by :meth:`close` (or ``with``).
    """

    def __init__(self, path: Path, manifest: Manifest, manifest_crc: int, io_threads: int) -> None:
        self._path = path
        self._manifest = manifest
        self._manifest_crc = manifest_crc
        self._io_threads = io_threads
        self._posix: PosixReader | None = None
        self._kvikio: KvikioReader | None = None
        self._io_mode: IoMode | None = None
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, io_threads: int = DEFAULT_THREADS) -> TileStore:
        """Open the store at ``path`` and check its manifest against its data file.

        Args:
            path: the store directory.
            io_threads: concurrent requests per large read (POSIX pool and KvikIO threads).

        Raises:
            FileNotFoundError: no store, no manifest or no data file at ``path``.
            ValueError: an unknown format version, a manifest that does not describe a valid
                store (the message names the file), or a data file that is a link leading
                outside the store directory.
            TileCorruptError: the data file's size is not what the manifest says (the message
                names the file, the expected size and the first tile cut off).
        """
        path = Path(path)
        io_threads = check_positive_int(io_threads, "io_threads")
        manifest = load_manifest(path)
        data = path / manifest.data_file
        if not data.is_file():
            raise FileNotFoundError(f"{data}: data file missing from tile store {path}")
        if data.resolve().parent != path.resolve():
            raise ValueError(
                f"{data}: data file is a link to {data.resolve()}, outside the tile store {path}"
            )
        size = data.stat().st_size
        if size != manifest.data_bytes:
            cut = next((t.index for t in manifest.tiles if t.offset + t.nbytes > size), None)
            what = f"truncated, tile {cut} onwards missing" if cut is not None else "trailing bytes"
            raise TileCorruptError(
                f"{data}: data file has {size} bytes, expected {manifest.data_bytes} ({what})",
                path=data,
                tile=cut,
            )
        crc = zlib.crc32((path / MANIFEST_NAME).read_bytes())
        return cls(path, manifest, crc, io_threads)

    # ---------------------------------------------------------------- description
    @property
    def path(self) -> Path:
        """The store directory."""
        return self._path

    @property
    def data_path(self) -> Path:
        """The data file holding the tiles."""
        return self._path / self._manifest.data_file

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, cols)`` of the matrix."""
        return self._manifest.shape

    @property
    def nnz(self) -> int:
        """Nonzeros of the matrix."""
        return self._manifest.nnz

    @property
    def tile_bytes(self) -> int:
        """Capacity of a tile slot: every tile's ``nbytes`` is at most this."""
        return self._manifest.tile_bytes

    @property
    def max_tile_nbytes(self) -> int:
        """The largest tile's ``nbytes`` (a slot this large holds any tile; 0 if no tiles)."""
        return max((t.nbytes for t in self._manifest.tiles), default=0)

    @property
    def alignment(self) -> int:
        """Every tile's offset and ``nbytes`` are multiples of this."""
        return self._manifest.alignment

    @property
    def index_dtype(self) -> np.dtype:
        """dtype of each tile's ``indptr`` and ``indices``."""
        return self._manifest.index_dtype

    @property
    def value_dtype(self) -> np.dtype:
        """dtype of each tile's ``data``."""
        return self._manifest.value_dtype

    @property
    def symmetric(self) -> bool | None:
        """Whether the builder was told the matrix is symmetric (``None``: not told)."""
        return self._manifest.symmetric

    @property
    def tiles(self) -> list[TileInfo]:
        """All tiles, in row order."""
        return list(self._manifest.tiles)

    @property
    def io_mode(self) -> IoMode:
        """How reads into GPU memory run: ``"gds"``, ``"kvikio-compat"`` or ``"posix"``."""
        if self._io_mode is None:
            self._io_mode = io_mode()
        return self._io_mode

    def __len__(self) -> int:
        return len(self._manifest.tiles)

    def __repr__(self) -> str:
        return (
            f"TileStore({str(self._path)!r}, shape={self.shape}, nnz={self.nnz}, "
            f"tiles={len(self)}, "
            f"tile_bytes={self.tile_bytes}, index_dtype={self.index_dtype.name}, "
            f"value_dtype={self.value_dtype.name})"
        )

    def tile_info(self, i: int) -> TileInfo:
        """Where tile ``i`` is and what it holds.

        Raises:
            IndexError: ``i`` is not in ``[0, len(store))``.
        """
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"tile index must be an int, got {i!r}")
        if not 0 <= i < len(self):
            raise IndexError(f"tile index {i} out of range: the store has {len(self)} tiles")
        return self._manifest.tiles[int(i)]

    # ---------------------------------------------------------------- reading
    def read_bytes(self, i: int, out: Any, *, verify: bool = True) -> int:
        """Read tile ``i``'s ``nbytes`` raw bytes into the front of ``out``.

        Host buffers are filled by POSIX reads; CUDA buffers by KvikIO when it is installed
        (:attr:`io_mode`), else through a pinned host bounce buffer. Both give the same bytes.

        Args:
            i: tile index.
            out: a contiguous uint8 buffer of at least ``nbytes`` bytes: a numpy array, a torch
                tensor on the CPU (pinned or not) or on a CUDA device, or any object with
                ``__cuda_array_interface__`` (such as a cupy array).
            verify: check the tile's CRC-32. Free on the POSIX paths (folded into the reads);
                a KvikIO read into GPU memory copies the tile back to the host to check it, so
                a hot loop that trusts the disk passes ``False`` (:meth:`verify` checks all).

        Returns:
            ``nbytes``, the number of bytes written into ``out``.

        Raises:
            TileCorruptError: the checksum does not match or the file ends inside the tile.
        """
        info = self.tile_info(i)
        target = _byte_buffer(out, info.nbytes, f"tile {info.index}")
        try:
            if isinstance(target, np.ndarray):
                crc = self._posix_reader().read(info.offset, info.nbytes, target, checksum=verify)
            elif self.io_mode == "posix":
                crc = self._posix_reader().read_to_tensor(
                    info.offset, info.nbytes, target, checksum=verify
                )
            else:
                self._kvikio_reader().read(info.offset, info.nbytes, target[: info.nbytes])
                crc = zlib.crc32(target[: info.nbytes].cpu().numpy()) if verify else None
        except EOFError as error:
            raise TileCorruptError(
                f"tile {info.index} of {self.data_path}: the data file ends inside it ({error})",
                path=self.data_path,
                tile=info.index,
            ) from error
        if crc is not None and crc != info.checksum:
            raise self._corrupt(info, crc)
        return info.nbytes

    def tile_arrays(
        self, i: int, buf: np.ndarray | torch.Tensor
    ) -> (
        tuple[np.ndarray, np.ndarray, np.ndarray] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ):
        """Zero-copy ``(indptr, indices, data)`` views of tile ``i`` held at the front of ``buf``.

        Args:
            buf: uint8 numpy array, or uint8 torch tensor on any device, holding the tile's
                bytes (as :meth:`read_bytes` leaves them); at least ``nbytes`` long.

        Returns:
            numpy arrays for a numpy ``buf``, torch tensors on ``buf``'s device otherwise.
        """
        info = self.tile_info(i)
        if not isinstance(buf, (np.ndarray, torch.Tensor)):
            raise TypeError(f"buf must be a numpy array or torch tensor, got {type(buf).__name__}")
        target = _byte_buffer(buf, info.nbytes, f"tile {info.index}", name="buf", host_numpy=False)
        return tile_views(target, info.n_rows, info.nnz, self.index_dtype, self.value_dtype)

    def read_tile(self, i: int, out: Any = None, *, verify: bool = True) -> TileCSR:
        """Tile ``i`` as a :class:`TileCSR` (views over ``out``, or over a new host buffer).

        Args:
            i: tile index.
            out: a buffer accepted by :meth:`read_bytes` (host numpy, pinned torch, CUDA
                tensor), or ``None`` to allocate a numpy one.
            verify: check the tile's CRC-32 (see :meth:`read_bytes`).

        Returns:
            The tile, with arrays of the buffer's kind and device.
        """
        info = self.tile_info(i)
        if out is None:
            out = np.empty(info.nbytes, dtype=np.uint8)
        elif not isinstance(out, (np.ndarray, torch.Tensor)):
            out = torch.as_tensor(out)
        self.read_bytes(i, out, verify=verify)
        indptr, indices, data = self.tile_arrays(i, out)
        return TileCSR(
            indptr, indices, data, info.row_start, info.row_stop, self.shape[1], info.partial
        )

    def verify(self, *, progress: bool = False) -> None:
        """Read every tile and check its CRC-32.

        Raises:
            TileCorruptError: naming the first bad tile (and how many others are bad).
        """
        buf = np.empty(self.max_tile_nbytes, dtype=np.uint8)
        reader = self._posix_reader()
        bad: list[tuple[TileInfo, int]] = []
        tiles = self._manifest.tiles
        for info in progress_bar(tiles, desc="verifying", unit="tile", disable=not progress):
            crc = reader.read(info.offset, info.nbytes, buf, checksum=True)
            if crc != info.checksum:
                bad.append((info, crc))
        if bad:
            raise self._corrupt(*bad[0], others=[b[0].index for b in bad[1:]])

    def to_scipy(self, *, progress: bool = False) -> scipy.sparse.csr_array:
        """The whole matrix as a scipy CSR array in host memory (needs RAM for all of it).

        scipy has no float16, so a float16 store's values come back as float32 (exactly).
        """
        n_rows, _ = self.shape
        indices = np.empty(self.nnz, dtype=self.index_dtype)
        data = np.empty(self.nnz, dtype=self.value_dtype)
        row_nnz = np.zeros(n_rows, dtype=np.int64)
        buf = np.empty(self.max_tile_nbytes, dtype=np.uint8)
        pos = 0
        tiles = self._manifest.tiles
        for info in progress_bar(tiles, desc="reading", unit="tile", disable=not progress):
            self.read_bytes(info.index, buf)
            indptr, idx, val = self.tile_arrays(info.index, buf)
            indices[pos : pos + info.nnz] = idx
            data[pos : pos + info.nnz] = val
            row_nnz[info.row_start : info.row_stop] += np.diff(indptr)
            pos += info.nnz
        indptr = np.zeros(n_rows + 1, dtype=np.int64)
        np.cumsum(row_nnz, out=indptr[1:])
        return scipy.sparse.csr_array((scipy_values(data), indices, indptr), shape=self.shape)

    def transpose(
        self, path: str | os.PathLike[str] | None = None, *, progress: bool = False
    ) -> TileStore:
        """The store of the transposed matrix, built once and reopened afterwards.

        A store marked symmetric is its own transpose. Otherwise the transpose lives at
        ``path`` (default ``<store>.T`` beside this one) with the same tile size, alignment and
        value dtype. It records this store's manifest checksum, so a transpose left over from
        an earlier version of this store is rebuilt, not reused.

        The transpose is formed in memory with scipy: it needs RAM for the whole matrix twice.

        Raises:
            FileExistsError: ``path`` holds something that is not a transpose of a store.
        """
        if self.symmetric:
            return self
        target = Path(path) if path is not None else self._path.with_name(self._path.name + ".T")
        stale = False
        if (target / MANIFEST_NAME).is_file():
            existing = TileStore.open(target, io_threads=self._io_threads)
            source = existing._manifest.extra.get("transpose_of")
            if source == self._manifest_crc:
                return existing
            existing.close()
            if source is None:
                raise FileExistsError(f"{target} holds a tile store that is not a transpose")
            stale = True
        matrix = self.to_scipy(progress=progress).T.tocsr()
        return _build(
            _as_source(matrix),
            target,
            tile_bytes=self.tile_bytes,
            alignment=self.alignment,
            index_dtype=None,
            value_dtype=self.value_dtype,
            overwrite=stale,
            progress=progress,
            symmetric=None,
            extra={"transpose_of": self._manifest_crc},
        )

    def close(self) -> None:
        """Release file handles and reader threads (reads reopen them)."""
        with self._lock:
            for reader in (self._posix, self._kvikio):
                if reader is not None:
                    reader.close()
            self._posix = self._kvikio = None

    def __enter__(self) -> TileStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _posix_reader(self) -> PosixReader:
        with self._lock:
            if self._posix is None:
                self._posix = PosixReader(self.data_path, threads=self._io_threads)
            return self._posix

    def _kvikio_reader(self) -> KvikioReader:
        with self._lock:
            if self._kvikio is None:
                self._kvikio = KvikioReader(self.data_path, threads=self._io_threads)
            return self._kvikio

    def _corrupt(
        self, info: TileInfo, crc: int, others: list[int] | None = None
    ) -> TileCorruptError:
        more = f"; {len(others)} more bad tiles: {others[:10]}" if others else ""
        return TileCorruptError(
            f"tile {info.index} of {self.data_path} is corrupt: CRC-32 {crc:#010x}, manifest says "
            f"{info.checksum:#010x} (bytes {info.offset}..{info.offset + info.nbytes}){more}",
            path=self.data_path,
            tile=info.index,
        )


def build_store(
    matrix: Any,
    path: str | os.PathLike[str],
    *,
    tile_bytes: int | str = DEFAULT_TILE_BYTES,
    alignment: int = DEFAULT_ALIGNMENT,
    index_dtype: np.dtype | type | str | None = None,
    value_dtype: np.dtype | type | str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    symmetric: bool | None = None,
) -> TileStore:
    """Tile a CSR matrix into a store at ``path`` and open it.

    Row blocks come from :func:`~aires.tiling.plan.plan_tiles`. Tiles are packed, checksummed
    and written with ``os.pwrite`` by a few threads, each reusing one tile-sized buffer, so a
    matrix of memory maps larger than RAM is streamed with a few tiles of extra memory. Column
    indices and values are checked tile by tile as they are packed.

    Args:
        matrix: a scipy sparse matrix or array (CSR kept, other formats converted), a torch
            sparse CSR or COO tensor, or a tuple ``(indptr, indices, data, shape)`` of numpy
            arrays or memory maps.
        path: the store directory to create; its parent is created if needed.
        tile_bytes: slot capacity, bytes or a size string such as ``"64MiB"``.
        alignment: tile offset and length granularity in the data file (power of two >= 256).
        index_dtype: ``int32``/``int64`` to force; ``None`` picks the narrowest that fits.
        value_dtype: ``float16``, ``float32`` (``None``) or ``float64``; values are cast.
        overwrite: replace an existing non-empty ``path``: the new store is built aside, then
            the old one is renamed away, the new one renamed in and the old one deleted, so
            readers never see a partial store (for an instant, no store).
        progress: show a tqdm progress bar.
        symmetric: record that the matrix is (``True``) or is not (``False``) symmetric;
            ``None`` records nothing. ``True`` is checked while the tiles are packed (no extra
            read): an order-independent hash of the nonzero entries ``(row, col, value)``,
            values as stored, must equal that of ``(col, row, value)``. Duplicate entries are
            compared one by one (a pair summed differently on the two sides is refused).

    Returns:
        The opened store.

    Raises:
        FileExistsError: ``path`` exists, is not an empty directory, and ``overwrite`` is false.
        ValueError, TypeError: a bad argument, a matrix that is not a valid CSR matrix, or
            ``symmetric=True`` for a matrix that is not symmetric (nothing is left on disk).
        OSError: not enough disk space or a failed write (the partial build is removed).
    """
    if symmetric not in (None, True, False):
        raise TypeError(f"symmetric must be True, False or None, got {symmetric!r}")
    src = _as_source(matrix)
    if symmetric and src.shape[0] != src.shape[1]:
        raise ValueError(f"symmetric=True, but matrix has shape {src.shape}: it is not square")
    return _build(
        src,
        Path(path),
        tile_bytes=tile_bytes,
        alignment=alignment,
        index_dtype=index_dtype,
        value_dtype=value_dtype,
        overwrite=overwrite,
        progress=progress,
        symmetric=symmetric,
        extra={},
    )


@dataclass(frozen=True)
class _Source:
    """A CSR matrix as (possibly memory-mapped) arrays, checked except for per-entry contents."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    shape: tuple[int, int]


def _build(
    src: _Source,
    path: Path,
    *,
    tile_bytes: int | str,
    alignment: int,
    index_dtype: np.dtype | type | str | None,
    value_dtype: np.dtype | type | str | None,
    overwrite: bool,
    progress: bool,
    symmetric: bool | None,
    extra: dict[str, Any],
    threads: int = _BUILD_THREADS,
    hash_device: torch.device | None = None,
) -> TileStore:
    """Plan, write and install the store of ``src``.

    ``src.indices`` and ``src.data`` need only support slicing: :mod:`aires.data.prepare`
    passes views that compute the normalised adjacency tile by tile, with ``threads`` workers,
    as CPU work scales with cores where plain packing is held to disk speed. ``hash_device``:
    a GPU that computes the symmetry hashes (:mod:`aires.tiling._symmetry`) instead of the
    workers.
    """
    _check_destination(path, overwrite)
    try:
        plan = plan_tiles(
            src.indptr,
            n_cols=src.shape[1],
            tile_bytes=tile_bytes,
            alignment=alignment,
            index_dtype=index_dtype,
            value_dtype=value_dtype,
        )
    except ValueError as error:
        if str(error).startswith("indptr"):  # the planner's scan of the row pointer
            raise ValueError(f"matrix: {error}") from error
        raise
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    _check_space(path.parent, plan.total_bytes)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    try:
        checksums, entries = _write_tiles(
            src, plan, tmp / DATA_NAME, progress, path.name, threads,
            hash_entries=bool(symmetric), hash_device=hash_device,
        )
        if symmetric and entries[0] != entries[1]:
            raise ValueError(
                "symmetric=True, but matrix is not symmetric: its nonzero entries (row, col, "
                "value) differ from its transpose's (compared by an order-independent hash of "
                "every entry); pass symmetric=False or None"
            )
        columns = (plan.row_start, plan.row_stop, plan.tile_nnz, plan.offset, plan.nbytes)
        columns += (checksums, plan.partial)
        manifest = Manifest(
            shape=plan.shape,
            nnz=plan.nnz,
            index_dtype=plan.index_dtype,
            value_dtype=plan.value_dtype,
            alignment=plan.alignment,
            tile_bytes=plan.tile_bytes,
            symmetric=symmetric,
            data_file=DATA_NAME,
            data_bytes=plan.total_bytes,
            tiles=[TileInfo(i, *row) for i, row in enumerate(zip(*(c.tolist() for c in columns)))],
            extra=extra,
        )
        with open(tmp / MANIFEST_NAME, "wb") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        _install(tmp, path, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    return TileStore.open(path)


def _write_tiles(
    src: _Source,
    plan: TilePlan,
    data_path: Path,
    progress: bool,
    name: str,
    threads: int,
    *,
    hash_entries: bool = False,
    hash_device: torch.device | None = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Write every tile of ``plan`` to a new ``data_path`` with ``threads`` workers, fsync it.

    Tiles go to their planned offsets with ``os.pwrite``, so worker threads need no ordering,
    and each tile's writeback starts once it is written (:mod:`aires.writeback`);
    at most ``2 * workers`` tiles are queued and each worker reuses one scratch buffer.

    Returns:
        The CRC-32s, and with ``hash_entries`` the :func:`~aires.tiling._symmetry.entry_hashes`
        of the whole matrix (on ``hash_device`` where given, :data:`_DEVICE_HASHES` tiles at a
        time, its cached memory released at the end): sums mod 2**64 of the tiles';
        ``(0, 0)`` without.
    """
    checksums = np.zeros(len(plan), dtype=np.int64)
    hashes = np.zeros((len(plan), 2), dtype=np.uint64)
    scratch = threading.local()
    on_device = threading.Semaphore(_DEVICE_HASHES)
    largest = int(plan.nbytes.max()) if len(plan) else 0
    fd = os.open(data_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)

    def write(i: int) -> int:
        buf = getattr(scratch, "buf", None)
        if buf is None:
            buf = scratch.buf = np.empty(largest, dtype=np.uint8)
        tile = _pack_checked(buf, src, plan, i)
        checksums[i] = zlib.crc32(tile)
        if hash_entries and hash_device is not None:
            with on_device:
                hashes[i] = tile_hashes_on(
                    tile, int(plan.row_start[i]), int(plan.row_stop[i] - plan.row_start[i]),
                    int(plan.nnz_stop[i] - plan.nnz_start[i]), plan.index_dtype,
                    plan.value_dtype, hash_device)
        elif hash_entries:
            hashes[i] = _tile_entry_hashes(buf, src, plan, i)
        pwrite_all(fd, tile, int(plan.offset[i]), f"tile {i} to {data_path}")
        return len(tile)

    try:
        try:
            os.ftruncate(fd, plan.total_bytes)
        except OSError as error:
            raise OSError(
                error.errno,
                f"sizing {data_path} to {plan.total_bytes} bytes failed: {error.strerror} "
                "(disk full, or a file size limit such as ulimit -f?)",
            ) from error
        workers = min(threads, os.cpu_count() or 1)
        bar = progress_bar(
            total=plan.total_bytes,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=f"tiling {name}",
            disable=not progress,
        )
        with bar, ThreadPoolExecutor(workers, thread_name_prefix="aires-tile") as pool:
            pending: deque[Future[int]] = deque()
            try:
                for i in range(len(plan)):
                    pending.append(pool.submit(write, i))
                    if len(pending) >= 2 * workers:
                        bar.update(pending.popleft().result())
                while pending:
                    bar.update(pending.popleft().result())
            except BaseException:
                for future in pending:
                    future.cancel()
                raise
        os.fsync(fd)
    finally:
        os.close(fd)
        if hash_device is not None and hash_device.type == "cuda":
            torch.cuda.empty_cache()  # the process may train next, under a budget
    total = hashes.sum(axis=0, dtype=np.uint64)  # wraps mod 2**64, like the per-tile sums
    return checksums, (int(total[0]), int(total[1]))


def _tile_entry_hashes(buf: np.ndarray, src: _Source, plan: TilePlan, i: int) -> tuple[int, int]:
    """:func:`~aires.tiling._symmetry.entry_hashes` of tile ``i``, packed in ``buf``: its
    values as stored (cast)."""
    lo, hi = int(plan.nnz_start[i]), int(plan.nnz_stop[i])
    r0, r1 = int(plan.row_start[i]), int(plan.row_stop[i])
    bounds = np.clip(np.asarray(src.indptr[r0 : r1 + 1], dtype=np.int64), lo, hi)
    rows = np.repeat(np.arange(r0, r1, dtype=np.int64), np.diff(bounds))
    values = tile_views(buf, r1 - r0, hi - lo, plan.index_dtype, plan.value_dtype)[2]
    return entry_hashes(rows, np.asarray(src.indices[lo:hi]), values)


def _pack_checked(buf: np.ndarray, src: _Source, plan: TilePlan, i: int) -> memoryview:
    """Pack tile ``i``, checking its column indices and (cast) values on the way."""
    lo, hi = int(plan.nnz_start[i]), int(plan.nnz_stop[i])
    n_cols = src.shape[1]
    if hi > lo:
        columns = src.indices[lo:hi]
        if int(columns.min()) < 0 or int(columns.max()) >= n_cols:
            k = int(np.flatnonzero((columns < 0) | (columns >= n_cols))[0])
            raise ValueError(
                f"matrix: column index {int(columns[k])} at position {lo + k} is out of range "
                f"[0, {n_cols})"
            )
    tile = pack_tile(
        buf,
        src.indptr,
        src.indices,
        src.data,
        row_start=int(plan.row_start[i]),
        row_stop=int(plan.row_stop[i]),
        nnz_start=lo,
        nnz_stop=hi,
        partial=bool(plan.partial[i]),
        nbytes=int(plan.nbytes[i]),
        index_dtype=plan.index_dtype,
        value_dtype=plan.value_dtype,
    )
    values = tile_views(
        buf, int(plan.row_stop[i] - plan.row_start[i]), hi - lo, plan.index_dtype, plan.value_dtype
    )[2]
    finite = np.isfinite(values)
    if not finite.all():
        k = int(np.flatnonzero(~finite)[0])
        raise ValueError(
            f"matrix: value {float(src.data[lo + k])!r} at position {lo + k} is not finite as "
            f"{plan.value_dtype.name}"
        )
    return tile


def _as_source(matrix: Any) -> _Source:
    """``matrix`` as CSR arrays, with its shape, dtypes, lengths and row pointer ends checked."""
    if scipy.sparse.issparse(matrix):
        csr = matrix if matrix.format == "csr" else matrix.tocsr()
        src = _Source(csr.indptr, csr.indices, csr.data, tuple(csr.shape))
    elif isinstance(matrix, torch.Tensor):
        src = _from_torch(matrix)
    elif isinstance(matrix, (tuple, list)) and len(matrix) == 4:
        indptr, indices, data, shape = matrix
        arrays = [
            a if isinstance(a, np.ndarray) else np.asarray(a) for a in (indptr, indices, data)
        ]
        if not isinstance(shape, (tuple, list)) or len(shape) != 2:
            raise ValueError(f"matrix: shape must be (rows, cols), got {shape!r}")
        src = _Source(*arrays, shape=tuple(shape))
    else:
        raise TypeError(
            "matrix must be a scipy sparse matrix, a torch sparse CSR/COO tensor or a tuple "
            f"(indptr, indices, data, shape), got {type(matrix).__name__}"
        )
    _check_header(src)
    return src


def _from_torch(tensor: torch.Tensor) -> _Source:
    if tensor.layout == torch.strided:
        raise TypeError("matrix is a dense torch tensor; pass a sparse CSR or COO tensor")
    if tensor.dim() != 2:
        raise ValueError(f"matrix must be two-dimensional, got a {tensor.dim()}-d sparse tensor")
    if tensor.layout == torch.sparse_coo:
        tensor = tensor.coalesce()
    if tensor.layout != torch.sparse_csr:
        tensor = tensor.to_sparse_csr()
    values = tensor.values().detach()
    if values.dtype == torch.bfloat16:
        values = values.float()  # numpy has no bfloat16; float32 holds it exactly
    return _Source(
        tensor.crow_indices().cpu().numpy(),
        tensor.col_indices().cpu().numpy(),
        values.cpu().numpy(),
        (int(tensor.shape[0]), int(tensor.shape[1])),
    )


def _check_header(src: _Source) -> None:
    """Cheap checks; per-entry ones (monotone indptr, column range, finite values) run later."""
    shape = src.shape
    if any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in shape):
        raise ValueError(f"matrix: shape must be two non-negative ints, got {shape!r}")
    rows = int(shape[0])
    for label, arr in (("indptr", src.indptr), ("indices", src.indices)):
        if arr.ndim != 1:
            raise ValueError(f"matrix: {label} must be one-dimensional, got shape {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"matrix: {label} must have an integer dtype, got {arr.dtype}")
    if not (
        np.issubdtype(src.data.dtype, np.number) or src.data.dtype == np.bool_
    ) or np.issubdtype(src.data.dtype, np.complexfloating):
        raise TypeError(f"matrix: data must be real numbers, got dtype {src.data.dtype}")
    if len(src.indptr) != rows + 1:
        raise ValueError(
            f"matrix: indptr has length {len(src.indptr)}, expected rows + 1 = {rows + 1}"
        )
    if src.data.shape != src.indices.shape:
        raise ValueError(
            f"matrix: data has shape {src.data.shape}, expected {src.indices.shape} like indices"
        )
    if int(src.indptr[0]) != 0 or int(src.indptr[-1]) != len(src.indices):
        raise ValueError(
            f"matrix: indptr must run from 0 to nnz = {len(src.indices)}, got "
            f"{int(src.indptr[0])} .. {int(src.indptr[-1])}"
        )


def _check_destination(path: Path, overwrite: bool) -> None:
    if not (path.exists() or path.is_symlink()):
        return
    empty_dir = path.is_dir() and not path.is_symlink() and not any(path.iterdir())
    if not empty_dir and not overwrite:
        raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")


def _check_space(directory: Path, nbytes: int) -> None:
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    if nbytes > free:
        raise OSError(
            errno.ENOSPC,
            f"not enough free space in {directory} for a tile store of {nbytes} bytes "
            f"({free} bytes free)",
        )


def _install(tmp: Path, path: Path, overwrite: bool) -> None:
    """Rename the finished ``tmp`` to ``path``; with ``overwrite``, swap out what is there."""
    try:
        os.rename(tmp, path)  # atomic; replaces an empty directory
        return
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
        if not overwrite:
            raise FileExistsError(f"{path} appeared during the build; not replacing it") from error
    old = path.with_name(f".{path.name}.old-{os.getpid()}-{secrets.token_hex(4)}")
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink()


def _remove_stale(path: Path) -> None:
    """Remove temporary siblings of ``path`` left by builds whose process is gone."""
    for kind in ("tmp", "old"):
        prefix = f".{path.name}.{kind}-"
        for entry in path.parent.iterdir():
            if not entry.name.startswith(prefix):
                continue
            pid = entry.name[len(prefix) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _byte_buffer(
    out: Any, nbytes: int, what: str, *, name: str = "out", host_numpy: bool = True
) -> np.ndarray | torch.Tensor:
    """``out`` as a flat uint8 numpy array or torch tensor of at least ``nbytes`` bytes.

    With ``host_numpy``, CPU torch tensors (pinned or not) become numpy views, for POSIX reads.
    cupy-like device arrays become torch views through ``__cuda_array_interface__``.
    """
    if isinstance(out, np.ndarray):
        if out.dtype != np.uint8:
            raise TypeError(f"{name} must have dtype uint8, got {out.dtype}")
        if not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError(f"{name} must be a contiguous, writable array")
        flat = out.reshape(-1)
    elif isinstance(out, torch.Tensor) or hasattr(out, "__cuda_array_interface__"):
        tensor = out if isinstance(out, torch.Tensor) else torch.as_tensor(out)
        if tensor.dtype != torch.uint8:
            raise TypeError(f"{name} must have dtype torch.uint8, got {tensor.dtype}")
        if not tensor.is_contiguous():
            raise ValueError(f"{name} must be a contiguous tensor")
        if tensor.device.type not in ("cpu", "cuda"):
            raise NotImplementedError(f"reading into {tensor.device.type} tensors is not supported")
        flat = tensor.view(-1)
        if host_numpy and flat.device.type == "cpu":
            flat = flat.numpy()
    else:
        raise TypeError(f"{name} must be a numpy array or a torch tensor, got {type(out).__name__}")
    if flat.shape[0] < nbytes:
        raise ValueError(f"{name} holds {flat.shape[0]} bytes, but {what} needs {nbytes}")
    return flat
