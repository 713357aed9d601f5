"""Interactive panel: click, box, lasso or scribble on an image; the object appears in 3D at once.

The panel calls ``tasks.interactive.InteractiveSession`` (the same calls a script makes) in one
worker thread, one prompt at a time, in order; prompts made while the scan is being prepared or
while a mask is computed wait in a queue. Each prompt shows a preview on the current slice first,
then the 3D mask. Accepted objects go into one Labels layer of the panel's own, with names.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Optional

import napari
import numpy as np
from napari.layers import Image, Points
from napari.qt.threading import create_worker
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ...tasks.interactive import InteractionError, InteractiveSession
from ...volume import Volume
from ..notify import show_problem
from ._layer_choice import chosen_layer, refill
from ._task_runner import TaskRunner
from ..layers import METADATA_KEY, adopt_geometry

# Keyboard shortcuts, bound through napari's keybindings while the panel is open.
SHORTCUTS = {"n": "accept the object and start the next", "u": "undo", "Shift-U": "redo",
             "t": "toggle positive / negative prompts"}
POSITIVE_COLOUR, NEGATIVE_COLOUR = "lime", "red"
SCRIBBLE_POSITIVE, SCRIBBLE_NEGATIVE = 1, 2


def layer_volume(layer: Image) -> Volume:
    """The image as napari shows it (layer axis order, spacing from the layer's scale): clicks,
    boxes and masks then need no reordering, whatever order the file stored the axes in."""
    stored = layer.metadata.get(METADATA_KEY) or {}
    data = np.asarray(layer.data[0] if layer.multiscale else layer.data)
    return Volume(data, spacing=tuple(float(v) for v in layer.scale[-3:]), modality=stored.get("modality"))


def unique_name(viewer: napari.Viewer, name: str) -> str:
    """``name``, or ``name [2]``, ... so no existing layer is ever replaced."""
    if name not in viewer.layers:
        return name
    k = 2
    while f"{name} [{k}]" in viewer.layers:
        k += 1
    return f"{name} [{k}]"


class InteractiveWidget(QWidget):
    """Segment objects one at a time with clicks, boxes, lassos and scribbles."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.image_box = QComboBox()
        self.negative = QCheckBox("negative prompts (t)")
        self.name_edit = QLineEdit()
        self.name_edit.setPlaceholderText("name of the object (e.g. liver)")
        self.image_box.setToolTip("the image layer to segment objects in; the objects layer shares its grid (mm)")
        self.name_edit.setToolTip("the object's name in the objects layer once accepted (empty: object 1, 2, ...)")
        self.negative.setToolTip("on: a click marks where the object is not, as a Shift-click does (t toggles it)")
        form = QFormLayout()
        form.addRow("image", self.image_box)
        form.addRow("object", self.name_edit)
        form.addRow("", self.negative)
        self.runner = TaskRunner("Start")
        self.accept_button, self.undo_button = QPushButton("Accept && next (n)"), QPushButton("Undo (u)")
        self.redo_button, self.reset_button = QPushButton("Redo (Shift-U)"), QPushButton("Reset object")
        self.accept_button.setToolTip("add the current object to the objects layer and start the next (n)")
        self.undo_button.setToolTip("take back the last prompt of this object (u)")
        self.redo_button.setToolTip("put back the last prompt taken back (Shift-U)")
        self.reset_button.setToolTip("drop every prompt of the current object and start it again")
        buttons = QHBoxLayout()
        for b in (self.accept_button, self.undo_button, self.redo_button, self.reset_button):
            buttons.addWidget(b)
            b.setEnabled(False)
        help_text = QLabel(
            "Left click: on the object; Shift- or right click: not on it. Draw a rectangle (box) or a "
            "polygon (lasso) in the boxes layer, or paint label 1 (object) / 2 (not) in the scribbles layer.\n"
            + "\n".join(f"{key}: {what}" for key, what in SHORTCUTS.items()))
        help_text.setWordWrap(True)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.runner)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addWidget(help_text)
        layout.addStretch(1)

        self.session: Optional[InteractiveSession] = None
        self.image: Optional[Image] = None
        self.points = self.shapes = self.scribbles = self.current = self.objects = None
        self.queue: deque = deque()
        self.worker = None
        self._scribbled = None
        self._shapes_seen = 0

        self.runner.run_button.clicked.connect(self.start)
        self.accept_button.clicked.connect(lambda: self.accept())
        self.undo_button.clicked.connect(lambda: self.enqueue("undo"))
        self.redo_button.clicked.connect(lambda: self.enqueue("redo"))
        self.reset_button.clicked.connect(lambda: self.enqueue("reset"))
        for event in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self._refresh_layers()
        self._bind_keys()

    # --- setup ------------------------------------------------------------------------------
    def _refresh_layers(self, *_: Any) -> None:
        refill(self.image_box, [layer.name for layer in self.viewer.layers if isinstance(layer, Image)])

    def _bind_keys(self) -> None:
        keys = {"n": lambda v: self.accept(), "u": lambda v: self.enqueue("undo"),
                "Shift-U": lambda v: self.enqueue("redo"), "t": lambda v: self.negative.toggle()}
        for key, action in keys.items():
            self.viewer.bind_key(key, action, overwrite=True)
        self.destroyed.connect(lambda *_: [self.viewer.bind_key(k, None) for k in keys])

    def start(self) -> None:
        """Prepare the chosen image (a worker; prompts made meanwhile wait) and add the prompt layers."""
        layer = chosen_layer(self.viewer, self.image_box)
        if layer is None:
            self.runner.refuse("choose an image layer first")
            return
        if layer.ndim != 3 or layer.rgb:
            self.runner.refuse(f"{layer.name!r} is not a 3D grey image (it has {layer.ndim} dimensions)")
            return
        volume = layer_volume(layer)
        self.image = layer
        self._add_layers(layer)
        self.runner.start(InteractiveSession, self._ready, volume=volume)

    def _add_layers(self, image: Image) -> None:
        place = {"scale": image.scale, "translate": image.translate}
        if not np.allclose(image.affine.affine_matrix, np.eye(image.ndim + 1)):
            place["affine"] = image.affine.affine_matrix
        shape = image.data.shape

        def named(what: str) -> str:
            return unique_name(self.viewer, f"{image.name} {what}")

        self.objects = self.viewer.add_labels(np.zeros(shape, np.uint16), name=named("objects"), **place)
        adopt_geometry(self.objects, image)  # saved objects go back onto the scan's grid and axis order
        self.current = self.viewer.add_labels(np.zeros(shape, np.uint8), name=named("current object"),
                                              opacity=0.5, **place)
        self.scribbles = self.viewer.add_labels(np.zeros(shape, np.uint8), name=named("scribbles"), **place)
        self.shapes = self.viewer.add_shapes(name=named("boxes"), ndim=image.ndim, edge_color="yellow",
                                             face_color="transparent", **place)
        self.points = self.viewer.add_points(np.zeros((0, image.ndim)), name=named("clicks"), size=4,
                                             face_color=POSITIVE_COLOUR, **place)
        self.points.mouse_drag_callbacks.append(self._clicked)
        self.shapes.events.data.connect(self._shape_drawn)
        self.scribbles.events.paint.connect(self._painted)
        self._scribbled = np.zeros(shape, dtype=bool)
        self.viewer.layers.selection.active = self.points

    def _ready(self, session: InteractiveSession) -> str:
        self.session = session
        for b in (self.accept_button, self.undo_button, self.redo_button, self.reset_button):
            b.setEnabled(True)
        self._next()
        return "ready: click on an object"

    # --- prompts from the layers --------------------------------------------------------------
    def index_of(self, layer, position) -> tuple:
        """The image's array index of a point of ``layer`` (its data coordinates)."""
        world = layer.data_to_world(np.asarray(position, dtype=float))
        return tuple(float(v) for v in self.image.world_to_data(world))

    def _clicked(self, layer: Points, event) -> Any:
        """Left click: positive; Shift- or right click: negative; a drag pans as usual."""
        if layer.mode not in ("pan_zoom", "transform"):
            return
        start = np.asarray(event.position)
        yield
        while event.type == "mouse_move":
            yield
        if np.linalg.norm(np.asarray(event.position) - start) > 1e-6 * max(1.0, np.abs(start).max()) + 1e-9:
            return  # a drag
        positive = not ("Shift" in event.modifiers or event.button == 2) and not self.negative.isChecked()
        index = self.image.world_to_data(np.asarray(event.position))
        self.add_click(tuple(float(v) for v in index), positive)

    def add_click(self, index: tuple, positive: bool = True) -> None:
        """Mark the click in the clicks layer and queue it (``index``: the image's array index)."""
        if self.session is not None:
            try:
                self.session.point(index, positive)  # checked here: a click outside says so at once
            except InteractionError as exc:
                self.status.setText(f"not used: {exc}")
                return
        self.enqueue("point", index, positive)  # the worker starts first; the marker is drawn meanwhile
        world = self.image.data_to_world(np.asarray(index))
        self.points.current_face_color = POSITIVE_COLOUR if positive else NEGATIVE_COLOUR
        self.points.add(np.asarray(self.points.world_to_data(world))[None])

    def _shape_drawn(self, event) -> None:
        if getattr(event, "action", "added") not in ("added", getattr(event.action, "ADDED", "added")):
            return
        if len(self.shapes.data) <= self._shapes_seen:
            self._shapes_seen = len(self.shapes.data)
            return
        self._shapes_seen = len(self.shapes.data)
        kind = self.shapes.shape_type[-1]
        vertices = np.array([self.index_of(self.shapes, v) for v in self.shapes.data[-1]])
        z = int(round(vertices[0, 0]))
        if kind == "rectangle":
            lo, hi = vertices.min(0), vertices.max(0)
            self.enqueue("box", (z, lo[1], lo[2]), (z, hi[1], hi[2]))
        elif kind in ("polygon", "path"):
            self.enqueue("lasso", vertices[:, 1:], z)

    def _painted(self, *_: Any) -> None:
        # napari may announce a paint before it writes the voxels: read them once it has
        QTimer.singleShot(0, self._collect_scribbles)

    def _collect_scribbles(self) -> None:
        data = np.asarray(self.scribbles.data)
        for value, positive in ((SCRIBBLE_POSITIVE, True), (SCRIBBLE_NEGATIVE, False)):
            new = (data == value) & ~self._scribbled
            if new.any():
                self._scribbled |= new
                self.enqueue("scribble", new, positive)

    # --- the queue ------------------------------------------------------------------------------
    def enqueue(self, action: str, *args: Any) -> None:
        """Queue one action for the session (run in order in the worker thread)."""
        self.queue.append((action, args))
        if self.session is None:
            self.status.setText(f"{len(self.queue)} prompt(s) wait for the scan to be ready…")
        self._next()

    def _next(self) -> None:
        if self.worker is not None or self.session is None or not self.queue:
            return
        action, args = self.queue.popleft()
        z = int(self.viewer.dims.current_step[0]) if self.image is not None else 0
        self.status.setText("computing…")
        worker = create_worker(_run_action, self.session, action, args, z, _start_thread=False)
        worker.yielded.connect(self._show_preview)
        worker.returned.connect(self._show_mask)
        worker.finished.connect(self._finished)
        self.worker = worker
        worker.start()

    def _show_preview(self, preview) -> None:
        z, plane = preview
        self.current.data[z] = plane.astype(np.uint8)
        self.current.refresh()

    def _show_mask(self, result) -> None:
        if isinstance(result, tuple) and result[0] == "accepted":
            self.accepted(result[1])
            return
        if isinstance(result, Exception):
            self.status.setText(f"not used: {result}")
            show_problem(str(result))
            return
        np.copyto(self.current.data, result)  # in place: no new layer data for napari to take in
        self.current.refresh()
        self.status.setText(f"object: {int(result.sum())} voxels; "
                            f"{'undo' if self.session.can_undo else 'nothing to undo'}")

    def _finished(self) -> None:
        self.worker = None
        self._next()

    def accept(self) -> None:
        """Accept the current object into the objects layer (after the queued prompts) and start the next."""
        self.enqueue("accept", self.name_edit.text().strip() or None)

    def accepted(self, value: int) -> None:
        if value == 0:
            self.status.setText("nothing to accept: the object is empty")
            return
        labels = self.session.labels
        # layers are changed in place and only where needed: every change redraws the canvas
        np.copyto(self.objects.data, labels.data)
        self.objects.refresh()
        self.objects.metadata["label_names"] = dict(labels.labels)
        own = self.objects.metadata.get(METADATA_KEY)
        if own:  # the scan's geometry (from adopt_geometry) with the names, for saving
            self.objects.metadata[METADATA_KEY] = {**own, "labels": {str(k): v for k, v in labels.labels.items()}}
        self.current.data[:] = 0
        self.current.refresh()
        if len(self.points.data):
            self.points.data = np.zeros((0, self.points.ndim))
        if len(self.shapes.data):
            self.shapes.data = []
        self._shapes_seen = 0
        if self._scribbled.any():
            self.scribbles.data[:] = 0
            self.scribbles.refresh()
            self._scribbled[:] = False
        self.name_edit.clear()
        self.status.setText(f"accepted {labels.labels[value]!r} as label {value}; click on the next object")


def _run_action(session: InteractiveSession, action: str, args: tuple, z: int):
    """Worker: yield ``(z, preview)`` for a prompt, then return the 3D mask (an error is returned)."""
    try:
        if action == "point":
            pending = session.point(*args)
            yield pending.index[0], session.preview_slice(pending.index[0], pending)
            return session.add_point(*args)
        if action == "box":
            return session.add_box(*args)
        if action == "lasso":
            return session.add_lasso(*args)
        if action == "scribble":
            return session.add_scribble(*args)
        if action in ("undo", "redo", "reset"):
            return getattr(session, action)()
        if action == "accept":
            return ("accepted", session.next_object(*args))
    except InteractionError as exc:
        return exc
    raise ValueError(f"unknown action {action!r}")
