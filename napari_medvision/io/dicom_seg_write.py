"""DICOM SEG export: a label map of a DICOM scan as one Segmentation object (highdicom).

``mv.save(labels, "organs.dcm")`` writes it for labels made on a loaded DICOM series: PACS,
OHIF and 3D Slicer show it over the scan. Segments are numbered 1..n in label-id order and
keep the label names; BINARY frames (the type every viewer reads), empty frames left out.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

from ..volume import Volume
from .dicom_source import source_slices
from .errors import WriteError
from .formats import register_writer

SEGMENT_LABEL_MAX = 64  # DICOM LO


def label_names(labels: Volume, data: np.ndarray) -> dict[int, str]:
    """{label id: name} for every named label and every non-zero value in ``data``, in id order."""
    present = {int(v) for v in np.unique(data) if v != 0}
    names = {int(k): v for k, v in (labels.labels or {}).items() if int(k) != 0}
    return {k: names.get(k, f"label {k}") for k in sorted(present | set(names))}


@register_writer("DICOM SEG", (".dcm",))
def write_dicom_seg(labels: Volume, path, source=None, series_description: str | None = None) -> Path:
    """Write ``labels`` (on a DICOM scan's grid) to ``path`` as a DICOM SEG; returns the path.

    source: the scan's DICOM file or folder (default ``labels.meta["source"]``, set by ``mv.load``).
    The file appears whole or not at all (written under a temporary name, then renamed).
    """
    import highdicom as hd  # imported here: only DICOM export needs it
    from pydicom.uid import generate_uid

    from .. import __version__

    path = Path(path)
    if not labels.is_labels:
        raise WriteError(path, "only label maps are written as DICOM (a DICOM SEG); save images as .nii.gz or .nrrd")
    data = np.asarray(labels.data)
    if not np.issubdtype(data.dtype, np.integer) or (data.size and data.min() < 0):
        raise WriteError(path, f"a DICOM SEG needs non-negative integer labels, got {data.dtype}")
    files = source_slices(labels, path, source)
    names = label_names(labels, data)
    if not names:
        raise WriteError(path, "the label map holds no labels to write")
    numbers = np.zeros(max(names) + 1, dtype=np.uint16)
    numbers[list(names)] = np.arange(1, len(names) + 1)  # segment numbers must run 1..n
    frames = numbers[data]
    frames = frames.astype(np.uint8) if len(names) < 256 else frames
    model = labels.meta.get("model")
    descriptions = [_description(i + 1, name, model) for i, name in enumerate(names.values())]
    seg = hd.seg.Segmentation(
        source_images=[f.header for f in files],
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=int(labels.meta.get("SeriesNumber") or 900),
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="napari-medvision",
        manufacturer_model_name=str(model or "napari-medvision")[:64],
        software_versions=__version__,
        device_serial_number="0",
        series_description=(series_description or f"medvision {model or 'labels'}")[:64],
        omit_empty_frames=bool(frames.any()),
    )
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        seg.save_as(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _description(number: int, name: str, model) -> "object":
    """A segment named as in the label map, coded as the SNOMED structure of that name when one exists."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    try:
        kind = getattr(codes.SCT, "".join(w.capitalize() for w in name.replace("-", " ").replace("_", " ").split()))
        category = codes.SCT.AnatomicalStructure
    except (AttributeError, KeyError):
        kind, category = codes.SCT.Tissue, codes.SCT.Tissue
    if model:
        algorithm = hd.AlgorithmIdentificationSequence(name=str(model)[:64], version="1",
                                                       family=codes.cid7162.ArtificialIntelligence)
        return hd.seg.SegmentDescription(number, name[:SEGMENT_LABEL_MAX], category, kind,
                                         hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm)
    return hd.seg.SegmentDescription(number, name[:SEGMENT_LABEL_MAX], category, kind,
                                     hd.seg.SegmentAlgorithmTypeValues.MANUAL)
