"""The Synthesize panel: example pairs or a named task -> a new Image or Labels layer; user layers untouched."""

from __future__ import annotations

import napari_medvision as mv

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("napari")

from napari.layers import Labels, Layer  # noqa: E402

from napari_medvision._napari.layers import volume_to_layer  # noqa: E402
from napari_medvision._napari.widgets.synthesize import EXAMPLES, INPAINT, SynthesisWidget  # noqa: E402
from napari_medvision.synthetic import brain_mr  # noqa: E402

from mvg_helpers import tiny_mvg_model  # noqa: E402

pytestmark = pytest.mark.napari

import torch  # noqa: E402

torch.set_num_threads(1)
SCALE = (3.0, 1.5, 1.25)


def add_brain(viewer):
    """T1 and T2 of a small synthetic brain with its tissue labels, as loaded layers (anisotropic voxels)."""
    images, tissues = brain_mr(seed=1, shape=(8, 48, 40), contrasts=("T1", "T2"), spacing=SCALE)
    for vol, name in ((images["T1"], "t1"), (images["T2"], "t2"), (tissues, "tissues")):
        data, kwargs, kind = volume_to_layer(vol, name=name)
        viewer.add_layer(Layer.create(data, kwargs, kind))
    return {name: np.array(viewer.layers[name].data, copy=True) for name in ("t1", "t2", "tissues")}


def panel_for(viewer, source="t1", task=EXAMPLES, example=("t1", "t2")):
    tiny_mvg_model()
    panel = SynthesisWidget(viewer)
    panel.model_box.setCurrentIndex(panel.model_box.findData("tiny-mvg"))
    panel.device_box.setCurrentText("cpu")
    panel.image_box.setCurrentText(source)
    panel.task_box.setCurrentText(task)
    row = panel.pair_rows[0]
    row.image_box.setCurrentText(example[0])
    row.target_box.setCurrentText(example[1])
    return panel


def wait_idle(qtbot, panel):
    qtbot.waitUntil(lambda: panel.runner.run_button.isEnabled() and panel.runner._token is None, timeout=60_000)


def test_panel_lists_the_synthesis_models_and_every_named_task(make_napari_viewer):
    tiny_mvg_model()
    viewer = make_napari_viewer()
    add_brain(viewer)
    panel = SynthesisWidget(viewer)
    listed = [panel.model_box.itemData(i) for i in range(panel.model_box.count())]
    synthesis_models = [card.id for card in mv.models.available(task="synthesis")]
    assert "tiny-mvg" in listed and sorted(listed) == sorted(synthesis_models)  # no segmentation models
    tasks = [panel.task_box.itemText(i) for i in range(panel.task_box.count())]
    assert tasks[0] == EXAMPLES and {"t1-to-t2", "t1-to-flair", "denoise-ct", INPAINT} <= set(tasks)
    assert "t1-to-pd (simulated)" in tasks  # no real PD image: the panel says so
    assert panel.image_box.currentText() == "t1"
    assert [panel.pair_rows[0].target_box.itemText(i) for i in range(3)] == ["t1", "t2", "tissues"]
    panel.add_pair()
    assert len(panel.pair_rows) == 2 and panel.pair_rows[1].target_box.count() == 3
    panel.remove_pair()
    assert len(panel.pair_rows) == 1


def test_an_example_pair_gives_a_new_image_layer_on_the_source_grid(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    before = add_brain(viewer)
    panel = panel_for(viewer, source="t1", example=("t1", "t2"))
    panel.run()
    qtbot.waitUntil(lambda: len(viewer.layers) == 4, timeout=60_000)
    wait_idle(qtbot, panel)
    result = viewer.layers[-1]
    assert result.name == "t1 synthesized (as t2)" and not isinstance(result, Labels)
    assert result.data.shape == before["t1"].shape and np.issubdtype(result.data.dtype, np.floating)
    np.testing.assert_allclose(result.scale, SCALE)
    np.testing.assert_allclose(result.translate, viewer.layers["t1"].translate)
    assert panel.runner.status.text() == "done"
    for name, data in before.items():  # the inputs were only read
        np.testing.assert_array_equal(viewer.layers[name].data, data)

    panel.run()  # a second run never overwrites the first result
    qtbot.waitUntil(lambda: len(viewer.layers) == 5, timeout=60_000)
    assert viewer.layers[-2] is result


def test_label_map_examples_give_a_labels_layer_with_the_target_names(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    before = add_brain(viewer)
    panel = panel_for(viewer, source="t2", example=("t1", "tissues"))
    panel.add_pair()  # two pairs: their outputs are averaged
    panel.pair_rows[1].image_box.setCurrentText("t2")
    panel.pair_rows[1].target_box.setCurrentText("tissues")
    panel.run()
    qtbot.waitUntil(lambda: len(viewer.layers) == 4, timeout=60_000)
    result = viewer.layers[-1]
    assert isinstance(result, Labels) and result.name == "t2 synthesized (as tissues, tissues)"
    assert result.data.shape == before["t2"].shape
    np.testing.assert_allclose(result.scale, SCALE)
    tissue_names = dict(zip(viewer.layers["tissues"].features["index"], viewer.layers["tissues"].features["name"]))
    assert set(np.unique(result.data).tolist()) <= {0, *tissue_names}  # only values the example labels use
    names = dict(zip(result.features["index"], result.features["name"]))
    assert names and all(tissue_names[v] == name for v, name in names.items())  # e.g. 3 -> "white matter"
    np.testing.assert_array_equal(viewer.layers["tissues"].data, before["tissues"])


def test_inpaint_without_a_mask_is_a_notification_naming_the_layer(make_napari_viewer, qtbot, monkeypatch):
    viewer = make_napari_viewer()
    add_brain(viewer)
    viewer.layers.remove("tissues")
    panel = panel_for(viewer, task=INPAINT)
    assert panel.pages.currentIndex() == 1 and panel.mask_box.count() == 0
    shown = []
    monkeypatch.setattr("napari_medvision._napari.widgets._task_runner.show_problem", shown.append)
    panel.run()
    assert len(shown) == 1 and shown[0].startswith("t1: inpainting needs a Labels layer")
    assert panel.runner.worker is None and len(viewer.layers) == 2


def test_an_empty_mask_is_reported_by_the_task_with_the_layer_name(make_napari_viewer, qtbot, monkeypatch):
    viewer = make_napari_viewer()
    add_brain(viewer)
    viewer.add_labels(np.zeros((8, 48, 40), dtype=np.uint8), name="hole", scale=SCALE)
    panel = panel_for(viewer, task=INPAINT)
    panel.mask_box.setCurrentText("hole")
    shown = []
    monkeypatch.setattr("napari_medvision._napari.widgets._task_runner.show_problem", shown.append)
    panel.run()
    wait_idle(qtbot, panel)
    assert shown == ["t1: the inpainting mask is empty; paint the region to fill"]
    assert len(viewer.layers) == 4


def test_inpainting_changes_only_the_painted_region(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    before = add_brain(viewer)
    hole = np.zeros((8, 48, 40), dtype=np.uint8)
    hole[:, 20:28, 15:25] = 1
    viewer.add_labels(hole, name="hole", scale=SCALE)
    panel = panel_for(viewer, task=INPAINT)
    panel.mask_box.setCurrentText("hole")
    panel.run()
    qtbot.waitUntil(lambda: len(viewer.layers) == 5, timeout=60_000)
    result = viewer.layers[-1]
    assert result.name == "t1 synthesized (inpaint)"
    outside = hole == 0
    np.testing.assert_allclose(result.data[outside], before["t1"][outside], rtol=1e-5)
    assert not np.allclose(result.data[~outside], before["t1"][~outside])
    np.testing.assert_array_equal(viewer.layers["t1"].data, before["t1"])


def test_cancel_adds_no_layer(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    add_brain(viewer)
    panel = panel_for(viewer)
    panel.run()
    panel.runner.cancel()
    wait_idle(qtbot, panel)
    assert len(viewer.layers) == 3
    assert panel.runner.status.text() == "cancelled: nothing was changed"
