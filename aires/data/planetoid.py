"""Planetoid citation graphs (Cora, CiteSeer) from pickle-free ``.npz`` files.

Both ship inside the package (``aires/data/files/``, with their provenance and licence in the
README there), so they load from a fresh install with no download. The format: ``adj_indptr``,
``adj_indices`` (symmetric CSR, int64), ``x_indptr``, ``x_indices``, ``x_data``, ``x_shape``
(sparse float32 bag-of-words), ``y``, ``label_present``, ``train_idx``, ``val_idx``,
``test_idx``. Node and edge counts match PyTorch Geometric's ``Planetoid`` datasets.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from aires.data.graph import Graph

__all__ = ["PLANETOID_NAMES", "default_planetoid_root", "load_planetoid"]

#: Names looked up under the Planetoid root (``NAME.npz``).
PLANETOID_NAMES = ("cora", "citeseer")

_KEYS = (
    "adj_indptr",
    "adj_indices",
    "x_indptr",
    "x_indices",
    "x_data",
    "x_shape",
    "y",
    "label_present",
    "train_idx",
    "val_idx",
    "test_idx",
)


def default_planetoid_root() -> Path:
    """The folder of the copies shipped with the package (``aires/data/files``)."""
    return Path(str(resources.files("aires.data") / "files"))


def load_planetoid(
    name_or_path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None
) -> Graph:
    """Load a Planetoid graph into memory.

    Args:
        name_or_path: ``"cora"`` or ``"citeseer"`` (case-insensitive), looked up as
            ``root/NAME.npz``; or the path of an ``.npz`` file.
        root: directory holding the files (default :func:`default_planetoid_root`, the
            copies shipped with the package).

    Returns:
        The graph: symmetric adjacency (no self loops), sparse CSR features, labels with ``-1``
        for the few nodes the release leaves unlabelled (none of them is in a split).

    Raises:
        ValueError: not a known name nor an ``.npz`` path, or the file lacks a required array.
        FileNotFoundError: the file does not exist.
    """
    text = os.fspath(name_or_path)
    if text.lower() in PLANETOID_NAMES:
        base = Path(root).expanduser() if root is not None else default_planetoid_root()
        path = base / f"{text.lower()}.npz"
    elif text.endswith(".npz") or Path(text).is_file():
        path = Path(text).expanduser()
    else:
        raise ValueError(
            f"name_or_path: {text!r} is neither a Planetoid name ({', '.join(PLANETOID_NAMES)}) "
            "nor an .npz file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"Planetoid file {path} not found")
    with np.load(path, allow_pickle=False) as npz:
        missing = [k for k in _KEYS if k not in npz.files]
        if missing:
            raise ValueError(f"{path}: not a Planetoid npz, missing arrays {missing}")
        arrays = {k: npz[k] for k in _KEYS}
    n = len(arrays["adj_indptr"]) - 1
    indices = arrays["adj_indices"].astype(np.int64)
    adj = sp.csr_array(
        (np.ones(len(indices), np.float32), indices, arrays["adj_indptr"].astype(np.int64)),
        shape=(n, n),
    )
    adj.sort_indices()
    x = sp.csr_array(
        (
            arrays["x_data"].astype(np.float32),
            arrays["x_indices"].astype(np.int64),
            arrays["x_indptr"].astype(np.int64),
        ),
        shape=tuple(int(s) for s in arrays["x_shape"]),
    )
    y = np.where(arrays["label_present"], arrays["y"], -1).astype(np.int64)
    return Graph(
        name=path.stem.lower(),
        num_nodes=n,
        adj=adj,
        x=x,
        y=torch.from_numpy(y),
        train_idx=torch.from_numpy(arrays["train_idx"].astype(np.int64)),
        val_idx=torch.from_numpy(arrays["val_idx"].astype(np.int64)),
        test_idx=torch.from_numpy(arrays["test_idx"].astype(np.int64)),
        num_classes=int(arrays["y"].max()) + 1,
        provenance={"source": "planetoid", "params": {"path": str(path.absolute())}},
        symmetric=(adj != adj.T).nnz == 0,
    )
