"""One image-layer picker per MR contrast, for models that take several (``input.contrasts``)."""

from __future__ import annotations

from typing import Any, Callable

from qtpy.QtWidgets import QComboBox, QFormLayout, QWidget

from ._layer_choice import refill

NONE = "(none)"
TITLES = {"flair": "FLAIR", "t1c": "T1c", "t1": "T1", "t2": "T2"}


class ContrastPickers(QWidget):
    """A combo box per contrast of the chosen model; hidden for single-image models.

    ``volumes()`` gives ``{contrast: Volume}`` of the picked layers, the first picked contrast
    first (its grid is the result's). A layer named after a contrast (``..._flair``) is picked for it
    by default, else the panel's image for the model's first contrast.
    """

    def __init__(self, viewer: Any, layer_names: Callable[[], list[str]]):
        super().__init__()
        self.viewer = viewer
        self.layer_names = layer_names
        self.boxes: dict[str, QComboBox] = {}
        self.form = QFormLayout(self)
        self.form.setContentsMargins(0, 0, 0, 0)
        self.setVisible(False)

    def set_contrasts(self, contrasts: list[str], image: str | None) -> None:
        """Show a picker per contrast (none: hide), preselecting layers by name."""
        if list(self.boxes) != list(contrasts):
            while self.form.rowCount():
                self.form.removeRow(0)
            self.boxes = {name: QComboBox() for name in contrasts}
            for name, box in self.boxes.items():
                self.form.addRow(TITLES.get(name, name), box)
            self.refresh(image, preselect=True)
        self.setVisible(bool(contrasts))

    def refresh(self, image: str | None = None, preselect: bool = False) -> None:
        names = self.layer_names()
        for k, (contrast, box) in enumerate(self.boxes.items()):
            refill(box, [NONE, *names])
            if preselect:
                named = [n for n in names if contrast in n.lower().replace("_", " ").replace("-", " ").split()]
                if named:
                    box.setCurrentText(named[0])
                elif k == 0 and image in names:
                    box.setCurrentText(image)

    def volumes(self, to_volume: Callable) -> dict:
        """``{contrast: Volume}`` of the picked layers (an empty dict when none is picked)."""
        picked = {}
        for contrast, box in self.boxes.items():
            name = box.currentText()
            if name != NONE and name in self.viewer.layers:
                picked[contrast] = to_volume(self.viewer.layers[name])
        return picked
