"""Load -> save -> load keeps the array bit for bit and the geometry to 1e-6 mm."""

from __future__ import annotations

import numpy as np
import pytest

import napari_medvision as mv
from napari_medvision import Volume


def oblique_direction() -> np.ndarray:
    """A proper rotation about two axes, as an oblique MR acquisition has."""
    a, b = np.deg2rad(20.0), np.deg2rad(-35.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rx @ rz


def ct_volume(dtype=np.int16) -> Volume:
    rng = np.random.default_rng(0)
    data = rng.integers(-1024, 2000, size=(7, 12, 10)).astype(dtype)
    return Volume(data, spacing=(2.5, 0.75, 0.8), origin=(-120.25, 30.5, -80.125),
                  direction=oblique_direction(), modality="CT")


def assert_same(a: Volume, b: Volume, tol: float = 1e-6) -> None:
    assert np.asarray(a.data).dtype == np.asarray(b.data).dtype
    np.testing.assert_array_equal(np.asarray(a.data), np.asarray(b.data))
    np.testing.assert_allclose(a.spacing, b.spacing, atol=tol)
    np.testing.assert_allclose(a.origin, b.origin, atol=tol)
    np.testing.assert_allclose(a.direction, b.direction, atol=tol)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".ome.zarr", ".zarr", ".tif"])
def test_exact_formats_keep_array_and_geometry(tmp_path, suffix):
    vol = ct_volume()
    path = mv.save(vol, tmp_path / f"ct{suffix}")
    back = mv.load(path)
    assert_same(vol, back)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_after_first_load_is_exact(tmp_path, suffix):
    # NIfTI stores the affine in float32, so the first save rounds geometry (to ~1e-5 mm);
    # from then on load -> save -> load is exact.
    first = mv.load(mv.save(ct_volume(), tmp_path / f"a{suffix}"))
    assert_same(ct_volume(), first, tol=1e-4)
    second = mv.load(mv.save(first, tmp_path / f"b{suffix}"))
    assert_same(first, second)


@pytest.mark.parametrize("suffix", [".ome.zarr", ".nii.gz", ".nrrd", ".mha", ".tif"])
def test_label_maps_keep_their_names(tmp_path, suffix):
    labels = Volume(np.arange(60, dtype=np.uint8).reshape(3, 4, 5) % 3, spacing=(1, 2, 3),
                    labels={1: "liver", 2: "spleen"}, modality="CT")
    back = mv.load(mv.save(labels, tmp_path / f"seg{suffix}"))
    assert back.labels == {1: "liver", 2: "spleen"}
    assert_same(labels, back, tol=1e-4)


def test_float_and_4d_series_round_trip_through_nifti(tmp_path):
    rng = np.random.default_rng(1)
    series = Volume(rng.normal(size=(3, 4, 5, 6)).astype(np.float32), spacing=(3.0, 2.0, 2.0),
                    origin=(10.0, -20.0, 30.0), meta={"time_step": 2.5})
    first = mv.load(mv.save(series, tmp_path / "fmri.nii.gz"))
    assert first.data.shape == (3, 4, 5, 6) and first.n_leading == 1
    assert first.meta["time_step"] == pytest.approx(2.5)
    assert_same(series, first, tol=1e-4)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_colour_photo_round_trip(tmp_path, suffix):
    rng = np.random.default_rng(2)
    photo = Volume(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8), spacing=(0.01, 0.01), rgb=True,
                   modality="fundus")
    back = mv.load(mv.save(photo, tmp_path / f"eye{suffix}"))
    assert back.rgb
    assert_same(photo, back)


def test_large_image_becomes_a_lazy_multiscale_pyramid(tmp_path):
    vol = Volume(np.random.default_rng(3).integers(0, 4000, (2, 1100, 1030), dtype=np.uint16),
                 spacing=(1.0, 0.5, 0.5), origin=(0.0, 5.0, 7.0))
    back = mv.load(mv.save(vol, tmp_path / "big.ome.zarr"))
    levels = back.meta["multiscale"]
    assert [lv.shape for lv in levels] == [(2, 1100, 1030), (2, 550, 515), (2, 275, 257)]
    assert type(back.data).__module__.startswith("dask")
    assert_same(vol, Volume(back.data.compute(), back.spacing, back.origin, back.direction))


def test_every_format_pair_that_holds_geometry_agrees(tmp_path):
    start = mv.load(mv.save(ct_volume(), tmp_path / "start.nii.gz"))
    for first in (".nrrd", ".mha", ".ome.zarr", ".tif", ".nii.gz"):
        via = mv.load(mv.save(start, tmp_path / f"via{first}"))
        for second in (".nrrd", ".mha", ".ome.zarr", ".nii.gz"):
            back = mv.load(mv.save(via, tmp_path / f"{first[1:]}_to{second}"))
            assert_same(start, back)


def test_failed_save_leaves_the_existing_file_untouched(tmp_path):
    good = mv.save(ct_volume(), tmp_path / "scan.nrrd")
    before = good.read_bytes()
    bad = Volume(np.zeros((2, 3, 4, 5, 6)), spacing=(1, 1, 1))  # 5D cannot go to NRRD here
    with pytest.raises(mv.io.WriteError, match="scan.nrrd"):
        mv.save(bad, good)
    assert good.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["scan.nrrd"]
