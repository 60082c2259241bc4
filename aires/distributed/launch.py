"""Starting the ranks: ``N`` spawned processes, or the ones ``torchrun`` started.

:func:`launch` runs ``fn(*args)`` in ``nproc`` fresh processes joined by ``torch.distributed``
(``gloo`` on the CPU, ``nccl`` on GPUs, one GPU per rank) and returns what each returned. Under
``torchrun`` the processes exist already: :func:`init_from_env` joins them from its environment.

A failing rank must not leave the others waiting forever in a collective. Two things bound it:
every collective has the process group's ``timeout`` (so a rank waiting on a dead or stuck peer
raises), and :func:`launch` watches the processes: as soon as one exits with an error it stops
the others and raises :class:`RankFailedError` naming the rank and carrying its error.
"""

from __future__ import annotations

import datetime
import os
import queue as queues
import signal
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

from aires.checks import check_positive_int

__all__ = [
    "DEFAULT_TIMEOUT",
    "RankFailedError",
    "backend_for",
    "free_port",
    "init_from_env",
    "launch",
    "world_size_from_env",
]

#: Seconds a collective may wait for its peers before it fails. An epoch's collectives are
#: each a panel or a scalar apart, so a healthy peer is never this late; a dead one is caught
#: by :func:`launch` long before, and this bounds the wait where nothing watches the processes.
DEFAULT_TIMEOUT = 300.0
#: Seconds between checks of the processes while draining their results.
_POLL = 0.1


class RankFailedError(RuntimeError):
    """A rank of a :func:`launch` failed; the others were stopped.

    Attributes:
        rank: the rank that failed first.
    """

    def __init__(self, message: str, rank: int) -> None:
        super().__init__(message)
        self.rank = rank


def free_port() -> int:
    """A TCP port free on this host now (for the rendezvous of one launch)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def backend_for(device: torch.device | str) -> str:
    """``nccl`` for CUDA, ``gloo`` for the CPU."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def world_size_from_env() -> int:
    """``WORLD_SIZE`` as ``torchrun`` sets it (1 when not under a launcher)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device | str, timeout: float = DEFAULT_TIMEOUT) -> torch.device:
    """Join the process group described by the environment (``torchrun``, or :func:`launch`):
    ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``.

    Returns:
        This rank's device: ``cuda:LOCAL_RANK`` (made current) for a CUDA ``device``, else
        the CPU.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": dev} if dev.type == "cuda" else {}
        dist.init_process_group(backend_for(dev), timeout=datetime.timedelta(seconds=timeout),
                                **kwargs)
    return dev


def launch(
    fn: Callable[..., Any],
    nproc: int,
    args: tuple[Any, ...] = (),
    *,
    device: torch.device | str = "cpu",
    timeout: float = DEFAULT_TIMEOUT,
) -> list[Any]:
    """``fn(*args)`` on ``nproc`` ranks, each a spawned process in one process group.

    Args:
        fn: a picklable (module-level) function; it runs after the process group is up and
            may use ``torch.distributed``.
        nproc: ranks (one GPU each on CUDA).
        args: its arguments (picklable).
        device: ``"cpu"`` (``gloo``) or ``"cuda"`` (``nccl``, rank ``r`` on ``cuda:r``).
        timeout: seconds a collective may wait for its peers.

    Returns:
        ``fn``'s return value on each rank, in rank order.

    Raises:
        RankFailedError: a rank raised or exited; the message names it and holds its error.
    """
    nproc = check_positive_int(nproc, "nproc")
    if torch.device(device).type == "cuda" and nproc > torch.cuda.device_count():
        raise ValueError(f"nproc={nproc} but {torch.cuda.device_count()} GPUs are visible")
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    received = ctx.Event()
    port = free_port()
    procs = mp.start_processes(
        _rank_main,
        args=(fn, args, nproc, port, str(device), timeout, results, received),
        nprocs=nproc,
        join=False,
        start_method="spawn",
    )
    got: dict[int, Any] = {}
    failures: dict[int, tuple[float, str]] = {}
    try:
        # Results are drained while waiting: a large one would otherwise fill the pipe and
        # keep its rank from exiting.
        while not procs.join(_POLL):
            _drain(results, got, failures)
            if len(got) == nproc:
                received.set()
    except ProcessException as error:
        _drain(results, got, failures)
        exits = [p.exitcode for p in procs.processes]
        rank, message = _first_failure(error, exits, failures)
        lines = message.strip().splitlines() or [""]
        # The error's own line first (a command prints it as its one-line error), then where.
        detail = "" if len(lines) == 1 else "\n" + "\n".join(lines)
        raise RankFailedError(f"rank {rank} of {nproc} failed: {lines[-1]}{detail}",
                              rank) from None
    return [got[r] for r in range(nproc)]


def _first_failure(
    error: ProcessException, exits: list[int | None], failures: dict[int, tuple[float, str]]
) -> tuple[int, str]:
    """The rank whose failure made the others fail, and its error.

    When one rank fails, its peers fail too (their collectives lose a connection), and the
    first failure the launcher sees may be a peer's. A rank that died without raising (an
    exit, a kill: a positive exit code or a signal other than the launcher's SIGTERM, and no
    error sent) is the cause; otherwise the earliest error sent is.
    """
    silent = [r for r, code in enumerate(exits)
              if code not in (0, None, -signal.SIGTERM) and r not in failures]
    if silent:
        code = exits[silent[0]]
        return silent[0], (f"exited with code {code}" if code > 0
                           else f"killed by signal {signal.Signals(-code).name}")
    if failures:
        rank = min(failures, key=lambda r: failures[r][0])
        return rank, failures[rank][1]
    return error.error_index, str(error)


def _drain(
    results: Any, got: dict[int, Any], failures: dict[int, tuple[float, str]]
) -> None:
    try:
        while not results.empty():
            rank, value, failed_at = results.get()
            if failed_at is None:
                got[rank] = value
            else:
                failures[rank] = (failed_at, value)
    except (EOFError, queues.Empty):  # pragma: no cover - a writer died mid-message
        pass


def _rank_main(
    rank: int,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    nproc: int,
    port: int,
    device: str,
    timeout: float,
    results: Any,
    received: Any,
) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
    )
    if torch.device(device).type == "cpu":
        # The ranks share the host's cores (torchrun sets OMP_NUM_THREADS=1 for the same reason).
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // nproc))
    init_from_env(device, timeout)
    try:
        value = fn(*args)
    except BaseException:
        # Sent before the group is torn down, which is what makes the peers fail: this
        # rank's error is then the earliest (see _first_failure).
        results.put((rank, traceback.format_exc(), time.monotonic()))
        raise
    finally:
        dist.destroy_process_group()
    results.put((rank, value, None))
    # Tensors travel as handles to this process's shared memory: stay until they are read.
    received.wait(timeout)
