"""Prepared graphs: one normalised, tiled copy of ``Â`` and one aligned feature file, in minutes.

:func:`prepare` turns a source (a synthetic preset, an OGB dataset directory, an edge list or an
on-disk graph) into a directory that training and every benchmark method read as it is::

    ROOT/<label>-<key>/
      prepared.json      what the bytes are (key, sizes, dtypes) and how the run went
      adjacency/         a TileStore of Â = D^-1/2 (A + I) D^-1/2 (symmetric, float32 values)
      features.npy       (N, F) row-major; data at byte 4096 (``features_offset``)
      labels.npy         int64 (N,), -1 where unlabelled
      train_idx.npy, val_idx.npy, test_idx.npy   int64

``Â`` is PyG's ``gcn_norm`` on an ``edge_index`` with unit weights: every stored entry of ``A``
off the diagonal counts once, each node gets exactly one self loop of weight 1 (existing loops
are replaced, as ``add_remaining_self_loops`` does), ``d`` counts the entries of a row of
``A + I`` and ``Â[i, j] = d_i^-1/2 * d_j^-1/2`` with ``d^-1/2`` computed by the same float32
torch operation as :func:`aires.gcn_conv.gcn_norm`, so the values are bit for bit those of
in-core training.

Bounded memory: the source's CSR is read with ``pread`` in chunks (never memory-mapped, so the
page cache holds it and the process's RSS does not); the degrees are one pass over it; the tile
store is then written tile by tile, each tile's rows normalised from the raw CSR as it is packed
(:func:`aires.tiling.store._build` with the views of :mod:`aires.data._normalise`, which compute
entries on demand), so no normalised CSR is ever written besides the tiles. The raw adjacency a
conversion wrote is deleted at the end, and the converter's feature file is adopted by a rename,
not copied. A synthetic graph's features are generated straight into the prepared directory
after the tiles, once the raw adjacency is deleted, so the disk holds at most two of the three
large things at once (:func:`_synthetic_need`).

Reuse: the directory name holds a hash of everything that decides its bytes (source, preset,
scale, seed, tile size, feature dtype, generator and format versions). It is built under
``.<name>.tmp-<pid>-*`` and renamed when complete, the tile store's mechanism, so it is whole
or absent; a leftover temporary directory of a dead process is removed by the next run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import resource
import shutil
import tempfile
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aires.checks import memory_available, parse_size
from aires.data._normalise import NormalisedRows, RawCSR, degrees
from aires.data.edgelist import convert_edge_list
from aires.data.generator import GENERATOR_VERSION, PRESETS, feature_rows, synthetic
from aires.data.ogb import load_ogb
from aires.data.storage import (
    ALIGNMENT,
    FORMAT_VERSION,
    MANIFEST,
    open_aligned_npy,
    open_graph,
    release_pages,
)
from aires.progress import progress_bar
from aires.tiling import TileStore
from aires.tiling.plan import DEFAULT_TILE_BYTES
from aires.tiling.store import _build, _fsync_dir, _remove_stale, _Source
from aires.writeback import pwrite_all

__all__ = [
    "FEATURE_DTYPES",
    "PREPARE_VERSION",
    "Prepared",
    "Synthetic",
    "open_prepared",
    "prepare",
    "write_rate",
]

#: Bumped whenever the same source and settings would give different bytes.
PREPARE_VERSION = 1
#: ``--feature-dtype`` choices and their on-disk numpy dtype (bf16 is stored as its raw bits).
FEATURE_DTYPES = {"float32": np.dtype("<f4"), "fp16": np.dtype("<f2"), "bf16": np.dtype("<u2")}
MANIFEST_NAME = "prepared.json"
_FORMAT = "aires-prepared"
_SPLITS = ("train_idx", "val_idx", "test_idx")
_DEFAULT_CHUNK = 1 << 20  # entries per step of the degree pass: 8 MiB of int64 column indices
#: Bytes of feature rows made and written at once: a block's fixed costs (a generator's kernel
#: launches and device copy) then do not show. Blocks of 4 MiB took 21 s for papers100M
#: x0.3's 17 GB on the H200 machine, one after another.
_FEATURE_BLOCK = 64 << 20
#: Feature blocks being written at once.
_FEATURE_WRITERS = 4
# Bytes written to measure the sequential write rate: as many as the tiles, within these bounds
# (64 MiB is past the disk's cache effects once fsynced; 1 GiB keeps the probe a second or so).
_CEILING_MIN, _CEILING_MAX = 64 << 20, 1 << 30
_SAMPLE_BLOCK = 16 << 20


@dataclass(frozen=True)
class Synthetic:
    """A synthetic RMAT source: a preset of :data:`aires.data.PRESETS` at a scale and seed."""

    preset: str
    scale: float = 1.0
    seed: int = 0


@dataclass
class Prepared:
    """A prepared graph, opened: the tile store of ``Â`` and memory maps of the rest.

    Attributes:
        path: the prepared directory.
        name: the graph's name.
        num_nodes, num_features, num_classes: ``N``, ``F`` (0: no features), classes.
        adjacency: the tile store of ``Â`` (symmetric, float32 values).
        features: read-only ``(N, F)`` memmap in ``feature_dtype`` (bf16 as ``uint16`` bits:
            ``torch.from_numpy(a).view(torch.bfloat16)``); ``None`` without features.
        features_path: the file; row ``i`` starts at ``features_offset + i * F * itemsize``.
        features_offset: byte offset of row 0 (4096, so row blocks are aligned).
        feature_dtype: ``"float32"``, ``"fp16"`` or ``"bf16"``.
        labels: int64 ``(N,)`` memmap, -1 where unlabelled.
        train_idx, val_idx, test_idx: int64 node indices of the split.
        timings: seconds per step of this run (``{"open": s}`` when reused).
        peak_rss_bytes: the process's peak resident set so far.
        reused: the directory existed and was opened, not built.
        report: the JSON report (sizes, bytes on disk, write ceiling, timings) of the build.
    """

    path: Path
    name: str
    num_nodes: int
    num_features: int
    num_classes: int
    adjacency: TileStore
    features: np.memmap | None
    features_path: Path | None
    features_offset: int
    feature_dtype: str
    labels: np.ndarray
    train_idx: np.ndarray
    val_idx: np.ndarray
    test_idx: np.ndarray
    timings: dict[str, float]
    peak_rss_bytes: int
    reused: bool
    report: dict[str, Any] = field(default_factory=dict)


def prepare(
    source: Synthetic | str | os.PathLike[str],
    *,
    root: str | os.PathLike[str],
    tile_bytes: int | str = DEFAULT_TILE_BYTES,
    feature_dtype: str = "float32",
    progress: bool = True,
    chunk_size: int = _DEFAULT_CHUNK,
    threads: int | None = None,
    device: str | torch.device | None = None,
) -> Prepared:
    """Prepare ``source`` under ``root`` once, and open it (a second call reuses it).

    Args:
        source: a :class:`Synthetic` spec; or a path: an on-disk graph directory (``graph.json``),
            an OGB dataset directory (``RELEASE_v*.txt`` or ``meta_dict.pt``), or a text edge
            list (undirected).
        root: where prepared graphs live.
        tile_bytes: tile slot capacity (bytes or ``"64MiB"``).
        feature_dtype: ``"float32"``, ``"fp16"`` or ``"bf16"``.
        progress: tqdm bars per step, on stderr.
        chunk_size: entries of the adjacency handled at once by the degree pass (>= 1; does not
            change any byte of the result).
        threads: workers normalising and packing tiles (default: every core).
        device: where the generator runs, and where Â is normalised and its symmetry hashed
            (default CUDA when present).

    Returns:
        The opened :class:`Prepared`.

    Raises:
        ValueError: a bad argument (the message names it and its value), an unknown preset, or
            an adjacency whose rows are not sorted or hold out-of-range columns.
        NotImplementedError: a source graph not marked symmetric.
        OSError: not enough free disk or host memory (the message names both numbers and the
            path), or a failed write; nothing half-written is left under the final name. A
            synthetic source is checked before anything is written; an OGB directory or an
            edge list, whose converted size is unknown up front, after its conversion and
            before the tiles.
    """
    clock = time.perf_counter()
    if feature_dtype not in FEATURE_DTYPES:
        raise ValueError(
            f"feature_dtype must be one of {', '.join(FEATURE_DTYPES)}, got {feature_dtype!r}"
        )
    tile_bytes = parse_size(tile_bytes, "tile_bytes")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    if threads is not None and (
        isinstance(threads, bool) or not isinstance(threads, int) or threads < 1
    ):
        raise ValueError(f"threads must be an int >= 1, got {threads!r}")
    dev = torch.device(device) if device is not None else _default_device()
    kind, label, params = _describe(source)
    params.update(
        tile_bytes=tile_bytes,
        feature_dtype=feature_dtype,
        prepare_version=PREPARE_VERSION,
        graph_format=FORMAT_VERSION,
    )
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    root = Path(root).expanduser().absolute()
    path = root / f"{label}-{key[:12]}"
    if (path / MANIFEST_NAME).is_file():
        return _open(path, reused=True, timings={"open": round(time.perf_counter() - clock, 3)})
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    if kind == "synthetic":
        _check_resources(path, _synthetic_need(params), _memory_need(
            _synthetic_nodes(params), threads or _cores(), tile_bytes))
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=root))
    try:
        report = _build_prepared(
            kind, source, params, key, tmp, path, feature_dtype, tile_bytes, progress,
            chunk_size, threads or _cores(), dev,
        )
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / MANIFEST_NAME).is_file():
                raise
            # Another process finished the same preparation first: same key, same bytes.
            shutil.rmtree(tmp, ignore_errors=True)
            return _open(path, reused=True, timings=report["timings"])
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    report["timings"]["total"] = round(time.perf_counter() - clock, 3)
    prepared = _open(path, reused=False, timings=report["timings"])
    prepared.report.update(report)
    return prepared


def open_prepared(path: str | os.PathLike[str]) -> Prepared:
    """Open the prepared directory ``path`` (as :func:`prepare` returns it when reused).

    Raises:
        FileNotFoundError: ``path`` holds no ``prepared.json`` (absent, or never completed).
        ValueError: an unknown format version, or a feature file unlike its manifest.
    """
    clock = time.perf_counter()
    path = Path(path)
    if not (path / MANIFEST_NAME).is_file():
        raise FileNotFoundError(f"{path} is not a prepared graph: {MANIFEST_NAME} is missing")
    return _open(path, reused=True, timings={"open": round(time.perf_counter() - clock, 3)})


def _cores() -> int:
    """CPUs this process may run on (a container's share, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _describe(source: Synthetic | str | os.PathLike[str]) -> tuple[str, str, dict[str, Any]]:
    """``(kind, label, params)``: what kind of source, a readable name, what decides its bytes."""
    if isinstance(source, Synthetic):
        preset = next((p for p in PRESETS.values() if p.name.lower() == source.preset.lower()),
                      None)
        if preset is None:
            raise ValueError(
                f"unknown preset {source.preset!r}; valid presets: {', '.join(PRESETS)}"
            )
        scale, seed = source.scale, source.seed
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
            math.isfinite(scale) and scale > 0
        ):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        params = {
            "source": "synthetic",
            "preset": dataclasses.asdict(preset),
            "scale": float(scale),
            "seed": seed,
            "generator_version": GENERATOR_VERSION,
        }
        return "synthetic", f"{preset.name}-x{scale:g}-s{seed}", params
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"source must be a Synthetic spec or a path, got {type(source).__name__}"
        )
    path = Path(source).expanduser().absolute()
    if (path / MANIFEST).is_file():
        kind = "graph"
        stamp = (path / MANIFEST).read_bytes()  # the manifest names every array and its shape
    elif path.is_dir() and (any(path.glob("RELEASE_v*.txt")) or (path / "meta_dict.pt").is_file()):
        kind = "ogb"
        stamp = json.dumps(sorted(
            (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
            for p in path.rglob("*") if p.is_file()
        )).encode()
    elif path.is_file():
        kind = "edgelist"
        stat = path.stat()
        stamp = f"{stat.st_size}:{stat.st_mtime_ns}".encode()
    else:
        raise ValueError(
            f"source: {str(path)!r} is neither a graph directory (graph.json), an OGB dataset "
            "directory (RELEASE_v*.txt or meta_dict.pt) nor an edge list file"
        )
    params = {"source": kind, "path": str(path), "stamp": hashlib.sha256(stamp).hexdigest()}
    if kind == "ogb":
        params["generator_version"] = GENERATOR_VERSION
    return kind, path.name.replace("_", "-"), params


# ------------------------------------------------------------------- resources


def _synthetic_nodes(params: dict[str, Any]) -> int:
    return max(2, round(params["preset"]["num_nodes"] * params["scale"]))


def _synthetic_need(params: dict[str, Any]) -> int:
    """Peak disk bytes of a synthetic preparation, the largest of its stages: the generator's
    (candidate pairs and row buckets beside the raw CSR), the tiles beside the raw CSR, then
    the features beside the tiles, once the raw CSR is gone. At papers100M size (1.6 billion
    edges, 57 GB of features) that is 99 GB, where features generated first made it 156."""
    n = _synthetic_nodes(params)
    m = max(1, round(params["preset"]["num_edges"] * params["scale"]))
    features = FEATURE_DTYPES[params["feature_dtype"]].itemsize * n * params["preset"][
        "num_features"]
    raw = 8 * n + 12 * 2 * m  # labels and splits, the CSR (int64 indices, float32 values)
    tiles = _tile_bytes_estimate(n, 2 * m + n)
    generating = raw + 16 * m * 1.3 + 16 * m
    tiling = raw + tiles + _CEILING_MAX
    finishing = 8 * n + tiles + features
    return int(max(generating, tiling, finishing))


def _tile_bytes_estimate(n: int, nnz: int) -> int:
    """Bytes of ``Â``'s tiles: int32 indices, float32 values, a tile-local row pointer."""
    return 8 * nnz + 4 * n + (64 << 20)  # plus a margin for tile padding


def _memory_need(n: int, threads: int, tile_bytes: int) -> int:
    """Host bytes: degrees, row pointer, ``d^-1/2`` and a loop flag per node; per tile worker a
    tile's int64 indices and float32 values plus its packing buffer; 1 GiB of chunk buffers."""
    return 25 * n + threads * 3 * tile_bytes + (1 << 30)


def _disk_free(path: Path) -> int:
    """Free bytes on the file system holding ``path`` (a function so tests can fake it)."""
    return shutil.disk_usage(path).free


def _check_resources(path: Path, disk: int, memory: int) -> None:
    """Refuse before writing when the disk or host memory cannot hold the preparation."""
    free = _disk_free(path.parent)
    if disk > free:
        raise OSError(
            f"preparing {path} needs {disk / 1e9:.2f} GB of disk, but {path.parent} has "
            f"{free / 1e9:.2f} GB free ({disk} > {free} bytes)"
        )
    available = memory_available()
    if memory > available:
        raise OSError(
            f"preparing {path} needs {memory / 1e9:.2f} GB of host memory, but "
            f"{available / 1e9:.2f} GB are available ({memory} > {available} bytes)"
        )


# ------------------------------------------------------------------- building


def _build_prepared(
    kind: str,
    source: Synthetic | str | os.PathLike[str],
    params: dict[str, Any],
    key: str,
    tmp: Path,
    path: Path,
    feature_dtype: str,
    tile_bytes: int,
    progress: bool,
    chunk: int,
    threads: int,
    device: torch.device,
) -> dict[str, Any]:
    """Fill ``tmp`` with the prepared graph; returns the report (without the total time)."""
    timings: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[step] = round(now - clock, 3)
        clock = now

    raw = tmp / "raw"  # a conversion's graph, deleted once adopted
    graph_dir = _source_graph(kind, source, params, raw, device, progress)
    lap("source")
    meta = json.loads((graph_dir / MANIFEST).read_bytes())
    if meta.get("symmetric") is not True:
        raise NotImplementedError(
            f"{graph_dir}: the adjacency is not marked symmetric (symmetric="
            f"{meta.get('symmetric')!r}); prepare needs an undirected graph (convert with "
            "undirected=True)"
        )
    csr = RawCSR(graph_dir)
    generated = isinstance(source, Synthetic)
    n = csr.num_nodes
    f = params["preset"]["num_features"] if generated else int(meta["num_features"])
    out_dtype = FEATURE_DTYPES[feature_dtype]
    features_bytes = n * f * out_dtype.itemsize
    _check_resources(
        path,
        _tile_bytes_estimate(n, csr.nnz + n) + _CEILING_MAX
        + (0 if kind != "graph" and feature_dtype == "float32" else features_bytes),
        _memory_need(n, threads, tile_bytes),
    )

    degree, has_loop = degrees(csr, chunk, threads, progress)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(degree, out=indptr[1:])
    # The very operation gcn_norm applies to its float32 degrees, on the CPU like in-core runs.
    dinv = torch.from_numpy(degree.astype(np.float32)).pow(-0.5).numpy()
    del degree
    lap("degrees")
    ceiling = write_rate(tmp, _tile_bytes_estimate(n, int(indptr[-1])))
    lap("write_ceiling")
    normalised = NormalisedRows(csr, indptr, dinv, has_loop,
                                device=device if device.type == "cuda" else None)
    store = _build(
        _Source(indptr, normalised.indices, normalised.data, (n, n)),
        tmp / "adjacency",
        tile_bytes=tile_bytes,
        alignment=4096,
        index_dtype=None,
        value_dtype=np.float32,
        overwrite=False,
        progress=progress,
        symmetric=True,
        extra={"normalisation": "gcn_norm", "prepared_key": key},
        threads=threads,
        hash_device=device if device.type == "cuda" else None,
    )
    adjacency_bytes = store.data_path.stat().st_size
    store.close()
    del normalised
    lap("tiles")
    _write_labels(graph_dir, tmp, n, adopt=graph_dir == raw)
    csr.close()
    lap("labels")
    if generated:
        # The raw adjacency goes first: at papers100M size it and X would not fit beside Â.
        shutil.rmtree(raw, ignore_errors=True)
        _write_features(graph_dir, tmp, n, f, feature_dtype, adopt=False, progress=progress,
                        rows=_generated_rows(source, tmp, device))
    else:
        _write_features(graph_dir, tmp, n, f, feature_dtype, adopt=graph_dir == raw,
                        progress=progress)
        shutil.rmtree(raw, ignore_errors=True)
    lap("features")
    if device.type == "cuda":  # the normalisation's and the features' cached device memory:
        torch.cuda.empty_cache()  # a benchmark's methods measure the GPU's used memory next

    x_bytes = n * f * out_dtype.itemsize
    one_copy = 8 * (csr.nnz_hat) + 8 * (n + 1) + x_bytes  # Â in CSR (int32, f32) plus X
    on_disk = _disk_bytes(tmp)
    report = {
        "name": meta["name"],
        "num_nodes": n,
        "num_features": f,
        "num_classes": int(meta["num_classes"]),
        "edges": csr.nnz,
        "nnz": int(indptr[-1]),
        "feature_dtype": feature_dtype,
        "device": str(device),
        "threads": threads,
        "tile_bytes": tile_bytes,
        "tiles": len(store),
        "bytes": {
            "adjacency": adjacency_bytes,
            "features": x_bytes,
            "total_on_disk": on_disk,
            "one_adjacency_plus_features": one_copy,
            "disk_ratio": round(on_disk / max(1, one_copy), 4),
        },
        "write_ceiling": {
            "bytes_per_second": round(ceiling),
            "adjacency_seconds": round(adjacency_bytes / ceiling, 3),
            "tiling_ratio": round(timings["tiles"] / max(1e-9, adjacency_bytes / ceiling), 3),
        },
        "degree_pass_bytes_per_second": round(8 * csr.nnz / max(1e-9, timings["degrees"])),
        "timings": timings,
        "peak_rss_bytes": peak_rss(),
    }
    manifest = {
        "format": _FORMAT,
        "version": PREPARE_VERSION,
        "key": key,
        "params": params,
        "name": meta["name"],
        "num_nodes": n,
        "num_features": f,
        "num_classes": int(meta["num_classes"]),
        "feature_dtype": feature_dtype,
        "report": report,
    }
    with open(tmp / MANIFEST_NAME, "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(tmp)
    return report


def _source_graph(
    kind: str,
    source: Synthetic | str | os.PathLike[str],
    params: dict[str, Any],
    raw: Path,
    device: torch.device,
    progress: bool,
) -> Path:
    """The on-disk graph to prepare: generated or converted into ``raw``, or a saved one."""
    if isinstance(source, Synthetic):
        # No features yet: they are written once the raw adjacency is gone (_write_features).
        synthetic(source.preset, scale=source.scale, seed=source.seed, out=raw,
                  device=device, progress=progress, features=False)
    elif kind == "ogb":
        load_ogb(Path(params["path"]), out=raw, progress=progress)
    elif kind == "edgelist":
        convert_edge_list(Path(params["path"]), raw, progress=progress)
    else:
        return Path(params["path"])
    return raw


def peak_rss() -> int:
    """Peak resident set of this process so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _disk_bytes(directory: Path) -> int:
    """Bytes allocated on disk under ``directory`` (sparse holes not counted)."""
    return sum(p.stat().st_blocks * 512 for p in directory.rglob("*") if p.is_file())


def write_rate(tmp: Path, nbytes: int) -> float:
    """Sequential write rate of the disk under ``tmp``, bytes per second, fsync included (of
    ``nbytes``, held between 64 MiB and 1 GiB)."""
    blocks = min(_CEILING_MAX, max(_CEILING_MIN, nbytes)) // _SAMPLE_BLOCK
    block = np.ones(_SAMPLE_BLOCK, dtype=np.uint8)
    sample = tmp / "write-ceiling.bin"
    start = time.perf_counter()
    fd = os.open(sample, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for _ in range(blocks):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - start
    sample.unlink()
    return blocks * _SAMPLE_BLOCK / max(seconds, 1e-9)


# ------------------------------------------------------------------- features and labels


def _generated_rows(
    source: Synthetic, tmp: Path, device: torch.device
) -> Callable[[int, int], np.ndarray]:
    """Rows of the synthetic source's features, from the labels already in ``tmp``: the bytes
    the generator would have written (:func:`~aires.data.generator.feature_rows`)."""
    labels = np.load(tmp / "labels.npy", mmap_mode="r", allow_pickle=False)
    make = feature_rows(source.preset, source.seed, device)

    def rows(r0: int, r1: int) -> np.ndarray:
        r1 = min(r1, len(labels))
        return make(r0, r1, np.array(labels[r0:r1])).cpu().numpy()  # a writable copy

    return rows


def _write_features(
    graph_dir: Path, tmp: Path, n: int, f: int, feature_dtype: str, *, adopt: bool,
    progress: bool, rows: Callable[[int, int], np.ndarray] | None = None,
) -> None:
    """``tmp/features.npy``: the source's dense float32 file renamed when it is ours and already
    aligned float32; otherwise converted (or densified) row block by row block, or made by
    ``rows(r0, r1)`` (a generator's), while earlier blocks are written and their writeback
    runs (:mod:`aires.writeback`)."""
    if f == 0:
        return
    out_file = tmp / "features.npy"
    dense = graph_dir / "x.npy"
    if adopt and feature_dtype == "float32" and dense.is_file():
        if np.load(dense, mmap_mode="r", allow_pickle=False).offset % 4096 == 0:
            os.rename(dense, out_file)
            return
    dtype = FEATURE_DTYPES[feature_dtype]
    open_aligned_npy(out_file, dtype, (n, f))  # the header, and the file at its size
    rows = rows or _graph_rows(graph_dir)
    row_bytes = f * dtype.itemsize
    step = max(1, _FEATURE_BLOCK // row_bytes)
    fd = os.open(out_file, os.O_WRONLY)
    try:
        with ThreadPoolExecutor(_FEATURE_WRITERS, thread_name_prefix="aires-features") as pool:
            pending: deque[Future[None]] = deque()
            for r0 in progress_bar(range(0, n, step), desc="features", disable=not progress):
                block = _feature_bytes(rows(r0, r0 + step), feature_dtype)
                pending.append(pool.submit(
                    pwrite_all, fd, block, ALIGNMENT + r0 * row_bytes,
                    f"feature rows from {r0} to {out_file}"))
                if len(pending) > _FEATURE_WRITERS:
                    pending.popleft().result()
            for future in pending:
                future.result()
        os.fsync(fd)  # on disk before the directory is renamed into place, as GraphWriter does
    finally:
        os.close(fd)


def _feature_bytes(block: np.ndarray, feature_dtype: str) -> memoryview:
    """A block of feature rows as the bytes of ``feature_dtype``."""
    values = np.ascontiguousarray(block, dtype=np.float32)
    if feature_dtype == "bf16":  # numpy has no bfloat16: torch rounds, its bits are stored
        values = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    else:
        values = values.astype(FEATURE_DTYPES[feature_dtype], copy=False)
    return memoryview(values).cast("B")


def _graph_rows(graph_dir: Path) -> Callable[[int, int], np.ndarray]:
    """Rows of a graph directory's features: its dense file's, or its sparse ones densified."""
    dense = graph_dir / "x.npy"
    if dense.is_file():
        source = np.load(dense, mmap_mode="r", allow_pickle=False)

        def rows(r0: int, r1: int) -> np.ndarray:
            block = np.array(source[r0:r1], dtype=np.float32)
            release_pages(source)
            return block

        return rows
    graph = open_graph(graph_dir)
    return lambda r0, r1: graph.x[r0:r1].toarray()


def _write_labels(graph_dir: Path, tmp: Path, n: int, *, adopt: bool) -> None:
    """Labels (-1 where absent) and split indices, moved from our conversion or copied."""
    move = os.rename if adopt else shutil.copyfile
    if (graph_dir / "y.npy").is_file():
        move(graph_dir / "y.npy", tmp / "labels.npy")
    else:
        np.save(tmp / "labels.npy", np.full(n, -1, dtype=np.int64))
    for split in _SPLITS:
        move(graph_dir / f"{split}.npy", tmp / f"{split}.npy")


# ------------------------------------------------------------------- opening


def _open(path: Path, *, reused: bool, timings: dict[str, float]) -> Prepared:
    """Open a complete prepared directory."""
    manifest = json.loads((path / MANIFEST_NAME).read_bytes())
    if manifest.get("format") != _FORMAT or manifest.get("version") != PREPARE_VERSION:
        raise ValueError(
            f"{path / MANIFEST_NAME}: format {manifest.get('format')!r} version "
            f"{manifest.get('version')!r} is not readable here (expected {_FORMAT!r} version "
            f"{PREPARE_VERSION}); delete {path} to prepare it again"
        )
    n, f = int(manifest["num_nodes"]), int(manifest["num_features"])
    adjacency = TileStore.open(path / "adjacency")
    features = None
    features_path = None
    offset = 0
    if f:
        features_path = path / "features.npy"
        features = np.load(features_path, mmap_mode="r", allow_pickle=False)
        expected = FEATURE_DTYPES[manifest["feature_dtype"]]
        if features.shape != (n, f) or features.dtype != expected:
            raise ValueError(
                f"{features_path}: dtype {features.dtype} shape {features.shape}, expected "
                f"{expected} {(n, f)}"
            )
        offset = int(features.offset)

    def load(name: str) -> np.ndarray:
        return np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)

    return Prepared(
        path=path,
        name=manifest["name"],
        num_nodes=n,
        num_features=f,
        num_classes=int(manifest["num_classes"]),
        adjacency=adjacency,
        features=features,
        features_path=features_path,
        features_offset=offset,
        feature_dtype=manifest["feature_dtype"],
        labels=load("labels"),
        train_idx=load("train_idx"),
        val_idx=load("val_idx"),
        test_idx=load("test_idx"),
        timings=timings,
        peak_rss_bytes=peak_rss(),
        reused=reused,
        report={**manifest["report"], "reused": reused, "timings": timings,
                "peak_rss_bytes": peak_rss()},
    )
