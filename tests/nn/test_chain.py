"""``aires.nn.chain``: the hand-written derivative of a row-local chain against autograd's."""

from __future__ import annotations

import pytest
import torch

from aires.nn import chain
from aires.nn.program import Op

CHAINS = {
    "hidden": (Op("linear", 0), Op("bias", 0), Op("relu"), Op("linear", 1)),
    "dropout-first": (Op("dropout", 0), Op("linear", 0), Op("relu"), Op("dropout", 1),
                      Op("linear", 1), Op("bias", 1)),
    "bias-only": (Op("bias", 1),),
    "relu-below": (Op("relu"), Op("linear", 0)),
}


def _params(seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(7, 5, generator=g, dtype=torch.float64),
             torch.randn(7, generator=g, dtype=torch.float64)),
            (torch.randn(7, 7, generator=g, dtype=torch.float64),
             torch.randn(7, generator=g, dtype=torch.float64))]


def _dropout(h: torch.Tensor, site: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(100 + site)
    mask = (torch.rand(h.shape, generator=g) >= 0.3).to(h.dtype) / 0.7
    return h * mask, mask


@pytest.mark.parametrize("output", [True, False])
@pytest.mark.parametrize("needs_input", [True, False])
@pytest.mark.parametrize("name", list(CHAINS))
def test_backprop_matches_autograd(name: str, needs_input: bool, output: bool) -> None:
    """``output=False`` (a backward pass's recompute) records the same tape, and returns
    nothing."""
    ops = CHAINS[name]
    width = 7 if name == "bias-only" else 5
    h = torch.randn(11, width, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    params = _params(0)
    tape = chain.Tape()
    out = chain.run(ops, h, params, _dropout)
    got = chain.run(ops, h, params, _dropout, tape, output=output)
    if output:
        torch.testing.assert_close(got, out, rtol=0, atol=0)
    else:
        assert got is None
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    # Earlier gradients to add to, as the blocks of a pass do.
    for w, b in params:
        w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    d_input = chain.backprop(tape, grad, params, needs_input)

    leaves = [(w.detach().requires_grad_(), b.detach().requires_grad_()) for w, b in _params(0)]
    x = h.clone().requires_grad_()
    torch.testing.assert_close(chain.run(ops, x, leaves, _dropout), out, rtol=0, atol=0)
    chain.run(ops, x, leaves, _dropout).backward(grad)
    for (w, b), (rw, rb) in zip(params, leaves, strict=True):
        for got, ref in ((w.grad, rw.grad), (b.grad, rb.grad)):
            expected = torch.ones_like(got) + (0 if ref is None else ref)
            torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    if needs_input:
        torch.testing.assert_close(d_input, x.grad, rtol=1e-12, atol=1e-12)
    else:
        assert d_input is None


def test_a_sparse_first_linear_gets_its_weight_gradient() -> None:
    dense = torch.randn(9, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    dense[dense < 0.3] = 0
    ops = CHAINS["hidden"]
    params, leaves = _params(0), [(w.detach().requires_grad_(), b.detach().requires_grad_())
                                  for w, b in _params(0)]
    tape = chain.Tape()
    out = chain.run(ops, dense.to_sparse_csr(), params, None, tape)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert chain.backprop(tape, grad, params, needs_input=False) is None
    chain.run(ops, dense, leaves, None).backward(grad)
    for (w, b), (rw, rb) in zip(params, leaves, strict=True):
        torch.testing.assert_close(w.grad, rw.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.grad, rb.grad, rtol=1e-12, atol=1e-12)


def test_a_tape_only_run_needs_a_tape() -> None:
    with pytest.raises(ValueError, match="records a tape"):
        chain.run(CHAINS["hidden"], torch.zeros(2, 5), _params(0), None, output=False)
