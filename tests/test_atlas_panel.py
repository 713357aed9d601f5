"""The Segment panel's atlas row: which atlases a model uses, and a labelled layer pair stored as an atlas set."""

from __future__ import annotations

import pytest

pytest.importorskip("napari")

from napari.layers import Layer  # noqa: E402

from napari_medvision import atlases  # noqa: E402
from napari_medvision._napari.layers import volume_to_layer  # noqa: E402
from napari_medvision._napari.widgets.segment import SegmentWidget  # noqa: E402
from napari_medvision.synthetic import ct_abdomen  # noqa: E402

pytestmark = pytest.mark.napari


def test_panel_names_the_atlases_and_adds_a_set_from_layers(make_napari_viewer):
    viewer = make_napari_viewer()
    image, labels = ct_abdomen(seed=0, shape=(16, 48, 40), spacing=(2.5, 2.0, 2.0))
    for vol, name in ((image, "ct"), (labels, "organs")):
        data, kwargs, kind = volume_to_layer(vol, name=name)
        viewer.add_layer(Layer.create(data, kwargs, kind))
    panel = SegmentWidget(viewer)
    panel.model_box.setCurrentIndex(panel.model_box.findData("ct-abdomen-organs-3d"))
    assert "totalseg-ct-abdomen" in panel.atlas_controls.info.text()

    controls = panel.atlas_controls
    controls.image_box.setCurrentText("ct")
    controls.labels_box.setCurrentText("organs")
    controls.name.setText("panel-organs")
    controls.add_from_layers()
    assert "panel-organs" in atlases.names(), controls.message.text()
    assert panel.model_box.currentData() == "panel-organs"
    assert "atlas set alone" in controls.info.text()

    controls.add_from_layers()  # the same name again: said in the panel, nothing raised
    assert "exists already" in controls.message.text()
