"""Products that cannot fit: a clear error before memory runs out, and the process stays usable.

The CPU test asks for an output larger than the machine's RAM under the default budget; the GPU
tests (run on the GPU machine) ask for one larger than the device, under the default budget (a
``ValueError`` before any allocation) and under an explicit budget beyond the device (the
allocation itself fails: ``ValueError`` or ``torch.cuda.OutOfMemoryError``, with a message), and
then check that small products still give the right answer and no device memory leaked.
"""

from __future__ import annotations

import gc
import math
import os

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from aires.matmul import clear_cache, matmul

ROWS, COLS = 1 << 20, 16
#: The budget error, which counts the call's output in the minimum it states.
TOO_BIG = r"gpu_budget=\d+ bytes .* below the minimum working set .* reserved for the output"


def tall(rows: int = ROWS, cols: int = COLS) -> tuple:
    """A ``rows x cols`` matrix with one entry per row: a tiny store with a huge output."""
    indptr = np.arange(rows + 1, dtype=np.int64)
    indices = np.arange(rows, dtype=np.int64) % cols
    return indptr, indices, np.ones(rows, np.float32), (rows, cols)


def reference(a: tuple, x: torch.Tensor) -> np.ndarray:
    indptr, indices, data, shape = a
    return sp.csr_array((data, indices, indptr), shape=shape).astype(np.float64) @ (
        x.double().cpu().numpy()
    )


def check_still_usable(big: tuple, device: str) -> None:
    """A small product, and a small-width product with the same big ``A``, are both right."""
    rng = np.random.default_rng(0)
    small = sp.random_array((300, 200), density=0.05, format="csr", rng=rng, dtype=np.float32)
    x = torch.from_numpy(rng.standard_normal((200, 8)).astype(np.float32)).to(device)
    np.testing.assert_allclose(
        matmul(small, x).cpu().numpy(),
        small.astype(np.float64) @ x.double().cpu().numpy(),
        rtol=1e-5,
        atol=1e-5,
    )
    narrow = torch.ones(COLS, 2, device=device)
    np.testing.assert_allclose(matmul(big, narrow).cpu().numpy(), reference(big, narrow))


def test_output_larger_than_ram_is_refused_before_allocating() -> None:
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    width = math.ceil(2 * ram / (ROWS * 4))  # a float32 output twice the machine's RAM
    big = tall()
    with pytest.raises(ValueError, match=TOO_BIG):
        matmul(big, torch.ones(COLS, width))
    check_still_usable(big, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("budget", ["default", "beyond-device"])
def test_gpu_out_of_memory_is_clear_and_the_process_stays_usable(budget: str) -> None:
    clear_cache()
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    _, total = torch.cuda.mem_get_info()
    width = math.ceil(1.5 * total / (ROWS * 4))  # a float32 output 1.5x the device
    big = tall()
    x = torch.ones(COLS, width, device="cuda")
    if budget == "default":
        with pytest.raises(ValueError, match=TOO_BIG):
            matmul(big, x)
    else:
        with pytest.raises(
            (ValueError, torch.cuda.OutOfMemoryError), match=r"(?i)out of memory|gpu_budget"
        ):
            matmul(big, x, gpu_budget=2 * total)
    del x
    gc.collect()
    torch.cuda.synchronize()
    check_still_usable(big, "cuda")
    clear_cache()
    gc.collect()
    torch.cuda.empty_cache()
    leaked = torch.cuda.memory_allocated() - before
    assert leaked < 64 << 20, f"{leaked} bytes of device memory still held after clear_cache()"
