"""DICOM SEG objects as label-map Volumes, placed onto the image they segment when it is at hand.

highdicom builds the label map on the SEG's own frame grid (binary, fractional and label-map
SEGs, sparse frames, several segments). Placing it onto an image grid uses highdicom's
``match_geometry`` (axis permutation, flips, crop, pad: no interpolation) when the grids line up,
and nearest-neighbour resampling with scipy when they share a frame of reference but not a grid.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..volume import Volume
from .dicom_scan import CappedReader, DicomFile
from .errors import GeometryWarning, ReadError
from .limits import check_compressed, check_memory, check_raw

REVERSE = np.eye(3)[::-1]  # LPS (x, y, z) <-> Volume's reversed (z, y, x)


def _hd_affine_to_volume(affine: np.ndarray) -> tuple[tuple, tuple, np.ndarray]:
    """(spacing, origin, direction) in Volume order from a highdicom index->LPS affine."""
    m = REVERSE @ affine[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    return tuple(spacing), tuple(REVERSE @ affine[:3, 3]), m / spacing


def _volume_to_hd_affine(vol: Volume) -> np.ndarray:
    a = np.eye(4)
    a[:3, :3] = REVERSE @ (vol.direction * np.asarray(vol.spacing)[None, :])
    a[:3, 3] = REVERSE @ np.asarray(vol.origin)
    return a


def read_seg(f: DicomFile):
    """The SEG in ``f`` as (highdicom Volume with one label per voxel, {number: label}, header)."""
    import highdicom as hd  # imported here: only SEG files need it

    _check_declared_size(f)
    try:
        with CappedReader(f.path) as fp:
            seg = hd.seg.segread(fp)
        labels = {int(s.SegmentNumber): str(s.get("SegmentLabel") or f"segment {int(s.SegmentNumber)}")
                  for s in seg.SegmentSequence}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # highdicom's notes on optional attributes
            volume = seg.get_volume(combine_segments=True, skip_overlap_checks=True, dtype=np.uint16)
    except Exception as exc:  # highdicom raises ValueError/RuntimeError/AttributeError for bad SEGs
        raise ReadError(f.path, f"is a DICOM SEG that could not be read: {str(exc).splitlines()[0][:200]}") from exc
    # Our convention: the slice axis points along the cross product of the in-plane axes, a
    # right-handed (x, y, z) frame; highdicom judges handedness in array order (z, y, x): "left".
    volume = volume.ensure_handedness("LEFT_HANDED", flip_axis=0)
    return volume, labels, seg


def _check_declared_size(f: DicomFile) -> None:
    """ReadError before highdicom allocates, when the frames the header declares (1 bit per pixel
    for BINARY) do not fit the file, or their label map would not fit in memory."""
    h = f.header
    rows, cols, bits = int(h.get("Rows") or 0), int(h.get("Columns") or 0), int(h.get("BitsAllocated") or 1)
    stored = -(-f.n_frames * rows * cols * bits // 8)
    what = f"{f.n_frames} segmentation frame(s) of {rows}x{cols}"
    size = f.path.stat().st_size
    if f.pixel_offset is not None:
        check_raw(f.path, what, (stored,), 1, max(size - f.pixel_offset, 0))
    else:
        check_compressed(f.path, what, (stored,), 1, size)
    check_memory(f.path, what, 4 * f.n_frames * rows * cols)  # uint16 label map and a mask per segment


def seg_volume(f: DicomFile, reference: Volume | None) -> Volume:
    """The label map of SEG ``f``: on ``reference``'s grid when they match, else on its own grid."""
    hd_volume, labels, seg = read_seg(f)
    array = hd_volume.array
    if array.max(initial=0) <= np.iinfo(np.uint8).max:
        array = array.astype(np.uint8)
    spacing, origin, direction = _hd_affine_to_volume(hd_volume.affine)
    referenced = _referenced_series(seg)
    meta = {
        "SeriesInstanceUID": str(seg.get("SeriesInstanceUID", "")),
        "FrameOfReferenceUID": str(seg.get("FrameOfReferenceUID", "")),
        "ReferencedSeriesInstanceUID": referenced,
        "SeriesDescription": str(seg.get("SeriesDescription", "")),
        "SegmentationType": str(seg.get("SegmentationType", "")),
    }
    own = Volume(array, spacing, origin, direction, modality="SEG", labels=labels, meta=meta)
    if reference is None:
        where = f" (series {referenced})" if referenced else ""
        warnings.warn(
            f"{f.path}: the segmented image{where} was neither given nor found beside it; the labels are on "
            "the segmentation's own frame grid (pass reference=<image Volume> to place them on the image)",
            GeometryWarning, stacklevel=3,
        )
        return own
    placed = place_on(own, hd_volume, reference, f)
    return placed if placed is not None else own


def _referenced_series(seg) -> str:
    seq = seg.get("ReferencedSeriesSequence")
    return str(seq[0].get("SeriesInstanceUID", "")) if seq else ""


def place_on(own: Volume, hd_volume, reference: Volume, f: DicomFile) -> Volume | None:
    """``own`` moved voxel for voxel onto ``reference``'s grid; None (with a warning) if they do not match."""
    import highdicom as hd

    ref_for = str(reference.meta.get("FrameOfReferenceUID") or "")
    seg_for = own.meta["FrameOfReferenceUID"]
    if ref_for and seg_for and ref_for != seg_for:
        warnings.warn(
            f"{f.path}: the segmentation's frame of reference ({seg_for}) differs from the image's ({ref_for}); "
            "the labels are on the segmentation's own grid",
            GeometryWarning, stacklevel=4,
        )
        return None
    if reference.ndim != 3:
        warnings.warn(f"{f.path}: the reference image is not 3D; the labels are on the segmentation's own grid",
                      GeometryWarning, stacklevel=4)
        return None
    target = hd.VolumeGeometry(_volume_to_hd_affine(reference), reference.spatial_shape, "PATIENT")
    total = int(np.count_nonzero(own.data))
    try:
        data = hd_volume.match_geometry(target, tol=1e-3).array
        data = data.astype(own.data.dtype, copy=False)
    except RuntimeError:
        data = _resample_nearest(own, reference)
        warnings.warn(
            f"{f.path}: the segmentation's grid does not line up with the image's; "
            "labels were resampled onto the image grid (nearest neighbour)",
            GeometryWarning, stacklevel=4,
        )
        total = None
    kept = int(np.count_nonzero(data))
    if kept == 0 and np.count_nonzero(own.data):
        warnings.warn(f"{f.path}: no labelled voxel falls inside the image; the labels are on the "
                      "segmentation's own grid", GeometryWarning, stacklevel=4)
        return None
    if total is not None and kept < total:
        warnings.warn(f"{f.path}: {total - kept} labelled voxels lie outside the image and were dropped",
                      GeometryWarning, stacklevel=4)
    meta = dict(own.meta, placed_on=str(reference.meta.get("SeriesInstanceUID", "")))
    return Volume(data, reference.spacing, reference.origin, reference.direction, modality="SEG",
                  labels=own.labels, meta=meta)


def _resample_nearest(own: Volume, reference: Volume) -> np.ndarray:
    """Labels sampled at each reference voxel centre from the nearest SEG voxel."""
    from scipy.ndimage import affine_transform

    index_to_index = np.linalg.inv(own.affine()) @ reference.affine()  # reference index -> SEG index
    return affine_transform(own.data, index_to_index[:3, :3], offset=index_to_index[:3, 3],
                            output_shape=reference.spatial_shape, order=0, mode="constant", cval=0)
