"""Prompt panel: an image plus a few painted slices (or example scans with masks) -> new Labels layer.

The panel calls ``tasks.prompting.prompt`` in a worker thread and shows the result as a layer of its
own; the user's image and labels layers are only read. With "update while I paint" on, painting
one more slice updates the result after a short pause in two steps: first a preview that redoes
only the slabs next to the new slice with the previous head and choice (``prompt(previous=...)``,
about a second from the cache), then the full, checked prompt. The result layer is updated in
place, unless the user has started correcting it by hand: then a new result layer is made instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import napari
import numpy as np
from napari.layers import Image, Labels, Layer
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QListWidget,
    QPushButton,
    QSizePolicy,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from ... import models
from ...tasks.prompting import prompt
from ..layers import layer_to_volume, volume_to_layer
from ._layer_choice import refill
from ._task_runner import TaskRunner
from .segment import devices, image_volume


ANNOTATED = "a few painted slices"
EXAMPLES = "example scans with masks"
CHOOSE_FILE = "__choose_file__"
UPDATE_DELAY_MS = 800  # wait this long after the last brush stroke before re-running


def summary(result) -> str:
    """The status line for a prompt result: the variant used and the leave-one-out Dice per label."""
    meta = result.meta or {}
    if meta.get("preview"):
        return "preview shown; checking with every painted slice…"
    expected = {name: d for name, d in (meta.get("expected_dice") or {}).items() if d is not None}
    if not expected:
        return f"done ({meta.get('choice')}); paint one more slice or add an example for an expected Dice"
    return f"done ({meta.get('choice')}); expected Dice " + ", ".join(f"{n} {d:.2f}" for n, d in expected.items())


def labels_volume(layer: Labels):
    """A snapshot of a labels layer as a Volume (copied: the user may paint while the task runs)."""
    data, meta, kind = layer.as_layer_data_tuple()
    return layer_to_volume(np.array(data, copy=True), meta, kind)


def dino_models() -> list[Any]:
    """Cards of registered DINO backbones (architecture ``dino``)."""
    return [c for c in models.available() if c.architecture.get("name") == "dino"]


class PromptWidget(QWidget):
    """Segment a structure from a few painted slices or from example scans, without training."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.image_box = QComboBox()
        self.mode_box = QComboBox()
        self.mode_box.addItems([ANNOTATED, EXAMPLES])
        self.annotations_box = QComboBox()
        self.example_image_box = QComboBox()
        self.example_labels_box = QComboBox()
        self.add_example_button = QPushButton("Add pair")
        self.remove_example_button = QPushButton("Remove")
        self.example_list = QListWidget()
        self.examples: list[tuple[str, str]] = []  # (image layer name, labels layer name)
        self.model_box = QComboBox()
        self.device_box = QComboBox()
        self.device_box.addItems(devices())
        self.auto_update = QCheckBox("update while I paint")
        self.auto_update.setChecked(True)

        annotated_page = QWidget()
        form = QFormLayout(annotated_page)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("painted slices", self.annotations_box)
        examples_page = QWidget()
        pair = QFormLayout()
        pair.addRow("example image", self.example_image_box)
        pair.addRow("its labels", self.example_labels_box)
        buttons = QHBoxLayout()
        buttons.addWidget(self.add_example_button)
        buttons.addWidget(self.remove_example_button)
        column = QVBoxLayout(examples_page)
        column.setContentsMargins(0, 0, 0, 0)
        column.addLayout(pair)
        column.addLayout(buttons)
        column.addWidget(self.example_list)
        self.pages = QStackedWidget()
        self.pages.addWidget(annotated_page)
        self.pages.addWidget(examples_page)

        top = QFormLayout()
        top.addRow("image", self.image_box)
        top.addRow("prompt with", self.mode_box)
        bottom = QFormLayout()
        bottom.addRow("features", self.model_box)
        bottom.addRow("device", self.device_box)
        bottom.addRow("", self.auto_update)
        self.runner = TaskRunner("Prompt")
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.pages)
        layout.addLayout(bottom)
        layout.addWidget(self.runner)
        layout.addStretch(1)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(UPDATE_DELAY_MS)
        self._timer.timeout.connect(self._update_after_paint)
        self._watched: Optional[Labels] = None
        self._result: Optional[Labels] = None  # the layer this panel last wrote and may update
        self._result_inputs: Optional[tuple] = None
        self._last = None  # the Volume behind self._result, which a preview starts from
        self._pending = False  # a paint arrived while a run was going, or a preview wants its checked run

        self._add_tooltips()
        self._show_page(0)
        self.runner.run_button.clicked.connect(self.run)
        self.mode_box.currentIndexChanged.connect(self._show_page)
        self.annotations_box.currentTextChanged.connect(self._watch_annotations)
        self.add_example_button.clicked.connect(self.add_example)
        self.remove_example_button.clicked.connect(self.remove_example)
        self.model_box.activated.connect(self._model_chosen)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()
        self._refresh_models()

    def _add_tooltips(self) -> None:
        tips = {
            self.image_box: "the scan to segment",
            self.mode_box: "painted slices: paint a few slices of the structure in a Labels layer on this scan; "
                           "example scans: other scans with their label maps, registered onto this one",
            self.annotations_box: "a Labels layer on the same grid with a few slices painted (one label per "
                                  "structure); unpainted slices are filled in",
            self.example_image_box: "an example scan (any grid; it is registered onto the image)",
            self.example_labels_box: "the example scan's label map, on the example's grid",
            self.model_box: "features the appearance head learns from: image intensities only, or a DINO "
                            "backbone (shipped, or an official DINOv2/DINOv3 checkpoint file)",
            self.device_box: "where the work runs; auto picks a GPU when there is one",
            self.auto_update: f"re-run {UPDATE_DELAY_MS / 1000:.1f} s after the last brush stroke: a preview "
                              "first (about a second), then the full result",
        }
        for widget, tip in tips.items():
            widget.setToolTip(tip)

    def _show_page(self, index: int) -> None:
        """Show one mode's fields; the hidden page takes no room (the panel keeps no empty area)."""
        for i in range(self.pages.count()):
            policy = QSizePolicy.Policy.Preferred if i == index else QSizePolicy.Policy.Ignored
            self.pages.widget(i).setSizePolicy(policy, policy)
        self.pages.setCurrentIndex(index)
        self.pages.adjustSize()

    # --- choices ---------------------------------------------------------------------------
    def _layer(self, name: str, kind: type) -> Optional[Layer]:
        if name in self.viewer.layers and isinstance(self.viewer.layers[name], kind):
            return self.viewer.layers[name]
        return None

    def _refresh_layers(self, *_: Any) -> None:
        images = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]
        labels = [layer.name for layer in self.viewer.layers
                  if isinstance(layer, Labels) and layer is not self._result]
        for box, names in ((self.image_box, images), (self.annotations_box, labels),
                           (self.example_image_box, images), (self.example_labels_box, labels)):
            refill(box, names)
        self._watch_annotations()
        if self._result is not None and self._result not in self.viewer.layers:
            self._result = None

    def _refresh_models(self) -> None:
        self.model_box.clear()
        self.model_box.addItem("image intensities only", None)
        for card in dino_models():
            self.model_box.addItem(f"{card.id} ({card.source})", card.id)
        self.model_box.addItem("DINO checkpoint file…", CHOOSE_FILE)

    def add_model_file(self, path: str | Path) -> None:
        """Offer and select a DINO checkpoint (``.pth`` / ``.safetensors``) from disk."""
        path = str(path)
        index = self.model_box.findData(path)
        if index < 0:
            self.model_box.insertItem(self.model_box.count() - 1, Path(path).name, path)
            index = self.model_box.findData(path)
        self.model_box.setCurrentIndex(index)

    def _model_chosen(self, index: int) -> None:
        if self.model_box.itemData(index) != CHOOSE_FILE:
            return
        path, _ = QFileDialog.getOpenFileName(self, "DINO checkpoint", "", "Checkpoints (*.pth *.pt *.safetensors)")
        if path:
            self.add_model_file(path)
        else:
            self.model_box.setCurrentIndex(0)

    def add_example(self) -> None:
        pair = (self.example_image_box.currentText(), self.example_labels_box.currentText())
        if not all(pair) or pair in self.examples:
            return
        self.examples.append(pair)
        self.example_list.addItem(f"{pair[0]}  +  {pair[1]}")

    def remove_example(self) -> None:
        row = self.example_list.currentRow()
        if 0 <= row < len(self.examples):
            self.examples.pop(row)
            self.example_list.takeItem(row)

    # --- running ---------------------------------------------------------------------------
    def _inputs(self) -> Optional[dict[str, Any]]:
        """Keyword arguments for ``prompt`` from the current choices, or None (status says why)."""
        image = self._layer(self.image_box.currentText(), Image)
        if image is None:
            self.runner.status.setText("choose an image layer first")
            return None
        model = self.model_box.currentData()
        device = self.device_box.currentText()
        kwargs: dict[str, Any] = {"volume": image_volume(image), "model": None if model == CHOOSE_FILE else model,
                                  "device": None if device == "auto" else device}
        if self.mode_box.currentText() == ANNOTATED:
            labels = self._layer(self.annotations_box.currentText(), Labels)
            if labels is None:
                self.runner.status.setText("choose the labels layer with your painted slices")
                return None
            kwargs["annotations"] = labels_volume(labels)
            key = (image.name, labels.name)
        else:
            pairs = [(self._layer(i, Image), self._layer(m, Labels)) for i, m in self.examples]
            if not pairs or any(i is None or m is None for i, m in pairs):
                self.runner.status.setText("add at least one example: an image layer and its labels layer")
                return None
            kwargs["examples"] = [(image_volume(i), labels_volume(m)) for i, m in pairs]
            key = (image.name, tuple(self.examples))
        return {"kwargs": kwargs, "key": key, "name": image.name}

    def run(self, preview: bool = False) -> None:
        """Prompt with the current choices; the result goes to this panel's result layer.

        preview: start from the last result (only the slabs the new slices change), then run the
        full prompt; a preview that does not apply (see ``prompt``'s ``previous``) is the full one.
        """
        if self.runner.worker is not None and not self.runner.run_button.isEnabled():
            self._pending = True  # one run at a time: go again when this one ends
            return
        inputs = self._inputs()
        if inputs is None:
            return
        kwargs = inputs["kwargs"]
        if preview and self._last is not None and self._result_inputs == inputs["key"] and "annotations" in kwargs:
            kwargs["previous"] = self._last
            self._pending = True  # the checked prompt follows the preview

        def done(result):
            if not result.meta.get("preview"):
                self._pending = False  # this was the checked prompt already
            self._show(result, inputs["key"], inputs["name"])
            return summary(result)

        self.runner.start(prompt, done, **kwargs)
        self.runner.worker.finished.connect(self._run_pending)

    def _run_pending(self) -> None:
        if self._pending:
            self._pending = False
            self.run()

    def _show(self, result, key: tuple, image_name: str) -> None:
        self._last = result
        if self._result is not None and self._result in self.viewer.layers and self._result_inputs == key:
            self._result.data = np.asarray(result.data)
            return
        data, kwargs, kind = volume_to_layer(result, name=f"{image_name} – prompt")
        layer = Layer.create(data, kwargs, kind)
        self._result, self._result_inputs = layer, key
        layer.events.paint.connect(self._result_edited)
        self.viewer.add_layer(layer)

    def _result_edited(self, *_: Any) -> None:
        """The user corrects the result by hand: it is theirs now, later updates go to a new layer."""
        self._result = None
        self._result_inputs = None
        self._last = None

    # --- updating while the user paints ----------------------------------------------------
    def _watch_annotations(self, *_: Any) -> None:
        layer = self._layer(self.annotations_box.currentText(), Labels)
        if layer is self._watched:
            return
        if self._watched is not None:
            self._watched.events.paint.disconnect(self._painted)
        self._watched = layer
        if layer is not None:
            layer.events.paint.connect(self._painted)

    def _painted(self, *_: Any) -> None:
        # Only once the user has prompted with this layer: painting alone never starts work.
        if self.auto_update.isChecked() and self.mode_box.currentText() == ANNOTATED and self._result is not None:
            self._timer.start()  # restarts on every stroke: one run after the user pauses

    def _update_after_paint(self) -> None:
        if self._result is not None and self._result in self.viewer.layers:
            self.run(preview=True)
