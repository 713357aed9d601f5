"""Run a task function off the GUI thread with a progress bar and a cancel button.

The task gets ``progress=`` (feeds the bar through a Qt signal, safe from the worker thread) and
``cancel=`` (a token the button sets). The result goes to ``on_done`` on the GUI thread; errors
become one notification; a cancel adds nothing, so nothing the user made is touched.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import numpy as np
from napari.layers import Labels
from napari.qt.threading import create_worker
from qtpy.QtCore import QObject, Signal
from qtpy.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QPushButton, QVBoxLayout, QWidget

from ...engine.progress import CancelToken, Cancelled
from ..notify import show_problem


# Imported when the first panel opens, on the GUI thread: a first import inside the worker holds
# Python's interpreter lock for long stretches (module code, TorchScript parsing) and froze the
# viewer for up to 0.6 s during a panel's first run.
HEAVY_MODULES = (
    "SimpleITK", "monai.networks.nets", "monai.inferers", "monai.metrics",
    "napari_medvision.engine.inference", "napari_medvision.engine.embeddings", "napari_medvision.engine.synthesis",
    "napari_medvision.models.transunet2d", "napari_medvision.models.transunet3d", "napari_medvision.models.mvg",
    "napari_medvision.models.dino", "napari_medvision.models.appearance_head", "napari_medvision.models.contrast_mlp",
    "napari_medvision.tasks.atlas_segment", "napari_medvision.tasks.prompting.register",
)
_warmed = False


def import_heavy_modules() -> None:
    """Import what the tasks need before any worker starts (once per session)."""
    global _warmed
    if _warmed:
        return
    for name in HEAVY_MODULES:
        importlib.import_module(name)
    # napari builds its label colour machinery on the first Labels layer of a session (about 0.5 s);
    # a throwaway one here keeps that cost away from the moment a result arrives.
    Labels(np.zeros((1, 1), dtype=np.uint8))
    _warmed = True


class _ProgressSignal(QObject):
    changed = Signal(int, int, str)


class _Failed:
    """What crosses back from the worker thread when the task raised (so napari sees no error)."""

    def __init__(self, error: Exception):
        self.error = error


def _guarded(task: Callable[..., Any], /, **kwargs: Any) -> Any:
    try:
        return task(**kwargs)
    except Exception as exc:  # reported on the GUI thread as one notification (or "cancelled")
        return _Failed(exc)


class TaskRunner(QWidget):
    """A run button, a progress bar, a cancel button and a status line for one long task."""

    def __init__(self, run_label: str, parent: QWidget | None = None):
        super().__init__(parent)
        import_heavy_modules()
        self.run_button = QPushButton(run_label)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1)
        self.bar.setValue(0)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(buttons)
        layout.addWidget(self.bar)
        layout.addWidget(self.status)
        self._signal = _ProgressSignal()
        self._signal.changed.connect(self._show_progress)
        self._token: CancelToken | None = None
        self._succeeded = False
        self.worker = None
        self.cancel_button.clicked.connect(self.cancel)

    def start(self, task: Callable[..., Any], on_done: Callable[[Any], None], /, **kwargs: Any) -> None:
        """Run ``task(**kwargs, progress=..., cancel=...)`` in a worker thread (kwargs may hold ``task=``)."""
        self._token = CancelToken()
        self._succeeded = False
        self.run_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText("running…")
        self.bar.setRange(0, 0)  # busy until the first report
        worker = create_worker(_guarded, task, progress=self._signal.changed.emit, cancel=self._token,
                               **kwargs, _start_thread=False)
        worker.returned.connect(lambda result: self._finish(on_done, result))
        worker.finished.connect(self._reset)
        self.worker = worker
        worker.start()

    def refuse(self, message: str) -> None:
        """Do not start: say why in the status line and as a notification (bad input, named)."""
        self.status.setText(f"not run: {message}")
        show_problem(message)

    def cancel(self) -> None:
        if self._token is not None:
            self._token.cancel()
            self.status.setText("cancelling…")

    def _show_progress(self, done: int, total: int, message: str) -> None:
        self.bar.setRange(0, max(total, 1))
        self.bar.setValue(min(done, total))
        if message:
            self.status.setText(message)

    def _finish(self, on_done: Callable[[Any], None], result: Any) -> None:
        if isinstance(result, _Failed):
            self._failed(result.error)
            return
        try:
            said = on_done(result)  # a panel may return a line for the status (what the result means)
            self.status.setText(said if isinstance(said, str) else "done")
            self._succeeded = True
        except Exception as exc:  # showing the result failed: say so, keep napari running
            show_problem(f"could not show the result: {exc}")

    def _failed(self, exc: Exception) -> None:
        if isinstance(exc, Cancelled):
            self.status.setText("cancelled: nothing was changed")
            return
        self.status.setText(f"failed: {exc}")
        show_problem(str(exc))

    def _reset(self) -> None:
        self.run_button.setEnabled(True)
        self.cancel_button.setEnabled(False)
        self.bar.setRange(0, 1)
        self.bar.setValue(1 if self._succeeded else 0)
        self._token = None
