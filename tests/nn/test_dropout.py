"""``aires.nn.dropout``: masks that depend on an element's position only, the same bits from
the GPU's fused kernel, its chunked torch fallback and the CPU."""

from __future__ import annotations

import pytest
import torch

from aires.nn import dropout as dropout_module
from aires.nn import dropout_mask

KEY = 0x5EED_1234_ABCD


@pytest.mark.parametrize("p", [0.1, 0.3, 0.5, 0.9])
def test_a_mask_keeps_about_one_minus_p_scaled_as_torch_scales(p: float) -> None:
    mask = dropout_mask(7, 300, 200, p, KEY, torch.device("cpu"))
    assert mask.dtype == torch.float32 and mask.shape == (300, 200)
    scale = (torch.ones(1) / (1.0 - p)).item()
    assert set(mask.unique().tolist()) == {0.0, scale}
    kept = (mask > 0).double().mean().item()
    assert abs(kept - (1 - p)) < 4 * ((p * (1 - p)) / mask.numel()) ** 0.5


def test_blocks_and_panels_of_a_mask_are_the_whole_masks_pieces() -> None:
    cpu = torch.device("cpu")
    whole = dropout_mask(0, 50, 30, 0.5, KEY, cpu)
    rows = torch.cat([dropout_mask(r0, min(7, 50 - r0), 30, 0.5, KEY, cpu)
                      for r0 in range(0, 50, 7)])
    panels = torch.cat([dropout_mask(0, 50, 30, 0.5, KEY, cpu, (c0, min(c0 + 8, 30)))
                        for c0 in range(0, 30, 8)], dim=1)
    torch.testing.assert_close(rows, whole, rtol=0, atol=0)
    torch.testing.assert_close(panels, whole, rtol=0, atol=0)
    assert not torch.equal(dropout_mask(0, 50, 30, 0.5, KEY + 1, cpu), whole)


def test_a_csr_blocks_entries_get_the_dense_masks_draws() -> None:
    dense = torch.rand(40, 30, generator=torch.Generator().manual_seed(4))
    dense[dense < 0.7] = 0
    block = dense.to_sparse_csr()
    cpu = torch.device("cpu")
    got = dropout_module.csr_dropout_mask(1_000, block.crow_indices(), block.col_indices(), 30,
                                          0.4, KEY, torch.float32)
    rows, cols = dense.nonzero(as_tuple=True)
    want = dropout_mask(1_000, 40, 30, 0.4, KEY, cpu)[rows, cols]
    assert len(got) == len(want) > 0
    torch.testing.assert_close(got, want, rtol=0, atol=0)


CASES = [
    (0, 1000, 256, None, 0.5),
    (2_449_000, 29, 256, None, 0.3),  # counters past 2**24 and the float32 grid
    (123_457, 513, 100, (50, 100), 0.1),  # one panel of a wider tensor
    (0, 1, 7, (3, 4), 0.9),
    (5, 0, 16, None, 0.5),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES)
def test_the_gpus_masks_are_the_cpus_bits(case: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused kernel (where CuPy is installed) and the torch path in row chunks."""
    r0, rows, cols, columns, p = case
    ref = dropout_mask(r0, rows, cols, p, KEY, torch.device("cpu"), columns)
    cuda = torch.device("cuda")
    fused = dropout_mask(r0, rows, cols, p, KEY, cuda, columns)
    monkeypatch.setattr(dropout_module, "MASK_BYTES", 4 * 64)  # chunks of a few rows
    chunked = dropout_module._torch_mask(r0, rows, cols, *(columns or (0, cols)), p, KEY, cuda)
    torch.testing.assert_close(fused.cpu(), ref, rtol=0, atol=0)
    torch.testing.assert_close(chunked.cpu(), ref, rtol=0, atol=0)


@pytest.mark.gpu
def test_the_fused_mask_takes_no_temporaries() -> None:
    if dropout_module._kernel() is None:
        pytest.skip("CuPy is not installed: the torch path runs")
    cuda = torch.device("cuda")
    dropout_mask(0, 8, 8, 0.5, KEY, cuda)  # compile the kernel
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    mask = dropout_mask(0, 55_296, 256, 0.5, KEY, cuda)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - before == mask.numel() * 4
