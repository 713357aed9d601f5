"""The DICOM slices a label map was made on, in the label map's slice order.

DICOM SEG and RTSTRUCT objects reference the images they segment slice by slice, so a writer
needs those images' headers and which label-map slice lies on which of them. The label map's
geometry decides: each slice's ImagePositionPatient must fall on one label-map slice and its
ImageOrientationPatient on the label map's in-plane axes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..volume import Volume
from .dicom_scan import DicomFile
from .errors import ReadError, WriteError

TOLERANCE_MM = 1e-3


def source_slices(labels: Volume, target: Path, source=None) -> list[DicomFile]:
    """Headers of the single-frame DICOM slices under ``labels``, one per slice along axis 0.

    source: the DICOM file or folder the labels were made on (default ``labels.meta["source"]``).
    ``labels.meta["SeriesInstanceUID"]``, when present, picks the series; otherwise the series
    whose grid matches the label map's.
    """
    from .dicom import find_series  # the reader module; imported here to keep writer imports light

    origin = source if source is not None else labels.meta.get("source")
    if not origin:
        raise WriteError(target, "a DICOM SEG or RTSTRUCT refers to the DICOM scan the labels were made on, "
                                 "and these labels name none (load the scan with mv.load and segment it, or pass source=)")
    folder = Path(origin)
    if labels.ndim != 3 or labels.rgb or labels.n_leading:
        raise WriteError(target, f"DICOM SEG export takes a 3D label map, got shape {tuple(labels.data.shape)}")
    try:
        series = find_series(folder)
    except ReadError as exc:
        raise WriteError(target, f"the source scan {folder} cannot be read: {exc.problem}") from exc
    wanted = str(labels.meta.get("SeriesInstanceUID") or "")
    n, rows, cols = labels.spatial_shape
    candidates = [s for s in series if s.kind == "slices" and len(s.files) == n
                  and int(s.header.get("Rows") or 0) == rows and int(s.header.get("Columns") or 0) == cols
                  and (not wanted or s.series_uid == wanted)]
    for candidate in candidates:
        ordered = _on_grid(candidate.files, labels)
        if ordered is not None:
            return ordered
    raise WriteError(target, f"no DICOM series of single-frame slices in {folder} lies on the label map's grid "
                             f"({n} slices of {rows}x{cols}); DICOM SEG export needs the labels on the scan's own grid")


def _on_grid(files: list[DicomFile], labels: Volume) -> list[DicomFile] | None:
    """``files`` ordered by label-map slice, or None when any slice is off the label map's grid."""
    direction = labels.direction
    spacing = np.asarray(labels.spacing)
    origin = np.asarray(labels.origin)
    placed: dict[int, DicomFile] = {}
    for f in files:
        h = f.header
        position, orientation = h.get("ImagePositionPatient"), h.get("ImageOrientationPatient")
        if position is None or orientation is None:
            return None
        # Volume order is reversed LPS: (z, y, x) components; a slice's rows run along x, columns along y.
        along_x = np.asarray([float(v) for v in orientation[:3]])[::-1]
        along_y = np.asarray([float(v) for v in orientation[3:]])[::-1]
        if not (np.allclose(along_x, direction[:, 2], atol=1e-4) and np.allclose(along_y, direction[:, 1], atol=1e-4)):
            return None
        pixel = h.get("PixelSpacing")  # (between rows, between columns) = (y, x)
        if pixel is None or not np.allclose([float(v) for v in pixel], spacing[1:], atol=TOLERANCE_MM):
            return None
        index = np.linalg.solve(direction * spacing[None, :], np.asarray([float(v) for v in position])[::-1] - origin)
        k = int(round(index[0]))
        if abs(index[0] - k) * spacing[0] > TOLERANCE_MM or np.any(np.abs(index[1:] * spacing[1:]) > TOLERANCE_MM):
            return None
        if k in placed or not 0 <= k < labels.spatial_shape[0]:
            return None
        placed[k] = f
    return [placed[k] for k in range(len(placed))] if len(placed) == labels.spatial_shape[0] else None
