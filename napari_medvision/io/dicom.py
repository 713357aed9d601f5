"""DICOM reader: a file or a folder of files becomes one Volume per chosen series.

- A folder is searched recursively; DICOMDIR indexes and non-DICOM files are ignored.
- Series are told apart by SeriesInstanceUID and geometry, and a multi-frame object is always its
  own series (see :mod:`.dicom_scan`). Several series and no ``series=``: MultipleSeriesError.
- Slices are ordered along the slice normal; gaps warn (see :mod:`.dicom_geometry`).
- Rescale slope/intercept are applied (CT in HU); integer rescales keep an integer dtype.
- A DICOM SEG becomes a label-map Volume, on its referenced image's grid when that image is given
  (``reference=``) or lies in the same folder (see :mod:`.dicom_seg`).

``write_dicom_series`` (in :mod:`.dicom_write`) writes a Volume as CT/MR slices for tests and benchmarks.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..volume import Volume
from .dicom_geometry import Grid, frame_planes, frame_rescale, in_plane_spacing, plane_of, slice_gap_fallback, stack
from .dicom_pixels import check_declared_size, output_dtype, read_multiframe, read_slices
from .dicom_scan import (DicomFile, Series, choose_series, files_in, find_dicom_files, group_series,
                         has_dicom_marker, read_header, read_headers)
from .dicom_seg import seg_volume
from .dicom_write import write_dicom_series
from .errors import GeometryWarning, ReadError
from .formats import register_reader

__all__ = ["read_dicom", "write_dicom_series", "find_series"]

KEPT_TAGS = ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "SeriesDescription", "SeriesNumber",
             "Manufacturer", "BodyPartExamined", "RescaleType", "PhotometricInterpretation", "SOPClassUID")


def looks_like_dicom(path: Path, max_files: int = 200) -> bool:
    """A file with the DICM marker, or a folder holding one among its first ``max_files`` files."""
    path = Path(path)
    if not path.is_dir():
        return has_dicom_marker(path)
    try:
        return any(has_dicom_marker(candidate) for candidate in files_in(path, max_files=max_files))
    except ReadError:  # more files than looked at: not recognised from its first files
        return False


@register_reader("DICOM", (".dcm", ".dicom", ".ima"), sniff=looks_like_dicom, folders=True)
def read_dicom(path, series: int | str | None = None, reference: Volume | None = None) -> list[Volume]:
    """The chosen series of a DICOM file or folder: the image, then any SEG label maps made on it.

    series: index (as listed by :class:`MultipleSeriesError`) or UID, needed when the folder holds several.
    reference: an image Volume to place a SEG's labels onto (otherwise the SEG's own grid is used,
        unless the referenced image lies in the same folder).
    """
    path = Path(path)
    all_series = find_series(path)
    chosen = choose_series(path, all_series, series)
    if chosen.kind == "seg":
        if reference is None:
            image = _referenced_image(chosen, all_series)
            reference = None if image is None else image_volume(image, with_pixels=False)
        return [seg_volume(chosen.files[0], reference)]
    image = image_volume(chosen)
    segs = [s for s in all_series if s.kind == "seg" and _references(s, chosen)]
    return [image] + [seg_volume(s.files[0], image) for s in segs]


def find_series(path: Path) -> list[Series]:
    """Every series in a file or folder, from headers only."""
    if path.is_dir():
        paths = find_dicom_files(path)
        if not paths:
            raise ReadError(path, "holds no DICOM files (none carries the 'DICM' marker)")
        files = read_headers(paths, skip_unreadable=True)
        if not files:
            raise ReadError(path, f"holds {len(paths)} DICOM file(s) but no images (only indexes, reports or unreadable files)")
        return group_series(files)
    if path.name.upper() == "DICOMDIR":
        return find_series(path.parent)
    if not has_dicom_marker(path):
        header = _forced_header(path)
    else:
        header = read_header(path)
    if "DirectoryRecordSequence" in header.header:
        return find_series(path.parent)
    if "Rows" not in header.header:
        raise ReadError(path, "is a DICOM file without an image (a report, index or structure set)")
    return group_series([header])


def _forced_header(path: Path) -> DicomFile:
    """Files without the Part 10 preamble: accepted only when they parse as an image header."""
    try:
        f = read_header(path, force=True)
    except ReadError:
        f = None
    if f is None or "Rows" not in f.header or "SOPClassUID" not in f.header:
        raise ReadError(path, "is not a DICOM file (the 'DICM' marker at byte 128 is missing)")
    return f


def _references(seg: Series, image: Series) -> bool:
    seq = seg.header.get("ReferencedSeriesSequence")
    return bool(seq) and str(seq[0].get("SeriesInstanceUID", "")) == image.series_uid


def _referenced_image(seg: Series, all_series: list[Series]) -> Series | None:
    candidates = [s for s in all_series if s.kind != "seg" and _references(seg, s)]
    return candidates[0] if candidates else None


def image_volume(series: Series, with_pixels: bool = True) -> Volume:
    """The Volume of one image series (``with_pixels=False``: the grid only, data not read)."""
    check_declared_size(series.files, [frame_rescale(series.header)])
    if series.kind == "multiframe":
        f = series.files[0]
        header = f.header
        planes = frame_planes(header)
        rescales = [frame_rescale(header, i) for i in range(f.n_frames)]
        source = str(f.path)
    else:
        header = series.header
        planes = [plane_of(f.header) for f in series.files]
        rescales = [frame_rescale(f.header) for f in series.files]
        source = _files_text(series)
    grid = _grid(planes, header, source, len(planes))
    rgb = int(header.get("SamplesPerPixel") or 1) > 1
    if not with_pixels:
        shape = (len(grid.order), int(header.Rows), int(header.Columns))
        data = np.broadcast_to(np.zeros((), output_dtype(header, rescales)), shape)
    elif series.kind == "multiframe":
        data = read_multiframe(series.files[0], grid.order, rescales)
    else:
        ordered = [series.files[i] for i in grid.order]
        data = read_slices(ordered, [rescales[i] for i in grid.order])
    if grid.repeats > 1:
        data = data.reshape((grid.repeats, -1) + data.shape[1:])
    spacing, origin, direction = grid.spacing, grid.origin, grid.direction
    if planes[0] is None and len(grid.order) == 1:  # a lone image without position: plain 2D
        data = data[0]
        spacing, origin, direction = spacing[1:], origin[1:], direction[1:, 1:]
    meta = {t: str(header.get(t)) for t in KEPT_TAGS if header.get(t) not in (None, "")}
    meta["files"] = len(series.files)
    return Volume(data, spacing, origin, direction, modality=_modality(header), rgb=rgb, meta=meta)


def _grid(planes, header, source: str, n: int) -> Grid:
    """The grid of the frames: from their planes, or from spacing alone when positions are absent."""
    usable = [p for p in planes if p is not None]
    if len(usable) == len(planes):
        return stack(planes, slice_gap_fallback(header), source)
    ps = in_plane_spacing(header) or (1.0, 1.0)
    if n > 1:
        warnings.warn(
            f"{source}: {len(planes) - len(usable)} of {n} frames have no position/orientation; "
            "frames are stacked in stored order with an identity orientation",
            GeometryWarning, stacklevel=3,
        )
    step = slice_gap_fallback(header)
    return Grid(list(range(n)), (step, ps[0], ps[1]), (0.0, 0.0, 0.0), np.eye(3))


def _modality(header) -> str:
    modality = str(header.get("Modality") or "").upper()
    known = {"CT": "CT", "MR": "MR", "PT": "PET", "US": "US", "CR": "XR", "DX": "XR", "XA": "XR", "RF": "XR",
             "MG": "XR", "OPT": "OCT", "OP": "fundus", "SEG": "SEG"}
    return known.get(modality, "other" if modality else "other")


def _files_text(series: Series) -> str:
    first = series.files[0].path
    if len(series.files) == 1:
        return str(first)
    return f"{first.parent} (series {series.key}, {len(series.files)} files)"
