"""Measuring label maps: volumes in mL from the voxel spacing, and agreement with a reference."""

from __future__ import annotations

import numpy as np
import pytest

import napari_medvision as mv
from napari_medvision.volume import Volume


def cube_labels(offset: int = 0) -> Volume:
    data = np.zeros((20, 30, 30), dtype=np.uint8)
    data[5:15, 5 + offset:15 + offset, 5:15] = 1      # 1000 voxels
    data[2:4, 20:25, 20:25] = 2                        # 50 voxels
    return Volume(data, spacing=(2.0, 0.5, 0.5), modality="CT", labels={1: "liver", 2: "spleen"})


def test_volumes_use_the_physical_spacing_and_mean_intensity_reads_the_image():
    labels = cube_labels()
    image = Volume(np.where(labels.data == 1, 60.0, -1000.0).astype(np.float32), spacing=labels.spacing, modality="CT")
    rows = mv.measure(labels, image=image)
    liver, spleen = rows
    assert (liver["name"], liver["voxels"], liver["volume_ml"]) == ("liver", 1000, 0.5)  # 1000 * 0.5 mm³
    assert spleen["voxels"] == 50 and spleen["volume_ml"] == 0.025
    assert liver["mean_intensity"] == 60.0 and spleen["mean_intensity"] == -1000.0


def test_dice_and_hd95_against_a_reference_shifted_by_two_voxels():
    moved, reference = cube_labels(offset=2), cube_labels()
    rows = {row["name"]: row for row in mv.measure(moved, reference=reference)}
    assert rows["liver"]["dice"] == pytest.approx(0.8)       # 800 of 1000 voxels overlap
    assert rows["liver"]["hd95_mm"] == pytest.approx(1.0)    # two voxels of 0.5 mm along y
    assert rows["spleen"]["dice"] == 1.0 and rows["spleen"]["hd95_mm"] == 0.0


def test_a_structure_only_in_the_reference_is_a_miss_not_left_out():
    labels, reference = cube_labels(), cube_labels()
    labels.data[labels.data == 2] = 0
    rows = {row["name"]: row for row in mv.measure(labels, reference=reference)}
    assert rows["spleen"]["voxels"] == 0 and rows["spleen"]["dice"] == 0.0 and rows["spleen"]["hd95_mm"] is None


def test_csv_has_a_header_and_one_line_per_label():
    text = mv.measure_csv(mv.measure(cube_labels(), reference=cube_labels()))
    lines = text.strip().splitlines()
    assert lines[0] == "label,name,voxels,volume_ml,dice,hd95_mm" and len(lines) == 3


def test_grids_that_differ_are_refused_by_name():
    other = Volume(np.zeros((20, 30, 31), np.uint8), spacing=(2.0, 0.5, 0.5))
    with pytest.raises(ValueError, match="reference: shape"):
        mv.measure(cube_labels(), reference=other)


def test_command_line_writes_the_csv(tmp_path):
    from napari_medvision.cli import main

    mv.save(cube_labels(), tmp_path / "labels.nii.gz")
    assert main(["measure", str(tmp_path / "labels.nii.gz"), "-o", str(tmp_path / "stats.csv")]) == 0
    assert (tmp_path / "stats.csv").read_text().splitlines()[1].startswith("1,liver,1000,0.5")


@pytest.mark.napari
def test_metrics_panel_in_a_real_viewer_fills_its_table_and_copies_csv(make_napari_viewer, qtbot):
    pytest.importorskip("napari")
    from napari.layers import Layer
    from qtpy.QtWidgets import QApplication

    from napari_medvision._napari.layers import volume_to_layer

    viewer = make_napari_viewer()
    for vol, name in ((cube_labels(offset=2), "prediction"), (cube_labels(), "manual")):
        data, kwargs, kind = volume_to_layer(vol, name=name)
        viewer.add_layer(Layer.create(data, kwargs, kind))
    _, panel = viewer.window.add_plugin_dock_widget("napari-medvision", "Metrics")
    panel.labels_box.setCurrentText("prediction")
    panel.reference_box.setCurrentText("manual")
    panel.run()
    qtbot.waitUntil(lambda: panel.runner.run_button.isEnabled() and panel.table.rowCount() == 2, timeout=30_000)
    assert panel.table.item(0, 1).text() == "liver"
    assert panel.runner.bar.value() == panel.runner.bar.maximum()
    panel.copy_button.click()
    assert QApplication.clipboard().text().startswith("label,name,voxels,volume_ml,dice,hd95_mm")
