"""NRRD/NHDR and MetaImage (MHA/MHD) through SimpleITK.

SimpleITK's array is already ``(z, y, x)``; its geometry is ``(x, y, z)`` and is reversed by
:func:`~napari_medvision.volume.from_itk_geometry`. Vector pixels (RGB) keep a trailing channel axis.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path

import numpy as np

from ..volume import Volume, from_itk_geometry, to_itk_geometry
from .errors import ReadError
from .limits import check_compressed, check_memory, check_raw, declared_bytes
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
        _check_declared_size(sitk, path)
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
    meta = _metadata(image)
    modality = next((meta[k] for k in _MODALITY_KEYS if k in meta), None)
    if modality == "MET_MOD_UNKNOWN":
        modality = None
    labels = None
    if LABELS_KEY in meta:
        labels = {int(k): str(v) for k, v in json.loads(meta.pop(LABELS_KEY)).items()}
    return [Volume(data=data, spacing=spacing, origin=origin, direction=direction, modality=modality,
                   rgb=rgb, labels=labels, meta=meta)]


def _metadata(image) -> dict[str, str]:
    """The image's text fields under 4000 characters; a field whose key or value is not valid
    text (a damaged header) is left out rather than failing the whole file."""
    meta = {}
    for key in image.GetMetaDataKeys():
        try:
            value = image.GetMetaData(key)
        except (TypeError, UnicodeDecodeError, RuntimeError):
            continue
        if len(value) < 4000:
            meta[key] = value
    return meta


# Expansion allowed per NRRD encoding / MetaImage compression: raw data must be all there,
# text needs at least two characters ("0 ") per value of up to 8 bytes, deflate at most 1032-fold.
_EXPANSION = {"raw": 1.0, "text": 4.0, "txt": 4.0, "ascii": 4.0, "hex": 0.5}


def _check_declared_size(sitk, path: Path) -> None:
    """ReadError before SimpleITK allocates, when the header declares more voxels than its data
    (raw, text or compressed) can hold, or than this process can take."""
    head = _header_text(path)
    if not head.startswith("NRRD"):
        _check_metaimage_fields(path, head)
    data_files = _data_files(path, head)
    for data_file in data_files or ():
        _check_data_file(path, data_file)
    info = sitk.ImageFileReader()
    info.SetFileName(str(path))
    info.ReadImageInformation()
    shape = tuple(info.GetSize()) + (info.GetNumberOfComponents(),)
    itemsize = sitk.Image([1] * info.GetDimension(), info.GetPixelID()).GetSizeOfPixelComponent() \
        if info.GetPixelID() != sitk.sitkUnknown else 8
    if data_files is None:  # a file list or pattern: SimpleITK checks each file
        check_memory(path, "the image", declared_bytes(shape, itemsize))
        return
    stored = sum(f.stat().st_size for f in data_files)
    encoding = _encoding(head)
    if encoding in _EXPANSION:
        header_bytes = len(head) if data_files == [path] else 0
        check_raw(path, "the image", shape, itemsize, int(_EXPANSION[encoding] * max(stored - header_bytes, 0)))
    else:
        check_compressed(path, "the image", shape, itemsize, stored)
    check_memory(path, "the image", declared_bytes(shape, itemsize))


# MetaImage numeric fields and how many values each holds, for n dimensions.
_META_VECTORS = {name.lower(): (name, power) for name, power in (
    ("DimSize", 1), ("ElementSpacing", 1), ("ElementSize", 1), ("Offset", 1), ("Position", 1), ("Origin", 1),
    ("CenterOfRotation", 1), ("TransformMatrix", 2), ("Rotation", 2), ("Orientation", 2))}
MAX_DIMENSIONS = 5  # SimpleITK's largest image dimension
# Largest spacing, origin or matrix entry: products of two stay finite (1e308 made ITK's SVD of
# the direction spin on an infinite entry).
MAX_FIELD_VALUE = 1e30


def _check_metaimage_fields(path: Path, head: str) -> None:
    """ReadError when a MetaImage header's dimension count, sizes or geometry are not finite
    numbers in range: SimpleITK's MetaIO crashes on ``NDims = 99999999`` and hangs on an
    infinite direction matrix."""
    fields = _fields(head)
    ndims = fields.get("ndims", "")
    if not ndims.isdigit() or not 1 <= int(ndims) <= MAX_DIMENSIONS:
        raise ReadError(path, f"has NDims = {ndims!r}; a MetaImage has 1 to {MAX_DIMENSIONS} dimensions")
    n = int(ndims)
    for key, (name, power) in _META_VECTORS.items():
        if key not in fields:
            continue
        try:
            values = [float(v) for v in fields[key].split()]
        except ValueError:
            values = []
        if len(values) < n ** power or not all(abs(v) <= MAX_FIELD_VALUE for v in values):  # NaN fails too
            raise ReadError(path, f"has a damaged {name} field ({fields[key][:60]!r}): expected {n ** power} "
                                  f"numbers of at most {MAX_FIELD_VALUE:g} in size")
        if key == "dimsize" and not all(v >= 1 and v == int(v) for v in values):
            raise ReadError(path, f"has DimSize = {fields[key][:60]!r}; sizes are positive whole numbers")
    channels = fields.get("elementnumberofchannels", "1")
    if not channels.isdigit() or int(channels) < 1:
        raise ReadError(path, f"has ElementNumberOfChannels = {channels!r}; expected a positive whole number")


def _check_data_file(path: Path, data_file: Path) -> None:
    """ReadError unless the data file a detached header names is a regular, non-empty file: a
    device (``/dev/zero``), folder, pipe or ``/proc`` file would be read as voxels or block."""
    if data_file == path:
        return
    try:
        info = data_file.stat()
    except OSError:
        raise ReadError(path, f"names the data file {data_file.name!r}, which does not exist") from None
    if not stat.S_ISREG(info.st_mode):
        raise ReadError(path, f"names the data file {str(data_file)!r}, which is not a regular file "
                              "(a device, folder or pipe)")
    if info.st_size == 0:
        raise ReadError(path, f"names the data file {str(data_file)!r}, which is empty")


def _header_text(path: Path) -> str:
    """The text header of an NRRD/MetaImage file (up to the blank line or the data element)."""
    with open(path, "rb") as f:
        head = f.read(65536)
    for end in (b"\n\n", b"\r\n\r\n"):
        if head.startswith(b"NRRD") and end in head:
            head = head[: head.index(end) + len(end)]
            break
    else:
        marker = head.find(b"ElementDataFile")
        if marker >= 0:
            line_end = head.find(b"\n", marker)
            head = head[: line_end + 1 if line_end >= 0 else len(head)]
    return head.decode("latin-1")


def _fields(head: str) -> dict[str, str]:
    """Lower-cased header fields: NRRD's ``key: value``, MetaImage's ``Key = Value``."""
    sep = ":" if head.startswith("NRRD") else "="
    fields = {}
    for line in head.splitlines():
        if ":=" in line:  # NRRD key/value metadata, not a field
            continue
        key, found, value = line.partition(sep)
        if found:
            fields[key.strip().lower()] = value.strip()
    return fields


def _encoding(head: str) -> str:
    fields = _fields(head)
    if "encoding" in fields:
        return fields["encoding"].lower()
    return "gzip" if fields.get("compresseddata", "").lower() == "true" else "raw"


def _data_files(path: Path, head: str) -> list[Path] | None:
    """The files holding the voxels: the file itself, the detached data file, or None for lists."""
    fields = _fields(head)
    name = fields.get("elementdatafile") or fields.get("data file") or fields.get("datafile")
    if name is None or name.upper() == "LOCAL":
        return [path]
    if name.upper().startswith("LIST") or "%" in name or " " in name.strip():
        return None
    return [path.parent / name]


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
