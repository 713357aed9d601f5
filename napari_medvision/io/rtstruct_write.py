"""RTSTRUCT export: a label map of a DICOM scan as contours per structure (rt-utils).

Radiotherapy planning systems read structure sets, not SEG objects. rt-utils (an optional
dependency: ``pip install rt-utils``) traces each label's outline slice by slice. Contours are
polygons through boundary pixel centres, so a structure read back differs from the label map
at its edge pixels.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

from ..volume import Volume
from .dicom_seg_write import label_names
from .dicom_source import source_slices
from .errors import WriteError


def write_rtstruct(labels: Volume, path, source=None) -> Path:
    """Write ``labels`` (on a DICOM scan's grid) to ``path`` as an RTSTRUCT; returns the path.

    source: the scan's DICOM file or folder (default ``labels.meta["source"]``). One ROI per
    label present, named as in the label map.
    """
    try:
        from rt_utils import RTStruct, ds_helper, image_helper
    except ImportError as exc:
        raise WriteError(path, "RTSTRUCT export needs rt-utils: pip install rt-utils") from exc
    path = Path(path)
    if not labels.is_labels:
        raise WriteError(path, "only label maps are written as an RTSTRUCT")
    data = np.asarray(labels.data)
    files = source_slices(labels, path, source)
    headers = [f.header for f in files]
    # rt-utils stacks its mask along the slices in ascending position; ours follow axis 0.
    order = sorted(range(len(headers)), key=lambda k: float(image_helper.get_slice_position(headers[k])))
    series = [headers[k] for k in order]
    structure_set = RTStruct(series, ds_helper.create_rtstruct_dataset(series))
    structure_set.set_series_description(f"medvision {labels.meta.get('model') or 'labels'}"[:64])
    stacked = data[order]
    written = 0
    for label, name in label_names(labels, data).items():
        mask = stacked == label
        if not mask.any():
            continue
        structure_set.add_roi(mask=np.moveaxis(mask, 0, -1), name=name[:64], approximate_contours=False)
        written += 1
    if not written:
        raise WriteError(path, "the label map holds no labelled voxel to trace")
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.partial.dcm")
    try:
        structure_set.ds.save_as(tmp, enforce_file_format=True)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
