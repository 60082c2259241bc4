"""The one graph type that every loader returns and every consumer (tiler, training) takes."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["Graph", "SPLITS"]

#: Split names accepted by :meth:`Graph.split_index` (``"valid"`` is OGB's word for ``"val"``).
SPLITS = ("train", "val", "test")

# Rows and entries scanned at once by the statistics (bounded memory on memmaps).
_SCAN = 1 << 24

Features = torch.Tensor | np.ndarray | sp.csr_array


@dataclass(eq=False)
class Graph:
    """A node-classification graph: adjacency, features, labels and split.

    Large graphs are memmap-backed (see :func:`aires.data.open_graph`): the arrays below may be
    views of files, read lazily, so a graph larger than RAM can be opened and streamed.

    Attributes:
        name: a short name (``"cora"``, ``"ogbn-products"``, ``"products-x0.1-s0"``).
        num_nodes: ``N``.
        adj: ``N x N`` adjacency, ``scipy.sparse.csr_array`` with int64 ``indptr`` and
            ``indices``, values 1.0 (float32), sorted column indices. Symmetric for undirected
            data; no self loops unless the source has them. May be memmap-backed.
        x: node features, ``N x F``: a dense float32 ``torch.Tensor`` (or numpy array), or a
            ``scipy.sparse.csr_array`` for sparse (bag-of-words) features. ``None`` for a graph
            converted from a bare edge list.
        y: class per node, ``torch.long`` of shape ``(N,)``; ``-1`` where the source has no label
            (such nodes are in no split). ``None`` for a bare edge list.
        train_idx, val_idx, test_idx: node ids of each split, ``torch.long``.
        num_classes: number of classes (0 for a bare edge list).
        provenance: where the graph came from: ``{"source": "planetoid"|"ogb"|"synthetic"|
            "edgelist", "params": {...}, ...}``; OGB graphs carry the evaluator's metadata here.
        symmetric: whether ``adj`` is known to be symmetric (``None``: not known).
    """

    name: str
    num_nodes: int
    adj: sp.csr_array
    x: Features | None
    y: torch.Tensor | None
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    test_idx: torch.Tensor
    num_classes: int
    provenance: dict[str, Any] = field(default_factory=dict)
    symmetric: bool | None = None

    def __post_init__(self) -> None:
        if isinstance(self.adj, sp.csr_matrix):
            self.adj = sp.csr_array(self.adj)
        if not isinstance(self.adj, sp.csr_array):
            raise TypeError(f"adj must be a scipy.sparse.csr_array, got {type(self.adj).__name__}")
        n = int(self.num_nodes)
        if self.adj.shape != (n, n):
            raise ValueError(
                f"adj has shape {self.adj.shape}, expected ({n}, {n}) for num_nodes={n}"
            )
        self.adj = _int64_csr(self.adj)
        if self.x is not None:
            if isinstance(self.x, sp.csr_matrix):
                self.x = sp.csr_array(self.x)
            if not isinstance(self.x, (torch.Tensor, np.ndarray, sp.csr_array)):
                raise TypeError(
                    "x must be a torch.Tensor, a numpy array or a scipy.sparse.csr_array, "
                    f"got {type(self.x).__name__}"
                )
            if len(self.x.shape) != 2 or self.x.shape[0] != n:
                raise ValueError(f"x has shape {tuple(self.x.shape)}, expected ({n}, F)")
            if isinstance(self.x, sp.csr_array):
                self.x = _int64_csr(self.x)
        if self.y is not None:
            if not isinstance(self.y, torch.Tensor) or self.y.dtype != torch.long:
                raise TypeError(f"y must be a torch.long tensor, got {self.y!r:.80}")
            if tuple(self.y.shape) != (n,):
                raise ValueError(f"y has shape {tuple(self.y.shape)}, expected ({n},)")
        for split in SPLITS:
            idx = getattr(self, f"{split}_idx")
            if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long or idx.dim() != 1:
                raise TypeError(f"{split}_idx must be a 1-D torch.long tensor, got {idx!r:.80}")
        if isinstance(self.num_classes, bool) or int(self.num_classes) != self.num_classes:
            raise TypeError(f"num_classes must be an int, got {self.num_classes!r}")
        if self.num_classes < 0 or (self.y is not None and self.num_classes == 0):
            raise ValueError(
                f"num_classes must be positive for a labelled graph, got {self.num_classes}"
            )

    @property
    def num_features(self) -> int:
        """``F``, the feature dimension (0 without features)."""
        return 0 if self.x is None else int(self.x.shape[1])

    @property
    def num_edges(self) -> int:
        """Stored adjacency entries (directed edges; twice the undirected count when symmetric)."""
        return int(self.adj.indptr[-1])

    @property
    def sparse_features(self) -> bool:
        """Whether ``x`` is a sparse CSR matrix."""
        return isinstance(self.x, sp.csr_array)

    def split_index(self, split: str) -> torch.Tensor:
        """Node ids of ``split`` (``"train"``, ``"val"`` or ``"valid"``, ``"test"``)."""
        key = "val" if split == "valid" else split
        if key not in SPLITS:
            raise ValueError(
                f"split must be one of {', '.join(SPLITS)} (or 'valid'), got {split!r}"
            )
        return getattr(self, f"{key}_idx")

    def edge_index(self) -> torch.Tensor:
        """The adjacency as a PyG ``edge_index``: ``torch.long`` of shape ``[2, E]``, row-major.

        Materialises ``16 * E`` bytes in memory.
        """
        indptr = torch.from_numpy(np.asarray(self.adj.indptr, dtype=np.int64))
        rows = torch.repeat_interleave(torch.arange(self.num_nodes), torch.diff(indptr))
        cols = torch.from_numpy(np.array(self.adj.indices, dtype=np.int64))
        return torch.stack([rows, cols])

    def x_torch(self) -> torch.Tensor:
        """Features as a torch tensor: dense float32, or a sparse CSR tensor (int64 indices).

        A memmap-backed array is wrapped without reading it (copy-on-write mapping); other
        numpy inputs are shared when writable and copied otherwise.

        Raises:
            ValueError: the graph has no features.
        """
        if self.x is None:
            raise ValueError(f"graph {self.name!r} has no node features")
        if isinstance(self.x, torch.Tensor):
            return self.x
        if isinstance(self.x, sp.csr_array):
            with warnings.catch_warnings():  # torch's "sparse CSR support is in beta" notice
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                return torch.sparse_csr_tensor(
                    _to_torch(self.x.indptr),
                    _to_torch(self.x.indices),
                    _to_torch(self.x.data),
                    size=self.x.shape,
                    check_invariants=False,
                )
        return _to_torch(self.x)

    def describe(self) -> dict[str, Any]:
        """Sizes, degree statistics and bytes, computed in bounded memory (memmap-friendly).

        Returns:
            A JSON-serialisable dict: ``name``, ``nodes``, ``edges`` (stored adjacency entries,
            i.e. directed edges), ``undirected_edges`` (for a symmetric graph: each loop counted
            once), ``self_loops``, ``symmetric``, ``degree`` (``min``, ``mean``, ``max``, ``p99``
            of the row lengths; ``p99`` is the nearest-rank 99th percentile), ``features``
            (``dim``, ``kind``, ``density``), ``classes``, ``split`` (sizes), ``bytes``
            (``adjacency``, ``features``, ``labels``, ``total``: the arrays as stored) and
            ``provenance``.
        """
        adj = self.adj
        n = self.num_nodes
        nnz = self.num_edges
        hist = np.zeros(1, dtype=np.int64)
        loops = 0
        for start, stop in _row_blocks(adj.indptr, _SCAN):
            indptr = np.asarray(adj.indptr[start : stop + 1])
            deg = np.diff(indptr)
            part = np.bincount(deg)
            if len(part) > len(hist):
                part[: len(hist)] += hist
                hist = part
            else:
                hist[: len(part)] += part
            cols = np.asarray(adj.indices[indptr[0] : indptr[-1]])
            rows = np.repeat(np.arange(start, stop, dtype=np.int64), deg)
            loops += int(np.count_nonzero(cols == rows))
        degree: dict[str, float | int] = {"min": 0, "mean": 0.0, "max": 0, "p99": 0}
        if n:
            present = np.flatnonzero(hist)
            cdf = np.cumsum(hist)
            degree = {
                "min": int(present[0]),
                "mean": nnz / n,
                "max": int(present[-1]),
                "p99": int(np.searchsorted(cdf, math.ceil(0.99 * n))),
            }
        return {
            "name": self.name,
            "nodes": n,
            "edges": nnz,
            "undirected_edges": (nnz + loops) // 2 if self.symmetric else None,
            "self_loops": loops,
            "symmetric": self.symmetric,
            "degree": degree,
            "features": {
                "dim": self.num_features,
                "kind": "none"
                if self.x is None
                else ("sparse" if self.sparse_features else "dense"),
                "density": self._feature_density(),
            },
            "classes": self.num_classes,
            "split": {s: int(getattr(self, f"{s}_idx").numel()) for s in SPLITS},
            "bytes": self._bytes(),
            "provenance": self.provenance,
        }

    def _feature_density(self) -> float | None:
        if self.x is None or self.x.shape[0] * self.x.shape[1] == 0:
            return None
        if isinstance(self.x, sp.csr_array):
            return int(self.x.indptr[-1]) / (self.x.shape[0] * self.x.shape[1])
        return 1.0

    def _bytes(self) -> dict[str, int]:
        adj = _nbytes(self.adj.indptr) + _nbytes(self.adj.indices) + _nbytes(self.adj.data)
        if self.x is None:
            feats = 0
        elif isinstance(self.x, sp.csr_array):
            feats = _nbytes(self.x.indptr) + _nbytes(self.x.indices) + _nbytes(self.x.data)
        else:
            feats = _nbytes(self.x)
        labels = sum(
            _nbytes(t)
            for t in (self.y, self.train_idx, self.val_idx, self.test_idx)
            if t is not None
        )
        return {
            "adjacency": adj,
            "features": feats,
            "labels": labels,
            "total": adj + feats + labels,
        }


def _row_blocks(indptr: np.ndarray, budget: int) -> Iterator[tuple[int, int]]:
    """Consecutive row ranges of at most ``budget`` rows and (unless one row is longer) entries."""
    n = len(indptr) - 1
    start = 0
    while start < n:
        by_entries = int(np.searchsorted(indptr, indptr[start] + budget, side="right")) - 1
        stop = min(n, start + budget, max(by_entries, start + 1))
        yield start, stop
        start = stop


def _int64_csr(matrix: sp.csr_array) -> sp.csr_array:
    """``matrix`` with int64 ``indptr`` and ``indices`` (scipy keeps both in one dtype), so that
    no graph overflows 32-bit offsets and consumers see one index type."""
    if matrix.indptr.dtype == np.int64 and matrix.indices.dtype == np.int64:
        return matrix
    return sp.csr_array(
        (matrix.data, matrix.indices.astype(np.int64), matrix.indptr.astype(np.int64)),
        shape=matrix.shape,
    )


def _nbytes(array: torch.Tensor | np.ndarray) -> int:
    if isinstance(array, torch.Tensor):
        return array.numel() * array.element_size()
    return int(array.nbytes)


def _to_torch(array: np.ndarray) -> torch.Tensor:
    """Share ``array`` with torch: memmaps through a copy-on-write mapping, never a full read."""
    if array.flags.writeable:
        return torch.from_numpy(array)
    if array.size == 0:
        return torch.from_numpy(np.array(array))
    base = array
    while not isinstance(base, np.memmap) and isinstance(base.base, np.ndarray):
        base = base.base
    if isinstance(base, np.memmap) and base.filename is not None and array.flags.c_contiguous:
        offset = base.offset + (array.ctypes.data - base.ctypes.data)
        cow = np.memmap(
            base.filename, dtype=array.dtype, mode="c", offset=offset, shape=array.shape
        )
        return torch.from_numpy(cow)
    return torch.from_numpy(np.array(array))
