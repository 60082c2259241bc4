"""Shared fixtures and the ``gpu`` marker's skip rule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

PLANETOID = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "planetoid"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture
def planetoid_dir() -> Path:
    if not PLANETOID.is_dir():
        pytest.skip(f"real Planetoid data not found at {PLANETOID}")
    return PLANETOID
