"""evaluate(): plain accuracy for non-OGB graphs (OGB's Evaluator is tested in test_ogb.py)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from aires.data import Graph, evaluate


@pytest.fixture
def graph() -> Graph:
    return Graph(
        name="g",
        num_nodes=6,
        adj=sp.csr_array((6, 6), dtype=np.float32),
        x=torch.ones(6, 2),
        y=torch.tensor([0, 1, 2, 0, -1, 1]),
        train_idx=torch.tensor([0, 1]),
        val_idx=torch.tensor([2]),
        test_idx=torch.tensor([3, 4, 5]),
        num_classes=3,
    )


def test_accuracy_from_labels_and_from_scores(graph: Graph) -> None:
    labels = torch.tensor([0, 0, 2, 0, 2, 2])
    # test nodes 3, 4, 5: node 4 is unlabelled and left out; 3 right, 5 wrong
    assert evaluate(graph, labels) == 0.5
    scores = torch.nn.functional.one_hot(labels, 3).float()
    assert evaluate(graph, scores, "test") == 0.5
    assert evaluate(graph, scores.numpy(), "train") == 0.5
    assert evaluate(graph, labels, "val") == evaluate(graph, labels, "valid") == 1.0


def test_bad_predictions_and_splits(graph: Graph) -> None:
    with pytest.raises(ValueError, match=r"shape \(N,\) or \(N, C\) with N = 6"):
        evaluate(graph, torch.zeros(3))
    with pytest.raises(ValueError, match="split must be one of"):
        evaluate(graph, torch.zeros(6), "dev")


def test_empty_split_is_nan(graph: Graph) -> None:
    graph.test_idx = torch.tensor([4])
    assert np.isnan(evaluate(graph, torch.zeros(6)))
