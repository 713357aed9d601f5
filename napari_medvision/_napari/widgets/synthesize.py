"""Synthesize panel: an image + a task (named, or example pairs from layers) -> a new Image or Labels layer.

The panel calls ``tasks.synthesize.synthesize`` (the MVG generalist) in a worker thread. A prompt
pair says what to do: (a T1 layer, its T2 layer) turns the chosen image T2-like; (a CT layer, its
organ Labels layer) segments it, and the result is then a Labels layer. Every layer is only read;
the result is always a layer of its own, on the source image's grid.
"""

from __future__ import annotations

from typing import Any, Optional

import napari
from napari.layers import Image, Labels, Layer
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from ... import models
from ...tasks.synthesis_tasks import TASKS, task_names
from ...tasks.synthesize import DEFAULT_MODEL, synthesize
from ..layers import volume_to_layer
from ._layer_choice import chosen_layer, refill
from ._model_choice import fill_models, watch_models
from ._task_runner import TaskRunner
from .prompt import labels_volume
from .segment import devices, image_volume

EXAMPLES = "examples from layers"
INPAINT = "inpaint"
INPAINT_HELP = "fill the region painted in a Labels layer from its surroundings"
EXAMPLES_PAGE, MASK_PAGE, NAMED_PAGE = range(3)
MAX_STEPS = 64  # autoregressive chunks; beyond this each chunk is a sliver of the image


class PromptPairRow(QWidget):
    """One prompt pair: an example image layer and its target (an image or a Labels layer)."""

    def __init__(self, number: int, parent: QWidget | None = None):
        super().__init__(parent)
        self.image_box = QComboBox()
        self.target_box = QComboBox()
        self.image_box.setToolTip("an example input: an image of the same kind as the one to synthesize from")
        self.target_box.setToolTip("what the model should make of that example: an image (another contrast) "
                                   "or a Labels layer (segmentation as generation)")
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow(f"example {number} image", self.image_box)
        form.addRow(f"example {number} target", self.target_box)


class SynthesisWidget(QWidget):
    """Pick an image, a synthesis model and what to make; the result arrives as a new layer."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.image_box = QComboBox()
        self.model_box = QComboBox()
        self.task_box = QComboBox()
        self.task_box.addItem(EXAMPLES, None)
        for name in task_names():
            self.task_box.addItem(f"{name} (simulated)" if TASKS[name].simulated else name, name)
            self.task_box.setItemData(self.task_box.count() - 1, TASKS[name].description, Qt.ToolTipRole)
        self.task_help = QLabel("")
        self.task_help.setWordWrap(True)
        self.mask_box = QComboBox()
        self.device_box = QComboBox()
        self.device_box.addItems(devices())
        self.steps = QSpinBox()
        self.steps.setRange(1, MAX_STEPS)
        self.steps.setValue(1)
        self.steps.setToolTip("1 fills the target in one pass; more generates it in that many chunks")
        self.consistency = QDoubleSpinBox()
        self.consistency.setRange(0.0, 5.0)
        self.consistency.setSingleStep(0.1)
        self.consistency.setValue(0.7)
        self.consistency.setSuffix(" slices")
        self.consistency.setToolTip("smoothing along z against slice-to-slice flicker, in slices (0: off)")
        self.image_box.setToolTip("the image to turn into something else; it is only read")
        self.model_box.setToolTip("the in-context generator used for example pairs and simulated tasks")
        self.task_box.setToolTip("a named task, or 'examples from layers' to show an image and what it "
                                 "should become")
        self.mask_box.setToolTip("a Labels layer painted over the region to fill")
        self.device_box.setToolTip("where the work runs; auto picks a GPU when there is one")

        self.pair_rows: list[PromptPairRow] = []
        self._pair_column = QVBoxLayout()
        self.add_pair_button = QPushButton("Add pair")
        self.remove_pair_button = QPushButton("Remove pair")
        buttons = QHBoxLayout()
        buttons.addWidget(self.add_pair_button)
        buttons.addWidget(self.remove_pair_button)
        examples_page = QWidget()
        column = QVBoxLayout(examples_page)
        column.setContentsMargins(0, 0, 0, 0)
        column.addLayout(self._pair_column)
        column.addLayout(buttons)
        mask_page = QWidget()
        mask_form = QFormLayout(mask_page)
        mask_form.setContentsMargins(0, 0, 0, 0)
        mask_form.addRow("region to fill", self.mask_box)
        self.pages = QStackedWidget()
        for page in (examples_page, mask_page, QWidget()):
            self.pages.addWidget(page)

        top = QFormLayout()
        top.addRow("image", self.image_box)
        top.addRow("model", self.model_box)
        top.addRow("synthesize", self.task_box)
        bottom = QFormLayout()
        bottom.addRow("device", self.device_box)
        bottom.addRow("chunks", self.steps)
        bottom.addRow("z-consistency", self.consistency)
        self.runner = TaskRunner("Synthesize")
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.task_help)
        layout.addWidget(self.pages)
        layout.addLayout(bottom)
        layout.addWidget(self.runner)
        layout.addStretch(1)

        self.runner.run_button.clicked.connect(self.run)
        self.task_box.currentIndexChanged.connect(self._task_chosen)
        self.add_pair_button.clicked.connect(self.add_pair)
        self.remove_pair_button.clicked.connect(self.remove_pair)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self.add_pair()
        self._refresh_models()
        watch_models(self, self._refresh_models)  # models saved or removed anywhere show at once
        self._task_chosen()

    # --- choices ---------------------------------------------------------------------------
    def _refresh_layers(self, *_: Any) -> None:
        images = [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]
        labels = [layer.name for layer in self.viewer.layers if isinstance(layer, Labels)]
        refill(self.image_box, images)
        refill(self.mask_box, labels)
        for row in self.pair_rows:
            refill(row.image_box, images)
            refill(row.target_box, images + labels)

    def _refresh_models(self, *_: Any) -> None:
        # the user's choice stays while it is listed; the default model otherwise
        fill_models(self.model_box, models.available(task="synthesis"),
                    prefer=self.model_box.currentData() or DEFAULT_MODEL)

    def _task_chosen(self, *_: Any) -> None:
        task = self.task_box.currentData()
        if task is None:
            self.pages.setCurrentIndex(EXAMPLES_PAGE)
            self.task_help.setText("each pair shows what to do: an example image and what it should become "
                                   "(an image, or a Labels layer to segment)")
        else:
            self.pages.setCurrentIndex(MASK_PAGE if task == INPAINT else NAMED_PAGE)
            self.task_help.setText(INPAINT_HELP if task == INPAINT else TASKS[task].description)

    def add_pair(self) -> None:
        """One more prompt pair row (several pairs are averaged: prompt ensembling)."""
        row = PromptPairRow(len(self.pair_rows) + 1)
        self.pair_rows.append(row)
        self._pair_column.addWidget(row)
        self.remove_pair_button.setEnabled(len(self.pair_rows) > 1)
        self._refresh_layers()

    def remove_pair(self) -> None:
        if len(self.pair_rows) > 1:
            row = self.pair_rows.pop()
            self._pair_column.removeWidget(row)
            row.deleteLater()
        self.remove_pair_button.setEnabled(len(self.pair_rows) > 1)

    # --- running ---------------------------------------------------------------------------
    def _inputs(self) -> Optional[dict[str, Any]]:
        """Keyword arguments for ``synthesize`` and the result's name, or None (the user is told why)."""
        image = chosen_layer(self.viewer, self.image_box)
        model_id = self.model_box.currentData()
        if image is None:
            self.runner.refuse("choose the image layer to synthesize from")
            return None
        if model_id is None:
            self.runner.refuse("no synthesis model is installed: add an MVG model (e.g. mvg-generalist)")
            return None
        volume = image_volume(image)
        volume.meta["source"] = image.name  # errors from the task then name the layer
        task = self.task_box.currentData()
        device = self.device_box.currentText()
        kwargs: dict[str, Any] = {"volume": volume, "model": model_id, "task": task,
                                  "device": None if device == "auto" else device,
                                  "steps": int(self.steps.value()), "consistency": float(self.consistency.value())}
        if task is None:
            examples = self._examples()
            if examples is None:
                return None
            kwargs["examples"], targets = examples
            what = f"as {', '.join(targets)}"
        else:
            what = task
            if task == INPAINT:
                mask = chosen_layer(self.viewer, self.mask_box)
                if not isinstance(mask, Labels):
                    self.runner.refuse(f"{image.name}: inpainting needs a Labels layer painted over the region "
                                       "to fill; add one and choose it as the region to fill")
                    return None
                kwargs["mask"] = labels_volume(mask)
        return {"kwargs": kwargs, "name": f"{image.name} synthesized ({what})"}

    def _examples(self) -> Optional[tuple[list, list[str]]]:
        """The prompt pairs as Volumes (snapshots) and their target layer names, or None."""
        pairs, targets = [], []
        for number, row in enumerate(self.pair_rows, start=1):
            example = chosen_layer(self.viewer, row.image_box)
            target = chosen_layer(self.viewer, row.target_box)
            if not isinstance(example, Image) or not isinstance(target, (Image, Labels)):
                self.runner.refuse(f"example {number}: choose an example image layer and its target layer")
                return None
            if example.data.shape[: example.ndim] != target.data.shape[: target.ndim]:
                self.runner.refuse(f"example {number}: {target.name!r} has shape {tuple(target.data.shape)}, "
                                   f"{example.name!r} has {tuple(example.data.shape)}; a pair must share a grid")
                return None
            target_volume = labels_volume(target) if isinstance(target, Labels) else image_volume(target)
            pairs.append((image_volume(example), target_volume))
            targets.append(target.name)
        return pairs, targets

    def run(self) -> None:
        inputs = self._inputs()
        if inputs is None:
            return
        self.runner.start(synthesize, lambda result: self._add_result(result, inputs["name"]), **inputs["kwargs"])

    def _add_result(self, result, name: str) -> None:
        data, kwargs, kind = volume_to_layer(result, name=name)
        self.viewer.add_layer(Layer.create(data, kwargs, kind))
