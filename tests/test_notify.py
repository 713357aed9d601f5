"""Error notifications show the whole sentence: the problem sits at its end, after the file name."""

from __future__ import annotations

import pytest

pytest.importorskip("napari")

pytestmark = pytest.mark.napari


def test_error_toast_opens_to_its_whole_message(make_napari_viewer, qtbot):
    from napari._qt.dialogs.qt_notification import NapariQtNotification
    from qtpy.QtWidgets import QApplication

    from napari_medvision._napari.notify import show_problem

    make_napari_viewer(show=True)
    message = ("/data/patient_0042/series_7/IM-0001-0003.dcm: the pixel data ends after 12 of 512 rows; "
               "the file is truncated")
    show_problem(message)

    def toast():
        found = [w for w in QApplication.allWidgets() if isinstance(w, NapariQtNotification)
                 and w.message.text() == message]
        return found[0] if found else None

    qtbot.waitUntil(lambda: toast() is not None and toast().property("expanded"), timeout=5_000)
