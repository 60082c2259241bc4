"""Run one method in this process and write its result: ``python -m bench.methods.run CONFIG OUT``.

The CLI starts one such process per method, so each starts with clean GPU memory and a crash
or out-of-memory in one cannot disturb another. Whatever happens inside the method, a result is
written: ``ok`` with the measurements, ``oom`` when memory ran out (the budget), ``error``
otherwise.
"""

from __future__ import annotations

import json
import sys
import traceback
import warnings
from pathlib import Path

import torch

from aires.scheduler.stats import max_memory_allocated, reset_peak_memory_stats

from bench.methods import method_module
from bench.methods.config import BUDGET_SCOPES, MethodConfig
from bench.methods.result import MethodResult, is_out_of_memory
from bench.methods.workload import load_workload

__all__ = ["cap_process", "main", "run_method"]


def cap_process(config: MethodConfig, device: torch.device) -> None:
    """Cap this process's PyTorch allocator at the GPU budget (``budget_scope="process"``).

    Without a process budget the cap is lifted, so runs in one process (the tests) do not
    inherit the previous run's cap.
    """
    if device.type != "cuda":
        return
    fraction = 1.0
    if config.gpu_budget is not None and config.budget_scope == "process":
        total = torch.cuda.get_device_properties(device).total_memory
        fraction = min(1.0, config.gpu_budget / total)
    # The cap is checked only when the allocator reserves a new segment: blocks cached by an
    # earlier run in this process would otherwise serve the method past its budget.
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(fraction, device)


def run_method(config: MethodConfig) -> MethodResult:
    """Run ``config.method`` on its workload; failures become ``oom`` or ``error`` results."""
    if config.budget_scope not in BUDGET_SCOPES:
        raise ValueError(
            f"budget_scope must be one of {BUDGET_SCOPES}, got {config.budget_scope!r}"
        )
    torch.manual_seed(config.seed)
    device: torch.device | None = None
    capped = True
    try:
        device = config.torch_device()
        module = method_module(config.method)
        # A method that brings its own allocator (uvm) must meet it untouched.
        capped = not getattr(module, "CAPS_ITSELF", False)
        if capped:
            cap_process(config, device)
            if device.type == "cuda":
                reset_peak_memory_stats(device)
        return module.run(load_workload(config.workload), config)
    except Exception as error:  # noqa: BLE001 - every failure is a result, not a crash
        cuda = capped and device is not None and device.type == "cuda"
        return MethodResult(
            status="oom" if is_out_of_memory(error) else "error",
            peak_gpu_bytes=max_memory_allocated(device) if cuda else None,
            error=f"{type(error).__name__}: {error}".strip()[:2000],
            extra={"traceback": traceback.format_exc(limit=6)[-4000:]},
        )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the method subprocess."""
    args = sys.argv[1:] if argv is None else argv
    # torch warns on every CSR tensor built; the baselines build one per chunk.
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
    if len(args) != 2:
        print("usage: python -m bench.methods.run CONFIG.json RESULT.json", file=sys.stderr)
        return 2
    result = run_method(MethodConfig.load(args[0]))
    Path(args[1]).write_text(json.dumps(result.to_json()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
