"""The napari plugin: layers sit at the scan's true position, files open and save through napari.

Geometry tests build napari layers without a viewer; tests marked ``napari`` open a viewer
(run them under Xvfb: pytest-xvfb starts one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

napari = pytest.importorskip("napari")

from napari.layers import Image, Labels  # noqa: E402

from napari_medvision._napari.layers import (  # noqa: E402
    CT_WINDOW,
    adopt_geometry,
    boundaries_to_shapes,
    layer_to_volume,
    scan_metadata_for,
    volume_to_layer,
)
from napari_medvision.volume import Volume  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CT_FILE = "ct_mr_totalseg/example_ct_sm.nii.gz"
OBLIQUE_MR_FILE = "mri_brain_t1_itk/KmeansTest_T1UCharRaw.nii.gz"  # LSA: axes swapped and flipped


def _layer(vol: Volume):
    data, kwargs, layer_type = volume_to_layer(vol)
    return {"image": Image, "labels": Labels}[layer_type](data, **kwargs)


def _world(layer, index):
    """World position napari gives the voxel at file (Volume) ``index``: the layer may show it transposed."""
    axes = layer.metadata["medvision"]["layer_axes"]
    if axes is not None:
        lead = len(index) - len(axes)
        index = tuple(index[:lead]) + tuple(index[lead + a] for a in axes)
    return layer.data_to_world(index)


def _rotation(angles_deg) -> np.ndarray:
    from scipy.spatial.transform import Rotation

    return Rotation.from_euler("zyx", angles_deg, degrees=True).as_matrix()


def _indices(shape, n=20, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, s, size=n) for s in shape]


# --- geometry without a viewer -------------------------------------------------------------
def test_axis_aligned_volume_is_placed_by_scale_and_translate():
    vol = Volume(np.zeros((4, 5, 6), np.float32), spacing=(3.0, 0.8, 0.7), origin=(-50.0, 12.5, 3.0))
    data, kwargs, layer_type = volume_to_layer(vol)
    assert layer_type == "image" and "affine" not in kwargs
    np.testing.assert_allclose(kwargs["scale"], vol.spacing)
    np.testing.assert_allclose(kwargs["translate"], vol.origin)
    layer = Image(data, **kwargs)
    np.testing.assert_allclose(layer.data_to_world((3, 4, 5)), np.add(vol.origin, np.multiply(vol.spacing, (3, 4, 5))))


@pytest.mark.parametrize("angles", [(30, -20, 10), (90, 0, 180), (0, 0, 0.5)])
def test_rotated_volume_voxels_land_where_volume_says(angles):
    vol = Volume(np.zeros((7, 8, 9), np.int16), spacing=(2.5, 0.9, 1.1), origin=(10.0, -120.0, 33.0),
                 direction=_rotation(angles))
    layer = _layer(vol)
    for index in zip(*_indices(vol.spatial_shape)):
        expected = vol.affine() @ np.append(index, 1.0)
        np.testing.assert_allclose(_world(layer, index), expected[:3], atol=1e-9)


def test_permuted_axes_are_shown_transposed_so_napari_slices_along_world_axes():
    # columns: array axis 0 runs along world axis 1, axis 1 along world axis 2, axis 2 along world axis 0
    sagittal = np.array([[0.0, 0, 1], [-1, 0, 0], [0, -1, 0]])
    vol = Volume(np.arange(24, dtype=np.int16).reshape(2, 3, 4), spacing=(5.0, 1.0, 0.5), direction=sagittal)
    layer = _layer(vol)
    assert layer.data.shape == (4, 2, 3)
    linear = layer.affine.affine_matrix[:3, :3]
    np.testing.assert_allclose(np.abs(linear), np.eye(3))  # axis-aligned: napari's slicing is exact
    np.testing.assert_allclose(layer.scale, (0.5, 5.0, 1.0))
    back = layer_to_volume(*_as_tuple(layer))
    np.testing.assert_array_equal(back.data, vol.data)
    assert back.same_grid(vol, tol=1e-12)


def test_sheared_grid_of_tilted_gantry_keeps_its_geometry():
    direction = np.eye(3)
    direction[:, 0] = [np.cos(np.radians(20)), np.sin(np.radians(20)), 0.0]  # slice axis tilted 20 degrees
    vol = Volume(np.zeros((5, 6, 7), np.int16), spacing=(5.0, 0.7, 0.7), origin=(1.0, 2.0, 3.0), direction=direction)
    layer = _layer(vol)
    for index in zip(*_indices(vol.spatial_shape)):
        np.testing.assert_allclose(layer.data_to_world(index), (vol.affine() @ np.append(index, 1.0))[:3], atol=1e-9)


def test_series_of_volumes_gets_unit_step_on_its_time_axis():
    vol = Volume(np.zeros((3, 4, 5, 6), np.float32), spacing=(2.0, 1.0, 0.5), origin=(5.0, 6.0, 7.0),
                 direction=_rotation((15, 0, 0)))
    layer = _layer(vol)
    assert layer.scale[0] == 1.0
    np.testing.assert_allclose(layer.data_to_world((2, 1, 2, 3))[1:], (vol.affine() @ [1, 2, 3, 1])[:3], atol=1e-9)
    assert layer.data_to_world((2, 1, 2, 3))[0] == pytest.approx(2.0)


def test_labels_layer_made_without_metadata_saves_on_the_same_grid():
    """A user's labels layer carries only napari's transform; it must still map to the scan's grid."""
    scan = Volume(np.zeros((6, 7, 8), np.int16), spacing=(3.0, 0.6, 0.6), origin=(-4.0, 100.0, -7.5),
                  direction=_rotation((12, -20, 15)), modality="CT")
    image = _layer(scan)
    painted = Labels(np.zeros(scan.spatial_shape, np.uint8), scale=image.scale, translate=image.translate,
                     affine=image.affine)
    painted.data[2, 3, 4] = 5
    vol = layer_to_volume(*_as_tuple(painted))
    assert vol.same_grid(scan, tol=1e-6)
    assert vol.labels == {} and vol.data.dtype == np.uint8 and vol.data[2, 3, 4] == 5


def test_labels_drawn_on_a_transposed_scan_find_the_scan_and_save_in_its_axis_order():
    scan = Volume(np.zeros((6, 7, 8), np.int16), spacing=(3.0, 0.6, 0.5), origin=(-4.0, 100.0, -7.5),
                  direction=_rotation((12, -80, 75)), modality="MR")
    image = _layer(scan)
    assert image.metadata["medvision"]["layer_axes"] is not None
    painted = Labels(np.zeros(image.data.shape, np.uint8), scale=image.scale, translate=image.translate,
                     affine=image.affine)
    other = _layer(Volume(np.zeros((6, 7, 8), np.int16), spacing=(1, 1, 1)))
    data, meta, layer_type = _as_tuple(painted)
    stored = scan_metadata_for(data.shape, meta, [other, image])
    assert stored is image.metadata["medvision"]
    painted.data[1, 2, 3] = 7
    vol = layer_to_volume(painted.data, {**meta, "metadata": {"medvision": stored}}, "labels")
    assert vol.same_grid(scan, tol=1e-12) and vol.data.shape == scan.data.shape
    (voxel,) = np.argwhere(vol.data == 7)
    np.testing.assert_allclose(vol.affine() @ np.append(voxel, 1), np.append(painted.data_to_world((1, 2, 3)), 1))


def test_loaded_geometry_survives_layer_round_trip_bit_for_bit():
    labels = Volume(np.arange(60, dtype=np.uint16).reshape(3, 4, 5) % 4, spacing=(1.5, 0.25, 0.3),
                    origin=(7.0, -8.0, 9.0), direction=_rotation((5, 5, 5)), modality="MR",
                    labels={1: "grey matter", 2: "white matter", 3: "csf"})
    layer = _layer(labels)
    assert isinstance(layer, Labels)
    assert dict(zip(layer.features["index"], layer.features["name"])) == labels.labels
    back = layer_to_volume(*_as_tuple(layer))
    assert back.same_grid(labels, tol=1e-9) and back.labels == labels.labels
    np.testing.assert_array_equal(back.data, labels.data)


def test_float_or_bool_masks_are_saved_as_integers():
    mask = Labels(np.zeros((4, 4), np.int8))
    data, meta, layer_type = _as_tuple(mask)
    vol = layer_to_volume((np.arange(16.0).reshape(4, 4) > 7), meta, layer_type)
    assert vol.data.dtype == np.uint8 and vol.data.sum() == 8
    vol = layer_to_volume(np.full((4, 4), 300.0), meta, layer_type)
    assert vol.data.dtype == np.uint16 and int(vol.data.max()) == 300


def test_ct_in_hounsfield_units_opens_in_soft_tissue_window():
    hu = np.random.default_rng(0).integers(-1000, 1500, size=(4, 30, 30)).astype(np.int16)
    _, kwargs, _ = volume_to_layer(Volume(hu, spacing=(1, 1, 1), modality="CT"))
    assert tuple(kwargs["contrast_limits"]) == CT_WINDOW and kwargs["colormap"] == "gray"
    mr = np.random.default_rng(1).normal(300, 50, size=(4, 30, 30)).astype(np.float32)
    _, kwargs, _ = volume_to_layer(Volume(mr, spacing=(1, 1, 1), modality="MR"))
    lo, hi = kwargs["contrast_limits"]
    assert lo == pytest.approx(np.percentile(mr, 0.5), rel=1e-4) and hi == pytest.approx(np.percentile(mr, 99.5), rel=1e-4)


def test_colour_photo_is_an_rgb_layer():
    photo = np.random.default_rng(0).integers(0, 255, size=(20, 30, 3)).astype(np.uint8)
    layer = _layer(Volume(photo, spacing=(0.01, 0.01), modality="fundus", rgb=True))
    assert layer.rgb and layer.data.shape == (20, 30, 3)
    np.testing.assert_allclose(layer.scale, (0.01, 0.01))


def test_pyramid_opens_as_multiscale_image():
    levels = [np.zeros((8, 64, 64), np.uint8), np.zeros((8, 32, 32), np.uint8), np.zeros((8, 16, 16), np.uint8)]
    layer = _layer(Volume(levels[0], spacing=(2, 0.5, 0.5), meta={"multiscale": levels}))
    assert layer.multiscale and len(layer.data) == 3
    np.testing.assert_allclose(layer.scale, (2, 0.5, 0.5))


def test_oct_boundaries_become_one_path_per_bscan_and_layer():
    rows = {"ILM": np.array([[10.0, 11, 12, 13], [9, 9, 10, 10]]), "RPE": np.array([[30.0, 31, np.nan, 33], [30, 30, 30, 30]])}
    vol = Volume(np.zeros((2, 50, 4), np.uint8), spacing=(0.1, 0.004, 0.01), modality="OCT", labels={1: "retina"},
                 meta={"boundaries": rows})
    paths, kwargs, layer_type = boundaries_to_shapes(vol)
    assert layer_type == "shapes" and len(paths) == 4 and kwargs["features"]["name"].count("RPE") == 2
    np.testing.assert_array_equal(paths[2], [[0, 30, 0], [0, 31, 1], [0, 33, 3]])  # the NaN column is skipped


def test_adopt_geometry_puts_painted_labels_on_the_scan_grid():
    scan = Volume(np.zeros((3, 4, 5), np.int16), spacing=(2, 1, 1), origin=(1, 2, 3), direction=_rotation((0, 90, 0)))
    image = _layer(scan)
    drawn = Labels(np.zeros(image.data.shape, np.uint8))
    adopt_geometry(drawn, image)
    assert drawn.metadata["medvision"]["spacing"] == list(scan.spacing)
    assert layer_to_volume(*_as_tuple(drawn)).same_grid(scan, tol=1e-9)
    with pytest.raises(ValueError, match="do not share a grid"):
        adopt_geometry(Labels(np.zeros((3, 4, 6, 2), np.uint8)), image)


def _as_tuple(layer):
    data, meta, layer_type = layer.as_layer_data_tuple()
    return data, meta, layer_type


# --- through a viewer ----------------------------------------------------------------------
@pytest.fixture
def plugin_viewer(make_napari_viewer):
    """A viewer with napari-medvision registered (installed, or straight from napari.yaml)."""
    from npe2 import PluginManager, PluginManifest

    pm = PluginManager.instance()
    pm.discover()
    if "napari-medvision" not in {m.name for m in pm.iter_manifests()}:
        try:
            pm.register(PluginManifest.from_file(REPO / "napari.yaml"))
        except Exception:
            # An earlier viewer in this session already gave napari our commands; the manifest
            # itself is registered all the same.
            if "napari-medvision" not in {m.name for m in pm.iter_manifests()}:
                raise
    return make_napari_viewer(show=True)


def _not_blank(viewer) -> np.ndarray:
    shot = viewer.screenshot(canvas_only=True, flash=False)
    rgb = np.asarray(shot)[..., :3].astype(float)
    assert rgb.max() > 40, "screenshot is black"
    assert rgb.std() > 8, f"screenshot is flat (std {rgb.std():.1f})"
    return rgb


def _errors():
    from napari.utils.notifications import NotificationSeverity, notification_manager

    return [n.message for n in notification_manager.records if n.severity == NotificationSeverity.ERROR]


@pytest.mark.napari
@pytest.mark.parametrize("key", ["ct", "mr", "oct", "fundus"])
def test_every_sample_opens_with_its_labels_and_shows_something(plugin_viewer, key):
    viewer = plugin_viewer
    viewer.open_sample("napari-medvision", key)
    kinds = [type(layer).__name__ for layer in viewer.layers]
    assert "Image" in kinds and "Labels" in kinds
    assert all("(synthetic)" in layer.name for layer in viewer.layers)
    for layer in viewer.layers:
        assert "medvision" in layer.metadata
    _not_blank(viewer)


@pytest.mark.napari
def test_real_ct_opens_at_its_true_spacing_and_position(plugin_viewer, data_dir):
    import nibabel as nib

    path = data_dir / CT_FILE
    (layer,) = plugin_viewer.open(path, plugin="napari-medvision")
    header = nib.load(path)
    np.testing.assert_allclose(layer.scale, header.header.get_zooms()[::-1])
    assert layer.name == "example_ct_sm" and tuple(layer.contrast_limits) == CT_WINDOW
    _check_world_matches_nibabel(layer, header)
    _not_blank(plugin_viewer)


@pytest.mark.napari
def test_oblique_mr_voxels_land_where_nibabel_puts_them(plugin_viewer, data_dir):
    import nibabel as nib

    path = data_dir / OBLIQUE_MR_FILE
    (layer,) = plugin_viewer.open(path, plugin="napari-medvision")
    _check_world_matches_nibabel(layer, nib.load(path))


def _check_world_matches_nibabel(layer, nifti):
    """napari world (reversed LPS) of random voxels equals nibabel's RAS, converted by hand."""
    for k, j, i in zip(*_indices(nifti.shape[::-1], n=10)):
        r, a, s = (nifti.affine @ [i, j, k, 1])[:3]
        np.testing.assert_allclose(_world(layer, (k, j, i)), (s, -a, -r), atol=1e-4)


@pytest.mark.napari
def test_text_file_named_like_nifti_gives_one_notification_and_viewer_keeps_working(plugin_viewer, tmp_path):
    bad = tmp_path / "x.nii.gz"
    bad.write_text("this is not an image\n")
    before = len(_errors())
    added = plugin_viewer.open(bad, plugin="napari-medvision")
    assert added == [] and len(plugin_viewer.layers) == 0
    new = _errors()[before:]
    assert len(new) == 1 and "x.nii.gz" in new[0], new
    plugin_viewer.add_image(np.random.default_rng(0).random((32, 32)))
    _not_blank(plugin_viewer)


@pytest.mark.napari
@pytest.mark.parametrize("scan_file, suffix", [(CT_FILE, ".nii.gz"), (OBLIQUE_MR_FILE, ".nii.gz"), (CT_FILE, ".ome.zarr")])
def test_labels_painted_on_a_scan_save_through_plugin_and_reload_identically(plugin_viewer, data_dir, tmp_path,
                                                                             scan_file, suffix):
    import nibabel as nib

    viewer = plugin_viewer
    (scan,) = viewer.open(data_dir / scan_file, plugin="napari-medvision")
    viewer.layers.selection.active = scan
    viewer._new_labels()  # what the "new labels layer" button does: napari copies the transform
    painted = viewer.layers[-1]
    assert isinstance(painted, Labels) and not painted.metadata
    painted.data[10:14, 40:60, 20:30] = 3
    painted.data[20, 5, 5] = 1
    out = tmp_path / f"painted{suffix}"
    written = painted.save(str(out), plugin="napari-medvision")
    assert written == [str(out)]
    if suffix == ".nii.gz":  # same grid and voxel order as the scan file, checked by nibabel itself
        original, saved = nib.load(data_dir / scan_file), nib.load(out)
        assert saved.shape == original.shape and np.issubdtype(saved.get_data_dtype(), np.integer)
        np.testing.assert_allclose(saved.affine, original.affine, atol=1e-5)
    (reloaded,) = viewer.open(out, plugin="napari-medvision")
    np.testing.assert_array_equal(np.asarray(reloaded.data), painted.data)
    for key in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(reloaded.metadata["medvision"][key], scan.metadata["medvision"][key], atol=1e-5)
    np.testing.assert_allclose(reloaded.scale, scan.scale)
    np.testing.assert_allclose(reloaded.data_to_world((3, 4, 5)), scan.data_to_world((3, 4, 5)), atol=1e-5)
    if suffix == ".ome.zarr":  # the format keeps the label flag: it comes back as a labels layer
        assert isinstance(reloaded, Labels)


@pytest.mark.napari
def test_folder_with_two_series_asks_which_and_opens_the_chosen_one(plugin_viewer, data_dir, monkeypatch):
    from qtpy.QtWidgets import QInputDialog

    offered = []

    def pick_multiframe(parent, title, label, items, current, editable):
        offered.extend(items)
        return next(i for i in items if "multi-frame" in i), True

    monkeypatch.setattr(QInputDialog, "getItem", staticmethod(pick_multiframe))
    (layer,) = plugin_viewer.open(data_dir / "dicom_ct_phantom", plugin="napari-medvision")
    assert len(offered) == 2 and layer.data.shape == (7, 512, 512)
    assert layer.metadata["medvision"]["modality"] == "CT"

    monkeypatch.setattr(QInputDialog, "getItem", staticmethod(lambda *a: ("", False)))  # the user cancels
    before = len(_errors())
    assert plugin_viewer.open(data_dir / "dicom_ct_phantom", plugin="napari-medvision") == []
    assert _errors()[before:] == []


def test_without_a_gui_several_series_become_one_notification(data_dir, monkeypatch):
    from napari_medvision._napari import reader

    shown = []
    monkeypatch.setattr(reader, "show_problem", shown.append)
    monkeypatch.setattr(reader, "qt_app_running", lambda: False)
    assert reader.read(str(data_dir / "dicom_ct_phantom")) == reader.NOTHING_TO_SHOW
    assert len(shown) == 1 and "dicom_ct_phantom" in shown[0] and "series=" in shown[0]


def test_reader_takes_medical_files_and_leaves_others_to_napari(data_dir, tmp_path):
    from napari_medvision._napari.reader import get_reader

    assert get_reader(str(data_dir / CT_FILE)) is not None
    assert get_reader(str(data_dir / "dicom_ct_phantom")) is not None  # a DICOM folder
    assert get_reader(str(tmp_path / "x.nii.gz")) is not None  # even a broken one: we explain the problem
    assert get_reader(str(data_dir / "fundus_drive_train" / "images")) is None  # a folder of photos
    (tmp_path / "notes.xml").write_text("<notes><todo>buy milk</todo></notes>")
    assert get_reader(str(tmp_path / "notes.xml")) is None
    assert get_reader(str(tmp_path / "table.csv")) is None


@pytest.mark.napari
def test_oct_export_opens_with_layer_labels_and_boundary_paths(plugin_viewer, data_dir):
    folder = data_dir / "oct_heyex_synthetic" / "heyex_xml" / "test_volume"
    image, labels, boundaries = plugin_viewer.open(folder, plugin="napari-medvision")
    assert (type(image).__name__, type(labels).__name__, type(boundaries).__name__) == ("Image", "Labels", "Shapes")
    assert "ILM-RNFL" in list(labels.features["name"])
    n_bscans = image.data.shape[0]
    assert len(boundaries.data) % n_bscans == 0 and len(boundaries.data) >= n_bscans
    np.testing.assert_allclose(boundaries.scale, labels.scale)
    _not_blank(plugin_viewer)
