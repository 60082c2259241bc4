"""Scoring predictions on a split: OGB's ``Evaluator`` for OGB graphs, plain accuracy otherwise."""

from __future__ import annotations

import functools

import numpy as np
import torch

from aires.data.graph import Graph

__all__ = ["evaluate"]


def evaluate(graph: Graph, pred: torch.Tensor | np.ndarray, split: str = "test") -> float:
    """Accuracy of full-graph predictions on one split.

    For a graph loaded by :func:`aires.data.load_ogb` the score comes from
    ``ogb.nodeproppred.Evaluator`` (the leaderboard's definition); for any other graph it is the
    share of correctly classified nodes. Nodes labelled ``-1`` (unlabelled) are left out.

    Args:
        graph: the graph the predictions are for.
        pred: predictions for **every** node: class scores or logits of shape ``(N, C)``
            (the argmax is taken), or class ids of shape ``(N,)``; torch or numpy, any device.
        split: ``"train"``, ``"val"`` (or ``"valid"``) or ``"test"``.

    Returns:
        The accuracy in ``[0, 1]`` (``nan`` when the split has no labelled node).

    Raises:
        ValueError: ``pred``'s first dimension is not ``N``, or an unknown split.
        ImportError: an OGB graph and ``ogb`` is not installed.
    """
    if graph.y is None:
        raise ValueError(f"graph {graph.name!r} has no labels to evaluate against")
    pred = torch.as_tensor(pred).detach()
    if pred.dim() not in (1, 2) or pred.shape[0] != graph.num_nodes:
        raise ValueError(
            f"pred must have shape (N,) or (N, C) with N = {graph.num_nodes}, "
            f"got {tuple(pred.shape)}"
        )
    idx = graph.split_index(split)
    # Select the split where the predictions live: only |split| rows travel to the host.
    picked = pred[idx.to(pred.device)]
    y_pred = (picked.argmax(dim=1) if picked.dim() == 2 else picked).cpu().to(torch.long)
    y_true = graph.y[idx]
    labelled = y_true >= 0
    y_true, y_pred = y_true[labelled], y_pred[labelled]
    if y_true.numel() == 0:
        return float("nan")
    info = graph.provenance.get("ogb")
    if info is None:
        return float((y_pred == y_true).double().mean())
    evaluator = _evaluator(
        info["name"], bool(info.get("custom")), int(info["num_tasks"]), str(info["eval_metric"])
    )
    result = evaluator.eval({"y_true": y_true[:, None], "y_pred": y_pred[:, None]})
    return float(result[info["eval_metric"]])


@functools.lru_cache(maxsize=16)
def _evaluator(name: str, custom: bool, num_tasks: int, eval_metric: str) -> object:
    """OGB's ``Evaluator``; for a custom ``DatasetSaver`` dataset, one built from its metadata.

    ``Evaluator(name)`` only knows the datasets of OGB's ``master.csv``; its ``__init__`` does
    nothing but read ``num_tasks`` and ``eval_metric`` from there, so a custom dataset gets the
    same object with those two set from its ``meta_dict``. Cached: training scores every epoch.
    """
    try:
        from ogb.nodeproppred import Evaluator
    except ImportError as err:
        raise ImportError(
            "evaluating OGB graphs needs the ogb package: pip install aires[ogb]"
        ) from err
    if not custom:
        return Evaluator(name)
    evaluator = Evaluator.__new__(Evaluator)
    evaluator.name = name
    evaluator.num_tasks = num_tasks
    evaluator.eval_metric = eval_metric
    return evaluator
