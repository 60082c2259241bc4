"""An epoch of a GCN as a program of stages over row-blocked tensors.

A ``L``-layer GCN, ``H_{l+1} = relu(Â dropout(H_l) W_l + b_l)`` with logits ``H_L`` and a
cross-entropy loss over the training rows, is cut into two kinds of stage:

- :class:`Aggregate`: ``target = Â · source``, the only step that mixes rows. It streams ``Â``'s
  tiles (``aires.scheduler``) against one column panel of ``source`` at a time.
- :class:`Rows`: a chain of row-local operations (dropout, ``@ W``, ``+ b``, ReLU, and finally the
  loss). Any row block of its output depends only on the same rows of its input, so it runs one
  row block at a time, and its backward is the same chain recomputed per block and differentiated
  by hand (:mod:`aires.nn.chain`; or, where the plan has the room, the tape its forward pass
  kept).

The input ``X`` is never copied into a ``Rows`` stage's output for its dropout alone: where the
first layer aggregates first, its mask is applied to each panel of ``X`` on the device, as the
aggregation loads it (``Aggregate.dropout``).

Each layer takes the product order ``(Â Z) W`` or ``Â (Z W)`` given for it, so the aggregations
run on whichever of ``F_in`` and ``F_out`` is narrower. Only the inputs of ``Rows`` stages (the
aggregations' outputs, and ``X``) are kept for the backward pass: a ``Rows`` stage's wide
intermediates (a 256-wide hidden layer, say) live in one row block on the device and are
recomputed in the backward pass instead of being stored, which is what keeps the bytes an epoch
moves close to the narrow tensors' sizes; a budget with room to spare keeps them on the device
instead (:attr:`aires.nn.plan.Plan.kept`), as an in-core loop does.

Backward runs the stages in reverse: a ``Rows`` stage recomputes its block and back-propagates
the gradient of its output (or the loss) into the gradient of its input and the parameters; an
``Aggregate`` stage computes ``d source = Âᵀ · d target`` (the same tiles when ``Â`` is
symmetric). Stages whose input carries no parameter dependence get no input gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Op", "Rows", "Aggregate", "Stage", "Program", "build_program", "ORDERS"]

ORDERS = ("aggregate_first", "transform_first")


@dataclass(frozen=True)
class Op:
    """One row-local operation: ``"dropout"``, ``"linear"`` (``@ W_layer``), ``"bias"``
    (``+ b_layer``) or ``"relu"``. ``layer`` names the parameter (or the dropout site)."""

    kind: str
    layer: int = -1


@dataclass(frozen=True)
class Rows:
    """``target = ops(source)`` one row block at a time; ``target`` ``None``: the loss (or, when
    predicting, the logits)."""

    source: str
    target: str | None
    ops: tuple[Op, ...]
    in_cols: int
    out_cols: int


@dataclass(frozen=True)
class Aggregate:
    """``target = Â · source``, ``cols`` columns; ``dropout``: the dropout site (layer) applied
    to each panel of ``source`` as it is put on the device (the input ``x``, which no
    row-local stage reads first), or ``None``."""

    source: str
    target: str
    cols: int
    dropout: int | None = None


Stage = Rows | Aggregate


@dataclass(frozen=True)
class Program:
    """The stages of one forward pass, and which tensors need a gradient.

    Attributes:
        stages: forward order; the last is the loss ``Rows`` stage.
        widths: columns of every tensor the stages exchange (``"x"`` is the input).
        needs_grad: tensor names whose gradient the backward pass computes (those that depend
            on a parameter).
    """

    stages: tuple[Stage, ...]
    widths: dict[str, int]
    needs_grad: frozenset[str]

    @property
    def aggregates(self) -> tuple[Aggregate, ...]:
        return tuple(s for s in self.stages if isinstance(s, Aggregate))

    def backward_aggregates(self) -> tuple[Aggregate, ...]:
        """Aggregations the backward pass runs (those whose source needs a gradient)."""
        return tuple(a for a in self.aggregates if a.source in self.needs_grad)


def build_program(dims: list[int], orders: list[str], dropout: float) -> Program:
    """The stages of a GCN with layer widths ``dims`` (``dims[0]`` input features, ``dims[-1]``
    classes), one product order per layer, and dropout ``dropout`` on every layer's input.

    Tensor names: ``x`` the input, ``t{l}`` the input of layer ``l``'s aggregation when a
    ``Rows`` stage produces it, ``s{l}`` layer ``l``'s aggregation output.
    """
    if len(orders) != len(dims) - 1:
        raise ValueError(f"need one order per layer ({len(dims) - 1}), got {len(orders)}")
    for order in orders:
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    stages: list[Stage] = []
    widths = {"x": dims[0]}
    source, width, ops = "x", dims[0], []
    layers = len(dims) - 1

    def close(target: str, out_cols: int) -> None:
        nonlocal source, width, ops
        stages.append(Rows(source, target, tuple(ops), width, out_cols))
        widths[target] = out_cols
        source, width, ops = target, out_cols, []

    def aggregate(target: str, site: int | None = None) -> None:
        nonlocal source
        stages.append(Aggregate(source, target, width, site))
        widths[target] = width
        source = target

    for layer in range(layers):
        if dropout > 0:
            ops.append(Op("dropout", layer))
        if orders[layer] == "aggregate_first":
            if source == "x" and ops:
                # x's dropout is applied to its panels as they are loaded: a row-local pass
                # would read all of x and write all of it back, as t0, for a mask.
                aggregate(f"s{layer}", site=layer)
            else:
                if ops:
                    close(f"t{layer}", width)
                aggregate(f"s{layer}")
            ops = [Op("linear", layer), Op("bias", layer)]
            width = dims[layer + 1]
        else:
            ops.append(Op("linear", layer))
            close(f"t{layer}", dims[layer + 1])
            aggregate(f"s{layer}")
            ops = [Op("bias", layer)]
        if layer < layers - 1:
            ops.append(Op("relu"))
    stages.append(Rows(source, None, tuple(ops), width, width))
    return Program(tuple(stages), widths, _needs_grad(stages))


def _needs_grad(stages: list[Stage]) -> frozenset[str]:
    """Tensors downstream of a parameter (a ``linear`` or ``bias`` op)."""
    needs: set[str] = set()
    for stage in stages:
        if isinstance(stage, Rows):
            has_param = any(op.kind in ("linear", "bias") for op in stage.ops)
            if stage.target is not None and (has_param or stage.source in needs):
                needs.add(stage.target)
        elif stage.source in needs:
            needs.add(stage.target)
    return frozenset(needs)
