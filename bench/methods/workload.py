"""The training problem every method solves, prepared once and shared through files.

A synthetic preset's workload is its prepared graph (:func:`aires.data.prepare.prepare`): one
tile store of ``Â`` and one aligned feature file, which the workload directory only points to,
so no second copy of the adjacency or the features is written; each method's subprocess reads
``Â`` from those tiles. For other datasets the parent process loads the graph with
:mod:`aires.data` (the loader AIRES itself uses), normalises the adjacency once,
``Â = D^-1/2 (A + I) D^-1/2`` with remaining self loops of weight 1 (PyG's ``gcn_norm``), and
writes ``Â`` (CSR), the dense features, the labels and the training rows as ``.npy`` files.
Either way every method trains on bit-identical inputs and none pays for loading or normalising.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.lib.format import open_memmap

__all__ = [
    "Workload",
    "is_preset",
    "load_graph",
    "load_workload",
    "main",
    "prepare_workload",
    "workload_key",
    "write_workload",
]

# Rows of the adjacency normalised per step: bounds the scratch memory on graphs larger than RAM.
_CHUNK_NNZ = 1 << 24
_FORMAT = 1


@dataclass(frozen=True)
class Workload:
    """Memory-mapped inputs of one benchmark.

    Args:
        path: directory holding the files.
        name: dataset name.
        adj_indptr, adj_indices, adj_data: ``Â`` in CSR (int64 row pointer, int32 or int64
            column indices, float32 values), self loops included.
        x: node features, float32.
        y: class of every node, int64.
        train_idx: rows of the training loss, int64.
        num_classes: number of classes.
        edges: stored entries of the input adjacency ``A`` (directed, before self loops).
        provenance: where the graph came from (loader, parameters).

    Shapes:
        adj_indptr ``(N + 1,)``; adj_indices, adj_data ``(nnz,)``; x ``(N, F)``; y ``(N,)``.
    """

    path: Path
    name: str
    adj_indptr: np.ndarray
    adj_indices: np.ndarray
    adj_data: np.ndarray
    x: np.ndarray
    y: np.ndarray
    train_idx: np.ndarray
    num_classes: int
    edges: int
    provenance: dict[str, Any]

    @property
    def num_nodes(self) -> int:
        """Number of nodes ``N``."""
        return len(self.adj_indptr) - 1

    @property
    def nnz(self) -> int:
        """Stored entries of ``Â`` (edges in both directions plus self loops)."""
        return len(self.adj_indices)

    @property
    def num_features(self) -> int:
        """Input feature width ``F``."""
        return int(self.x.shape[1])

    @property
    def adjacency_bytes(self) -> int:
        """Bytes of ``Â`` in CSR as stored (row pointer, indices, values)."""
        return self.adj_indptr.nbytes + self.adj_indices.nbytes + self.adj_data.nbytes

    def scipy_adjacency(self) -> sp.csr_array:
        """``Â`` as a scipy CSR array over the memory maps (no copy)."""
        shape = (self.num_nodes, self.num_nodes)
        return sp.csr_array((self.adj_data, self.adj_indices, self.adj_indptr), shape=shape)

    def describe(self) -> dict[str, Any]:
        """The ``dataset`` entry of the benchmark JSON."""
        return {
            "name": self.name,
            "nodes": self.num_nodes,
            "edges": self.edges,
            "features": self.num_features,
        }


def workload_key(dataset: str, *, scale: float | None, seed: int) -> str:
    """Directory name of a prepared workload: one per dataset, scale and seed."""
    tag = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset)
    return f"{tag}-scale{scale:g}-seed{seed}" if scale is not None else f"{tag}-seed{seed}"


def load_graph(
    dataset: str, *, root: str | None, scale: float | None, seed: int, cache_dir: Path
) -> Any:
    """The graph named ``dataset``, loaded by :func:`aires.data.load_graph`.

    A synthetic preset (``scale`` 1 unless given) is generated once into
    ``cache_dir / "graphs"``.

    Raises:
        ValueError: ``scale`` given for a dataset that is not a synthetic preset.
    """
    from aires import data

    if is_preset(dataset):
        return data.load_graph(dataset, scale=1.0 if scale is None else scale, seed=seed,
                               cache_dir=cache_dir / "graphs", progress=False)
    if scale is not None:
        raise ValueError(
            f"scale applies to the synthetic presets ({', '.join(_presets())}) only, "
            f"not to {dataset!r}"
        )
    return data.load_graph(dataset, root=root)


def _presets() -> list[str]:
    from aires.data import PRESETS

    return list(PRESETS)


def is_preset(dataset: str) -> bool:
    """Whether ``dataset`` names a synthetic preset of :mod:`aires.data` (case-blind)."""
    return dataset.lower() in {p.lower() for p in _presets()}


def prepare_workload(
    dataset: str,
    cache_dir: str | Path,
    *,
    root: str | None = None,
    scale: float | None = None,
    seed: int = 0,
) -> Path:
    """Load ``dataset``, normalise its adjacency and write the workload files (once).

    A prepared workload is reused: the directory is written under a temporary name and renamed
    when complete, so it is either whole or absent.

    Args:
        dataset: a name :func:`aires.data.load_graph` knows, or a synthetic preset name.
        cache_dir: where workloads are kept.
        root: data root for OGB and Planetoid datasets.
        scale: size of a synthetic preset (``None``: ``dataset`` is not synthetic).
        seed: seed of the synthetic generator.

    Returns:
        The workload directory, to be opened by :func:`load_workload`.
    """
    cache_dir = Path(cache_dir)
    if scale is None and is_preset(dataset):
        scale = 1.0
    target = cache_dir / workload_key(dataset, scale=scale, seed=seed)
    if _complete(target):
        return target
    tmp = cache_dir / f".{target.name}.tmp-{os.getpid()}"
    try:
        if is_preset(dataset):
            _point_to_prepared(dataset, scale, seed, cache_dir, tmp)
        else:
            graph = load_graph(dataset, root=root, scale=scale, seed=seed, cache_dir=cache_dir)
            write_workload(graph, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _complete(target: Path) -> bool:
    """Whether ``target`` holds a workload of this format (and its prepared graph, if any)."""
    if not (target / "meta.json").is_file():
        return False
    meta = json.loads((target / "meta.json").read_text())
    if meta.get("format") != _FORMAT:
        return False
    return "prepared" not in meta or (Path(meta["prepared"]) / "prepared.json").is_file()


def _point_to_prepared(dataset: str, scale: float, seed: int, cache_dir: Path, out: Path) -> None:
    """Prepare the preset under ``cache_dir / "prepared"`` and write a ``meta.json`` naming it."""
    from aires.data.prepare import Synthetic, prepare

    prepared = prepare(Synthetic(dataset, scale, seed), root=cache_dir / "prepared",
                       progress=False)
    prepared.adjacency.close()
    out.mkdir(parents=True)
    meta = {
        "format": _FORMAT,
        "name": prepared.name,
        "num_classes": prepared.num_classes,
        "edges": int(prepared.report["edges"]),
        "prepared": str(prepared.path),
        "provenance": {"source": "synthetic",
                       "params": {"preset": dataset, "scale": scale, "seed": seed}},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def write_workload(graph: Any, directory: str | Path) -> Path:
    """Write the workload files of ``graph`` (an :class:`aires.data.Graph`) into ``directory``.

    Raises:
        ValueError: the graph has no features or a non-square adjacency.
    """
    out = Path(directory)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    adj = graph.adj
    if getattr(graph, "symmetric", None) is False:
        # The baselines' backward reuses Â as Âᵀ; a directed graph is made undirected, as
        # PyG users do (``ToUndirected``) before training a GCN on it.
        adj = sp.csr_array(((adj + adj.T) > 0).astype(np.float32))
    if graph.x is None:
        raise ValueError(f"graph {graph.name!r} has no node features to train on")
    _write_normalized(adj, out)
    _write_features(graph.x, out / "x.npy")
    np.save(out / "y.npy", _numpy(graph.y).astype(np.int64).reshape(-1))
    np.save(out / "train_idx.npy", _numpy(graph.train_idx).astype(np.int64))
    meta = {
        "format": _FORMAT,
        "name": graph.name,
        "num_classes": int(graph.num_classes),
        "edges": int(adj.nnz),
        "provenance": _jsonable(getattr(graph, "provenance", {})),
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


def load_workload(path: str | Path) -> Workload:
    """Open a workload written by :func:`prepare_workload` (memory maps, read only)."""
    path = Path(path)
    meta_file = path / "meta.json"
    if not meta_file.is_file():
        raise ValueError(f"workload: {str(path)!r} holds no prepared workload (no meta.json)")
    meta = json.loads(meta_file.read_text())
    if "prepared" in meta:
        return _from_prepared(path, meta)

    def load(name: str) -> np.ndarray:
        return np.load(path / f"{name}.npy", mmap_mode="r", allow_pickle=False)

    return Workload(
        path=path,
        name=meta["name"],
        adj_indptr=load("adj_indptr"),
        adj_indices=load("adj_indices"),
        adj_data=load("adj_data"),
        x=load("x"),
        y=load("y"),
        train_idx=load("train_idx"),
        num_classes=meta["num_classes"],
        edges=meta["edges"],
        provenance=meta["provenance"],
    )


def _from_prepared(path: Path, meta: dict[str, Any]) -> Workload:
    """A workload over a prepared graph: ``Â`` read from its tiles into memory (the methods
    copy it whole to where they compute anyway), the rest memory-mapped."""
    from aires.data.prepare import open_prepared

    prepared = open_prepared(meta["prepared"])
    with prepared.adjacency as store:
        adj = store.to_scipy()
    return Workload(
        path=path,
        name=meta["name"],
        adj_indptr=adj.indptr,
        adj_indices=adj.indices,
        adj_data=adj.data,
        x=prepared.features,
        y=prepared.labels,
        train_idx=prepared.train_idx,
        num_classes=meta["num_classes"],
        edges=meta["edges"],
        provenance=meta["provenance"],
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.methods.workload SPEC.json OUT.json``: prepare in a process of its own.

    ``SPEC.json`` holds the arguments of :func:`prepare_workload`; ``OUT.json`` receives
    ``{"path": ...}``. A process of its own, because generating a synthetic graph may use the
    GPU, and the benchmark's parent process must hold no GPU memory while methods run.
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m bench.methods.workload SPEC.json OUT.json", file=sys.stderr)
        return 2
    spec = json.loads(Path(args[0]).read_text())
    path = prepare_workload(
        spec["dataset"], spec["cache_dir"], root=spec["root"], scale=spec["scale"],
        seed=spec["seed"],
    )
    Path(args[1]).write_text(json.dumps({"path": str(path)}))
    return 0


def _write_normalized(adj: sp.csr_array, out: Path) -> None:
    """Write ``D^-1/2 (A + I) D^-1/2`` of the pattern of ``adj``, streaming row chunks.

    Every stored entry of ``A`` counts as weight 1 and a self loop of weight 1 is added where
    the diagonal entry is missing (PyG's ``add_remaining_self_loops``).
    """
    n = adj.shape[0]
    if adj.shape != (n, n):
        raise ValueError(f"graph adjacency must be square, got shape {adj.shape}")
    indptr = np.asarray(adj.indptr, dtype=np.int64)
    chunks = _row_chunks(indptr, _CHUNK_NNZ)
    degree = np.empty(n, dtype=np.int64)
    for r0, r1 in chunks:
        block = _with_self_loops(adj, indptr, r0, r1)
        degree[r0:r1] = np.diff(block.indptr)
    dinv = (1.0 / np.sqrt(degree)).astype(np.float32)
    out_indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(degree, out=out_indptr[1:])
    nnz = int(out_indptr[-1])
    index_dtype = np.int32 if n < 2**31 else np.int64
    indices = open_memmap(out / "adj_indices.npy", mode="w+", dtype=index_dtype, shape=(nnz,))
    data = open_memmap(out / "adj_data.npy", mode="w+", dtype=np.float32, shape=(nnz,))
    for r0, r1 in chunks:
        block = _with_self_loops(adj, indptr, r0, r1)
        s, e = out_indptr[r0], out_indptr[r1]
        rows = np.repeat(np.arange(r0, r1), np.diff(block.indptr))
        indices[s:e] = block.indices
        data[s:e] = dinv[rows] * dinv[block.indices]
    indices.flush()
    data.flush()
    np.save(out / "adj_indptr.npy", out_indptr)


def _with_self_loops(adj: sp.csr_array, indptr: np.ndarray, r0: int, r1: int) -> sp.csr_array:
    """Rows ``r0:r1`` of ``pattern(A) + I`` with sorted indices and all values 1."""
    s, e = int(indptr[r0]), int(indptr[r1])
    shape = (r1 - r0, adj.shape[1])
    block = sp.csr_array(
        (np.ones(e - s, np.float32), np.asarray(adj.indices[s:e]), indptr[r0 : r1 + 1] - s),
        shape=shape,
    )
    eye = sp.csr_array(
        (np.ones(r1 - r0, np.float32), np.arange(r0, r1), np.arange(r1 - r0 + 1)), shape=shape
    )
    block = (block + eye).tocsr()
    block.sum_duplicates()
    block.sort_indices()
    return block


def _row_chunks(indptr: np.ndarray, nnz_per_chunk: int) -> list[tuple[int, int]]:
    """Row ranges of about ``nnz_per_chunk`` entries each (a longer row is a chunk alone)."""
    n = len(indptr) - 1
    bounds = [0]
    while bounds[-1] < n:
        r0 = bounds[-1]
        r1 = int(np.searchsorted(indptr, indptr[r0] + nnz_per_chunk, side="right")) - 1
        bounds.append(min(n, max(r1, r0 + 1)))
    return list(zip(bounds[:-1], bounds[1:]))


def _write_features(x: Any, path: Path) -> None:
    """Write features as a dense float32 ``.npy``, by row blocks (sparse ones are densified)."""
    sparse = sp.issparse(x)
    x = sp.csr_array(x) if sparse else _numpy(x)
    if x.ndim != 2:
        raise ValueError(f"graph features must be two-dimensional, got shape {x.shape}")
    out = open_memmap(path, mode="w+", dtype=np.float32, shape=x.shape)
    rows = max(1, _CHUNK_NNZ // max(1, x.shape[1]))
    for r0 in range(0, x.shape[0], rows):
        block = x[r0 : r0 + rows]
        out[r0 : r0 + rows] = block.toarray() if sparse else block
    out.flush()


def _numpy(value: Any) -> np.ndarray:
    """A numpy view of a torch tensor or array-like."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _jsonable(value: Any) -> Any:
    """``value`` with anything JSON cannot hold turned into a string."""
    return json.loads(json.dumps(value, default=str))


if __name__ == "__main__":
    sys.exit(main())
