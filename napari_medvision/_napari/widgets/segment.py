"""Segment panel: image layer + model (filtered by the layer's modality) + device -> new Labels layer."""

from __future__ import annotations

from typing import Any

import napari
from napari.layers import Image, Layer
from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QFormLayout, QVBoxLayout, QWidget

from ... import atlases, models
from ...tasks.segment import segment
from ..layers import METADATA_KEY, layer_to_volume, volume_to_layer
from ._atlas_controls import AtlasControls
from ._contrast_pickers import ContrastPickers
from ._layer_choice import chosen_layer, refill
from ._model_choice import fill_models, watch_models
from ._task_runner import TaskRunner


def image_volume(layer: Image):
    """The Volume behind an image layer (geometry from the layer's metadata or transform)."""
    data, meta, kind = layer.as_layer_data_tuple()
    return layer_to_volume(data, meta, kind)


def devices() -> list[str]:
    import torch

    found = ["auto", "cpu"]
    if torch.cuda.is_available():
        found.append("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        found.append("mps")
    return found


class SegmentWidget(QWidget):
    """Pick an image layer and a model; the segmentation arrives as a new Labels layer."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.layer_box = QComboBox()
        self.model_box = QComboBox()
        self.device_box = QComboBox()
        self.device_box.addItems(devices())
        self.overlap = QDoubleSpinBox()
        self.overlap.setRange(0.0, 0.9)
        self.overlap.setSingleStep(0.05)
        self.overlap.setValue(0.5)
        self.layer_box.setToolTip("the image layer to segment (its modality picks the models offered)")
        self.model_box.setToolTip("a shipped model, your fine-tuned versions, or an atlas set of your own")
        self.device_box.setToolTip("where the network runs; auto picks a GPU when there is one")
        self.overlap.setToolTip("share of each sliding window (0-0.9) that its neighbours also cover: "
                                "more is smoother and slower")
        form = QFormLayout()
        form.addRow("image", self.layer_box)
        form.addRow("model", self.model_box)
        self.contrasts = ContrastPickers(self.viewer, self._image_names)  # multi-contrast models only
        form.addRow(self.contrasts)
        form.addRow("device", self.device_box)
        form.addRow("tile overlap (share)", self.overlap)
        self.atlas_controls = AtlasControls(self.viewer, self._atlas_added)  # atlases of the model
        form.addRow(self.atlas_controls)
        self.runner = TaskRunner("Segment")
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.runner)
        layout.addStretch(1)
        self.runner.run_button.clicked.connect(self.run)
        self.layer_box.currentTextChanged.connect(self._refresh_models)
        self.model_box.currentIndexChanged.connect(self._show_contrasts)
        self.model_box.currentIndexChanged.connect(lambda *_: self.atlas_controls.show_model(self.model_box.currentData()))
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()
        watch_models(self, self._refresh_models)  # a model saved or removed anywhere shows here at once

    def selected_layer(self) -> Image | None:
        return chosen_layer(self.viewer, self.layer_box)

    def _refresh_layers(self, *_: Any) -> None:
        refill(self.layer_box, self._image_names())
        self.contrasts.refresh()
        self.atlas_controls.refresh()
        self._refresh_models()

    def _image_names(self) -> list[str]:
        return [layer.name for layer in self.viewer.layers if isinstance(layer, Image)]

    def _show_contrasts(self, *_: Any) -> None:
        model_id = self.model_box.currentData()
        card = next((c for c in models.available(task="segmentation") if c.id == model_id), None)
        contrasts = list(card.input.get("contrasts", [])) if card else []
        self.contrasts.set_contrasts(contrasts, self.layer_box.currentText())

    def _refresh_models(self, *_: Any) -> None:
        layer = self.selected_layer()
        modality = _modality(layer) if layer is not None else None
        cards = models.available(task="segmentation")
        fitting = [c for c in cards if modality is None or c.modality.lower() == modality.lower()]
        fill_models(self.model_box, fitting or cards)  # keeps the user's choice while it is listed
        for atlas in atlases.available(modality):  # atlas sets that segment alone
            if not atlas.models:
                self.model_box.addItem(f"{atlas.name} (atlas set, {atlas.source})", atlas.name)
        self.atlas_controls.show_model(self.model_box.currentData())

    def _atlas_added(self, name: str) -> None:
        self._refresh_models()
        self.model_box.setCurrentIndex(max(0, self.model_box.findData(name)))

    def run(self) -> None:
        layer = self.selected_layer()
        model_id = self.model_box.currentData()
        if layer is None or model_id is None:
            self.runner.status.setText("choose an image layer and a model first")
            return
        volume = image_volume(layer)
        if self.contrasts.isVisibleTo(self):  # the model takes several contrasts: one layer each
            volume = self.contrasts.volumes(image_volume)
            if not volume:
                self.runner.status.setText("choose a layer for at least one contrast")
                return
        device = self.device_box.currentText()
        self.runner.start(
            segment, lambda result: self._add_result(result, layer, model_id),
            volume=volume, model=model_id, device=None if device == "auto" else device,
            overlap=float(self.overlap.value()),
        )

    def _add_result(self, result, source: Layer, model_id: str) -> None:
        data, kwargs, kind = volume_to_layer(result, name=f"{source.name} – {model_id}")
        self.viewer.add_layer(Layer.create(data, kwargs, kind))


def _modality(layer: Layer) -> str | None:
    return (layer.metadata.get(METADATA_KEY) or {}).get("modality")
