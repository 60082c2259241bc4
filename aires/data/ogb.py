"""OGB node-property datasets read with the ``ogb`` package's own parsers, from a local root.

``ogb.nodeproppred.NodePropPredDataset`` downloads whatever it does not find (and asks on stdin
when a release note is missing), and caches the parsed graph as a pickle
(``processed/data_processed``) that it unpickles on every later load: a file that runs code when
loaded. So AIRES does what that class does on a first load, with the same ``ogb.io`` readers of
the raw csv/npz files, and never reads, or writes, the pickle cache: nothing a dataset directory
holds is unpickled (``split_dict.pt`` and ``meta_dict.pt`` are read with
``torch.load(weights_only=True)``, allowing numpy arrays only). Every file needed is checked
first; when one is missing the error says where the files go and what to run on a machine with
internet.

Layout under ``root`` (what ``NodePropPredDataset(name, root)`` creates when it downloads)::

    ROOT/ogbn_products/
      RELEASE_v1.txt
      raw/edge.csv.gz  raw/num-node-list.csv.gz  raw/num-edge-list.csv.gz
      raw/node-feat.csv.gz  raw/node-label.csv.gz          (csv datasets: arxiv, products)
      raw/data.npz  raw/node-label.npz                     (binary datasets: papers100M)
      split/sales_ranking/train.csv.gz  valid.csv.gz  test.csv.gz   (or split_dict.pt)
      processed/data_processed                             (ogb's pickle cache: never read)

Custom datasets written by ``ogb.io.DatasetSaver`` load from their ``meta_dict`` (or from the
saver's submission directory, which holds ``meta_dict.pt``).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aires.data._external_sort import CSRBuilder
from aires.data.graph import Graph
from aires.data.storage import GraphWriter, open_graph

__all__ = ["OGB_NODE_DATASETS", "default_ogb_root", "load_ogb"]

#: The homogeneous single-task OGB node-classification datasets this loader supports.
OGB_NODE_DATASETS = ("ogbn-arxiv", "ogbn-products", "ogbn-papers100M")

_CHUNK = 1 << 24
_EXTRA = "pip install aires[ogb]  (or: pip install ogb)"


def default_ogb_root() -> Path | None:
    """``$AIRES_OGB_ROOT`` if set, else ``None`` (a root must then be given)."""
    env = os.environ.get("AIRES_OGB_ROOT")
    return Path(env).expanduser() if env else None


def load_ogb(
    name: str | os.PathLike[str],
    root: str | os.PathLike[str] | None = None,
    *,
    meta_dict: dict[str, Any] | None = None,
    undirected: bool = True,
    out: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    chunk_size: int = _CHUNK,
    progress: bool = False,
) -> Graph:
    """Load an OGB node-property dataset from local files with ``NodePropPredDataset``.

    Args:
        name: an OGB name (``"ogbn-arxiv"``), found as ``root/ogbn_arxiv``; or the path of an
            OGB dataset directory (``.../ogbn_arxiv``); or the path of a ``DatasetSaver``
            submission directory (holding ``meta_dict.pt``); or, with ``meta_dict``, the name of
            a custom dataset.
        root: the directory holding OGB datasets (default ``$AIRES_OGB_ROOT``).
        meta_dict: a custom dataset's metadata, as returned by
            ``DatasetSaver.get_meta_dict()``; its ``dir_path`` is the dataset directory.
        undirected: add the reverse of every edge (GCNs on ogbn-arxiv and ogbn-papers100M, whose
            edges are directed citations, use the symmetrised graph).
        out: write the graph as an on-disk graph here and return it memmap-backed (the way to
            convert large datasets); default: build it in a temporary directory and load it
            into memory.
        overwrite: replace ``out`` if it exists.
        chunk_size: edges sorted in memory at once while building the adjacency.
        progress: show progress bars.

    Returns:
        The graph; ``provenance["ogb"]`` holds what :func:`aires.data.evaluate` needs for
        OGB's ``Evaluator``.

    Raises:
        FileNotFoundError: files are missing (the message gives the layout and how to get them).
        ValueError: unknown name, or no root given; a ``meta_dict.pt`` or ``split_dict.pt``
            that holds anything but plain data (it is never unpickled), or names a directory
            outside the dataset.
        NotImplementedError: heterogeneous or multi-task datasets (ogbn-mag, ogbn-proteins).
        ImportError: ``ogb`` is not installed.
    """
    dataset_name, root_dir, meta, dataset_dir = _resolve(name, root, meta_dict)
    if meta.get("is hetero") == "True":
        raise NotImplementedError(
            f"{dataset_name} is heterogeneous; AIRES trains homogeneous graphs"
        )
    if int(meta["num tasks"]) != 1 or meta["eval metric"] != "acc":
        raise NotImplementedError(
            f"{dataset_name} has {meta['num tasks']} tasks scored by {meta['eval metric']!r}; "
            "only single-task classification scored by accuracy is supported"
        )
    _check_files(dataset_name, dataset_dir, meta)
    graph, labels, split = _read_dataset(dataset_dir, meta)
    info = {
        "name": dataset_name,
        "num_tasks": int(meta["num tasks"]),
        "eval_metric": str(meta["eval metric"]),
        "custom": root_dir is None,
    }
    provenance = {
        "source": "ogb",
        "params": {
            "name": dataset_name,
            "dir": str(dataset_dir.absolute()),
            "undirected": undirected,
        },
        "ogb": info,
    }
    def write(path: str | os.PathLike[str], replace: bool) -> None:
        _write(path, replace, dataset_name, graph, labels, split, int(meta["num classes"]),
               undirected, provenance, chunk_size, progress)

    if out is not None:
        write(out, overwrite)
        return open_graph(out)
    # No destination: build the on-disk graph in a scratch directory and load it into memory.
    with tempfile.TemporaryDirectory(prefix="aires-ogb-") as tmp:
        path = Path(tmp) / "graph"
        write(path, False)
        loaded = open_graph(path, mmap=False)
    loaded.provenance.pop("path", None)
    return loaded


def _read_dataset(
    dataset_dir: Path, meta: dict[str, Any]
) -> tuple[dict[str, Any], np.ndarray, dict[str, Any]]:
    """``(graph dict, labels, split)`` as ``NodePropPredDataset`` gives them, from the raw files.

    The same ``ogb.io`` readers and the same files as ogb's first load (its ``pre_process`` and
    ``get_idx_split``), without its pickle cache. Additional node and edge files (such as
    ogbn-arxiv's ``node_year``) are not read: AIRES does not use them.
    """
    try:
        import pandas as pd
        from ogb.io.read_graph_raw import read_binary_graph_raw, read_csv_graph_raw
    except ImportError as err:
        raise ImportError(f"loading OGB datasets needs the ogb package: {_EXTRA}") from err
    raw = dataset_dir / "raw"
    inverse = meta.get("add_inverse_edge") == "True"
    with contextlib.redirect_stdout(sys.stderr):  # ogb's readers print progress
        if meta.get("binary") == "True":
            graph = read_binary_graph_raw(str(raw), add_inverse_edge=inverse)[0]
            with np.load(raw / "node-label.npz", allow_pickle=False) as npz:
                labels = npz["node_label"]
        else:
            graph = read_csv_graph_raw(str(raw), add_inverse_edge=inverse)[0]
            labels = pd.read_csv(raw / "node-label.csv.gz", compression="gzip", header=None).values
    split_dir = dataset_dir / "split" / _plain_name(meta["split"], "split", dataset_dir)
    if (split_dir / "split_dict.pt").is_file():
        split = _load_plain(split_dir / "split_dict.pt")
        if not isinstance(split, dict) or not {"train", "valid", "test"} <= split.keys():
            raise ValueError(f"{split_dir / 'split_dict.pt'}: no train/valid/test split in it")
    else:
        split = {
            part: pd.read_csv(
                split_dir / f"{part}.csv.gz", compression="gzip", header=None
            ).values.T[0]
            for part in ("train", "valid", "test")
        }
    return graph, labels, split


def _load_plain(path: Path) -> Any:
    """A ``torch.save`` file that holds only tensors, numpy arrays and plain containers.

    ``weights_only=True`` runs torch's restricted unpickler, here allowing the few numpy globals
    that rebuild a numeric array and nothing else, so a crafted file cannot run code.

    Raises:
        ValueError: the file holds anything else (or is not a ``torch.save`` file).
    """
    with torch.serialization.safe_globals(_numpy_globals()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as err:
            raise ValueError(
                f"{path}: not loaded: it is not a torch.save file of plain arrays and values "
                f"(AIRES never unpickles anything else): {str(err).splitlines()[0]}"
            ) from err


def _numpy_globals() -> list[Any]:
    """What unpickling a numeric numpy array needs: its rebuild function, ``ndarray`` and the
    numeric dtypes (no object dtype), under numpy 2 names and numpy 1's ``numpy.core``."""
    reconstruct = np.empty(0).__reduce__()[0]
    dtypes = [type(np.dtype(code)) for code in "?bhilqBHILQefd"]
    return [
        reconstruct,
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
        np.ndarray,
        np.dtype,
        *dtypes,
    ]


def _plain_name(value: Any, what: str, source: Path) -> str:
    """``value`` if it is a plain file name (no separator, not ``..``), else ``ValueError``."""
    text = str(value)
    if text in ("", ".", "..") or "/" in text or "\\" in text or "\0" in text:
        raise ValueError(f"{source}: {what} must be a plain name, got {text!r}")
    return text


def _master() -> dict[str, dict[str, str]]:
    """OGB's own table of node-property datasets (``ogb/nodeproppred/master.csv``)."""
    try:
        import ogb.nodeproppred
        import pandas as pd
    except ImportError as err:
        raise ImportError(f"loading OGB datasets needs the ogb package: {_EXTRA}") from err
    path = Path(ogb.nodeproppred.__file__).parent / "master.csv"
    table = pd.read_csv(path, index_col=0, keep_default_na=False)
    return {column: {k: str(v) for k, v in table[column].items()} for column in table.columns}


def _resolve(
    name: str | os.PathLike[str],
    root: str | os.PathLike[str] | None,
    meta_dict: dict[str, Any] | None,
) -> tuple[str, Path | None, dict[str, Any], Path]:
    """``(dataset name, root or None for a custom dataset, metadata, dataset directory)``."""
    text = os.fspath(name)
    if meta_dict is not None:
        if "dir_path" not in meta_dict:
            raise ValueError(
                "meta_dict must come from DatasetSaver.get_meta_dict() (no 'dir_path' key)"
            )
        return text, None, dict(meta_dict), Path(meta_dict["dir_path"])
    path = Path(text).expanduser()
    if path.is_dir() and (path / "meta_dict.pt").is_file():
        meta = _load_plain(path / "meta_dict.pt")
        if not isinstance(meta, dict) or "download_name" not in meta:
            raise ValueError(f"{path / 'meta_dict.pt'}: not an ogb meta_dict (no download_name)")
        download = _plain_name(meta["download_name"], "download_name", path / "meta_dict.pt")
        dataset_dir = path / download
        return (
            f"ogbn-{meta['download_name']}",
            None,
            {**meta, "dir_path": str(dataset_dir)},
            dataset_dir,
        )
    if path.is_dir() and any(path.glob("RELEASE_v*.txt")):
        text, root = path.name.replace("_", "-", 1), path.parent
    master = _master()
    if text not in master:
        raise ValueError(
            f"name: unknown OGB node dataset {text!r}; supported: {', '.join(OGB_NODE_DATASETS)}"
        )
    root_dir = Path(root).expanduser() if root is not None else default_ogb_root()
    if root_dir is None:
        raise ValueError(f"root: where is {text}? pass root=... (or set AIRES_OGB_ROOT)")
    return text, root_dir, master[text], root_dir / text.replace("-", "_")


def _check_files(name: str, dataset_dir: Path, meta: dict[str, Any]) -> None:
    """Raise ``FileNotFoundError`` unless ogb will find everything without downloading."""
    missing = []
    release = dataset_dir / f"RELEASE_v{meta['version']}.txt"
    if not release.is_file():
        missing.append(release)
    missing += [p for p in _raw_files(dataset_dir, meta) if not p.is_file()]
    split = dataset_dir / "split" / _plain_name(meta["split"], "split", dataset_dir)
    if not (split / "split_dict.pt").is_file():
        missing += [
            p
            for p in (split / f"{s}.csv.gz" for s in ("train", "valid", "test"))
            if not p.is_file()
        ]
    if not missing:
        return
    layout = "\n".join(
        f"    {p.relative_to(dataset_dir.parent)}"
        for p in [release, *_raw_files(dataset_dir, meta)]
    )
    download = str(meta.get("download_name", dataset_dir.name))
    raise FileNotFoundError(
        f"{name}: files missing under {dataset_dir.parent} (AIRES never downloads):\n"
        + "\n".join(f"    {p}" for p in missing)
        + f"\nExpected layout under {dataset_dir.parent}:\n{layout}\n"
        + f"    {split.relative_to(dataset_dir.parent)}/train.csv.gz, valid.csv.gz, test.csv.gz "
        "(or split_dict.pt)\n"
        "On a machine with internet, run:\n"
        f'    pip install ogb && python -c "from ogb.nodeproppred import NodePropPredDataset; '
        f"NodePropPredDataset('{name}', root='ogb_data')\"\n"
        f"  (or: wget {meta.get('url', '')} && unzip {download}.zip "
        f"&& mv {download} {dataset_dir.name})\n"
        f"then copy ogb_data/{dataset_dir.name} to {dataset_dir} (see datasets/README.md)."
    )


def _raw_files(dataset_dir: Path, meta: dict[str, Any]) -> list[Path]:
    raw = dataset_dir / "raw"
    if meta.get("binary") == "True":
        return [raw / "data.npz", raw / "node-label.npz"]
    files = ["edge", "num-node-list", "num-edge-list", "node-label"]
    if meta.get("has_node_attr") == "True":
        files.append("node-feat")
    return [raw / f"{f}.csv.gz" for f in files]


def _write(
    path: str | os.PathLike[str],
    overwrite: bool,
    name: str,
    graph: dict[str, Any],
    labels: np.ndarray,
    split: dict[str, np.ndarray],
    num_classes: int,
    undirected: bool,
    provenance: dict[str, Any],
    chunk_size: int,
    progress: bool,
) -> None:
    """Write an ogb graph dict as an on-disk graph; the adjacency goes through the external sort."""
    n = int(graph["num_nodes"])
    edges = graph["edge_index"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with GraphWriter(path, overwrite=overwrite) as writer:
        builder = CSRBuilder(
            writer.workdir,
            n,
            n,
            expected_entries=edges.shape[1] * (2 if undirected else 1),
            chunk_size=chunk_size,
            device=device,
        )
        for start in range(0, edges.shape[1], chunk_size):
            src = torch.from_numpy(
                np.ascontiguousarray(edges[0, start : start + chunk_size], dtype=np.int64)
            )
            dst = torch.from_numpy(
                np.ascontiguousarray(edges[1, start : start + chunk_size], dtype=np.int64)
            )
            builder.add(src, dst)
            if undirected:
                builder.add(dst, src)
        builder.finish(partial(writer.adjacency, n), progress=progress)
        features = graph.get("node_feat")
        if features is not None:
            writer.put("x", np.asarray(features, dtype=np.float32))
        y = np.asarray(labels).reshape(n, -1)[:, 0]
        if np.issubdtype(y.dtype, np.floating):
            y = np.where(np.isnan(y), -1, y)  # ogbn-papers100M leaves most nodes unlabelled (NaN)
        writer.put("y", y.astype(np.int64))
        for ours, theirs in (("train_idx", "train"), ("val_idx", "valid"), ("test_idx", "test")):
            writer.put(ours, np.asarray(split[theirs], dtype=np.int64))
        writer.commit(
            name=name,
            num_nodes=n,
            num_features=0 if features is None else int(features.shape[1]),
            num_classes=num_classes,
            symmetric=True if undirected else None,
            provenance=provenance,
        )
