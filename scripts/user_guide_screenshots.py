"""Screenshots of every MedVision panel in a real napari window, run on real scans, for docs/user-guide.

Each panel is opened with ``viewer.window.add_plugin_dock_widget``, filled in and run as a person
would, and the whole window is saved once the result layer is there::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/user_guide_screenshots.py [PANEL ...]

Scans come from ``../shared/data`` (or ``$MEDVISION_DATA``); images go to docs/user-guide/images/.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import napari
import numpy as np
from napari.layers import Layer
from qtpy.QtWidgets import QApplication

import napari_medvision as mv
from napari_medvision._napari.layers import volume_to_layer

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("MEDVISION_DATA", REPO.parent / "shared" / "data"))
OUT = REPO / "docs" / "user-guide" / "images"
PLUGIN = "napari-medvision"
CT = DATA / "ct_mr_totalseg" / "example_ct_sm.nii.gz"
CT_LABELS = DATA / "ct_mr_totalseg" / "example_seg.nii.gz"
LIVER = 5  # TotalSegmentator's id of the liver in example_seg (class_map_total_and_total_mr.json)
# A real skull-stripped T1 that ships (Apache-2.0) as the brain atlas, so its picture may be shown.
BRAIN_T1 = REPO / "weights" / "atlases" / "aseg-brain-mr" / "image.nii.gz"


def wait_until(condition, timeout: float = 600.0) -> None:
    """Process Qt events until ``condition()`` holds (the panels run their work in threads)."""
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the panel did not finish in time")
        QApplication.processEvents()
        time.sleep(0.05)


def add(viewer: napari.Viewer, volume, name: str):
    data, kwargs, kind = volume_to_layer(volume, name=name)
    return viewer.add_layer(Layer.create(data, kwargs, kind))


def new_viewer() -> napari.Viewer:
    viewer = napari.Viewer(show=True)
    viewer.window._qt_window.resize(1500, 950)
    return viewer


def run_and_wait(panel, layers_before: int, viewer: napari.Viewer, timeout: float = 900.0) -> None:
    panel.run()
    wait_until(lambda: panel.runner.run_button.isEnabled() and len(viewer.layers) > layers_before, timeout)


def save(viewer: napari.Viewer, name: str) -> Path:
    QApplication.processEvents()
    path = OUT / f"{name}.png"
    viewer.screenshot(path=str(path), canvas_only=False)
    viewer.close()
    print(f"wrote {path.relative_to(REPO)}", flush=True)
    return path


def liver_reference():
    reference = mv.load(CT_LABELS)
    return reference.with_data((np.asarray(reference.data) == LIVER).astype(np.uint8), labels={1: "liver"})


def segment() -> Path:
    viewer = new_viewer()
    add(viewer, mv.load(CT), "abdomen CT")
    _, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    panel.model_box.setCurrentIndex(max(0, panel.model_box.findData("ct-abdomen-organs-3d")))
    run_and_wait(panel, 1, viewer)
    viewer.dims.set_current_step(0, viewer.layers[0].data.shape[0] // 2)
    return save(viewer, "segment")


def metrics() -> Path:
    viewer = new_viewer()
    ct = mv.load(CT)
    add(viewer, ct, "abdomen CT")
    organs = mv.segment(ct, model="ct-abdomen-organs-3d")
    add(viewer, organs, "organs")
    _, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Metrics")
    panel.labels_box.setCurrentText("organs")
    panel.image_box.setCurrentText("abdomen CT")
    panel.run()
    wait_until(lambda: panel.runner.run_button.isEnabled() and panel.table.rowCount() > 0)
    return save(viewer, "metrics")


def prompt() -> Path:
    viewer = new_viewer()
    ct = mv.load(CT)
    add(viewer, ct, "abdomen CT")
    liver = liver_reference()
    painted = np.zeros_like(np.asarray(liver.data))
    rows = np.flatnonzero(np.asarray(liver.data).reshape(liver.data.shape[0], -1).any(axis=1))
    for z in rows[[len(rows) // 4, len(rows) // 2, 3 * len(rows) // 4]]:
        painted[z] = np.asarray(liver.data)[z]
    add(viewer, liver.with_data(painted), "painted liver")
    _, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Prompt")
    panel.auto_update.setChecked(False)
    panel.annotations_box.setCurrentText("painted liver")
    run_and_wait(panel, 2, viewer)
    viewer.dims.set_current_step(0, int(rows[len(rows) // 2]) + 2)
    return save(viewer, "prompt")


def synthesize() -> Path:
    viewer = new_viewer()
    add(viewer, mv.load(BRAIN_T1), "T1")
    _, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Synthesize")
    panel.task_box.setCurrentIndex(panel.task_box.findData("t1-to-t2"))
    run_and_wait(panel, 1, viewer)
    viewer.canvas.grid.enabled = True
    viewer.dims.set_current_step(0, viewer.layers[0].data.shape[0] // 2)
    return save(viewer, "synthesize")


def finetune() -> Path:
    viewer = new_viewer()
    ct = mv.load(CT)
    add(viewer, ct, "abdomen CT")
    organs = mv.segment(ct, model="ct-abdomen-organs-3d")
    liver_id = next(k for k, v in organs.labels.items() if v == "liver")
    corrected = np.asarray(organs.data).copy()
    truth = np.asarray(liver_reference().data).astype(bool)
    picked = np.flatnonzero(truth.reshape(truth.shape[0], -1).any(axis=1))[[2, 6, 10]]
    for z in picked:  # the user fixed the liver on three slices
        corrected[z][corrected[z] == liver_id] = 0
        corrected[z][truth[z]] = liver_id
    add(viewer, organs.with_data(corrected), "organs corrected")
    _, panel = viewer.window.add_plugin_dock_widget(PLUGIN, "Fine-tune")
    panel.model_box.setCurrentIndex(max(0, panel.model_box.findData("ct-abdomen-organs-3d")))
    panel.image_box.setCurrentText("abdomen CT")
    panel.labels_box.setCurrentText("organs corrected")
    panel.slices_edit.setText(", ".join(str(int(z)) for z in picked))
    panel.runner.run_button.click()
    wait_until(lambda: panel.runner.run_button.isEnabled() and "step" not in panel.runner.status.text(), 900)
    viewer.dims.set_current_step(0, int(picked[1]))
    return save(viewer, "finetune")


PANELS = {"segment": segment, "metrics": metrics, "prompt": prompt, "synthesize": synthesize,
          "finetune": finetune}


def main(names: list[str]) -> int:
    if not DATA.is_dir():
        print(f"real data folder {DATA} is absent (set MEDVISION_DATA)", file=sys.stderr)
        return 2
    OUT.mkdir(parents=True, exist_ok=True)
    for name in names or list(PANELS):
        PANELS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
