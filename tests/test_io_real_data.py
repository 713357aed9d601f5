"""Every NIfTI, NRRD and photo in the shared data reads with the geometry SimpleITK/nibabel give."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import napari_medvision as mv
from napari_medvision.volume import from_itk_geometry

ITK_READABLE = [
    "ct_mr_totalseg/example_ct_sm.nii.gz",
    "ct_mr_totalseg/example_mr_sm.nii.gz",
    "ct_mr_totalseg/example_seg.nii.gz",
    "ct_mr_totalseg/example_seg_mr.nii.gz",
    "mri_brain_mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "mri_brain_mni152/mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "mri_brain_t1_itk/KmeansTest_T1RawSkullStrip.nii.gz",
    "mri_brain_t1_itk/KmeansTest_T1UCharRaw.nii.gz",
    "mri_misc_niivue/MR_Gd.nii.gz",
    "mri_misc_niivue/CT_AVM.nii.gz",
    "nrrd_lesions/brain1_image.nrrd",
    "nrrd_lesions/brain1_label.nrrd",
    "nrrd_lesions/brain2_image.nrrd",
    "nrrd_lesions/breast1_image.nrrd",
]


@pytest.mark.parametrize("name", ITK_READABLE)
def test_geometry_matches_simpleitk(data_dir, name):
    path = data_dir / name
    vol = mv.load(path)
    reference = sitk.ReadImage(str(path))
    spacing, origin, direction = from_itk_geometry(reference.GetSpacing(), reference.GetOrigin(),
                                                   reference.GetDirection())
    np.testing.assert_allclose(vol.spacing, spacing, atol=1e-5)
    np.testing.assert_allclose(vol.origin, origin, atol=1e-4)
    np.testing.assert_allclose(vol.direction, direction, atol=1e-5)
    np.testing.assert_allclose(np.asarray(vol.data, dtype=np.float64),
                               sitk.GetArrayFromImage(reference).astype(np.float64), rtol=1e-6, atol=1e-3)


def test_every_nifti_in_the_shared_data_reads(data_dir):
    paths = sorted(data_dir.rglob("*.nii.gz"))
    assert len(paths) >= 10
    for path in paths:
        vol = mv.load(path)
        img = nib.load(str(path))
        assert vol.data.shape == tuple(reversed([s for s in img.shape if s > 1][:3]))[-vol.data.ndim:]
        if any(word in path.name for word in ("seg", "Segmentation", "subcortical", "SkullStrip", "_labels")):
            assert vol.labels, f"{path.name} is a label map"
        else:
            assert vol.labels is None and vol.modality in ("CT", "MR"), path.name


def test_segmentations_without_names_read_as_label_maps(data_dir):
    seg = mv.load(data_dir / "ct_mr_totalseg/example_seg.nii.gz")
    assert seg.is_labels and len(seg.labels) == len(np.unique(seg.data)) - 1
    lesion = mv.load(data_dir / "nrrd_lesions/brain1_label.nrrd")
    assert lesion.labels == {1: "label 1"}


def test_ct_reads_as_ct_in_hounsfield_units_in_lps(data_dir):
    ct = mv.load(data_dir / "ct_mr_totalseg/example_ct_sm.nii.gz")
    assert ct.modality == "CT"
    assert ct.data.shape == (30, 101, 122) and ct.spacing == (3.0, 3.0, 3.0)
    assert ct.data.min() <= -1000 and ct.data.max() >= 300
    # The file is RAS-stored; in LPS the x and y axes of this scan point the other way.
    affine = nib.load(str(data_dir / "ct_mr_totalseg/example_ct_sm.nii.gz")).affine
    assert np.sign(ct.direction[2, 2]) == -np.sign(affine[0, 0])


def test_drive_fundus_is_colour_with_a_field_of_view_matching_the_manual_mask(data_dir):
    images = sorted((data_dir / "fundus_drive_train/images").glob("*.tif"))
    assert len(images) == 20
    for image_path in images[:5]:
        photo, fov = mv.load_all(image_path)
        assert photo.rgb and photo.modality == "fundus" and photo.data.shape == (584, 565, 3)
        manual = mv.load(data_dir / "fundus_drive_train/mask" / image_path.name.replace(".tif", "_mask.gif"))
        truth = np.asarray(manual.data) > 0
        mine = np.asarray(fov.data) > 0
        dice = 2 * (truth & mine).sum() / (truth.sum() + mine.sum())
        assert dice > 0.97, f"{image_path.name}: field-of-view Dice {dice:.3f}"


def test_jpeg_and_png_fundus_photos(data_dir):
    retina = mv.load(data_dir / "fundus_skimage/retina.jpg")
    assert retina.rgb and retina.data.shape == (1411, 1411, 3)
    crop = mv.load(data_dir / "fundus_skimage/microaneurysms.png")
    assert crop.data.shape[:2] == (102, 102)


def test_oct_bscan_tiffs_are_greyscale_2d(data_dir):
    for name in ("exampleOCTimage0001.tif", "exampleOCTimage0002.tif"):
        bscan = mv.load(data_dir / "oct_bscans_layers" / name)
        assert bscan.data.shape == (1050, 1000) and not bscan.rgb
