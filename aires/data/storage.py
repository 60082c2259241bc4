"""The on-disk graph: a directory of ``.npy`` arrays and a ``graph.json`` manifest.

::

    GRAPH_DIR/
      graph.json         format, version, name, num_nodes, num_features, num_classes,
                         symmetric, dtype and shape of every array, provenance
      adj_indptr.npy     int64 (N + 1,)       adjacency in CSR, sorted columns, values 1.0
      adj_indices.npy    int64 (nnz,)
      adj_data.npy       float32 (nnz,)
      x.npy              float32 (N, F)       dense features (data at byte 4096), or sparse in CSR:
      x_indptr.npy, x_indices.npy (int64), x_data.npy (float32)
      y.npy              int64 (N,)           -1 where unlabelled
      train_idx.npy, val_idx.npy, test_idx.npy   int64

Dense features are an ``.npy`` whose header is padded so the data starts at byte
:data:`ALIGNMENT` (4 KiB): any row block is one aligned byte range, readable by O_DIRECT, KvikIO
and GPUDirect Storage without a bounce copy, and a prepared graph (:mod:`aires.data.prepare`)
adopts the file as it is instead of copying it.

Arrays are opened with ``np.load(mmap_mode=..., allow_pickle=False)``, so a graph larger than
RAM opens at once and is paged in as it is read. A directory is written under a temporary name
next to its destination and renamed when complete: a graph directory is either whole or absent.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from aires.data.graph import SPLITS, Graph, _to_torch

__all__ = [
    "ALIGNMENT",
    "FORMAT",
    "FORMAT_VERSION",
    "GraphWriter",
    "save_graph",
    "open_graph",
    "is_graph_dir",
    "open_aligned_npy",
    "release_pages",
]

FORMAT = "aires-graph"
FORMAT_VERSION = 1
MANIFEST = "graph.json"
#: Byte offset of the data in a dense feature ``.npy`` (the page and GDS alignment).
ALIGNMENT = 4096

_DTYPES = {
    "adj_indptr": np.int64,
    "adj_indices": np.int64,
    "adj_data": np.float32,
    "x": np.float32,
    "x_indptr": np.int64,
    "x_indices": np.int64,
    "x_data": np.float32,
    "y": np.int64,
    "train_idx": np.int64,
    "val_idx": np.int64,
    "test_idx": np.int64,
}
_REQUIRED = ("adj_indptr", "adj_indices", "adj_data", "train_idx", "val_idx", "test_idx")
_COPY_ELEMENTS = 1 << 23  # entries copied at once (64 MiB of int64)


def open_aligned_npy(
    path: str | os.PathLike[str], dtype: np.dtype | type | str, shape: tuple[int, ...]
) -> np.memmap:
    """Create ``path`` as an ``.npy`` of ``shape`` whose data starts at byte :data:`ALIGNMENT`.

    A plain ``.npy`` header is 64 or 128 bytes, so row blocks of its data are not page aligned;
    padding the header (format 1.0 allows up to 65535 bytes of it) fixes that while ``np.load``
    still reads the file. Returns the data as a writable memmap (zero-filled, sparse on disk).
    """
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in shape)
    magic = np.lib.format.magic(1, 0)
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                 "shape": shape})
    length = ALIGNMENT - len(magic) - 2
    header = (text + " " * (length - len(text) - 1) + "\n").encode("latin1")
    nbytes = math.prod(shape) * dtype.itemsize
    with open(path, "wb") as f:
        f.write(magic + struct.pack("<H", length) + header)
        f.truncate(ALIGNMENT + nbytes)
    if nbytes == 0:  # mmap cannot map zero bytes; an empty array needs no file view
        return np.lib.format.open_memmap(path, mode="r+")
    return np.memmap(path, dtype=dtype, mode="r+", offset=ALIGNMENT, shape=shape)


def release_pages(array: np.ndarray) -> None:
    """Unmap the pages of a written memmap from this process; they stay in the page cache.

    Pages written through a shared file mapping count in the process's resident set until the
    mapping goes away, so a producer filling a multi-GB memmap would show that much RSS though
    the kernel may write back and reclaim the pages at will. ``MADV_DONTNEED`` on a shared
    mapping drops only this process's references (dirty pages are still written back), which
    keeps the peak RSS of a large preparation near its chunk buffers. No-op for other arrays.
    """
    mm = getattr(array, "_mmap", None)
    if isinstance(mm, mmap.mmap) and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED)


def is_graph_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory holding an on-disk graph (it has a ``graph.json``)."""
    return (Path(path) / MANIFEST).is_file()


class GraphWriter:
    """Writes an on-disk graph array by array, then publishes it atomically.

    Arrays are created as memmaps in a temporary sibling directory, so producers can fill them
    chunk by chunk; :meth:`commit` writes the manifest and renames the directory into place.
    Leaving the ``with`` block without committing (an exception) deletes everything written.

    Args:
        path: the graph directory to create.
        overwrite: replace an existing directory at ``path`` (only once the new one is complete).

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """

    def __init__(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.path = Path(path).expanduser().absolute()
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"{self.path} already exists; pass overwrite=True to replace it")
        self.overwrite = overwrite
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:12]}"
        self.tmp.mkdir()
        #: Scratch space for producers (external sort buckets); removed on commit.
        self.workdir = self.tmp / "_work"
        self._arrays: dict[str, np.ndarray] = {}
        self._done = False

    def __enter__(self) -> GraphWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._done:
            self._arrays.clear()
            shutil.rmtree(self.tmp, ignore_errors=True)

    def array(self, name: str, shape: tuple[int, ...]) -> np.memmap:
        """A new writable memmap for array ``name`` (dtype fixed by the format)."""
        if name not in _DTYPES:
            raise ValueError(f"unknown array name {name!r}; expected one of {', '.join(_DTYPES)}")
        file = self.tmp / f"{name}.npy"
        shape = tuple(int(s) for s in shape)
        if name == "x":
            out = open_aligned_npy(file, _DTYPES[name], shape)
        else:
            out = np.lib.format.open_memmap(file, mode="w+", dtype=_DTYPES[name], shape=shape)
        self._arrays[name] = out
        return out

    def adjacency(self, n: int, nnz: int) -> tuple[np.memmap, np.memmap, np.memmap]:
        """New memmaps for the CSR adjacency of ``n`` nodes with ``nnz`` entries: ``indptr``,
        ``indices``, ``data`` (the ``allocate`` that ``CSRBuilder.finish`` takes)."""
        return (
            self.array("adj_indptr", (n + 1,)),
            self.array("adj_indices", (nnz,)),
            self.array("adj_data", (nnz,)),
        )

    def put(self, name: str, values: np.ndarray | torch.Tensor) -> None:
        """Write ``values`` (numpy, memmap or CPU tensor) as array ``name``, in bounded memory."""
        if isinstance(values, torch.Tensor):
            values = values.detach().cpu().numpy()
        out = self.array(name, values.shape)
        step = max(1, _COPY_ELEMENTS // max(1, math.prod(values.shape[1:])))
        for start in range(0, len(values), step):
            out[start : start + step] = values[start : start + step]
            release_pages(out)

    def commit(
        self,
        *,
        name: str,
        num_nodes: int,
        num_features: int,
        num_classes: int,
        symmetric: bool | None,
        provenance: dict[str, Any],
    ) -> Path:
        """Write ``graph.json``, flush, and rename the directory to ``path``; returns ``path``."""
        missing = [a for a in _REQUIRED if a not in self._arrays]
        if missing:
            raise ValueError(f"cannot commit {self.path}: arrays {missing} were not written")
        arrays = {}
        for key, arr in self._arrays.items():
            arr.flush()
            arrays[key] = {"dtype": np.dtype(arr.dtype).str, "shape": list(arr.shape)}
        self._arrays.clear()
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "name": name,
            "num_nodes": int(num_nodes),
            "num_features": int(num_features),
            "num_classes": int(num_classes),
            "symmetric": symmetric,
            "arrays": arrays,
            "provenance": provenance,
        }
        with open(self.tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        shutil.rmtree(self.workdir, ignore_errors=True)
        old = None
        if self.path.exists():
            if not self.overwrite:
                raise FileExistsError(f"{self.path} appeared while it was being written")
            old = self.path.parent / f".{self.path.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(self.path, old)
        os.rename(self.tmp, self.path)
        self._done = True
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return self.path


def save_graph(graph: Graph, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write ``graph`` as an on-disk graph directory (atomically), in bounded memory.

    Args:
        graph: the graph (memmap-backed arrays are copied chunk by chunk).
        path: the directory to create.
        overwrite: replace an existing directory.

    Returns:
        The absolute path written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
    """
    with GraphWriter(path, overwrite=overwrite) as writer:
        writer.put("adj_indptr", np.asarray(graph.adj.indptr))
        writer.put("adj_indices", np.asarray(graph.adj.indices))
        data = writer.array("adj_data", (graph.num_edges,))
        for start in range(0, graph.num_edges, _COPY_ELEMENTS):
            stop = start + _COPY_ELEMENTS
            data[start:stop] = graph.adj.data[start:stop]
        if isinstance(graph.x, sp.csr_array):
            writer.put("x_indptr", np.asarray(graph.x.indptr))
            writer.put("x_indices", np.asarray(graph.x.indices))
            writer.put("x_data", np.asarray(graph.x.data))
        elif graph.x is not None:
            writer.put("x", graph.x)
        if graph.y is not None:
            writer.put("y", graph.y)
        for split in SPLITS:
            writer.put(f"{split}_idx", graph.split_index(split))
        return writer.commit(
            name=graph.name,
            num_nodes=graph.num_nodes,
            num_features=graph.num_features,
            num_classes=graph.num_classes,
            symmetric=graph.symmetric,
            provenance=graph.provenance,
        )


def open_graph(path: str | os.PathLike[str], *, mmap: bool = True) -> Graph:
    """Open an on-disk graph directory.

    Args:
        path: the directory written by :func:`save_graph` or a generator.
        mmap: memory-map the arrays (read lazily; the adjacency is read-only, dense features and
            labels are copy-on-write torch tensors). ``False`` reads everything into memory.

    Returns:
        The graph; its ``provenance`` gains ``"path"``.

    Raises:
        FileNotFoundError: no ``graph.json`` or a listed array is missing.
        ValueError: a manifest that is not valid JSON, of an unknown format or version, or
            listing an array that is not one of the format's (array names are never paths, so
            nothing outside the directory is read); an array file that is a link leading
            outside the directory; an array whose dtype or shape differs from the manifest (a
            truncated or foreign file).
    """
    root = Path(path).expanduser()
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{root} is not an on-disk graph: {manifest_path} is missing")
    manifest = _read_manifest(manifest_path)
    arrays: dict[str, np.ndarray] = {}
    for key, spec in manifest["arrays"].items():
        file = root / f"{key}.npy"
        if not file.is_file():
            raise FileNotFoundError(
                f"{root}: array file {file.name} listed in {MANIFEST} is missing"
            )
        if file.resolve().parent != root.resolve():
            raise ValueError(f"{file}: a link to {file.resolve()}, outside the graph directory")
        try:
            arr = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"{file}: not a readable .npy array ({err})") from err
        if arr.dtype != np.dtype(spec["dtype"]) or list(arr.shape) != spec["shape"]:
            raise ValueError(
                f"{file}: dtype {arr.dtype} shape {list(arr.shape)} differs from the manifest "
                f"({spec['dtype']} {spec['shape']})"
            )
        arrays[key] = arr
    missing = [a for a in _REQUIRED if a not in arrays]
    if missing:
        raise ValueError(f"{manifest_path}: required arrays {missing} are not listed")
    n = int(manifest["num_nodes"])
    adj = sp.csr_array(
        (arrays["adj_data"], arrays["adj_indices"], arrays["adj_indptr"]), shape=(n, n)
    )
    x: torch.Tensor | sp.csr_array | None = None
    if "x" in arrays:
        x = _to_torch(arrays["x"])
    elif "x_indptr" in arrays:
        x = sp.csr_array(
            (arrays["x_data"], arrays["x_indices"], arrays["x_indptr"]),
            shape=(n, int(manifest["num_features"])),
        )
    y = _to_torch(arrays["y"]) if "y" in arrays else None
    provenance = dict(manifest.get("provenance") or {})
    provenance["path"] = str(root.absolute())
    return Graph(
        name=manifest["name"],
        num_nodes=n,
        adj=adj,
        x=x,
        y=y,
        train_idx=_to_torch(arrays["train_idx"]),
        val_idx=_to_torch(arrays["val_idx"]),
        test_idx=_to_torch(arrays["test_idx"]),
        num_classes=int(manifest["num_classes"]),
        provenance=provenance,
        symmetric=manifest.get("symmetric"),
    )


def _read_manifest(path: Path) -> dict[str, Any]:
    """``graph.json`` parsed and checked: format, version, and only the format's arrays, each
    with the format's dtype (so an array name can never be a path out of the directory)."""
    try:
        manifest = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a valid JSON manifest ({err})") from err
    if not isinstance(manifest, dict):
        raise ValueError(f"{path}: not an AIRES graph manifest (a JSON object expected)")
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}"
            f" is not readable here (expected {FORMAT!r} version {FORMAT_VERSION})"
        )
    keys = ("name", "num_nodes", "num_features", "num_classes", "arrays")
    missing = [k for k in keys if k not in manifest]
    arrays = manifest.get("arrays")
    if missing or not isinstance(arrays, dict):
        raise ValueError(f"{path}: malformed manifest, missing or invalid: {missing or ['arrays']}")
    for key, spec in arrays.items():
        if key not in _DTYPES:
            raise ValueError(
                f"{path}: unknown array {key!r}; a graph holds only {', '.join(_DTYPES)}"
            )
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("shape"), list)
            or spec.get("dtype") != np.dtype(_DTYPES[key]).str
        ):
            raise ValueError(
                f"{path}: array {key!r} must be listed with shape and dtype "
                f"{np.dtype(_DTYPES[key]).str!r}, got {spec!r:.120}"
            )
    return manifest
