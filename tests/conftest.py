"""Shared fixtures and the ``gpu`` marker's skip rule."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import aires.gcn_conv as gcn_conv_module
from aires.data import default_planetoid_root


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
    """The Cora and CiteSeer files shipped inside the package."""
    return default_planetoid_root()


@pytest.fixture(autouse=True)
def fresh_layer_cache() -> Iterator[None]:
    """Each test starts with the layer module's shared store cache empty, and leaves it so."""
    gcn_conv_module._STORES.clear()
    gcn_conv_module._DIGESTS.clear()
    yield
    gcn_conv_module._STORES.clear()
    gcn_conv_module._DIGESTS.clear()


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every store built by the layer module, in order."""
    built: list[Any] = []
    original = gcn_conv_module.build_store

    def counting(*args: Any, **kwargs: Any) -> Any:
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(gcn_conv_module, "build_store", counting)
    return built
