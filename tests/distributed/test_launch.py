"""``aires.distributed.launch``: results per rank, and no hang when a rank fails.

Every failure test waits on a collective that the failing rank never joins; the launcher must
raise :class:`RankFailedError` naming that rank long before the collective's own timeout
(the default, 300 s), except where the timeout is the point.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from aires.distributed import RankFailedError, free_port, launch

BOUND_S = 30  # well past process start-up on 2 cores, far below any collective timeout


def identity() -> tuple[int, int, str, torch.Tensor]:
    total = torch.ones(1)
    dist.all_reduce(total)
    return dist.get_rank(), dist.get_world_size(), dist.get_backend(), total


def fail_on_rank_one(how: str) -> None:
    """Rank 0 waits in a collective; rank 1 raises, exits or hangs outside any collective."""
    if dist.get_rank() == 1:
        if how == "raise":
            raise ValueError("rank 1 gave up")
        if how == "exit":
            os._exit(3)
        time.sleep(10 * BOUND_S)
    dist.all_reduce(torch.ones(1))


def test_every_rank_runs_in_one_gloo_group() -> None:
    results = launch(identity, 2)
    assert [r[:3] for r in results] == [(0, 2, "gloo"), (1, 2, "gloo")]
    assert all(r[3].item() == 2.0 for r in results)


@pytest.mark.parametrize(("how", "message"), [
    ("raise", r"^rank 1 of 2 failed: ValueError: rank 1 gave up\n"),
    ("exit", r"^rank 1 of 2 failed: exited with code 3$"),
])
def test_a_failing_rank_stops_the_others(how: str, message: str) -> None:
    start = time.monotonic()
    with pytest.raises(RankFailedError, match=message) as error:
        launch(fail_on_rank_one, 2, (how,))
    assert error.value.rank == 1
    assert time.monotonic() - start < BOUND_S


def test_a_stuck_rank_fails_its_peers_collective_at_the_timeout() -> None:
    """Rank 1 is alive but never joins: rank 0's collective times out, and the launcher stops
    rank 1 and reports rank 0's timeout."""
    start = time.monotonic()
    with pytest.raises(RankFailedError, match=r"(?s)^rank 0 of 2 failed: .*[Tt]imed? ?out") as error:
        launch(fail_on_rank_one, 2, ("hang",), timeout=3)
    assert error.value.rank == 0
    assert time.monotonic() - start < BOUND_S


def test_free_ports_are_free() -> None:
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_more_ranks_than_gpus_is_refused() -> None:
    with pytest.raises(ValueError, match=r"nproc=\d+ but \d+ GPUs are visible"):
        launch(identity, torch.cuda.device_count() + 1, device="cuda")
