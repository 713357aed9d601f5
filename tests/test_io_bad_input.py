"""Bad input gives one ReadError (a ValueError) naming the file and the problem."""

from __future__ import annotations

import gzip
import warnings

import numpy as np
import pytest

import napari_medvision as mv
from napari_medvision import Volume
from napari_medvision.io import ReadError


def small_ct() -> Volume:
    return Volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), spacing=(2.0, 1.0, 1.0))


def test_truncated_nifti(tmp_path):
    good = mv.save(small_ct(), tmp_path / "good.nii.gz").read_bytes()
    raw = gzip.decompress(good)
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(raw[: len(raw) - 100])[:-20])
    with pytest.raises(ReadError, match=r"truncated\.nii\.gz: .*(truncated|corrupt|not a valid)"):
        mv.load(truncated)


def test_wrong_content_for_its_suffix_says_what_it_holds(tmp_path):
    png = mv.save(Volume(np.zeros((8, 8), np.uint8), spacing=(1, 1)), tmp_path / "photo.png")
    disguised = tmp_path / "scan.nii.gz"
    disguised.write_bytes(png.read_bytes())
    with pytest.raises(ReadError, match=r"scan\.nii\.gz: is named \.nii\.gz but holds PNG"):
        mv.load(disguised)


def test_text_file(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("patient notes, not an image\n")
    with pytest.raises(ReadError, match=r"notes\.txt: is not in a format medvision reads"):
        mv.load(notes)


def test_text_file_with_an_image_suffix(tmp_path):
    fake = tmp_path / "fake.nrrd"
    fake.write_text("hello")
    with pytest.raises(ReadError, match=r"fake\.nrrd"):
        mv.load(fake)


def test_empty_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReadError, match=r"empty: the folder is empty"):
        mv.load(empty)


def test_missing_file(tmp_path):
    with pytest.raises(ReadError, match="no such file"):
        mv.load(tmp_path / "nowhere.nii.gz")


def test_five_dimensional_array(tmp_path):
    import nibabel as nib

    path = tmp_path / "five_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2, 2), np.float32), np.eye(4)), str(path))
    with pytest.raises(ReadError, match=r"five_d\.nii\.gz: has 5 dimensions"):
        mv.load(path)


def test_all_nan_data_is_refused_and_partial_nan_warns(tmp_path):
    nan_path = mv.save(Volume(np.full((3, 4, 5), np.nan, np.float32), spacing=(1, 1, 1)), tmp_path / "nan.nrrd")
    with pytest.raises(ReadError, match=r"nan\.nrrd: contains no valid values"):
        mv.load(nan_path)
    data = np.ones((3, 4, 5), np.float32)
    data[0, 0, :2] = np.nan
    partial = mv.save(Volume(data, spacing=(1, 1, 1)), tmp_path / "partial.mha")
    with pytest.warns(mv.io.GeometryWarning, match="2 voxels are NaN"):
        mv.load(partial)


def test_errors_are_value_errors_so_callers_can_catch_them(tmp_path):
    bad = tmp_path / "bad.mha"
    bad.write_bytes(b"\0" * 10)
    with pytest.raises(ValueError):
        mv.load(bad)


def test_unknown_output_suffix(tmp_path):
    with pytest.raises(mv.io.WriteError, match=r"out\.xyz: cannot write suffix"):
        mv.save(small_ct(), tmp_path / "out.xyz")


def test_good_files_load_without_warnings(tmp_path):
    path = mv.save(small_ct(), tmp_path / "ok.nii.gz")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mv.load(path)
