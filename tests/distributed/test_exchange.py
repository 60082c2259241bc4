"""``Exchange.complete``: every rank ends with the whole panel, whether its rows were in place or
were loaded piece by piece as the others' arrived (2 ``gloo`` processes)."""

from __future__ import annotations

import torch

from aires.distributed import Exchange, launch

#: Uneven ranges, rank 1's shorter than the pieces asked for (some of its pieces are empty).
RANGES = [(0, 37), (37, 40)]
COLS = 3


def whole() -> torch.Tensor:
    return torch.arange(RANGES[-1][1] * COLS, dtype=torch.float64).view(-1, COLS) * 1.5 - 7


def complete_on_rank(piece_bytes: int | None) -> tuple[torch.Tensor, int, list[tuple[int, int]]]:
    """This rank's completed panel, the bytes it received, and the row ranges it loaded."""
    exchange = Exchange(RANGES, torch.device("cpu"))
    source, panel = whole(), torch.full((RANGES[-1][1], COLS), float("nan"), dtype=torch.float64)
    loaded: list[tuple[int, int]] = []

    def load(r0: int, r1: int) -> None:
        loaded.append((r0, r1))
        panel[r0:r1] = source[r0:r1]

    if piece_bytes is None:
        load(exchange.start, exchange.stop)
        received = exchange.complete(panel)
    else:
        received = exchange.complete(panel, load=load, piece_bytes=piece_bytes)
    return panel, received, loaded


def test_rows_in_place_are_completed_from_their_owners() -> None:
    for rank, (panel, received, _) in enumerate(launch(complete_on_rank, 2, (None,))):
        assert torch.equal(panel, whole())
        a, b = RANGES[rank]
        assert received == (RANGES[-1][1] - (b - a)) * COLS * 8


def test_rows_loaded_piece_by_piece_are_sent_as_they_come() -> None:
    """Pieces of about 5 rows (120 bytes of a 960-byte panel: 8 pieces a rank): each rank loads
    its own rows in order, in pieces that tile them, and ends with the whole panel."""
    for rank, (panel, received, loaded) in enumerate(launch(complete_on_rank, 2, (120,))):
        assert torch.equal(panel, whole())
        a, b = RANGES[rank]
        assert received == (RANGES[-1][1] - (b - a)) * COLS * 8
        assert loaded[0][0] == a and loaded[-1][1] == b
        assert all(p[1] == q[0] and p[0] < p[1] for p, q in zip(loaded, loaded[1:]))
        assert len(loaded) == (8 if rank == 0 else 3)


def test_rows_loaded_whole_are_still_sent_in_two_pieces() -> None:
    for rank, (panel, _, loaded) in enumerate(launch(complete_on_rank, 2, (1 << 30,))):
        assert torch.equal(panel, whole())
        assert len(loaded) == 2
