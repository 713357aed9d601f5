"""Segment panel's atlas row: which atlas sets the chosen model registers, and "add atlas set from layers"."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtWidgets import QComboBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QPushButton, QWidget

from ... import atlases
from ..layers import layer_to_volume
from ._layer_choice import chosen_layer, refill


def atlas_text(model_id: str | None) -> str:
    """One line for the panel: the atlas sets a model (or an atlas set chosen as the model) uses."""
    if not model_id:
        return ""
    atlas = atlases.find(model_id)
    if atlas is not None and not atlas.models:
        return f"atlas set alone: {len(atlas)} scan(s), {len(atlas.labels)} labels ({atlas.source})"
    sets = atlases.for_model(model_id)
    if not sets:
        return "no atlases: the network alone"
    return "atlases: " + ", ".join(f"{s.name} ({len(s)} scan(s), {s.source})" for s in sets)


class AtlasControls(QWidget):
    """Shows the atlases of the chosen model; stores an image layer + its labels layer as a user atlas set."""

    def __init__(self, viewer: Any, on_added: Callable[[str], None]):
        super().__init__()
        self.viewer = viewer
        self.on_added = on_added
        self.info = QLabel("")
        self.info.setWordWrap(True)
        self.image_box, self.labels_box = QComboBox(), QComboBox()
        self.name = QLineEdit()
        self.name.setPlaceholderText("new atlas set name")
        self.image_box.setToolTip("an image layer of a scan you have labelled: it becomes an atlas member")
        self.labels_box.setToolTip("the Labels layer of that scan (same grid), with the label names it should keep")
        self.name.setToolTip("the atlas set's name (letters, digits, '-' and '_'); it is saved in your user folder")
        self.add_button = QPushButton("Add atlas set from layers")
        self.add_button.clicked.connect(self.add_from_layers)
        self.message = QLabel("")
        self.message.setWordWrap(True)
        row = QHBoxLayout()
        row.addWidget(self.image_box)
        row.addWidget(self.labels_box)
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("atlases", self.info)
        form.addRow("image + labels", row)
        form.addRow(self.name, self.add_button)
        form.addRow(self.message)

    def show_model(self, model_id: str | None) -> None:
        self.info.setText(atlas_text(model_id))

    def refresh(self) -> None:
        refill(self.image_box, [l.name for l in self.viewer.layers if isinstance(l, Image)])
        refill(self.labels_box, [l.name for l in self.viewer.layers if isinstance(l, Labels)])

    def add_from_layers(self) -> None:
        image, labels = chosen_layer(self.viewer, self.image_box), chosen_layer(self.viewer, self.labels_box)
        if image is None or labels is None:
            self.message.setText("choose an image layer and its labels layer")
            return
        image_volume = layer_to_volume(*image.as_layer_data_tuple())
        label_volume = layer_to_volume(*labels.as_layer_data_tuple())
        if label_volume.labels is None:
            ids = [int(v) for v in np.unique(np.asarray(label_volume.data)) if v]
            label_volume = label_volume.with_data(label_volume.data, labels={k: f"label {k}" for k in ids})
        try:
            atlas = atlases.add(self.name.text().strip(), [(image_volume, label_volume)])
        except ValueError as exc:
            self.message.setText(str(exc))
            return
        self.message.setText(f"added {atlas.name}: choose it as the model to segment with it")
        self.on_added(atlas.name)
