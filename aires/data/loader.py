"""One entry point for every graph: a name or a path in, a :class:`Graph` out."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from aires.data.generator import PRESETS, synthetic
from aires.data.graph import Graph
from aires.data.ogb import OGB_NODE_DATASETS, load_ogb
from aires.data.planetoid import PLANETOID_NAMES, load_planetoid
from aires.data.storage import is_graph_dir, open_graph

__all__ = ["load_graph"]


def load_graph(
    name: str | os.PathLike[str], root: str | os.PathLike[str] | None = None, **kwargs: Any
) -> Graph:
    """Load a graph by name or path, dispatching on what it is.

    ==============================================  ============================================
    ``name``                                        loaded by
    ==============================================  ============================================
    a directory with ``graph.json``                 :func:`open_graph` (memmap-backed)
    an OGB dataset or ``DatasetSaver`` directory    :func:`load_ogb`
    an ``.npz`` file, ``"cora"``, ``"citeseer"``    :func:`load_planetoid` (``root``: its folder)
    ``"ogbn-arxiv"``, ``"ogbn-products"``, ...      :func:`load_ogb` (``root``: the OGB root)
    a preset: ``"tiny"``, ``"arxiv"``,              :func:`synthetic` (``kwargs``: ``scale``,
    ``"products"``, ``"papers100M"``                ``seed``, ``feature_density``, ...)
    ==============================================  ============================================

    Args:
        name: what to load (see the table).
        root: the directory Planetoid or OGB names are looked up in.
        **kwargs: passed on to :func:`synthetic` or :func:`load_ogb`.

    Raises:
        ValueError: nothing matches ``name`` (the message lists what would), or ``kwargs`` given
            for a loader that takes none.
    """
    text = os.fspath(name)
    path = Path(text).expanduser()
    if is_graph_dir(path):
        _no_kwargs(text, kwargs)
        return open_graph(path)
    if path.is_dir() and ((path / "meta_dict.pt").is_file() or any(path.glob("RELEASE_v*.txt"))):
        return load_ogb(path, **kwargs)
    if text.lower() in PLANETOID_NAMES or text.endswith(".npz"):
        _no_kwargs(text, kwargs)
        return load_planetoid(text, root)
    if text.startswith("ogbn-"):
        return load_ogb(text, root, **kwargs)
    if text.lower() in (p.lower() for p in PRESETS):
        return synthetic(text, **kwargs)
    raise ValueError(
        f"name: cannot load {text!r}; expected an on-disk graph directory, an OGB dataset "
        f"directory, an .npz file, a Planetoid name ({', '.join(PLANETOID_NAMES)}), an OGB name "
        f"({', '.join(OGB_NODE_DATASETS)}) or a synthetic preset ({', '.join(PRESETS)}); "
        "convert edge lists first with `aires data convert`"
    )


def _no_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    if kwargs:
        raise ValueError(f"{name!r} takes no extra options, got {', '.join(kwargs)}")
