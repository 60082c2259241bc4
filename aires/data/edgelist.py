"""Text edge lists (``src dst`` per line) to on-disk graphs, streamed through an external sort."""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch

from aires.checks import check_positive_int
from aires.data._external_sort import CSRBuilder
from aires.data.graph import Graph
from aires.data.storage import GraphWriter, open_graph
from aires.progress import progress_bar

__all__ = ["convert_edge_list"]

_LINES = 1 << 20


def convert_edge_list(
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    num_nodes: int | None = None,
    undirected: bool = True,
    name: str | None = None,
    overwrite: bool = False,
    chunk_size: int = 1 << 24,
    progress: bool = False,
) -> Graph:
    """Convert a whitespace-separated edge list into an on-disk graph (no features or labels).

    Lines are ``src dst`` with 0-based integer node ids; further columns are ignored, and lines
    starting with ``#`` or ``%`` are comments. Duplicate edges are merged; self loops are kept.
    The file is read twice (sizes, then edges) in blocks, so it may be larger than memory.

    Args:
        path: the edge list.
        out: the graph directory to write.
        num_nodes: ``N`` (default: largest id + 1).
        undirected: also store the reverse of every edge (symmetric adjacency).
        name: the graph's name (default: the file's stem).
        overwrite: replace ``out`` if it exists.
        chunk_size: entries sorted in memory at once.
        progress: show progress bars.

    Returns:
        The written graph, memmap-backed.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a line does not parse, an id is negative or ``>= num_nodes``, the file
            holds no edges and ``num_nodes`` is not given, or ``num_nodes`` is not positive.
        TypeError: ``num_nodes`` is not an int.
    """
    source = Path(path).expanduser()
    if not source.is_file():
        raise FileNotFoundError(f"edge list {source} not found")
    count, largest = 0, -1
    for src, dst in _blocks(source):
        if len(src) and min(src.min(), dst.min()) < 0:
            raise ValueError(f"{source}: negative node id {min(src.min(), dst.min())}")
        count += len(src)
        largest = max(largest, int(src.max(initial=-1)), int(dst.max(initial=-1)))
    if num_nodes is None and count == 0:
        raise ValueError(
            f"{source}: the edge list holds no edges; pass num_nodes for a graph without edges"
        )
    n = largest + 1 if num_nodes is None else check_positive_int(num_nodes, "num_nodes")
    if n <= largest:
        raise ValueError(f"num_nodes={num_nodes} but {source} has node id {largest}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with GraphWriter(out, overwrite=overwrite) as writer:
        builder = CSRBuilder(
            writer.workdir,
            n,
            n,
            expected_entries=count * (2 if undirected else 1),
            chunk_size=chunk_size,
            device=device,
        )
        bar = progress_bar(total=count, desc="read edges", disable=not progress, leave=False)
        for src, dst in _blocks(source):
            rows, cols = torch.from_numpy(src), torch.from_numpy(dst)
            builder.add(rows, cols)
            if undirected:
                builder.add(cols, rows)
            bar.update(len(src))
        bar.close()
        builder.finish(partial(writer.adjacency, n), progress=progress)
        for split in ("train_idx", "val_idx", "test_idx"):
            writer.put(split, np.zeros(0, np.int64))
        writer.commit(
            name=name or source.stem,
            num_nodes=n,
            num_features=0,
            num_classes=0,
            symmetric=True if undirected else None,
            provenance={
                "source": "edgelist",
                "params": {"path": str(source.absolute()), "undirected": undirected},
            },
        )
    return open_graph(out)


def _blocks(source: Path) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(src, dst)`` int64 arrays for blocks of lines."""
    with open(source) as f:
        for block, first in _numbered(f):
            try:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message=".*[Ee]mpty input.*")
                    warnings.filterwarnings("ignore", message=".*no data.*")
                    edges = np.loadtxt(
                        block, dtype=np.int64, comments=("#", "%"), usecols=(0, 1), ndmin=2
                    )
            except ValueError as err:
                raise ValueError(
                    f"{source}: cannot parse lines {first}-{first + len(block) - 1} "
                    f"as 'src dst' integers ({err})"
                ) from err
            yield np.ascontiguousarray(edges[:, 0]), np.ascontiguousarray(edges[:, 1])


def _numbered(lines: Iterator[str]) -> Iterator[tuple[list[str], int]]:
    first = 1
    while block := list(itertools.islice(lines, _LINES)):
        yield block, first
        first += len(block)
