"""The benchmark's methods: AIRES and the baselines, each a module with ``run(workload, config)``.

Methods are imported by name only when they run (each in its own process), so the optional
dependencies of one (CuPy, PyG, KvikIO) are never needed by another.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from bench.methods.config import MethodConfig
from bench.methods.result import MethodResult

__all__ = [
    "ABLATIONS",
    "METHODS",
    "MethodConfig",
    "MethodResult",
    "check_method",
    "method_module",
]

METHODS: dict[str, str] = {
    "aires": "bench.methods.aires",
    "aires-ddp": "bench.methods.aires_ddp",
    "uvm": "bench.methods.uvm",
    "feature-cache": "bench.methods.feature_cache",
    "naive": "bench.methods.naive",
    "incore": "bench.methods.incore",
    "incore-tuned": "bench.methods.incore_tuned",
    "save-on-cpu": "bench.methods.incore_tuned",
}

# AIRES ablation variants, run as methods named "aires-<variant>" by ``--ablation``.
ABLATIONS: tuple[str, ...] = (
    "pyg-order", "no-align", "no-prealloc", "sync", "host-only", "disk-only",
)


def check_method(name: str, argument: str = "method") -> str:
    """The module path of method ``name`` (an ablation ``aires-<variant>`` is AIRES's).

    Args:
        name: a method name.
        argument: what the caller calls it (``"--methods"`` on the command line), named in the
            error.

    Raises:
        ValueError: ``name`` is not a known method.
    """
    if name in METHODS:
        return METHODS[name]
    if name.startswith("aires-") and name.removeprefix("aires-") in ABLATIONS:
        return METHODS["aires"]
    known = list(METHODS) + [f"aires-{a}" for a in ABLATIONS]
    raise ValueError(f"{argument}: unknown method {name!r}; known: {', '.join(known)}")


def method_module(name: str) -> ModuleType:
    """Import and return the module implementing method ``name`` (see :func:`check_method`)."""
    return importlib.import_module(check_method(name))
