"""The Prompt panel: painted slices -> a new Labels layer that follows further painting; user layers untouched."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("napari")

from napari.layers import Layer  # noqa: E402

from napari_medvision._napari.layers import volume_to_layer  # noqa: E402
from napari_medvision._napari.widgets import prompt as prompt_panel  # noqa: E402
from napari_medvision._napari.widgets.prompt import EXAMPLES, PromptWidget  # noqa: E402
from napari_medvision.synthetic import ct_abdomen  # noqa: E402

pytestmark = pytest.mark.napari

import torch  # noqa: E402

torch.set_num_threads(1)
LIVER = 1


def add_ct_with_one_painted_slice(viewer):
    """A small synthetic CT (liver on slices 2-7), and a labels layer with the liver painted on slice 5 only."""
    image, labels = ct_abdomen(seed=0, shape=(8, 32, 24), spacing=(2.5, 2.0, 2.0))
    data, kwargs, kind = volume_to_layer(image, name="ct")
    viewer.add_layer(Layer.create(data, kwargs, kind))
    painted = np.zeros(labels.data.shape, dtype=np.uint8)
    painted[5] = labels.data[5] == LIVER
    viewer.add_labels(painted, name="my liver", scale=viewer.layers["ct"].scale)
    return image, labels


def wait_idle(qtbot, panel):
    qtbot.waitUntil(lambda: panel.runner.run_button.isEnabled() and panel.runner._token is None, timeout=120_000)


def test_painted_slices_give_a_new_layer_that_updates_when_one_more_slice_is_painted(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    _, truth = add_ct_with_one_painted_slice(viewer)
    mine = viewer.layers["my liver"]
    before = np.array(mine.data, copy=True)
    panel = PromptWidget(viewer)
    assert (panel.image_box.currentText(), panel.annotations_box.currentText()) == ("ct", "my liver")
    assert panel.model_box.currentData() is None  # intensities only unless a DINO model is chosen
    panel.device_box.setCurrentText("cpu")

    panel.run()
    qtbot.waitUntil(lambda: len(viewer.layers) == 3, timeout=120_000)
    wait_idle(qtbot, panel)
    result = viewer.layers[-1]
    assert result.name == "ct – prompt" and result.data.shape == truth.data.shape
    # one painted slice: nothing to hold out, and the status says how to get an estimate
    assert panel.runner.status.text().startswith("done (") and "paint one more slice" in panel.runner.status.text()
    np.testing.assert_array_equal(mine.data, before)  # the user's layer was only read
    first = np.array(result.data, copy=True)
    assert (first[5] == LIVER).sum() > 0.5 * (truth.data[5] == LIVER).sum()

    # The user paints the liver on slice 3 as well: after a pause the same result layer is updated,
    # first by a preview that redoes only the slices next to slice 3, then by the checked prompt.
    runs = []
    original_start = panel.runner.start
    panel.runner.start = lambda *a, **k: (runs.append(k), original_start(*a, **k))[1]
    mine.brush_size = 1
    ys, xs = np.nonzero(truth.data[3] == LIVER)
    for y, x in zip(ys, xs):
        mine.paint((3, y, x), LIVER, refresh=False)
    qtbot.waitUntil(lambda: len(runs) == 2, timeout=30_000)
    wait_idle(qtbot, panel)
    assert len(runs) == 2  # many brush dabs, one debounced update: the preview, then the checked prompt
    assert runs[0]["previous"].meta["annotated_slices"] == [5] and "previous" not in runs[1]
    assert np.count_nonzero(runs[0]["annotations"].data[3]) == len(ys)
    assert len(viewer.layers) == 3 and viewer.layers[-1] is result
    assert not np.array_equal(result.data, first)
    assert panel._last.meta["preview"] is False and panel._last.meta["annotated_slices"] == [3, 5]
    assert "expected Dice label 1 0." in panel.runner.status.text()  # two slices: a leave-one-out estimate


def test_a_result_the_user_corrects_is_not_overwritten(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    add_ct_with_one_painted_slice(viewer)
    panel = PromptWidget(viewer)
    panel.device_box.setCurrentText("cpu")
    panel.run()
    qtbot.waitUntil(lambda: len(viewer.layers) == 3, timeout=120_000)
    wait_idle(qtbot, panel)
    corrected = viewer.layers[-1]
    corrected.paint((5, 5, 5), 2)
    kept = np.array(corrected.data, copy=True)

    panel.run()
    qtbot.waitUntil(lambda: len(viewer.layers) == 4, timeout=120_000)
    np.testing.assert_array_equal(corrected.data, kept)


def test_example_pairs_and_a_dino_file_reach_the_prompt(make_napari_viewer, qtbot, monkeypatch, tmp_path):
    viewer = make_napari_viewer()
    image, truth = add_ct_with_one_painted_slice(viewer)
    data, kwargs, kind = volume_to_layer(truth, name="atlas labels")
    viewer.add_layer(Layer.create(data, kwargs, kind))
    panel = PromptWidget(viewer)
    panel.mode_box.setCurrentText(EXAMPLES)
    assert panel.pages.currentIndex() == 1
    panel.example_image_box.setCurrentText("ct")
    panel.example_labels_box.setCurrentText("atlas labels")
    panel.add_example()
    panel.add_example()  # the same pair twice counts once
    checkpoint = tmp_path / "dinov2_vits14_pretrain.pth"
    panel.add_model_file(checkpoint)
    seen = {}

    def recording_prompt(volume, examples=None, annotations=None, model=None, **rest):
        seen.update(examples=examples, annotations=annotations, model=model)
        return truth  # what the real prompt would return: a labels Volume on the image's grid

    monkeypatch.setattr(prompt_panel, "prompt", recording_prompt)
    panel.run()
    qtbot.waitUntil(lambda: len(viewer.layers) == 4, timeout=60_000)

    assert seen["model"] == str(checkpoint) and seen["annotations"] is None
    (example_image, example_mask), = seen["examples"]
    np.testing.assert_array_equal(example_image.data, image.data)
    assert example_mask.labels[LIVER] == "liver"
    np.testing.assert_array_equal(viewer.layers[-1].data, truth.data)
