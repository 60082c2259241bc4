"""Synthetic RMAT graphs (:func:`synthetic`) of OGB sizes, generated out of core.

A preset fixes the node count, the undirected edge count, the feature dimension, the number of
classes and the split fractions of one OGB dataset; ``scale`` multiplies nodes and edges. The
graph has **exactly** that many nodes and undirected edges (RMAT with the Graph500 initiator,
symmetrised, no self loops, no duplicates: see :mod:`aires.data._rmat`), all of it deterministic
from the seed and independent of the chunk size and of the device.

Labels and features carry signal, so that training on a synthetic graph means something: the
RMAT grid is cut into ``C`` contiguous blocks of ids, one class each (RMAT links ids that share
leading bits more often, so classes are homophilous), and node ``i``'s features are its class
centroid plus uniform noise: ``x[i] = mu[y[i]] + noise * U(-1, 1)`` with ``mu ~ U(-1, 1)``.
Sparse features keep each entry with probability ``feature_density``.

Everything is written chunk by chunk to memmaps (never all edges in memory), on the GPU when
there is one, and cached under ``cache_dir`` keyed by a hash of the parameters.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aires.data._external_sort import CSRBuilder
from aires.data._rmat import GRAPH500, RmatSampler
from aires.data._splitmix import stream_key, uniform
from aires.data.graph import Graph
from aires.data.storage import (
    FORMAT_VERSION,
    GraphWriter,
    is_graph_dir,
    open_graph,
    release_pages,
)
from aires.progress import progress_bar

__all__ = [
    "Preset", "PRESETS", "GENERATOR_VERSION", "default_cache_dir", "feature_rows", "synthetic",
]

#: Bumped whenever the same parameters would give different bytes (invalidates caches).
GENERATOR_VERSION = 1

_CHUNK_CPU = 1 << 24
_CHUNK_CUDA = 1 << 26


@dataclass(frozen=True)
class Preset:
    """Sizes of one synthetic graph family at ``scale=1``.

    Attributes:
        name: the preset's name.
        num_nodes: nodes.
        num_edges: undirected edges (the adjacency stores twice as many entries).
        num_features: feature dimension.
        num_classes: classes.
        split: fractions of nodes in train, validation and test (the rest are in no split).
        feature_noise: amplitude of the uniform noise around each class centroid.
    """

    name: str
    num_nodes: int
    num_edges: int
    num_features: int
    num_classes: int
    split: tuple[float, float, float]
    feature_noise: float = 3.0

    def sizes(self, scale: float) -> tuple[int, int]:
        """``(nodes, undirected edges)`` at ``scale`` (both rounded, nodes at least 2)."""
        return max(2, round(self.num_nodes * scale)), max(1, round(self.num_edges * scale))


#: The presets; sizes of ogbn-arxiv, ogbn-products and ogbn-papers100M, plus ``tiny`` for tests.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("tiny", 1_000, 8_000, 16, 4, (0.6, 0.2, 0.2)),
        Preset("arxiv", 169_343, 1_166_243, 128, 40, (0.537, 0.176, 0.287)),
        Preset("products", 2_449_029, 61_859_140, 100, 47, (0.0803, 0.0161, 0.9037)),
        Preset("papers100M", 111_059_956, 1_615_685_872, 128, 172, (0.0109, 0.0011, 0.0019)),
    )
}


def default_cache_dir() -> Path:
    """``$AIRES_CACHE`` if set, else ``~/.cache/aires/graphs``."""
    return Path(os.environ.get("AIRES_CACHE") or Path.home() / ".cache" / "aires" / "graphs")


def synthetic(
    preset: str | Preset,
    *,
    scale: float = 1.0,
    seed: int = 0,
    feature_density: float | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    chunk_size: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    features: bool = True,
) -> Graph:
    """A synthetic RMAT graph, generated once and then opened from disk (memmap-backed).

    Args:
        preset: a name in :data:`PRESETS` (case-insensitive) or a :class:`Preset`.
        scale: multiplies the preset's nodes and edges (> 0).
        seed: the random seed (an int >= 0).
        feature_density: ``None`` for dense float32 features; a fraction in ``(0, 1]`` for sparse
            CSR features with about that share of stored entries.
        cache_dir: where generated graphs are kept (default :func:`default_cache_dir`); the
            directory name holds the preset, scale, seed and a hash of every parameter.
        out: write the graph to this directory instead of the cache.
        overwrite: generate again even if the graph exists (at ``out`` or in the cache).
        chunk_size: entries handled in memory at once (default 2**26 on CUDA, 2**24 on CPU);
            does not change the result.
        device: ``"cuda"``/``"cpu"``; default CUDA when available.
        progress: show progress bars (tqdm, on stderr).
        features: write the features; ``False`` leaves them out (the graph has none, and its
            disk peak is the edges' alone), for a caller that writes them elsewhere later with
            :func:`feature_rows` (dense features only).

    Returns:
        The graph; ``provenance["generation"]`` holds timings and counts of the run that made it.

    Raises:
        ValueError: unknown preset (the message lists them), or a bad scale, seed, density,
            chunk size or size combination.
        FileExistsError: ``out`` holds something else and ``overwrite`` is false.
        OSError: not enough free disk space for the graph and its temporary files.
    """
    spec = _resolve(preset)
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float))
        or not math.isfinite(scale)
        or scale <= 0
    ):
        raise ValueError(f"scale must be a positive finite number, got {scale!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if feature_density is not None and not (
        isinstance(feature_density, (int, float)) and 0 < feature_density <= 1
    ):
        raise ValueError(
            f"feature_density must be None (dense) or in (0, 1], got {feature_density!r}"
        )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1024
    ):
        raise ValueError(f"chunk_size must be an int >= 1024, got {chunk_size!r}")
    dev = torch.device(device) if device is not None else _default_device()
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA GPU is visible")
    num_nodes, num_edges = spec.sizes(scale)
    if num_nodes >= 2**31:
        raise ValueError(f"scale={scale} gives {num_nodes} nodes; at most 2**31 - 1 are supported")
    if num_edges > 0.1 * num_nodes * (num_nodes - 1) / 2:
        raise ValueError(
            f"scale={scale} gives {num_edges} edges on {num_nodes} nodes, over 10% of all pairs; "
            "RMAT cannot reach that many distinct edges"
        )
    params = {
        "generator": "rmat",
        "generator_version": GENERATOR_VERSION,
        "format_version": FORMAT_VERSION,
        "preset": dataclasses.asdict(spec),
        "scale": float(scale),
        "seed": int(seed),
        "rmat": list(GRAPH500),
        "features": "dense" if feature_density is None else "sparse",
        "feature_density": None if feature_density is None else float(feature_density),
    }
    if not features:
        if feature_density is not None:
            raise ValueError("features=False leaves out dense features only; "
                             f"feature_density={feature_density!r} asks for sparse ones")
        params["features"] = "none"
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
    label = f"{spec.name}-x{scale:g}-s{seed}" + (
        "" if feature_density is None else f"-sparse{feature_density:g}"
    )
    if out is not None:
        path = Path(out).expanduser()
        if path.exists() and not overwrite:
            existing = open_graph(path) if is_graph_dir(path) else None
            if existing is not None and existing.provenance.get("key") == key:
                return existing
            raise FileExistsError(
                f"{path} exists and is not this graph; pass overwrite=True to replace it"
            )
    else:
        path = Path(cache_dir or default_cache_dir()).expanduser() / f"{label}-{key[:12]}"
        if is_graph_dir(path) and not overwrite:
            return open_graph(path)
    chunk = chunk_size or (_CHUNK_CUDA if dev.type == "cuda" else _CHUNK_CPU)
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_disk(path.parent, num_nodes, num_edges, spec.num_features if features else 0,
                feature_density)
    try:
        with GraphWriter(path, overwrite=overwrite) as writer:
            stats = _generate(
                writer, spec, num_nodes, num_edges, seed, feature_density, chunk, dev, progress,
                features,
            )
            writer.commit(
                name=label,
                num_nodes=num_nodes,
                num_features=spec.num_features if features else 0,
                num_classes=spec.num_classes,
                symmetric=True,
                provenance={
                    "source": "synthetic",
                    "params": params,
                    "key": key,
                    "generation": stats,
                },
            )
    except FileExistsError:
        if out is None and is_graph_dir(path):
            return open_graph(path)  # another process cached the same graph first
        raise
    return open_graph(path)


def _resolve(preset: str | Preset) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if isinstance(preset, str):
        for name, spec in PRESETS.items():
            if name.lower() == preset.lower():
                return spec
    raise ValueError(f"unknown preset {preset!r}; valid presets: {', '.join(PRESETS)}")


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _check_disk(parent: Path, n: int, m: int, f: int, density: float | None) -> None:
    """Fail before starting when the disk cannot hold the graph and its temporary files."""
    feats = 4 * n * f if density is None else 12 * n * f * density + 8 * n
    # Candidate pairs (16 B each, ~1.3 per edge) and row buckets (8 B per entry) coexist at peak.
    need = int(feats + 8 * n + 16 * m * 1.3 + 16 * m + 12 * 2 * m)
    free = shutil.disk_usage(parent).free
    if free < need:
        raise OSError(
            f"generating this graph needs about {need / 1e9:.1f} GB under {parent}, "
            f"{free / 1e9:.1f} GB are free; use a smaller scale or another cache_dir/out"
        )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(
    writer: GraphWriter,
    spec: Preset,
    n: int,
    m: int,
    seed: int,
    density: float | None,
    chunk: int,
    device: torch.device,
    progress: bool,
    features: bool = True,
) -> dict[str, Any]:
    """Fill ``writer`` with the graph; returns the run's statistics."""
    phases: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        _sync(device)
        now = time.perf_counter()
        phases[phase] = round(now - clock, 3)
        clock = now

    sampler = RmatSampler(n, seed, device=device)
    builder = CSRBuilder(
        writer.workdir / "rows", n, n, expected_entries=2 * m, chunk_size=chunk, device=device
    )
    for keys in sampler.select(
        m, workdir=writer.workdir / "pairs", chunk_size=chunk, progress=progress
    ):
        lo = keys // n
        hi = keys - lo * n
        builder.add(torch.cat([lo, hi]), torch.cat([hi, lo]))
    lap("edges")

    def allocate(nnz: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if nnz != 2 * m:
            raise RuntimeError(f"internal error: {nnz} adjacency entries for {m} undirected edges")
        return writer.adjacency(n, nnz)

    builder.finish(allocate, progress=progress)
    lap("csr")
    y = writer.array("y", (n,))
    for start in _chunks(n, chunk, "labels", progress):
        raw = torch.arange(start, min(n, start + chunk), device=device)
        y[sampler.permute(raw).cpu().numpy()] = (raw * spec.num_classes // n).cpu().numpy()
    _write_split(writer, spec, n, seed, chunk, device, progress)
    lap("labels")
    if features:
        if density is None:
            _write_dense_features(writer, y, spec, seed, chunk, device, progress)
        else:
            _write_sparse_features(writer, y, spec, seed, density, chunk, device, progress)
        lap("features")
    return {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "chunk_size": chunk,
        "seconds": round(sum(phases.values()), 3),
        "phase_seconds": phases,
        **sampler.stats,
    }


def _chunks(total: int, size: int, desc: str, progress: bool) -> Iterator[int]:
    bar = progress_bar(total=total, desc=desc, disable=not progress, leave=False)
    for start in range(0, total, size):
        yield start
        bar.update(min(size, total - start))
    bar.close()


def _write_split(
    writer: GraphWriter,
    spec: Preset,
    n: int,
    seed: int,
    chunk: int,
    device: torch.device,
    progress: bool,
) -> None:
    key = stream_key(seed, "split")
    bounds = np.cumsum(spec.split)
    parts: list[list[np.ndarray]] = [[], [], []]
    for start in _chunks(n, chunk, "split", progress):
        nodes = torch.arange(start, min(n, start + chunk), device=device)
        u = uniform(nodes, key)
        lower = 0.0
        for part, upper in zip(parts, bounds):
            part.append(nodes[(u >= lower) & (u < float(upper))].cpu().numpy())
            lower = float(upper)
    for name, part in zip(("train_idx", "val_idx", "test_idx"), parts):
        writer.put(name, np.concatenate(part))


def feature_rows(
    preset: str | Preset, seed: int, device: torch.device
) -> Callable[[int, int, np.ndarray], torch.Tensor]:
    """A function giving the dense feature rows ``[start, stop)`` of ``preset`` at ``seed``,
    at any scale, from those rows' labels: the bytes :func:`synthetic` writes (on ``device``)."""
    spec = _resolve(preset)
    f = spec.num_features
    cells = torch.arange(spec.num_classes * f, device=device)
    centroids = (2 * uniform(cells, stream_key(seed, "centroids")) - 1).reshape(spec.num_classes, f)
    noise_key = stream_key(seed, "feature-noise")

    def rows(start: int, stop: int, labels: np.ndarray) -> torch.Tensor:
        cell = torch.arange(start * f, stop * f, device=device).reshape(stop - start, f)
        noise = spec.feature_noise * (2 * uniform(cell, noise_key) - 1)
        return centroids[torch.from_numpy(labels).to(device)] + noise

    return rows


def _write_dense_features(
    writer: GraphWriter,
    y: np.ndarray,
    spec: Preset,
    seed: int,
    chunk: int,
    device: torch.device,
    progress: bool,
) -> None:
    n = len(y)
    x = writer.array("x", (n, spec.num_features))
    rows = feature_rows(spec, seed, device)
    step = max(1, chunk // spec.num_features)
    for start in _chunks(n, step, "features", progress):
        stop = min(n, start + step)
        x[start:stop] = rows(start, stop, np.asarray(y[start:stop])).cpu().numpy()
        release_pages(x)


def _write_sparse_features(
    writer: GraphWriter,
    y: np.ndarray,
    spec: Preset,
    seed: int,
    density: float,
    chunk: int,
    device: torch.device,
    progress: bool,
) -> None:
    """Two passes: count the kept entries per row, then fill indices and values."""
    n, f = len(y), spec.num_features
    rows = feature_rows(spec, seed, device)
    mask_key = stream_key(seed, "feature-mask")
    step = max(1, chunk // f)

    def mask(start: int, stop: int) -> torch.Tensor:
        cell = torch.arange(start * f, stop * f, device=device).reshape(stop - start, f)
        return uniform(cell, mask_key) < density

    indptr = writer.array("x_indptr", (n + 1,))
    indptr[0] = 0
    total = 0
    for start in _chunks(n, step, "feature mask", progress):
        stop = min(n, start + step)
        counts = torch.cumsum(mask(start, stop).sum(1), 0).cpu().numpy()
        indptr[start + 1 : stop + 1] = counts + total
        total += int(counts[-1])
    indices = writer.array("x_indices", (total,))
    data = writer.array("x_data", (total,))
    for start in _chunks(n, step, "features", progress):
        stop = min(n, start + step)
        keep = mask(start, stop)
        lo, hi = int(indptr[start]), int(indptr[stop])
        indices[lo:hi] = torch.nonzero(keep)[:, 1].cpu().numpy()
        data[lo:hi] = rows(start, stop, np.asarray(y[start:stop]))[keep].cpu().numpy()
