"""The Fine-tune panel: tracks the painted slices, trains off the GUI thread, applies the new model."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("napari")

from napari.layers import Layer  # noqa: E402

from napari_medvision._napari.layers import volume_to_layer  # noqa: E402
from napari_medvision._napari.widgets.finetune import FinetuneWidget, Refusal, painted_slices  # noqa: E402

from test_finetune import corrected_ct  # noqa: E402
from test_segment import tiny_ct_model  # noqa: E402

pytestmark = pytest.mark.napari


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test of this file runs torch on one thread (conftest)."""


def viewer_with_corrections(make_napari_viewer):
    """A viewer holding the CT and an empty labels layer on its grid, as before the user paints."""
    viewer = make_napari_viewer()
    image, corrected = corrected_ct()
    data, kwargs, kind = volume_to_layer(image, name="ct")
    viewer.add_layer(Layer.create(data, kwargs, kind))
    data, kwargs, kind = volume_to_layer(corrected.with_data(np.zeros_like(corrected.data)), name="corrections")
    viewer.add_layer(Layer.create(data, kwargs, kind))
    return viewer, corrected


def paint_two_slices(viewer, corrected):
    """The user paints liver on slices 6 and 12 (a brush stroke, then a programmatic edit)."""
    layer = viewer.layers["corrections"]
    layer.brush_size = 3
    layer.paint((6, 24, 20), 1)
    truth = np.asarray(corrected.data[12])
    where = np.nonzero(truth == 1)
    layer.data_setitem((np.full(where[0].size, 12), *where), 1)
    return layer


def test_painted_slices_are_tracked_and_can_be_marked_by_hand(make_napari_viewer):
    tiny_ct_model()
    viewer, corrected = viewer_with_corrections(make_napari_viewer)
    panel = FinetuneWidget(viewer)
    assert panel.labels_box.currentText() == "corrections" and panel.image_box.currentText() == "ct"
    layer = paint_two_slices(viewer, corrected)
    assert panel.corrected_slices() == [6, 12]
    assert sorted(np.flatnonzero(np.asarray(layer.data).reshape(20, -1).any(1))) == [6, 12]  # independent check
    viewer.dims.set_current_step(0, 15)
    panel.mark_current_slice()
    assert panel.slices_edit.text() == "6, 12, 15"
    panel.slices_edit.setText("3; 9,x")
    with pytest.raises(ValueError, match="numbers separated by commas"):
        panel.corrected_slices()


def test_painted_slices_of_a_masked_stroke():
    from collections import namedtuple

    Atom = namedtuple("Atom", "slice_key mask old_values new_value")
    mask = np.zeros((3, 4, 4), bool)
    mask[[0, 2], 1, 1] = True
    atoms = [Atom((slice(5, 8), slice(0, 4), slice(0, 4)), mask, None, 1),
             ((np.array([1, 1, 9]), np.array([0, 1, 2]), np.array([0, 0, 0])), None, 2)]
    assert painted_slices(atoms) == {5, 7, 1, 9}


def test_panel_trains_plots_and_applies_the_new_model(make_napari_viewer, qtbot):
    tiny_ct_model()
    viewer, corrected = viewer_with_corrections(make_napari_viewer)
    panel = FinetuneWidget(viewer)
    layer = paint_two_slices(viewer, corrected)
    layer.data_setitem((np.full(3, 9), np.array([20, 21, 22]), np.array([20, 20, 20])), 1)
    assert panel.corrected_slices() == [6, 9, 12]
    panel.model_box.setCurrentIndex(panel.model_box.findData("tiny-ct"))
    panel.device_box.setCurrentText("cpu")
    panel.steps.setValue(4)
    panel.guard.setChecked(False)   # an untrained test model: keep the result whatever it scores
    panel.new_id.setText("tiny-ct-panel")
    panel.run()
    qtbot.waitUntil(lambda: panel.card is not None, timeout=60_000)
    assert panel.card.id == "tiny-ct-panel" and panel.card.parent == "tiny-ct"
    assert panel.card.training["data"]["volumes"][0]["corrected_slices"] == [6, 9, 12]
    qtbot.waitUntil(lambda: panel.runner.run_button.isEnabled(), timeout=10_000)
    assert panel.plot.points and panel.plot.points[-1]["step"] == 4
    assert not panel.plot.grab().isNull()  # the curves draw
    assert panel.model_box.currentData() == "tiny-ct-panel"
    assert "tiny-ct-panel" in panel.result.text() and str(panel.card.weights_path) in panel.result.text()
    assert len(viewer.layers) == 2
    panel.apply_button.click()
    qtbot.waitUntil(lambda: len(viewer.layers) == 3, timeout=60_000)
    result = viewer.layers[-1]
    assert result.name == "ct – tiny-ct-panel" and result.data.shape == (20, 48, 40)
    np.testing.assert_allclose(result.scale, viewer.layers["ct"].scale)


def test_cancel_adds_no_model_and_no_layer(make_napari_viewer, qtbot):
    import napari_medvision as mv

    tiny_ct_model()
    viewer, corrected = viewer_with_corrections(make_napari_viewer)
    panel = FinetuneWidget(viewer)
    paint_two_slices(viewer, corrected)
    panel.model_box.setCurrentIndex(panel.model_box.findData("tiny-ct"))
    panel.device_box.setCurrentText("cpu")
    panel.steps.setValue(5000)
    panel.new_id.setText("tiny-ct-cancelled")
    panel.run()
    qtbot.waitUntil(lambda: "loss" in panel.runner.status.text(), timeout=60_000)
    panel.runner.cancel()
    qtbot.waitUntil(lambda: panel.runner.run_button.isEnabled(), timeout=60_000)
    assert "cancelled" in panel.runner.status.text()
    assert panel.card is None and not panel.apply_button.isEnabled()
    assert len(viewer.layers) == 2
    assert "tiny-ct-cancelled" not in [c.id for c in mv.models.available()]


def test_panel_trains_a_new_prompting_head_and_applies_it(make_napari_viewer, qtbot):
    """No model needed: the painted slices alone train a pixel classifier, listed and applied like any model."""
    from napari_medvision.tasks.prompting.head import NEW_HEAD

    viewer, corrected = viewer_with_corrections(make_napari_viewer)
    panel = FinetuneWidget(viewer)
    layer = paint_two_slices(viewer, corrected)
    layer.data_setitem((np.full(3, 9), np.array([20, 21, 22]), np.array([20, 20, 20])), 1)
    panel.model_box.setCurrentIndex(panel.model_box.findData(NEW_HEAD))
    panel.device_box.setCurrentText("cpu")
    panel.steps.setValue(50)
    panel.new_id.setText("liver-head")
    panel.run()
    qtbot.waitUntil(lambda: panel.card is not None, timeout=60_000)
    assert panel.card.architecture["name"] == "appearance-head" and panel.card.parent is None
    assert panel.model_box.currentData() == "liver-head"
    qtbot.waitUntil(lambda: panel.runner.run_button.isEnabled(), timeout=10_000)
    panel.apply_button.click()
    qtbot.waitUntil(lambda: len(viewer.layers) == 3, timeout=60_000)
    result = viewer.layers[-1]
    assert result.data.shape == (20, 48, 40)
    liver = np.asarray(corrected.data) == 1
    predicted = np.asarray(result.data) == 1
    assert 2 * (liver & predicted).sum() / (liver.sum() + predicted.sum()) > 0.5


def test_the_labels_are_copied_when_the_run_starts_and_a_refusal_keeps_the_parent(make_napari_viewer, qtbot):
    tiny_ct_model()
    viewer, corrected = viewer_with_corrections(make_napari_viewer)
    panel = FinetuneWidget(viewer)
    layer = paint_two_slices(viewer, corrected)
    seen = {}

    def spy(**kwargs):
        seen["labels"] = kwargs["labels"][0].data
        return Refusal("the fine-tuned model was not saved and tiny-ct stays: liver 0.5 -> 0.4")

    panel._finetune_or_refusal = spy
    panel.model_box.setCurrentIndex(panel.model_box.findData("tiny-ct"))
    panel.run()
    qtbot.waitUntil(lambda: panel.runner.run_button.isEnabled() and "labels" in seen, timeout=30_000)
    assert seen["labels"] is not layer.data and not np.shares_memory(seen["labels"], layer.data)
    assert "Not saved" in panel.result.text() and "tiny-ct stays" in panel.result.text()
    assert panel.model_box.currentData() == "tiny-ct" and panel.card is None


def test_every_open_panel_lists_a_new_model_at_once_and_keeps_the_choice(make_napari_viewer, qtbot):
    import napari_medvision as mv
    from napari_medvision._napari.widgets.segment import SegmentWidget

    tiny_ct_model()
    viewer, _ = viewer_with_corrections(make_napari_viewer)
    segment_panel, finetune_panel = SegmentWidget(viewer), FinetuneWidget(viewer)
    segment_panel.model_box.setCurrentIndex(segment_panel.model_box.findData("tiny-ct"))
    tiny_ct_model("tiny-ct-other")                      # saved elsewhere (a script, another panel)
    qtbot.waitUntil(lambda: segment_panel.model_box.findData("tiny-ct-other") >= 0, timeout=5_000)
    assert finetune_panel.model_box.findData("tiny-ct-other") >= 0
    assert segment_panel.model_box.currentData() == "tiny-ct"   # the user's choice stays
    mv.models.remove_model("tiny-ct-other")
    qtbot.waitUntil(lambda: segment_panel.model_box.findData("tiny-ct-other") < 0, timeout=5_000)
