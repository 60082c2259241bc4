"""What one benchmark method is asked to do: the same training run for every method."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["BUDGET_SCOPES", "ORDERS", "MethodConfig"]

BUDGET_SCOPES = ("process", "data")
#: Product orders of a benchmark: AIRES's cost model per layer, or PyG's ``Â (H W)`` everywhere.
ORDERS = ("auto", "pyg")


@dataclass(frozen=True)
class MethodConfig:
    """The training run one method performs; identical for every method of a benchmark.

    Args:
        method: registry name of the method (``"aires"``, ``"naive"``, ...), or an AIRES ablation
            variant (``"aires-sync"``, ...).
        workload: directory written by :func:`bench.methods.workload.prepare_workload`.
        gpu_budget: GPU bytes the method may use; ``None`` for no limit. On a CPU the "device"
            is host memory and the budget bounds what a method holds there (scope ``"data"``).
        budget_scope: ``"process"``: the whole process (graph data, activations, workspaces) is
            capped at ``gpu_budget`` with ``torch.cuda.set_per_process_memory_fraction``, so a
            method that needs more reports ``oom`` (CUDA only: a CPU has no such cap).
            ``"data"``: the budget bounds only the graph data (adjacency and features) a method
            keeps on the device; activations come on top and show in the peak.
        epochs: timed epochs (each: forward, backward, optimizer step over the whole graph).
        warmup: untimed epochs before them (CUDA context, cuSPARSE handles, allocator warm-up).
        layers: GCN layers (``>= 1``).
        hidden: hidden channels.
        lr: Adam learning rate.
        tile_bytes: bytes per AIRES tile, and per row chunk of the chunked baselines.
        seed: seed of the weights.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"``; see :meth:`torch_device`.
        order: every method's product order: ``"auto"`` (AIRES's cost model per layer,
            :meth:`aires.nn.GCN.orders`; the algebra is open to any method, so the comparison
            measures the systems alone) or ``"pyg"`` (``Â (H W)`` in every layer, as PyG's
            ``GCNConv`` computes).
        store_dir: where AIRES keeps its tile stores between runs (``None``: temporary).
    """

    method: str
    workload: str
    gpu_budget: int | None
    budget_scope: str = "process"
    epochs: int = 3
    warmup: int = 1
    layers: int = 2
    hidden: int = 256
    lr: float = 0.01
    tile_bytes: int = 64 << 20
    seed: int = 0
    device: str = "cpu"
    order: str = "auto"
    store_dir: str | None = None

    def __post_init__(self) -> None:
        try:
            device = torch.device(self.device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device: cannot use {self.device!r} ({error})") from None
        if self.order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {self.order!r}")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if device.type == "cpu" and self.gpu_budget is not None and self.budget_scope == "process":
            raise ValueError(
                "budget_scope='process' caps the CUDA allocator; with device='cpu' the budget "
                "needs budget_scope='data'"
            )

    def torch_device(self) -> torch.device:
        """The compute device, with its index on CUDA (``cuda`` becomes the current device).

        Several ``torch.cuda`` calls (``set_per_process_memory_fraction`` among them) reject a
        CUDA device without an index, so every method works on this one.
        """
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None:
            # Before CUDA is initialised the current device is 0; asking would initialise it,
            # and with it the allocator that ``uvm`` must replace first.
            index = torch.cuda.current_device() if torch.cuda.is_initialized() else 0
            device = torch.device("cuda", index)
        return device

    def dump(self, path: str | Path) -> None:
        """Write the configuration as JSON (read back by :meth:`load`)."""
        Path(path).write_text(json.dumps(asdict(self)))

    @classmethod
    def load(cls, path: str | Path) -> MethodConfig:
        """Read a configuration written by :meth:`dump`."""
        return cls(**json.loads(Path(path).read_text()))
