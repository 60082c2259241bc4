"""A tiny graph prepared as a benchmark workload, shared by the bench tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from aires.data.graph import Graph
from bench.methods.workload import write_workload


def tiny_graph(n: int = 240, features: int = 12, classes: int = 4, seed: int = 0) -> Graph:
    """An undirected random graph with a hub row, dense features and a training split."""
    rng = np.random.default_rng(seed)
    a = sp.random(n, n, density=0.03, random_state=seed, format="csr")
    a = (a + a.T).tolil()
    a[0, 1:] = 1.0  # a hub, so row chunks of very different sizes appear
    a[1:, 0] = 1.0
    a.setdiag(0)
    a = a.tocsr()
    a.eliminate_zeros()
    a.data[:] = 1.0
    return Graph(
        name="tiny",
        num_nodes=n,
        adj=sp.csr_array(a.astype(np.float32)),
        x=torch.from_numpy(rng.standard_normal((n, features)).astype(np.float32)),
        y=torch.from_numpy(rng.integers(0, classes, n)),
        train_idx=torch.arange(0, n // 2),
        val_idx=torch.arange(n // 2, 3 * n // 4),
        test_idx=torch.arange(3 * n // 4, n),
        num_classes=classes,
        symmetric=True,
    )


@pytest.fixture
def make_graph() -> Callable[..., Graph]:
    return tiny_graph


@pytest.fixture(scope="session")
def workload_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_workload(tiny_graph(), tmp_path_factory.mktemp("bench") / "tiny")
