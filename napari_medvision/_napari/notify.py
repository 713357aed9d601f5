"""Tell the napari user what went wrong in one sentence, instead of a traceback."""

from __future__ import annotations

import warnings


def show_problem(message: str) -> None:
    """An error notification in the viewer (or a warning where napari's notifier is unavailable)."""
    try:
        from napari.utils.notifications import show_error
    except ImportError:  # pragma: no cover - napari is always there when this module runs
        warnings.warn(message, stacklevel=2)
        return
    show_error(message)


def qt_app_running() -> bool:
    """True when a Qt application exists, so a dialog can ask the user."""
    try:
        from qtpy.QtWidgets import QApplication
    except Exception:  # no Qt binding: headless
        return False
    return QApplication.instance() is not None
