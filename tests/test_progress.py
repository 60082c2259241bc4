"""``aires.progress``: bars redraw on every update on a terminal, rarely in a log."""

from __future__ import annotations

import io

from aires.progress import LOG_INTERVAL_S, progress_bar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _draws(stream: io.StringIO, updates: int) -> int:
    bar = progress_bar(range(updates), file=stream, ascii=True)
    for i in bar:
        bar.set_postfix(step=i, refresh=False)
    return stream.getvalue().count("\r")


def test_a_log_gets_the_summary_and_few_redraws() -> None:
    log = io.StringIO()
    # 2,000 updates in well under LOG_INTERVAL_S: the first draw and the summary on close.
    assert _draws(log, 2000) <= 3
    assert "2000/2000" in log.getvalue()
    assert progress_bar(file=log).mininterval == LOG_INTERVAL_S


def test_a_terminal_keeps_tqdms_interval() -> None:
    terminal = _Terminal()
    assert progress_bar(file=terminal).mininterval < LOG_INTERVAL_S
