"""Progress bars that stay readable in logs: the one place AIRES makes a tqdm bar.

On a terminal a bar redraws in place. Written to a file or a pipe (CI logs, ``| tee``,
``2> log``), every redraw is appended to one ever-growing line: a 200-epoch run redrawing on
each epoch left a 60 KB line. So when the bar's stream is not a terminal it redraws at most
every :data:`LOG_INTERVAL_S` seconds, and its last state (the summary) is written on close.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

__all__ = ["LOG_INTERVAL_S", "progress_bar"]

T = TypeVar("T")

#: Seconds between redraws when the bar does not go to a terminal.
LOG_INTERVAL_S = 10.0


def progress_bar(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)``, redrawn at most every :data:`LOG_INTERVAL_S` seconds
    when its stream (``file``, default stderr) is not a terminal.

    Callers update postfixes with ``refresh=False``: a forced refresh would bypass the interval.
    """
    stream = kwargs.get("file") or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if not (callable(isatty) and isatty()):
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0.1), LOG_INTERVAL_S)
    return tqdm(iterable, **kwargs)
