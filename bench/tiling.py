"""Tiler benchmark: tiling and tile-read throughput against the same disk's sequential bandwidth.

On a synthetic power-law CSR matrix (default 120M nonzeros, int32 indices, float32 values) kept
as memory maps in ``--dir``, one run measures, on the disk behind ``--dir``:

- **sequential write**: a file as large as the store written in 64 MiB ``pwrite`` calls and
  fsynced (what ``dd ... conv=fsync`` does), the baseline for
- **tiling**: ``build_store`` from the memory maps (inputs in the page cache, as right after
  they were produced), including its fsync, for each tile size. Target: at most 1.5x the
  sequential write at the default tile size.
- **sequential read**, cold: the store's data file read front to back, by one thread in 16 MiB
  reads (``dd``-like) and, for each other count in ``--threads``, in 64 MiB requests split over
  that many threads; the best is the baseline for
- **tile reads**, cold, for each tile size and each path: POSIX into a host buffer (pinned when
  CUDA is there) for each thread count, and with the CRC check; KvikIO into a host buffer and
  into GPU memory; POSIX through a pinned bounce buffer into GPU memory (these three with the
  largest thread count). Target: the best POSIX tile read at the default tile size reaches 90%
  of the best sequential read.

"Cold" means the file's pages were evicted before each pass (``posix_fadvise(DONTNEED)``, plus
``echo 3 > /proc/sys/vm/drop_caches`` when running as root); the JSON says what worked.

Example (GPU machine)::

    python -m bench.tiling --dir /tmp/aires-bench --out bench/results/tiling-h100.json
    python -m bench.tiling --nnz 2M --tile-sizes 256KiB,1MiB --default-tile 1MiB  # smoke
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aires.checks import check_positive_int, parse_size
from aires.tiling import TileStore, build_store
from aires.tiling.reader import KvikioReader, PosixReader, io_mode
from bench.provenance import versions

__all__ = [
    "READ_VARIANTS",
    "evict",
    "main",
    "make_matrix",
    "parse_args",
    "read_tiles",
    "run",
    "sequential_read",
    "sequential_write",
]

READ_VARIANTS = ("posix-host", "posix-host-verified", "kvikio-host", "kvikio-gpu", "bounce-gpu")

_WRITE_CHUNK = 64 << 20
_DD_CHUNK = 16 << 20
_GEN_CHUNK = 1 << 24


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (sizes accept units: ``120M`` nonzeros, ``64MiB`` tiles)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.tiling", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--nnz", default="120M", help="nonzeros of the synthetic matrix (120M)")
    parser.add_argument("--rows", default=None, help="rows (= columns); default nnz / 50")
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "aires-tiling-bench",
        help="scratch directory on the disk to measure",
    )
    parser.add_argument("--tile-sizes", default="1MiB,4MiB,16MiB,64MiB,256MiB")
    parser.add_argument("--default-tile", default="64MiB", help="the tile size the targets use")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per measurement")
    parser.add_argument(
        "--threads",
        default="1,16",
        help="I/O thread counts to try for POSIX reads (the largest also for KvikIO/bounce)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-drop-caches",
        dest="drop_caches",
        action="store_false",
        help="evict only the measured file (fadvise), never the whole page cache",
    )
    parser.add_argument("--keep", action="store_true", help="keep the matrix for the next run")
    parser.add_argument("--out", type=Path, default=Path("bench/results/tiling.json"))
    return parser.parse_args(argv)


def make_matrix(directory: Path, nnz: int, rows: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """A square power-law CSR matrix as memory maps ``(indptr, indices, data)`` in ``directory``.

    Row lengths follow a Pareto law (a few hub rows, many short ones), columns are uniform,
    values in ``[0.5, 1.5)``. Written chunk by chunk, so it never needs the matrix in RAM; an
    existing matrix with the same parameters is reused.
    """
    directory.mkdir(parents=True, exist_ok=True)
    meta_path, params = directory / "matrix.json", {"nnz": nnz, "rows": rows, "seed": seed}
    names = ("indptr", "indices", "data")
    if meta_path.is_file() and json.loads(meta_path.read_text()) == params:
        return tuple(np.load(directory / f"{n}.npy", mmap_mode="r", allow_pickle=False) for n in names)
    meta_path.unlink(missing_ok=True)
    rng = np.random.default_rng(seed)
    weights = rng.pareto(1.5, rows) + 1.0
    lengths = np.floor(weights * (nnz / weights.sum())).astype(np.int64)
    lengths[rng.choice(rows, nnz - int(lengths.sum()), replace=False)] += 1
    indptr = np.lib.format.open_memmap(directory / "indptr.npy", "w+", np.int64, (rows + 1,))
    indptr[0] = 0
    np.cumsum(lengths, out=indptr[1:])
    indices = np.lib.format.open_memmap(directory / "indices.npy", "w+", np.int32, (nnz,))
    data = np.lib.format.open_memmap(directory / "data.npy", "w+", np.float32, (nnz,))
    for start in range(0, nnz, _GEN_CHUNK):
        stop = min(start + _GEN_CHUNK, nnz)
        indices[start:stop] = rng.integers(0, rows, stop - start, dtype=np.int32)
        data[start:stop] = rng.random(stop - start, dtype=np.float32) + np.float32(0.5)
    for array in (indptr, indices, data):
        array.flush()
    meta_path.write_text(json.dumps(params))
    return indptr, indices, data


def evict(path: Path, *, drop_caches: bool = True) -> dict[str, bool]:
    """Drop ``path``'s pages from the page cache; which methods worked.

    ``fadvise`` evicts the file's clean pages without root; ``drop_caches`` (root only, when
    asked) drops every clean page cache entry of the machine, as a cold start would.
    """
    done = {"fadvise": False, "drop_caches": False}
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        done["fadvise"] = True
    except OSError:
        pass
    finally:
        os.close(fd)
    if drop_caches:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as control:
                control.write("3\n")
            done["drop_caches"] = True
        except OSError:
            pass
    return done


def sequential_write(path: Path, nbytes: int) -> float:
    """Seconds to write ``nbytes`` of random bytes to a new ``path`` in 64 MiB writes + fsync."""
    block = memoryview(np.random.default_rng(1).integers(0, 256, _WRITE_CHUNK, dtype=np.uint8))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        start = time.perf_counter()
        for offset in range(0, nbytes, _WRITE_CHUNK):
            chunk = block[: min(_WRITE_CHUNK, nbytes - offset)]
            done = 0
            while done < len(chunk):
                done += os.pwrite(fd, chunk[done:], offset + done)
        os.fsync(fd)
        return time.perf_counter() - start
    finally:
        os.close(fd)
        path.unlink()


def sequential_read(path: Path, *, threads: int) -> float:
    """Seconds to read all of ``path`` front to back.

    ``threads == 1``: ``dd``-like 16 MiB ``readinto`` calls. More: 64 MiB requests, each split
    into 4 MiB pieces read concurrently (the tile readers' machinery without tiles).
    """
    size = path.stat().st_size
    if threads == 1:
        buf = memoryview(bytearray(_DD_CHUNK))
        start = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while f.readinto(buf):
                pass
        return time.perf_counter() - start
    reader = PosixReader(path, threads=threads)
    buf = np.empty(_WRITE_CHUNK, dtype=np.uint8)
    try:
        start = time.perf_counter()
        for offset in range(0, size, _WRITE_CHUNK):
            reader.read(offset, min(_WRITE_CHUNK, size - offset), buf)
        return time.perf_counter() - start
    finally:
        reader.close()


def read_tiles(path: Path, variant: str, *, threads: int, drop_caches: bool = True) -> float:
    """Seconds to read every tile of the store at ``path`` in order by one path (``variant``).

    Variants: ``posix-host``, ``posix-host-verified`` (``TileStore.read_bytes`` into a host
    buffer, pinned when CUDA is available as the scheduler's are), ``kvikio-host``,
    ``kvikio-gpu`` (``read_bytes`` into GPU memory, by KvikIO), ``bounce-gpu`` (POSIX through
    a pinned bounce buffer). ``threads``: the store's ``io_threads`` / KvikIO's threads.
    """
    if variant not in READ_VARIANTS:
        raise ValueError(f"variant must be one of {READ_VARIANTS}, got {variant!r}")
    with TileStore.open(path, io_threads=threads) as store, contextlib.ExitStack() as readers:
        tiles, nbytes = store.tiles, store.max_tile_nbytes
        cuda = torch.cuda.is_available()
        if variant.endswith("gpu"):
            buf: Any = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=cuda).numpy()
        if variant == "kvikio-host":
            kvikio = KvikioReader(store.data_path, threads=threads)
            readers.callback(kvikio.close)
            read = lambda t: kvikio.read(t.offset, t.nbytes, buf[: t.nbytes])  # noqa: E731
        elif variant == "bounce-gpu":
            posix = PosixReader(store.data_path, threads=threads)
            readers.callback(posix.close)
            posix.read_to_tensor(0, tiles[0].nbytes, buf)  # pins the bounce buffer untimed
            read = lambda t: posix.read_to_tensor(t.offset, t.nbytes, buf)  # noqa: E731
        else:
            verify = variant == "posix-host-verified"
            store.read_bytes(0, buf, verify=False)  # opens the store's readers untimed
            read = lambda t: store.read_bytes(t.index, buf, verify=verify)  # noqa: E731
        evict(store.data_path, drop_caches=drop_caches)
        start = time.perf_counter()
        for tile in tiles:
            read(tile)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start


def warm(paths: list[Path]) -> None:
    """Read ``paths`` once so the build reads its inputs from the page cache."""
    buf = memoryview(bytearray(_DD_CHUNK))
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def run(args: argparse.Namespace, command: str = "python -m bench.tiling") -> dict[str, Any]:
    """Run every measurement; the JSON-ready result (``command`` is recorded in it)."""
    nnz = parse_size(args.nnz, "nnz")
    rows = parse_size(args.rows, "rows") if args.rows is not None else max(1, nnz // 50)
    repeats = check_positive_int(args.repeats, "repeats")
    threads = sorted({check_positive_int(int(n), "threads") for n in str(args.threads).split(",")})
    default_tile = parse_size(args.default_tile, "default_tile")
    sizes = sorted(
        {parse_size(s, "tile_sizes") for s in args.tile_sizes.split(",")} | {default_tile}
    )
    scratch = Path(args.dir)
    mode = io_mode()
    variants = ["posix-host", "posix-host-verified"]
    if torch.cuda.is_available():
        variants += ["kvikio-host", "kvikio-gpu"] if mode != "posix" else []
        variants += ["bounce-gpu"]
    cache = evict_probe(scratch, drop_caches=args.drop_caches)
    print(banner(mode, cache, scratch), flush=True)

    t0 = time.perf_counter()
    indptr, indices, data = make_matrix(scratch / "matrix", nnz, rows, args.seed)
    print(f"matrix: {nnz:,} nonzeros, {rows:,} rows ({time.perf_counter() - t0:.1f} s)", flush=True)
    matrix = (indptr, indices, data, (rows, rows))
    result: dict[str, Any] = {
        "benchmark": "tiling",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "device": device(),
        "versions": versions(),
        "io_mode": mode,
        "cache": cache,
        "config": {
            "dir": str(scratch),
            "filesystem": filesystem(scratch),
            "tile_sizes": sizes,
            "default_tile": default_tile,
            "repeats": repeats,
            "threads": threads,
        },
        "matrix": {
            "nnz": nnz,
            "rows": rows,
            "cols": rows,
            "index_dtype": "int32",
            "value_dtype": "float32",
            "max_row_nnz": int(np.diff(indptr).max()),
            "input_bytes": int(indptr.nbytes + indices.nbytes + data.nbytes),
            "inputs": "page cache (warm)",
        },
        "builds": [],
        "reads": [],
    }
    store_path = scratch / "store"
    for tile_bytes in sizes:
        builds = repeats if tile_bytes == default_tile else 1
        seconds = []
        for _ in range(builds):
            shutil.rmtree(store_path, ignore_errors=True)
            warm([scratch / "matrix" / f"{name}.npy" for name in ("indptr", "indices", "data")])
            start = time.perf_counter()
            store = build_store(matrix, store_path, tile_bytes=tile_bytes, progress=False)
            seconds.append(time.perf_counter() - start)
        size = store.data_path.stat().st_size
        entry = {
            "tile_bytes": tile_bytes,
            "tiles": len(store),
            "bytes": size,
            **timing(seconds, size),
        }
        result["builds"].append(entry)
        print(
            f"build  {human(tile_bytes):>8}: {entry['GBps']:.2f} GB/s ({len(store)} tiles)",
            flush=True,
        )
        if tile_bytes == default_tile:
            write = [sequential_write(scratch / "seq-write.bin", size) for _ in range(repeats)]
            result["seq_write"] = {"bytes": size, **timing(write, size)}
            reads = {}
            for n in threads:
                times = []
                for _ in range(repeats):
                    evict(store.data_path, drop_caches=args.drop_caches)
                    times.append(sequential_read(store.data_path, threads=n))
                reads[f"threads_{n}"] = {"threads": n, **timing(times, size)}
            best = max(r["GBps"] for r in reads.values())
            result["seq_read"] = {"bytes": size, "GBps": best, **reads}
            print(
                f"seq write {result['seq_write']['GBps']:.2f} GB/s, seq read {best:.2f} GB/s",
                flush=True,
            )
        store.close()
        for variant in variants:
            for n in threads if variant == "posix-host" else threads[-1:]:
                times = [
                    read_tiles(store_path, variant, threads=n, drop_caches=args.drop_caches)
                    for _ in range(repeats)
                ]
                entry = {"tile_bytes": tile_bytes, "variant": variant, "threads": n}
                entry.update(timing(times, size))
                result["reads"].append(entry)
                print(
                    f"read   {human(tile_bytes):>8} {variant:>20} x{n:<3}: "
                    f"{entry['GBps']:.2f} GB/s",
                    flush=True,
                )
        shutil.rmtree(store_path)
    if not args.keep:
        shutil.rmtree(scratch / "matrix")
    result["targets"] = targets(result, default_tile)
    return result


def targets(result: dict[str, Any], default_tile: int) -> dict[str, Any]:
    """The issue's two targets at the default tile size, and ratios for every measurement."""
    write_s, read_gbps = result["seq_write"]["mean_s"], result["seq_read"]["GBps"]
    for build in result["builds"]:
        # Seconds per byte against seconds per byte: stores of other tile sizes differ a little.
        build["ratio_to_seq_write"] = (
            build["mean_s"] * result["seq_write"]["bytes"] / (build["bytes"] * write_s)
        )
    for read in result["reads"]:
        read["ratio_to_seq_read"] = read["GBps"] / read_gbps
    build = next(b for b in result["builds"] if b["tile_bytes"] == default_tile)
    read = max(
        (
            r
            for r in result["reads"]
            if r["tile_bytes"] == default_tile and r["variant"] == "posix-host"
        ),
        key=lambda r: r["GBps"],
    )
    return {
        "build_vs_seq_write": {
            "ratio": build["ratio_to_seq_write"],
            "target_max": 1.5,
            "met": build["ratio_to_seq_write"] <= 1.5,
        },
        "read_vs_seq_read": {
            "ratio": read["ratio_to_seq_read"],
            "threads": read["threads"],
            "target_min": 0.9,
            "met": read["ratio_to_seq_read"] >= 0.9,
        },
    }


def timing(seconds: list[float], nbytes: int) -> dict[str, Any]:
    """Mean, spread and bandwidth (decimal GB/s of the mean) of repeated passes."""
    mean = statistics.fmean(seconds)
    return {
        "seconds": seconds,
        "mean_s": mean,
        "std_s": statistics.stdev(seconds) if len(seconds) > 1 else 0.0,
        "GBps": nbytes / mean / 1e9 if mean > 0 else float("inf"),
    }


def evict_probe(directory: Path, *, drop_caches: bool) -> dict[str, Any]:
    """Whether cold-cache passes are possible here (tried on a small file)."""
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / "evict-probe.bin"
    probe.write_bytes(b"\0" * 4096)
    done = evict(probe, drop_caches=drop_caches)
    probe.unlink()
    return {"cold": done["fadvise"] or done["drop_caches"], **done}


def banner(mode: str, cache: dict[str, Any], scratch: Path) -> str:
    """One paragraph: device, I/O mode and whether reads are cold."""
    how = (
        "drop_caches + fadvise"
        if cache["drop_caches"]
        else "fadvise" if cache["fadvise"] else "none"
    )
    return (
        f"== tiling benchmark on {device()['name']}\n"
        f"   io_mode={mode} (gds: GPUDirect Storage; kvikio-compat: KvikIO via bounce buffers; "
        f"posix: no KvikIO/CUDA)\n"
        f"   cold cache: {cache['cold']} (eviction: {how}); scratch {scratch} "
        f"({filesystem(scratch)})"
    )


def device() -> dict[str, Any]:
    """CPU, and GPU when there is one."""
    facts: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "name": f"CPU ({os.cpu_count()} cores)",
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        facts.update(
            name=props.name, gpu=props.name, gpu_bytes=props.total_memory, cuda=torch.version.cuda
        )
    return facts


def filesystem(path: Path) -> str | None:
    """Type of the file system holding ``path`` (from ``/proc/mounts``), e.g. ``ext4``."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return None
    target = str(path.resolve())
    best = max(
        (
            m
            for m in mounts
            if len(m) > 2 and (target == m[1] or target.startswith(m[1].rstrip("/") + "/"))
        ),
        key=lambda m: len(m[1]),
        default=None,
    )
    return best[2] if best else None


def human(nbytes: int) -> str:
    """``nbytes`` in binary units, as the CLI takes them."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size and nbytes % size == 0:
            return f"{nbytes // size}{unit}"
    return f"{nbytes}B"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the JSON; exit status 0 (targets are reported, not enforced)."""
    args = parse_args(argv)
    command = " ".join(["python -m bench.tiling", *(sys.argv[1:] if argv is None else argv)])
    result = run(args, command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    t = result["targets"]
    print(
        f"targets: build/seq-write {t['build_vs_seq_write']['ratio']:.2f} (<= 1.5: "
        f"{t['build_vs_seq_write']['met']}), tile read/seq read "
        f"{t['read_vs_seq_read']['ratio']:.2f} (>= 0.9: {t['read_vs_seq_read']['met']}); "
        f"wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
