"""The Segment panel: runs off the GUI thread and adds a new Labels layer, touching nothing else."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("napari")

from napari_medvision._napari.widgets.segment import SegmentWidget  # noqa: E402
from napari_medvision.synthetic import ct_abdomen  # noqa: E402
from napari_medvision._napari.layers import volume_to_layer  # noqa: E402
from napari.layers import Layer  # noqa: E402

from test_segment import tiny_ct_model  # noqa: E402

pytestmark = pytest.mark.napari


def add_ct(viewer):
    image, labels = ct_abdomen(seed=0, shape=(16, 48, 40), spacing=(2.5, 2.0, 2.0))
    for vol, name in ((image, "ct"), (labels, "truth")):
        data, kwargs, kind = volume_to_layer(vol, name=name)
        viewer.add_layer(Layer.create(data, kwargs, kind))
    return image


def test_panel_offers_models_for_the_layer_modality_and_adds_a_labels_layer(make_napari_viewer, qtbot):
    tiny_ct_model()
    viewer = make_napari_viewer()
    image = add_ct(viewer)
    truth_before = np.array(viewer.layers["truth"].data, copy=True)
    panel = SegmentWidget(viewer)
    assert panel.layer_box.currentText() == "ct"
    assert "tiny-ct" in [panel.model_box.itemData(i) for i in range(panel.model_box.count())]
    panel.model_box.setCurrentIndex(panel.model_box.findData("tiny-ct"))
    panel.device_box.setCurrentText("cpu")
    panel.run()
    qtbot.waitUntil(lambda: len(viewer.layers) == 3, timeout=60_000)
    result = viewer.layers[-1]
    assert result.name == "ct – tiny-ct" and result.data.shape == image.data.shape
    np.testing.assert_allclose(result.scale, viewer.layers["ct"].scale)
    np.testing.assert_array_equal(viewer.layers["truth"].data, truth_before)
    qtbot.waitUntil(lambda: panel.runner.run_button.isEnabled(), timeout=10_000)
    assert panel.runner.status.text() == "done"


def test_cancel_adds_nothing(make_napari_viewer, qtbot):
    tiny_ct_model()
    viewer = make_napari_viewer()
    add_ct(viewer)
    panel = SegmentWidget(viewer)
    panel.model_box.setCurrentIndex(panel.model_box.findData("tiny-ct"))
    panel.runner._token = None
    panel.run()
    panel.runner.cancel()
    qtbot.waitUntil(lambda: panel.runner.run_button.isEnabled(), timeout=60_000)
    assert len(viewer.layers) == 2
    assert "cancelled" in panel.runner.status.text() or panel.runner.status.text() == "done"


def test_a_failing_run_becomes_a_notification_not_a_crash(make_napari_viewer, qtbot, monkeypatch):
    viewer = make_napari_viewer()
    add_ct(viewer)
    panel = SegmentWidget(viewer)
    panel.model_box.addItem("missing", "no-such-model")
    panel.model_box.setCurrentIndex(panel.model_box.findData("no-such-model"))
    shown = []
    monkeypatch.setattr("napari_medvision._napari.widgets._task_runner.show_problem", shown.append)
    panel.run()
    qtbot.waitUntil(lambda: panel.runner.run_button.isEnabled(), timeout=60_000)
    assert shown and "no model with this id" in shown[0]
    assert len(viewer.layers) == 2
