"""DICOM SEG and RTSTRUCT export of a label map made on a DICOM scan (``mv.save(labels, "x.dcm")``).

Read back with highdicom and rt-utils: the same frames, geometry and segment labels as the label map.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import napari_medvision as mv
from napari_medvision.io import WriteError
from napari_medvision.io.dicom import write_dicom_series

hd = pytest.importorskip("highdicom")


def dicom_scan(folder, direction=None):
    """An 8-slice CT series on disk and its Volume as read back, with a liver box and a spleen corner."""
    data = np.full((8, 32, 32), -1000, np.int16)
    data[2:6, 8:20, 10:24] = 60
    write_dicom_series(mv.Volume(data, (2.5, 0.8, 0.7), (10, -20, 30), direction, modality="CT"), folder)
    image = mv.load(folder)
    labels = (np.asarray(image.data) > 0).astype(np.uint8)
    labels[4:6, :4, :4] = 3  # label ids need not be consecutive
    return image, image.with_data(labels, labels={1: "liver", 3: "spleen"})


@pytest.mark.parametrize("direction", [None, np.array([[0, 0, -1], [-1, 0, 0], [0, 1, 0.0]])],
                         ids=["axial", "rotated"])
def test_dicom_seg_reads_back_with_the_same_frames_geometry_and_labels(tmp_path, direction):
    image, labels = dicom_scan(tmp_path / "ct", direction)
    path = mv.save(labels, tmp_path / "organs.dcm")

    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    assert [(int(s.SegmentNumber), s.SegmentLabel) for s in seg.SegmentSequence] == [(1, "liver"), (2, "spleen")]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == image.meta["SeriesInstanceUID"]
    assert seg.FrameOfReferenceUID == image.meta["FrameOfReferenceUID"]
    data = np.asarray(labels.data)
    non_empty = sum(int(np.any(data[k] == v)) for k in range(data.shape[0]) for v in (1, 3))
    assert int(seg.NumberOfFrames) == non_empty

    placed = mv.load_all(path, reference=image)[0]  # the reader places it voxel for voxel on the scan
    assert placed.same_grid(image, tol=1e-6)
    np.testing.assert_array_equal(np.asarray(placed.data), np.where(data == 3, 2, data))
    assert placed.labels == {1: "liver", 2: "spleen"}

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        own = mv.load(path)  # on the SEG's own frame grid: where the labelled slices are, in world space
    first = own.affine() @ np.array([0, 0, 0, 1.0])
    k = int(np.flatnonzero(data.any(axis=(1, 2)))[0])
    assert np.allclose(first, image.affine() @ np.array([k, 0, 0, 1.0]), atol=1e-4)


def test_rtstruct_traces_each_label_on_the_scan(tmp_path):
    pytest.importorskip("rt_utils")
    from rt_utils import RTStructBuilder

    from napari_medvision.io.rtstruct_write import write_rtstruct

    image, labels = dicom_scan(tmp_path / "ct")
    write_rtstruct(labels, tmp_path / "organs.rtstruct.dcm")
    structures = RTStructBuilder.create_from(str(tmp_path / "ct"), str(tmp_path / "organs.rtstruct.dcm"))
    assert structures.get_roi_names() == ["liver", "spleen"]
    liver = np.moveaxis(structures.get_roi_mask_by_name("liver"), -1, 0)  # rt-utils: (rows, cols, slices)
    truth = np.asarray(labels.data) == 1
    assert 2 * (liver & truth).sum() / (liver.sum() + truth.sum()) > 0.95


def test_dicom_export_refuses_what_it_cannot_place(tmp_path):
    image, labels = dicom_scan(tmp_path / "ct")
    with pytest.raises(WriteError, match="only label maps"):
        mv.save(image, tmp_path / "image.dcm")
    loose = mv.Volume(np.asarray(labels.data), labels.spacing, labels.origin, labels.direction, labels={1: "liver"})
    with pytest.raises(WriteError, match="name none"):
        mv.save(loose, tmp_path / "loose.dcm")
    shifted = mv.Volume(np.asarray(labels.data), labels.spacing, tuple(np.add(labels.origin, 5.0)), labels.direction,
                        labels={1: "liver"}, meta={"source": str(tmp_path / "ct")})
    with pytest.raises(WriteError, match="grid"):
        mv.save(shifted, tmp_path / "shifted.dcm")
    assert not list(tmp_path.glob("*.dcm")) and not list(tmp_path.glob(".*partial*"))
