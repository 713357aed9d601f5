"""Tell the napari user what went wrong in one sentence, instead of a traceback."""

from __future__ import annotations

import warnings


def show_problem(message: str) -> None:
    """An error notification in the viewer (or a warning where napari's notifier is unavailable)."""
    if _notify("show_error", message):
        _expand_toast_later(message)


def show_notice(message: str) -> None:
    """A warning notification in the viewer (a Python warning where napari is unavailable)."""
    _notify("show_warning", message)


def _notify(kind: str, message: str) -> bool:
    """napari's ``show_error`` / ``show_warning``; False (and a Python warning) where napari is unavailable."""
    try:
        from napari.utils import notifications
    except ImportError:  # pragma: no cover - napari is always there when this module runs
        warnings.warn(message, stacklevel=3)
        return False
    getattr(notifications, kind)(message)
    return True


def _expand_toast_later(message: str) -> None:
    """Open the error's toast to its whole text once napari has shown it.

    napari's toast shows one elided line until the user clicks its chevron; our messages name the
    file and the problem, and the problem is at the end. napari has no option for this, so the
    toast napari made is found by its text and expanded (its own ``expand``).
    """
    try:
        from napari._qt.dialogs.qt_notification import NapariQtNotification
        from qtpy.QtCore import QTimer
        from qtpy.QtWidgets import QApplication
    except ImportError:
        return
    if QApplication.instance() is None:
        return

    def expand() -> None:
        for widget in QApplication.allWidgets():
            if isinstance(widget, NapariQtNotification) and widget.message.text() == message:
                if not widget.property("expanded"):
                    widget.expand()

    QTimer.singleShot(50, expand)


def qt_app_running() -> bool:
    """True when a Qt application exists, so a dialog can ask the user."""
    try:
        from qtpy.QtWidgets import QApplication
    except Exception:  # no Qt binding: headless
        return False
    return QApplication.instance() is not None
