"""Reading DICOM: series grouping, slice order, geometry against SimpleITK, compression, SEG, bad input."""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from napari_medvision.io import GeometryWarning, MultipleSeriesError, ReadError, load, load_all
from napari_medvision.io.dicom import looks_like_dicom, read_dicom, write_dicom_series
from napari_medvision.volume import Volume, from_itk_geometry

MISC = "dicom_misc/pydicom_data"
TESTS = "dicom_misc/pydicom_test_files"


# --- helpers ------------------------------------------------------------------------------

def itk_series(files) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    return reader.Execute()


def assert_matches_itk(vol: Volume, image: sitk.Image, single_slice: bool = False) -> None:
    """Same voxels at the same places as SimpleITK, allowing its slices in the opposite order."""
    expected = sitk.GetArrayFromImage(image)
    spacing, origin, direction = (np.array(v, dtype=float) for v in
                                  from_itk_geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection()))
    if np.dot(direction[:, 0], vol.direction[:, 0]) < 0:  # ITK keeps file/frame order; we sort along the normal
        origin = origin + direction[:, 0] * spacing[0] * (expected.shape[0] - 1)
        direction[:, 0] *= -1
        expected = expected[::-1]
    np.testing.assert_allclose(np.asarray(vol.data), expected, rtol=1e-6)
    first = 1 if single_slice else 0  # ITK's spacing across a lone slice is a convention, not geometry
    np.testing.assert_allclose(vol.spacing[first:], spacing[first:], atol=1e-4)
    np.testing.assert_allclose(vol.origin, origin, atol=1e-4)
    np.testing.assert_allclose(vol.direction[:, first:], direction[:, first:], atol=1e-4)


def oblique() -> np.ndarray:
    a, b = np.deg2rad(15.0), np.deg2rad(-30.0)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
    return rx @ rz


def small_ct(seed: int = 0, shape=(20, 64, 64), direction=None) -> Volume:
    data = np.random.default_rng(seed).integers(-1024, 2500, size=shape).astype(np.int16)
    return Volume(data, (2.5, 0.7, 0.8), (-40.0, 12.5, -100.25), direction, modality="CT")


# --- real files ---------------------------------------------------------------------------

def test_phantom_folder_keeps_slices_and_multiframe_apart(data_dir):
    folder = data_dir / "dicom_ct_phantom"
    assert looks_like_dicom(folder)
    with pytest.raises(MultipleSeriesError) as asked:
        load(folder)
    assert len(asked.value.choices) == 2 == len(set(asked.value.uids))
    assert "7 axial slices" in asked.value.choices[0] and "multi-frame" in asked.value.choices[1]

    slices = load(folder, series=0)
    multiframe = load(folder, series=asked.value.uids[1])
    assert slices.modality == multiframe.modality == "CT"
    assert slices.data.shape == multiframe.data.shape == (7, 512, 512)
    assert slices.meta["files"] == 7 and multiframe.meta["files"] == 1
    assert_matches_itk(slices, itk_series(sorted(folder.glob("slice*.dcm"))))
    assert_matches_itk(multiframe, sitk.ReadImage(str(folder / "volume.dcm")))
    np.testing.assert_array_equal(slices.data, multiframe.data)
    assert slices.data.min() == -1024  # rescaled to HU (stored 0 is air)


@pytest.mark.parametrize("name", [f"{MISC}/693_UNCI.dcm", f"{MISC}/693_J2KR.dcm", f"{MISC}/MR2_J2KR.dcm",
                                  f"{MISC}/MR-SIEMENS-DICOM-WithOverlays.dcm", f"{TESTS}/CT_small.dcm",
                                  f"{TESTS}/MR_small.dcm"])
def test_single_slices_match_simpleitk(data_dir, name):
    vol = load(data_dir / name)
    header = pydicom.dcmread(data_dir / name, stop_before_pixels=True)
    assert vol.modality == header.Modality
    assert vol.data.shape == (1, header.Rows, header.Columns)
    assert_matches_itk(vol, sitk.ReadImage(str(data_dir / name)), single_slice=True)


def test_rescale_keeps_integers_and_makes_floats_float32(data_dir):
    ct = load(data_dir / f"{MISC}/693_UNCI.dcm")
    mr = load(data_dir / f"{MISC}/MR2_J2KR.dcm")
    header = pydicom.dcmread(data_dir / f"{MISC}/MR2_J2KR.dcm", stop_before_pixels=True)
    assert ct.data.dtype == np.int16
    assert not float(header.RescaleSlope).is_integer() and mr.data.dtype == np.float32


def test_enhanced_ct_uses_functional_groups(data_dir):
    vol = load(data_dir / f"{MISC}/eCT_Supplemental.dcm")
    assert vol.data.shape == (2, 512, 512)
    assert vol.spacing == pytest.approx((10.0, 0.388672, 0.388672))
    assert_matches_itk(vol, sitk.ReadImage(str(data_dir / f"{MISC}/eCT_Supplemental.dcm")))


def test_jpeg2000_multiframe_equals_uncompressed_twin(data_dir):
    with pytest.warns(GeometryWarning, match="no position"):  # these two files carry no plane geometry
        compressed = load(data_dir / f"{MISC}/emri_small_jpeg_2k_lossless.dcm")
        plain = load(data_dir / f"{MISC}/emri_small.dcm")
    assert compressed.data.shape == (10, 64, 64)
    np.testing.assert_array_equal(compressed.data, plain.data)
    np.testing.assert_array_equal(plain.data, sitk.GetArrayFromImage(sitk.ReadImage(str(data_dir / f"{MISC}/emri_small.dcm"))))


def test_dicomdir_tree_asks_which_series(data_dir):
    tree = data_dir / f"{TESTS}/dicomdirtests"
    with pytest.raises(MultipleSeriesError) as asked:
        load(tree)
    choices, uids = asked.value.choices, asked.value.uids
    assert len(choices) == len(uids) == len(set(uids)) > 10
    score = next(i for i, c in enumerate(choices) if "SmartScore" in c)
    assert "5 axial slices" in choices[score]
    vol = load(tree, series=uids[score])
    assert_matches_itk(vol, itk_series(sorted((tree / "98892001" / "CT5N").iterdir())))
    with pytest.warns(GeometryWarning, match=r"between slice 0 at -99\.48 mm and slice 1 at 103\.02 mm"):
        load(tree, series=next(i for i, c in enumerate(choices) if "Routine Brain" in c))  # a scout far below
    with pytest.raises(MultipleSeriesError):  # pointing at the DICOMDIR index means its folder
        load(tree / "DICOMDIR")


def test_seg_alone_is_a_label_map_on_its_own_grid(data_dir):
    path = data_dir / f"{MISC}/liver.dcm"
    with pytest.warns(GeometryWarning, match="neither given nor found"):
        seg = load(path)
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array  # (3, 512, 512) bits, one frame per position
    z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2]) for f in ds.PerFrameFunctionalGroupsSequence]
    assert seg.modality == "SEG" and seg.labels == {1: "Liver"}
    np.testing.assert_array_equal(seg.data, frames[np.argsort(z)])
    assert seg.origin == pytest.approx((min(z), -226.8, -235.2))
    assert seg.spacing == pytest.approx((1.0, 0.810547, 0.810547))


# --- generated series ---------------------------------------------------------------------

def test_oblique_series_sorted_by_position_not_file_name(tmp_path):
    vol = small_ct(direction=oblique())
    files = write_dicom_series(vol, tmp_path / "ct", "oblique")
    rng = np.random.default_rng(1)
    for f, new in zip(files, rng.permutation(len(files))):  # names and InstanceNumbers say nothing
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = int(new) + 1
        ds.save_as(f)
        f.rename(f.with_name(f"x{new:03d}.dcm"))
    back = load(tmp_path / "ct")
    np.testing.assert_array_equal(back.data, vol.data)
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-6)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-4)
    np.testing.assert_allclose(back.direction, vol.direction, atol=1e-6)
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(tmp_path / "ct"))
    assert_matches_itk(back, itk_series(names))


def test_float_volume_comes_back_float32_within_quantisation(tmp_path):
    data = np.random.default_rng(2).normal(100.0, 30.0, size=(5, 32, 32)).astype(np.float32)
    vol = Volume(data, (3.0, 1.0, 1.0), modality="MR")
    write_dicom_series(vol, tmp_path, "float")
    back = load(tmp_path)
    assert back.modality == "MR" and back.data.dtype == np.float32
    step = (data.max() - data.min()) / 65535
    np.testing.assert_allclose(back.data, data, atol=step)


def test_missing_slice_warns_where_and_still_loads(tmp_path):
    files = write_dicom_series(small_ct(), tmp_path, "gap")
    files[8].unlink()  # positions along z: -40 + 2.5 k; slice 8 at -20.0 is gone
    with pytest.warns(GeometryWarning, match=r"between slice 7 at -22\.50 mm and slice 8 at -17\.50 mm") as record:
        vol = load(tmp_path)
    assert "1 missing" in str(record[0].message)
    assert vol.data.shape == (19, 64, 64) and vol.spacing[0] == pytest.approx(2.5)


def test_no_gap_no_warning(tmp_path):
    write_dicom_series(small_ct(), tmp_path, "plain")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(tmp_path)


def test_folder_of_two_series_asks_then_loads_the_chosen_one(tmp_path):
    ct = small_ct(seed=3)
    mr = Volume(np.random.default_rng(4).integers(0, 900, size=(6, 40, 48)).astype(np.int16), (4.0, 1.0, 1.0),
                modality="MR")
    write_dicom_series(ct, tmp_path, "Chest CT", series_number=1)
    write_dicom_series(mr, tmp_path / "sub", "T1 MR", series_number=2)
    with pytest.raises(MultipleSeriesError) as asked:
        load(tmp_path)
    choices = asked.value.choices
    assert len(choices) == 2
    ct_index = next(i for i, c in enumerate(choices) if "CT series 1 'Chest CT': 20 axial slices of 64x64" in c)
    mr_index = next(i for i, c in enumerate(choices) if "MR series 2 'T1 MR': 6 axial slices of 40x48" in c)
    np.testing.assert_array_equal(load(tmp_path, series=mr_index).data, mr.data)
    np.testing.assert_array_equal(load(tmp_path, series=asked.value.uids[ct_index]).data, ct.data)
    # read_dicom directly: load() tries the other folder readers too and reports the first one's error
    with pytest.raises(ReadError, match="no series number 5"):
        read_dicom(tmp_path, series=5)


@pytest.mark.parametrize("syntax", [pydicom.uid.RLELossless, pydicom.uid.JPEG2000Lossless, pydicom.uid.JPEGLSLossless])
def test_compressed_series_equals_uncompressed(tmp_path, syntax):
    vol = small_ct(shape=(6, 32, 32))
    files = write_dicom_series(vol, tmp_path / "plain", "plain")
    (tmp_path / "packed").mkdir()
    for f in files:
        ds = pydicom.dcmread(f)
        try:
            ds.compress(syntax)
        except (RuntimeError, NotImplementedError) as exc:
            pytest.skip(f"no {syntax.name} encoder here: {exc}")
        ds.save_as(tmp_path / "packed" / f.name)
    packed = load(tmp_path / "packed")
    assert pydicom.dcmread(next((tmp_path / "packed").iterdir())).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(packed.data, load(tmp_path / "plain").data)
    np.testing.assert_array_equal(packed.data, vol.data)


# --- DICOM SEG with its image ----------------------------------------------------------------

def make_seg(image_files, mask: np.ndarray, path, frame_of_reference: str | None = None):
    import highdicom as hd

    sources = [pydicom.dcmread(f) for f in image_files]
    if frame_of_reference:
        for ds in sources:
            ds.FrameOfReferenceUID = frame_of_reference
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Tumour",
        segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure"),
        segmented_property_type=hd.sr.CodedConcept("108369006", "SCT", "Neoplasm"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=mask, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=9,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="test", manufacturer_model_name="test",
        software_versions="1", device_serial_number="1",
    )
    seg.save_as(path)
    return path


def image_and_seg(tmp_path):
    vol = small_ct(seed=5, shape=(8, 32, 32), direction=oblique())
    files = write_dicom_series(vol, tmp_path / "study", "CT")
    mask = np.zeros(vol.data.shape, np.uint8)
    mask[2:5, 10:20, 8:14] = 1
    # highdicom wants the mask in the order of the source images it is given: ours are by position
    seg = make_seg(files, mask, tmp_path / "study" / "seg.dcm")
    return vol, mask, seg


def test_seg_placed_on_the_given_image(tmp_path):
    vol, mask, seg_path = image_and_seg(tmp_path)
    image = load(tmp_path / "study", series=0)
    labels = load(seg_path, reference=image)
    assert labels.labels == {1: "Tumour"} and labels.modality == "SEG"
    assert labels.same_grid(image)
    np.testing.assert_array_equal(labels.data, mask)


def test_folder_with_image_and_seg_asks_and_returns_both(tmp_path):
    vol, mask, _ = image_and_seg(tmp_path)
    with pytest.raises(MultipleSeriesError) as asked:
        load(tmp_path / "study")
    assert "segmentation" in asked.value.choices[1]
    image, labels = load_all(tmp_path / "study", series=0)
    np.testing.assert_array_equal(image.data, vol.data)
    np.testing.assert_array_equal(labels.data, mask)
    only_labels = load_all(tmp_path / "study", series=1)  # the SEG: placed on the image found beside it
    assert len(only_labels) == 1 and only_labels[0].same_grid(image)
    np.testing.assert_array_equal(only_labels[0].data, mask)


def test_seg_of_another_frame_of_reference_warns_and_keeps_its_grid(tmp_path):
    vol = small_ct(seed=6, shape=(4, 16, 16))
    files = write_dicom_series(vol, tmp_path / "ct", "CT")
    mask = np.zeros(vol.data.shape, np.uint8)
    mask[1, 4:8, 4:8] = 1
    seg_path = make_seg(files, mask, tmp_path / "seg.dcm", frame_of_reference=pydicom.uid.generate_uid())
    with pytest.warns(GeometryWarning, match="frame of reference"):
        labels = load(seg_path, reference=load(tmp_path / "ct"))
    # its own grid holds only the frame that has labels: slice 1 of the image
    assert labels.data.shape == (1, 16, 16) and labels.data.sum() == 16
    assert labels.origin[0] == pytest.approx(vol.origin[0] + vol.spacing[0])


# --- bad input ----------------------------------------------------------------------------

def test_text_file_named_dcm_is_refused_by_name(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_text("patient notes, not an image\n" * 20)
    with pytest.raises(ReadError, match="notes.dcm"):
        load(path)


@pytest.mark.parametrize("keep", [600, 4000])  # cut in the header / in the pixel data
def test_truncated_file_is_refused_by_name(tmp_path, keep):
    files = write_dicom_series(small_ct(shape=(1, 64, 64)), tmp_path / "full", "one")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(files[0].read_bytes()[:keep])
    with pytest.raises(ReadError, match="cut.dcm"):
        load(cut)


def test_folder_without_dicom_is_refused(tmp_path):
    (tmp_path / "readme.txt").write_text("nothing here")
    (tmp_path / "scan.dcm").write_bytes(b"\0" * 300)
    assert not looks_like_dicom(tmp_path)
    with pytest.raises(ReadError, match="no DICOM"):
        read_dicom(tmp_path)


def test_truncated_slice_in_a_series_names_the_slice(tmp_path):
    files = write_dicom_series(small_ct(shape=(5, 32, 32)), tmp_path, "series")
    files[2].write_bytes(files[2].read_bytes()[:-100])
    with pytest.raises(ReadError, match=files[2].name):
        read_dicom(tmp_path)
