"""Metrics panel: per-label volume (mL), voxel count and mean intensity of any labels layer, and
Dice / HD95 against a chosen reference labels layer; the table copies as CSV.

The panel calls ``tasks.measure.measure`` in a worker thread (HD95 on a whole scan takes seconds)
on copies of the layers, so painting during the run changes nothing it reads.
"""

from __future__ import annotations

from typing import Any

import napari
import numpy as np
from napari.layers import Image, Labels
from qtpy.QtWidgets import (
    QApplication,
    QComboBox,
    QFormLayout,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ...tasks.measure import COLUMNS, measure, measure_csv
from ..layers import layer_to_volume
from ._layer_choice import chosen_layer, refill
from ._task_runner import TaskRunner

NONE = "(none)"
HEADERS = {"label": "label", "name": "name", "voxels": "voxels", "volume_ml": "volume (mL)",
           "mean_intensity": "mean intensity", "dice": "Dice", "hd95_mm": "HD95 (mm)"}


def layer_volume(layer):
    """A copy of a layer as a Volume on its physical grid."""
    data, meta, kind = layer.as_layer_data_tuple()
    return layer_to_volume(np.array(data, copy=True), meta, kind)


class MetricsWidget(QWidget):
    """Measure a labels layer; optionally against a reference and with an image's intensities."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.labels_box = QComboBox()
        self.labels_box.setToolTip("the label map to measure")
        self.image_box = QComboBox()
        self.image_box.setToolTip("optional: an image on the same grid; adds each label's mean intensity "
                                  "(HU for CT)")
        self.reference_box = QComboBox()
        self.reference_box.setToolTip("optional: a reference label map on the same grid; adds Dice (0-1) and "
                                      "the 95th-percentile Hausdorff distance in mm")
        form = QFormLayout()
        form.addRow("labels", self.labels_box)
        form.addRow("image", self.image_box)
        form.addRow("reference", self.reference_box)
        self.runner = TaskRunner("Measure")
        self.table = QTableWidget(0, 0)
        self.table.setToolTip("one row per label; volumes use the scan's voxel spacing")
        self.copy_button = QPushButton("Copy as CSV")
        self.copy_button.setToolTip("copy the table to the clipboard as comma-separated values")
        self.copy_button.setEnabled(False)
        self.setMinimumWidth(560)  # room for every column of the table without scrolling
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.runner)
        layout.addWidget(self.table, 1)
        layout.addWidget(self.copy_button)
        self.rows: list[dict] = []
        self.runner.run_button.clicked.connect(self.run)
        self.copy_button.clicked.connect(self.copy_csv)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()

    def _refresh_layers(self, *_: Any) -> None:
        labels = [layer.name for layer in self.viewer.layers if isinstance(layer, Labels)]
        images = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]
        refill(self.labels_box, labels)
        refill(self.image_box, [NONE, *images])
        refill(self.reference_box, [NONE, *labels])

    def run(self) -> None:
        layer = chosen_layer(self.viewer, self.labels_box)
        if layer is None:
            self.runner.refuse("choose a labels layer to measure first")
            return
        image = chosen_layer(self.viewer, self.image_box)
        reference = chosen_layer(self.viewer, self.reference_box)
        if reference is layer:
            self.runner.refuse(f"{layer.name}: choose another layer as the reference")
            return
        self.runner.start(_measure_with_progress, self.show_rows, labels=layer_volume(layer),
                          image=None if image is None else layer_volume(image),
                          reference=None if reference is None else layer_volume(reference))

    def show_rows(self, rows: list[dict]) -> str:
        self.rows = rows
        columns = [c for c in COLUMNS if any(c in row for row in rows)]
        self.table.clear()
        self.table.setColumnCount(len(columns))
        self.table.setRowCount(len(rows))
        self.table.setHorizontalHeaderLabels([HEADERS[c] for c in columns])
        for r, row in enumerate(rows):
            for c, column in enumerate(columns):
                value = row.get(column)
                self.table.setItem(r, c, QTableWidgetItem("" if value is None else str(value)))
        self.table.resizeColumnsToContents()
        self.copy_button.setEnabled(bool(rows))
        return f"{len(rows)} labels measured"

    def copy_csv(self) -> None:
        QApplication.clipboard().setText(measure_csv(self.rows))
        self.runner.status.setText(f"{len(self.rows)} rows copied as CSV")


def _measure_with_progress(labels, image=None, reference=None, progress=None, cancel=None) -> list[dict]:
    if progress is not None:
        progress(0, 1, "measuring the labels")
    rows = measure(labels, image=image, reference=reference)
    if progress is not None:
        progress(1, 1, "measured")
    return rows
