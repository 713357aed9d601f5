"""A plain CT/MR Image Storage writer: one file per slice, int16 with rescale slope/intercept.

It exists so tests and benchmarks can make DICOM series of known content and geometry (missing
slices, mixed series, 300-slice stacks); it is not registered as a ``save`` format.
"""

from __future__ import annotations

import datetime
import re
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, PYDICOM_IMPLEMENTATION_UID, generate_uid

from ..volume import Volume, to_itk_geometry
from .errors import WriteError

STORAGE = {"CT": CTImageStorage, "MR": MRImageStorage}
INT16 = np.iinfo(np.int16)


def _rescale_for(data: np.ndarray, modality: str) -> tuple[float, float]:
    """(slope, intercept) that fit ``data`` into int16: exact for integers spanning <= 65535 values."""
    lo, hi = float(data.min()), float(data.max())
    if np.issubdtype(data.dtype, np.integer) and hi - lo <= INT16.max - INT16.min:
        if modality == "CT" and lo >= -1024 and hi + 1024 <= INT16.max:
            return 1.0, -1024.0  # the scanners' convention: stored values start at 0 for air
        if lo >= INT16.min and hi <= INT16.max:
            return 1.0, 0.0
        return 1.0, lo - INT16.min
    slope = (hi - lo) / (INT16.max - INT16.min) if hi > lo else 1.0
    return slope, lo - INT16.min * slope


def _ds_number(value: float) -> str:
    """A DS string (at most 16 characters) that keeps as much precision as fits."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.8g}"


def write_dicom_series(volume: Volume, folder, series_description: str = "medvision", *,
                       modality: str | None = None, series_number: int = 1, study_uid: str | None = None,
                       frame_of_reference_uid: str | None = None, patient_id: str = "MEDVISION",
                       series_uid: str | None = None) -> list[Path]:
    """Write a 3D scalar ``volume`` as one DICOM file per slice into ``folder``; returns the files.

    Geometry comes from the Volume (spacing, origin, direction); values are stored as int16 with
    RescaleSlope/RescaleIntercept (exact for integer data, 16-bit quantised for float data).
    ``modality`` is ``"CT"`` or ``"MR"`` (default: the volume's, else CT).
    """
    folder = Path(folder)
    modality = (modality or volume.modality or "CT").upper()
    if modality not in STORAGE:
        raise WriteError(folder, f"write_dicom_series writes CT or MR images, not {modality}")
    data = np.asarray(volume.data)
    if volume.rgb or volume.n_leading or volume.ndim not in (2, 3):
        raise WriteError(folder, f"write_dicom_series needs a 2D or 3D scalar volume, got shape {data.shape}")
    if volume.ndim == 2:
        data = data[None]
        spacing, origin, direction = (1.0,) + volume.spacing, (0.0,) + volume.origin, np.eye(3)
        direction[1:, 1:] = volume.direction
        volume = Volume(data, spacing, origin, direction)
    folder.mkdir(parents=True, exist_ok=True)
    spacing_xyz, origin_xyz, flat = to_itk_geometry(volume)
    d = np.asarray(flat).reshape(3, 3)  # columns: world directions of x (columns), y (rows), z (slices)
    slope, intercept = _rescale_for(data, modality)
    stored = np.clip(np.rint((data.astype(np.float64) - intercept) / slope), INT16.min, INT16.max).astype("<i2")

    ds = _template(modality, series_description, series_number, study_uid, frame_of_reference_uid,
                   patient_id, series_uid)
    ds.Rows, ds.Columns = int(data.shape[1]), int(data.shape[2])
    ds.PixelSpacing = [_ds_number(spacing_xyz[1]), _ds_number(spacing_xyz[0])]
    ds.SliceThickness = _ds_number(spacing_xyz[2])
    ds.SpacingBetweenSlices = _ds_number(spacing_xyz[2])
    ds.ImageOrientationPatient = [_ds_number(v) for v in (*d[:, 0], *d[:, 1])]
    ds.RescaleSlope, ds.RescaleIntercept = _ds_number(slope), _ds_number(intercept)
    if modality == "CT":
        ds.RescaleType = "HU"
    slug = re.sub(r"[^A-Za-z0-9]+", "_", series_description).strip("_")[:24] or "series"
    tail = ds.SeriesInstanceUID.split(".")[-1][-6:]
    written = []
    for k in range(data.shape[0]):
        position = np.asarray(origin_xyz) + d[:, 2] * spacing_xyz[2] * k
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds_number(v) for v in position]
        ds.SliceLocation = _ds_number(float(position @ np.cross(d[:, 0], d[:, 1])))
        ds.PixelData = stored[k].tobytes()
        path = folder / f"{slug}_{tail}_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written.append(path)
    return written


def _template(modality, description, number, study_uid, for_uid, patient_id, series_uid) -> Dataset:
    """The header every slice shares: patient, study, series, frame of reference, pixel format."""
    now = datetime.datetime.now()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = STORAGE[modality]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = STORAGE[modality]
    ds.Modality = modality
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Medvision^Test", patient_id, "", "O"
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.SeriesNumber = number
    ds.SeriesDescription = description
    ds.FrameOfReferenceUID = for_uid or generate_uid()
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "napari-medvision"
    ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if modality == "CT":
        ds.KVP = ""
    else:
        ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = "RM", "NONE", "", "3D"
    return ds

