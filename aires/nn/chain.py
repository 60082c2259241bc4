"""A ``Rows`` stage's chain of row-local ops on one row block, and its derivative by hand.

A row-local stage's backward pass runs once per row block (45 times an epoch on products at
2 GiB). Under autograd each block built a graph of a dozen nodes and handed it to the engine's
device thread, and that host work, not the device, set the pass's time: the hidden stage's
backward pass took 23.6 ms on one H200 machine and 37.4 ms on another, the same 45 blocks of
about 0.5 ms of kernels each. The chain has four kinds of op (dropout, ``@ W``, ``+ b``, ReLU), so
their derivatives are written out here: :func:`run` records in a :class:`Tape` what each step's
derivative reads, and :func:`backprop` adds each parameter's gradient into its ``.grad`` in
place (``addmm_``, and ``addmv_`` for a bias: a column sum as a product with ones, a third of
the reduction's time) and returns the input's, with no graph and no engine.

A backward pass recomputes a block's chain for what its derivative reads, which is never the
chain's last output when the last op is a linear: ``run(..., output=False)`` skips that product
(one GEMM of the three a block of products' hidden stage recomputed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from aires.nn.program import Op

__all__ = ["Tape", "backprop", "run"]

#: ``dropout(h, site)``: ``h`` with the site's mask applied, and the mask (``None`` on sparse
#: rows, whose gradient nothing needs).
Dropout = Callable[[Tensor, int], tuple[Tensor, Tensor | None]]
Params = list[tuple[Tensor, Tensor]]


@dataclass
class Tape:
    """The steps a :func:`run` took, each ``(kind, layer, saved)``: ``kind`` one of
    ``"dropout"``, ``"linear"``, ``"linear+bias"`` (one fused kernel), ``"bias"``, ``"relu"``;
    ``saved`` what its derivative reads: the mask, the linear's input, nothing, the output."""

    steps: list[tuple[str, int, Tensor | None]] = field(default_factory=list)


def run(
    ops: tuple[Op, ...],
    h: Tensor,
    params: Params,
    dropout: Dropout | None,
    tape: Tape | None = None,
    *,
    output: bool = True,
) -> Tensor | None:
    """The chain on a row block ``h`` (strided, or sparse CSR rows before the first linear).

    Args:
        ops: the stage's ops.
        h: the block.
        params: ``(weight, bias)`` per layer, ``weight`` shaped ``(out, in)`` as in ``nn.Linear``.
        dropout: applies a dropout site; ``None``: no dropout (evaluation, or ``p = 0``).
        tape: records the steps for :func:`backprop` when given.
        output: ``False`` (with a ``tape``): only the tape is wanted, so a last linear (and
            its bias) is recorded but not computed; returns ``None`` then.
    """
    if not output and tape is None:
        raise ValueError("run(output=False) records a tape: pass one")
    k = 0
    while k < len(ops):
        op, saved = ops[k], None
        kind = op.kind
        if kind == "dropout":
            if dropout is None:
                k += 1
                continue
            h, saved = dropout(h, op.layer)
        elif kind == "linear":
            weight, bias = params[op.layer]
            saved = h
            rest = ops[k + 1 :]
            if not output and rest in ((), (Op("bias", op.layer),)):
                assert tape is not None
                tape.steps.append(("linear+bias" if rest else "linear", op.layer, saved))
                return None
            if h.layout != torch.strided:
                h = torch.sparse.mm(h, weight.t())
            elif k + 1 < len(ops) and ops[k + 1] == Op("bias", op.layer):
                h = F.linear(h, weight, bias)
                kind = "linear+bias"
                k += 1
            else:
                h = F.linear(h, weight)
        elif kind == "bias":
            h = h + params[op.layer][1]
        else:
            h = F.relu(h)
            saved = h
        if tape is not None:
            tape.steps.append((kind, op.layer, saved))
        k += 1
    return h if output else None


def backprop(tape: Tape, grad: Tensor, params: Params, needs_input: bool) -> Tensor | None:
    """Back-propagate ``grad``, the gradient of the chain's output, through ``tape``.

    Adds each parameter's gradient to its ``.grad`` (a zero one first where it has none) and
    returns the gradient of the chain's input, or ``None`` unless ``needs_input``.
    """
    steps = tape.steps
    # Below the lowest step with parameters only the input could want a gradient.
    lowest = next((i for i, (kind, _, _) in enumerate(steps) if kind not in ("dropout", "relu")),
                  len(steps))
    g = grad
    for i in range(len(steps) - 1, -1, -1):
        kind, layer, saved = steps[i]
        wanted = needs_input or i > lowest
        if kind.startswith("linear"):
            weight, bias = params[layer]
            assert saved is not None
            if saved.layout == torch.strided:
                _grad(weight).addmm_(g.t(), saved)
            else:  # autograd's formula for a sparse first operand: ``h.t() @ g``
                _grad(weight).add_(torch.mm(saved.t(), g).t())
            if kind == "linear+bias":
                _add_column_sums(_grad(bias), g)
            if wanted:
                g = g @ weight
        elif kind == "bias":
            _add_column_sums(_grad(params[layer][1]), g)
        elif not wanted:
            break
        elif kind == "relu":
            g = torch.ops.aten.threshold_backward(g, saved, 0)
        else:
            if saved is None:
                raise ValueError("the gradient of sparse rows' dropout is not supported")
            g = g * saved
    return g if needs_input else None


def _add_column_sums(into: Tensor, g: Tensor) -> None:
    """``into += g.sum(0)``, as ``gᵀ · 1`` (``torch.sum`` over the rows of a 55,296 x 256
    block took 67 us on the H200, three times its bytes' time)."""
    into.addmv_(g.t(), _ones(g.shape[0], g))


_ONES: dict[tuple[torch.device, torch.dtype], Tensor] = {}


def _ones(n: int, like: Tensor) -> Tensor:
    """``n`` ones on ``like``'s device and of its dtype, from a vector kept per device and
    dtype (grown as needed), so a block's bias gradient allocates and fills nothing."""
    key = (like.device, like.dtype)
    ones = _ONES.get(key)
    if ones is None or ones.numel() < n:
        ones = _ONES[key] = torch.ones(n, device=like.device, dtype=like.dtype)
    return ones[:n]


def _grad(leaf: Tensor) -> Tensor:
    """``leaf.grad``, made zero first where it has none."""
    if leaf.grad is None:
        leaf.grad = torch.zeros_like(leaf)
    return leaf.grad
