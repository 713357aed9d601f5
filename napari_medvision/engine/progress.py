"""Progress callbacks and cancel tokens shared by every long call (API, CLI and panels).

A task reports with ``progress(done, total, message)`` and checks ``cancel.raise_if_cancelled()``
between steps; the napari panels pass a callback that feeds a progress bar and a token that
their cancel button sets. Nothing here knows about Qt.
"""

from __future__ import annotations

import sys
import threading
from typing import Callable, Optional

ProgressFn = Callable[[int, int, str], None]


class Cancelled(Exception):
    """The user cancelled the operation; partial results are discarded, inputs untouched."""


class CancelToken:
    """A thread-safe flag: the GUI sets it, the worker polls it between steps."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def raise_if_cancelled(self) -> None:
        if self._event.is_set():
            raise Cancelled("cancelled by the user")


def report(progress: Optional[ProgressFn], done: int, total: int, message: str = "") -> None:
    """Call ``progress`` if given; a failing callback never stops the computation."""
    if progress is None:
        return
    try:
        progress(done, total, message)
    except Exception:  # a broken progress bar must not lose the user's result
        pass


def check(cancel: Optional[CancelToken]) -> None:
    if cancel is not None:
        cancel.raise_if_cancelled()


def terminal_progress(prefix: str = "") -> ProgressFn:
    """A progress callback that redraws one line on a terminal (used by the CLI)."""
    def show(done: int, total: int, message: str = "") -> None:
        width = 30
        filled = int(width * done / max(total, 1))
        sys.stderr.write(f"\r{prefix}[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {message[:40]:<40}")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()

    return show
