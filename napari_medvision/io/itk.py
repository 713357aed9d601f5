"""NRRD/NHDR and MetaImage (MHA/MHD) through SimpleITK.

SimpleITK's array is already ``(z, y, x)``; its geometry is ``(x, y, z)`` and is reversed by
:func:`~napari_medvision.volume.from_itk_geometry`. Vector pixels (RGB) keep a trailing channel axis.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..volume import Volume, from_itk_geometry, to_itk_geometry
from .errors import ReadError
from .formats import register_reader, register_writer

ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
_MODALITY_KEYS = ("Modality", "modality", "0008|0060")
LABELS_KEY = "medvision_labels"


def _sniff(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(64)
    return head.startswith(b"NRRD000") or b"ObjectType" in head or head.startswith(b"NDims")


@register_reader("NRRD/MetaImage", ITK_SUFFIXES, sniff=_sniff)
def read_itk(path: Path, **_) -> list[Volume]:
    import SimpleITK as sitk  # imported here: loading SimpleITK costs ~0.3 s that other formats need not pay

    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ReadError(path, f"is not a readable NRRD/MetaImage file ({_itk_reason(exc)})") from exc
    data = sitk.GetArrayFromImage(image)
    rgb = image.GetNumberOfComponentsPerPixel() in (3, 4) and data.ndim == image.GetDimension() + 1
    if image.GetDimension() == 4:
        # ITK 4D: (t, z, y, x) array; the fourth axis is time, not space.
        spacing, origin, direction = from_itk_geometry(
            image.GetSpacing()[:3], image.GetOrigin()[:3],
            np.asarray(image.GetDirection()).reshape(4, 4)[:3, :3].ravel())
    else:
        spacing, origin, direction = from_itk_geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    meta = {k: image.GetMetaData(k) for k in image.GetMetaDataKeys() if len(image.GetMetaData(k)) < 4000}
    modality = next((meta[k] for k in _MODALITY_KEYS if k in meta), None)
    if modality == "MET_MOD_UNKNOWN":
        modality = None
    labels = None
    if LABELS_KEY in meta:
        labels = {int(k): str(v) for k, v in json.loads(meta.pop(LABELS_KEY)).items()}
    return [Volume(data=data, spacing=spacing, origin=origin, direction=direction, modality=modality,
                   rgb=rgb, labels=labels, meta=meta)]


@register_writer("NRRD/MetaImage", ITK_SUFFIXES)
def write_itk(vol: Volume, path: Path) -> None:
    data = np.asarray(vol.data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if vol.n_leading:
        raise ValueError("4D series are saved as NIfTI (.nii.gz) here")
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(data, isVector=vol.rgb)
    spacing, origin, direction = to_itk_geometry(vol)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    if vol.modality:
        image.SetMetaData("Modality", vol.modality)
    if vol.labels is not None:
        image.SetMetaData(LABELS_KEY, json.dumps({str(k): v for k, v in vol.labels.items()}))
    # Write beside the target, then rename: a failed write never clobbers a good file.
    tmp = path.with_name(path.stem + ".partial" + path.suffix)
    try:
        sitk.WriteImage(image, str(tmp), useCompression=True)
        if path.suffix.lower() in (".mhd", ".nhdr"):
            _move_detached(tmp, path)
        else:
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _move_detached(tmp: Path, path: Path) -> None:
    """Detached headers name their data file: rewrite that name when renaming into place."""
    header = tmp.read_text(errors="replace")
    for data_file in tmp.parent.glob(tmp.stem + ".*"):
        if data_file == tmp:
            continue
        target = path.with_name(path.stem + data_file.name[len(tmp.stem):])
        data_file.replace(target)
        header = header.replace(data_file.name, target.name)
    path.write_text(header)


def _itk_reason(exc: Exception) -> str:
    text = str(exc)
    for line in text.splitlines():
        if "Description:" in line:
            return line.split("Description:", 1)[1].strip()[:200]
    return text.strip().splitlines()[-1][:200] if text.strip() else "unknown error"
