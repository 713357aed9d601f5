"""Fine-tune panel: image + corrected labels layer + model -> a new user model, then "apply" it.

The slices the user paints in the labels layer are tracked from its ``paint`` events (and can be
typed or added by hand), so training learns from the corrections, not from the model's own
unedited output. The labels are copied when a run starts (painting meanwhile changes nothing).
Training runs in ``mv.finetune`` off the GUI thread (``TaskRunner``); a small plot shows the
loss and, per held-out fold, the new model's and the parent's Dice. At the end the panel says
the new model's id, where it is stored and its gain over the parent, or why the parent stays.
"""

from __future__ import annotations

from typing import Any, Iterable

import napari
import numpy as np
from napari.layers import Image, Labels, Layer
from qtpy.QtCore import QObject, QPointF, Qt, Signal
from qtpy.QtGui import QColor, QPainter, QPen
from qtpy.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                            QPushButton, QSpinBox, QVBoxLayout, QWidget)

from ... import models
from ...tasks.finetune import FinetuneOptions, FinetuneRefused, finetune
from ...tasks.prompting.head import NEW_HEAD
from ...tasks.segment import segment
from ..layers import label_names, volume_to_layer
from ._layer_choice import chosen_layer, refill
from ._model_choice import fill_models, watch_models
from ._task_runner import TaskRunner
from .segment import devices, image_volume


def painted_slices(atoms: Iterable[Any]) -> set[int]:
    """Indices along axis 0 touched by one napari Labels ``paint`` event (its ``value``).

    napari records a brush or fill stroke as ``_MaskedPaintAtom`` (a bounding box ``slice_key``
    and an optional mask) and ``data_setitem`` as ``(indices, old values, new value)``.
    """
    found: set[int] = set()
    for atom in atoms:
        key = getattr(atom, "slice_key", None)
        if key is not None:
            first = key[0]
            rows = np.arange(first.start or 0, first.stop)
            mask = getattr(atom, "mask", None)
            if mask is not None and mask.ndim > 1:
                rows = rows[mask.reshape(mask.shape[0], -1).any(axis=1)]
            found.update(int(r) for r in rows)
        else:
            found.update(int(i) for i in np.unique(np.asarray(atom[0][0])))
    return found


class CurvePlot(QWidget):
    """Training loss (grey), held-out Dice of the new model (green) and of the parent (orange)
    against the step: a plain QPainter plot.

    Drawn by hand so that the panel needs no plotting library beyond Qt.
    """

    def __init__(self, parent: QWidget | None = None):
        super().__init__(parent)
        self.setMinimumHeight(110)
        self.points: list[dict] = []

    def clear(self) -> None:
        self.points = []
        self.update()

    def add(self, entry: dict) -> None:
        self.points.append(dict(entry))
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        painter = QPainter(self)
        painter.setRenderHint(QPainter.Antialiasing)
        w, h, m = self.width(), self.height(), 6
        painter.setPen(QPen(QColor(120, 120, 120)))
        painter.drawRect(m, m, w - 2 * m, h - 2 * m)
        if not self.points:
            painter.drawText(self.rect(), Qt.AlignCenter, "loss and validation Dice appear here")
            return
        last = max(p["step"] for p in self.points) or 1
        losses = [p["loss"] for p in self.points]
        top = max(max(losses), 1.0)

        def curve(key: str, scale: float, colour: QColor) -> None:
            # the top 18 px hold the numbers: the curves are drawn below them
            pts = [QPointF(m + (w - 2 * m) * p["step"] / last, h - m - (h - 2 * m - 18) * p[key] / scale)
                   for p in self.points if p.get(key) is not None and np.isfinite(p[key])]
            painter.setPen(QPen(colour, 2))
            for a, b in zip(pts, pts[1:]):
                painter.drawLine(a, b)
            for p in pts:
                painter.drawEllipse(p, 2, 2)

        curve("loss", top, QColor(160, 160, 160))
        curve("parent_score", 1.0, QColor(230, 140, 40))
        curve("score", 1.0, QColor(40, 170, 80))
        latest = self.points[-1]
        scored = [p for p in self.points if _finite(p.get("score"))]
        text = f"step {latest['step']}  loss {latest['loss']:.3f}"
        if latest.get("phase"):
            text = f"{latest['phase']}  " + text
        if scored:
            last = scored[-1]
            text += f"  held-out Dice {last['score']:.3f}"
            if _finite(last.get("parent_score")):
                text += f" (parent {last['parent_score']:.3f})"
        painter.setPen(QPen(QColor(200, 200, 200)))
        painter.drawText(m + 4, m + 14, text)


def _finite(value) -> bool:
    return value is not None and bool(np.isfinite(value))


class Refusal:
    """The guard kept the parent: what to tell the user (why, with the figures)."""

    def __init__(self, message: str):
        self.message = message


class _Validation(QObject):
    seen = Signal(dict)


class FinetuneWidget(QWidget):
    """Choose a model, an image and its corrected labels layer; train; apply the new model."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.model_box = QComboBox()
        self.image_box = QComboBox()
        self.labels_box = QComboBox()
        self.slices_edit = QLineEdit()
        self.slices_edit.setPlaceholderText("painted slices appear here (empty: every labelled slice)")
        self.mark_button = QPushButton("Mark current slice")
        self.steps = QSpinBox()
        self.steps.setRange(0, 100_000)
        self.steps.setValue(200)
        self.steps.setSpecialValueText("no limit")
        self.time_budget = QDoubleSpinBox()
        self.time_budget.setRange(0, 24 * 3600)
        self.time_budget.setSuffix(" s")
        self.time_budget.setSpecialValueText("no limit")
        self.device_box = QComboBox()
        self.device_box.addItems(devices())
        # the default trains the output head on the frozen network's features (distilled, guarded)
        self.whole_network = QCheckBox("train the whole network (slower; forgets more)")
        self.guard = QCheckBox("save only if it beats the parent on held-out corrected slices")
        self.guard.setChecked(True)
        self.new_id = QLineEdit()
        self.new_id.setPlaceholderText("<model>-ft-<date-time>")
        tips = {
            self.model_box: "the model to improve; the new version is saved apart, the parent is never changed",
            self.image_box: "the image the corrections were drawn on",
            self.labels_box: "a Labels layer with your corrected labels (copied when training starts)",
            self.slices_edit: "indices along z of the slices you corrected, e.g. 12, 20, 31 (empty: every "
                              "slice holding a label)",
            self.steps: "optimiser steps at most (training updates; a few hundred take about a minute on a CPU)",
            self.time_budget: "stop training after this many seconds (0: no limit)",
            self.device_box: "where training runs; auto picks a GPU when there is one",
            self.new_id: "the new model's id (letters, digits, '-' and '_')",
            self.whole_network: "off: only the output rows of the corrected labels train, held to the parent "
                                "elsewhere; on: every weight trains (minutes, and untouched labels may drift)",
            self.guard: "keep some corrected slices aside and save the new model only if it beats the parent "
                        "there, per label, with no untouched label moving",
        }
        for widget, tip in tips.items():
            widget.setToolTip(tip)
        slices_row = QHBoxLayout()
        slices_row.addWidget(self.slices_edit)
        slices_row.addWidget(self.mark_button)
        form = QFormLayout()
        form.addRow("model", self.model_box)
        form.addRow("image", self.image_box)
        form.addRow("corrected labels", self.labels_box)
        form.addRow("corrected slices", slices_row)
        form.addRow("optimiser steps", self.steps)
        form.addRow("time budget", self.time_budget)
        form.addRow("device", self.device_box)
        form.addRow("", self.whole_network)
        form.addRow("", self.guard)
        form.addRow("new model id", self.new_id)
        self.plot = CurvePlot()
        self.runner = TaskRunner("Fine-tune")
        self.apply_button = QPushButton("Apply: segment with the new model")
        self.apply_button.setEnabled(False)
        self.result = QLabel("")
        self.result.setWordWrap(True)
        self.result.setTextInteractionFlags(Qt.TextSelectableByMouse)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.runner)
        layout.addWidget(self.plot)
        layout.addWidget(self.result)
        layout.addWidget(self.apply_button)
        layout.addStretch(1)

        self.painted: dict[str, set[int]] = {}
        self.card = None
        self._tracked: Labels | None = None
        self._validation = _Validation()
        self._validation.seen.connect(self.plot.add)
        self.runner.run_button.clicked.connect(self.run)
        self.apply_button.clicked.connect(self.apply)
        self.mark_button.clicked.connect(self.mark_current_slice)
        self.labels_box.currentTextChanged.connect(self._track_labels)
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()
        self._refresh_models()
        watch_models(self, self._refresh_models)  # models saved or removed anywhere show at once

    # --- layers, models and the painted slices ----------------------------------------------------
    def _layer(self, box: QComboBox):
        return chosen_layer(self.viewer, box)

    def _refresh_layers(self, *_: Any) -> None:
        for box, kind in ((self.image_box, Image), (self.labels_box, Labels)):
            refill(box, [layer.name for layer in self.viewer.layers if isinstance(layer, kind)])
        self._track_labels()

    def _refresh_models(self, *_: Any) -> None:
        # a prompting head learns from the corrections alone, in seconds (tasks.prompting.head)
        fill_models(self.model_box, models.available(task="segmentation"),
                    extra=[("new prompting head (pixel classifier)", NEW_HEAD)])

    def _track_labels(self, *_: Any) -> None:
        layer = self._layer(self.labels_box)
        if layer is self._tracked:
            return
        if self._tracked is not None:
            self._tracked.events.paint.disconnect(self._on_paint)
        self._tracked = layer
        if layer is not None:
            layer.events.paint.connect(self._on_paint)
        self._show_slices()

    def _on_paint(self, event) -> None:
        layer = self._tracked
        if layer is not None:
            self.painted.setdefault(layer.name, set()).update(painted_slices(event.value))
            self._show_slices()

    def mark_current_slice(self) -> None:
        layer = self._layer(self.labels_box)
        if layer is None:
            return
        axis = self.viewer.dims.ndim - layer.ndim  # the layer's axis 0 in the viewer's dims
        current = int(self.viewer.dims.current_step[axis])
        self.painted.setdefault(layer.name, set()).add(current)
        self._show_slices()

    def _show_slices(self) -> None:
        layer = self._layer(self.labels_box)
        picked = sorted(self.painted.get(layer.name, set())) if layer is not None else []
        self.slices_edit.setText(", ".join(str(s) for s in picked))

    def corrected_slices(self) -> list[int] | None:
        """The slices typed or painted; ``None`` when the field is empty (every labelled slice)."""
        text = self.slices_edit.text().replace(";", ",")
        numbers = [t.strip() for t in text.split(",") if t.strip()]
        if not numbers:
            return None
        try:
            return sorted({int(n) for n in numbers})
        except ValueError:
            raise ValueError(f"corrected slices must be numbers separated by commas, got {text!r}") from None

    # --- running ------------------------------------------------------------------------------------
    def run(self) -> None:
        image, labels = self._layer(self.image_box), self._layer(self.labels_box)
        model_id = self.model_box.currentData()
        if image is None or labels is None or model_id is None:
            self.runner.status.setText("choose a model, an image layer and its corrected labels layer first")
            return
        try:
            slices = self.corrected_slices()
        except ValueError as exc:
            self.runner.status.setText(str(exc))
            return
        volume = image_volume(image)
        volume.meta["name"] = image.name
        # The corrections lie on the image's grid: they take its geometry (a labels layer made in
        # napari often has none of its own).
        # a copy: a brush stroke during training must not change what it learns from
        corrected = volume.with_data(np.array(labels.data, copy=True), labels=label_names(labels), rgb=False)
        corrected.meta = {"name": labels.name}
        device = self.device_box.currentText()
        self.plot.clear()
        self.result.setText("")
        self.apply_button.setEnabled(False)
        self.card = None
        options = FinetuneOptions(
            steps=self.steps.value() or None, time_budget_s=self.time_budget.value() or None,
            device=None if device == "auto" else device,
            method="network" if self.whole_network.isChecked() else "tail", guard=self.guard.isChecked(),
            new_id=self.new_id.text().strip() or None, on_validation=self._validation.seen.emit)
        self.runner.start(self._finetune_or_refusal, self._trained, model=model_id, images=[volume],
                          labels=[corrected], slices=None if slices is None else [slices], options=options)

    @staticmethod
    def _finetune_or_refusal(**kwargs):
        """The new card, or the guard's refusal (a result to show, not a failure)."""
        try:
            return finetune(**kwargs)
        except FinetuneRefused as exc:
            return Refusal(str(exc))  # wrapped: a worker re-raises an exception it returns

    def _trained(self, card) -> str:
        if isinstance(card, Refusal):  # the parent stays selected
            self.result.setText(f"Not saved: {card.message}")
            return "the parent model stays: the new one did not beat it"
        self.card = card
        self.apply_button.setEnabled(True)
        self._refresh_models()
        self.model_box.setCurrentIndex(self.model_box.findData(card.id))
        self.result.setText(result_summary(card))
        return f"saved model {card.id}"

    def apply(self) -> None:
        """Segment the chosen image with the fine-tuned model; the result is a new labels layer."""
        image = self._layer(self.image_box)
        if self.card is None or image is None:
            self.runner.status.setText("fine-tune a model first, and keep its image layer")
            return
        card, device = self.card, self.device_box.currentText()
        self.runner.start(segment, lambda result: self._add_result(result, image, card.id),
                          volume=image_volume(image), model=card.id, device=None if device == "auto" else device)

    def _add_result(self, result, source: Layer, model_id: str) -> None:
        data, kwargs, kind = volume_to_layer(result, name=f"{source.name} – {model_id}")
        self.viewer.add_layer(Layer.create(data, kwargs, kind))


def result_summary(card) -> str:
    """What the user needs after a fine-tune: the id, where it is stored and its gain over the parent."""
    training = card.training or {}
    guard = (training.get("guard") or {}).get("figures") or {}
    lines = [f"New model {card.id} (from {card.parent}), stored in {card.weights_path}."]
    corrected = guard.get("corrected labels") or {}
    if corrected:
        gains = ", ".join(f"{name} {f['parent']:.3f} → {f['new']:.3f}" for name, f in corrected.items())
        lines.append(f"Held-out corrected slices, parent → new Dice: {gains}.")
    else:
        for name, value in (card.metrics or {}).items():
            lines.append(f"{name}: {value}")
    lines.append(f"{training.get('steps')} steps in {training.get('wall_time_s')} s.")
    return " ".join(lines)
