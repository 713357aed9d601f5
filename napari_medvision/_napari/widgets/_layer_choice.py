"""Layer pickers shared by the panels: refill a combo box as layers come and go."""

from __future__ import annotations

from typing import Any

from qtpy.QtWidgets import QComboBox


def refill(box: QComboBox, names: list[str]) -> None:
    """Replace the box's items with ``names``, keeping the user's choice if it still exists (no signals)."""
    current = box.currentText()
    box.blockSignals(True)
    box.clear()
    box.addItems(names)
    if current in names:
        box.setCurrentText(current)
    box.blockSignals(False)


def chosen_layer(viewer: Any, box: QComboBox):
    """The viewer layer named in ``box``, or None when it is gone."""
    name = box.currentText()
    return viewer.layers[name] if name in viewer.layers else None
