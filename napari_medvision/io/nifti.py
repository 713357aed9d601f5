"""NIfTI-1/2 (``.nii``, ``.nii.gz``) through nibabel.

NIfTI stores voxel->RAS; Volume is LPS in reversed axis order, so reading flips the first two
world axes and reverses array and world axes; writing does the inverse. The sform is used when
set (nibabel's best affine), else the qform; scaling slope/intercept are applied on read.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from ..volume import Volume
from .errors import ReadError
from .limits import check_compressed, check_memory, check_raw, declared_bytes
from .formats import register_reader, register_writer

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
NIFTI_SUFFIXES = (".nii", ".nii.gz")
LABELS_KEY = "medvision_labels"
NIFTI_INTENT_LABEL = 1002


def _sniff(path: Path) -> bool:
    head = _head(path, 352)
    return len(head) >= 348 and head[344:348] in (b"n+1\0", b"ni1\0", b"n+2\0", b"ni2\0") or head[4:8] == b"n+2\0"


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        start = f.read(2)
    opener = gzip.open if start == b"\x1f\x8b" else open
    with opener(path, "rb") as f:
        return f.read(n)


@register_reader("NIfTI", NIFTI_SUFFIXES, sniff=_sniff)
def read_nifti(path: Path, **_) -> list[Volume]:
    try:
        header, array = _read_header_and_voxels(path)
    except ReadError:
        raise
    except (EOFError, OSError, zlib.error, ValueError) as exc:
        raise ReadError(path, f"is truncated or corrupt: the voxel data could not be read ({_short(exc)})") from exc
    except Exception as exc:
        raise ReadError(path, f"is not a valid NIfTI file ({_short(exc)})") from exc
    # Drop NIfTI's trailing singleton axes (a 2D image is stored as x, y, 1).
    while array.ndim > 2 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim > 4:
        raise ReadError(path, f"has {array.ndim} dimensions (shape {array.shape}); medvision handles 2D, 3D and 4D")
    affine = header.get_best_affine().astype(float)
    lps = RAS_TO_LPS @ affine[:3, :3]
    lps_origin = RAS_TO_LPS @ affine[:3, 3]
    n = min(array.ndim, 3)
    # NIfTI axes are (i, j, k[, t]); Volume wants (t, k, j, i) and world reversed.
    if array.ndim == 4:
        data = np.transpose(array, (3, 2, 1, 0))
    else:
        data = np.transpose(array, tuple(range(array.ndim))[::-1])
    linear = lps[:, :n][::-1, ::-1]  # rows: world (S, P, L); columns: reversed index axes
    origin = lps_origin[::-1]
    if n == 2:
        # A 2D image: keep the in-plane rows of the world (P, L); the slice position rides in meta.
        linear = lps[:2, :2][::-1, ::-1]
        origin = lps_origin[:2][::-1]
    spacing = np.linalg.norm(linear, axis=0)
    spacing[spacing == 0] = 1.0
    direction = linear / spacing[None, :]
    meta = {
        "nifti_affine": affine.tolist(),
        "sform_code": int(header["sform_code"]),
        "qform_code": int(header["qform_code"]),
        "description": _text(header.get("descrip")),
        "xyzt_units": list(header.get_xyzt_units()),
    }
    if array.ndim == 4:
        meta["time_step"] = float(header["pixdim"][4])
    labels = _label_names(header)
    return [Volume(data=np.ascontiguousarray(data), spacing=tuple(spacing), origin=tuple(origin),
                   direction=direction, modality=None, labels=labels, meta=meta)]


def _label_names(header) -> dict[int, str] | None:
    """Names stored by medvision in a comment extension; ``{}`` for a label-intent file without them."""
    for ext in header.extensions:
        try:
            content = json.loads(ext.get_content())
        except (ValueError, TypeError, UnicodeDecodeError):
            continue
        if isinstance(content, dict) and LABELS_KEY in content:
            return {int(k): str(v) for k, v in content[LABELS_KEY].items()}
    if int(header["intent_code"]) == NIFTI_INTENT_LABEL:
        return {}
    return None


@register_writer("NIfTI", NIFTI_SUFFIXES)
def write_nifti(vol: Volume, path: Path) -> None:
    data = np.asarray(vol.data)
    if vol.rgb:
        raise ValueError("colour images are not stored in NIfTI here: save them as .png or .tif")
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if data.dtype == np.float16:
        data = data.astype(np.float32)
    n = vol.ndim
    linear_rev = vol.direction * np.asarray(vol.spacing)[None, :]
    affine = np.eye(4)
    if n == 3:
        affine[:3, :3] = RAS_TO_LPS @ linear_rev[::-1, ::-1]
        affine[:3, 3] = RAS_TO_LPS @ np.asarray(vol.origin)[::-1]
    else:
        source = vol.meta.get("nifti_affine")
        if source is not None:
            affine = np.asarray(source, dtype=float).copy()  # keeps the slice's z position
        affine[:2, :2] = (RAS_TO_LPS[:2, :2] @ linear_rev[::-1, ::-1])
        affine[:2, 3] = RAS_TO_LPS[:2, :2] @ np.asarray(vol.origin)[::-1]
    if data.ndim == 4:
        array = np.transpose(data, (3, 2, 1, 0))
    else:
        array = np.transpose(data, tuple(range(data.ndim))[::-1])
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    code = int(vol.meta.get("sform_code") or 1)
    img.set_sform(affine, code=code)
    img.set_qform(affine, code=int(vol.meta.get("qform_code") or code))
    img.header.set_xyzt_units("mm", "sec")
    if vol.labels is not None:
        img.header.set_intent("label")
        names = json.dumps({LABELS_KEY: {str(k): v for k, v in vol.labels.items()}}).encode()
        img.header.extensions.append(nib.nifti1.Nifti1Extension("comment", names))
    if data.ndim == 4 and vol.meta.get("time_step"):
        img.header["pixdim"][4] = vol.meta["time_step"]
    tmp = path.with_name(path.name + ".partial" + (".nii.gz" if path.name.lower().endswith(".gz") else ".nii"))
    try:
        nib.save(img, str(tmp))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_header_and_voxels(path: Path) -> tuple:
    """The NIfTI header and the voxel array with scaling applied.

    Unscaled ``.nii.gz`` voxels are decompressed with ISA-L (isal) straight into the final array:
    nibabel streams through Python's zlib, which made loading a 300x512x512 CT about 1.6x slower
    than SimpleITK; scaled or uncompressed files go through nibabel's own array proxy.
    """
    img = nib.load(str(path))
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise ValueError(f"it is a {type(img).__name__}, not NIfTI")
    header = img.header
    shape = header.get_data_shape()
    dtype = header.get_data_dtype()
    offset = int(img.dataobj.offset)  # the loaded header copy reports 0 here
    nbytes = _checked_size(path, shape, dtype, offset, float(img.dataobj.slope), float(img.dataobj.inter))
    # The loaded header copy has its scaling reset; the array proxy keeps the file's.
    unscaled = float(img.dataobj.slope) == 1.0 and float(img.dataobj.inter) == 0.0
    if not (unscaled and _is_gzip(path)):
        return header, np.asanyarray(img.dataobj)
    from isal import igzip

    # One readinto over header and voxels into one buffer, then a view: no extra copy.
    raw = np.empty(offset + nbytes, dtype=np.uint8)
    with igzip.open(path, "rb") as stream:
        view = memoryview(raw)
        filled = 0
        while filled < raw.size:
            got = stream.readinto(view[filled:])
            if not got:
                raise EOFError(f"expected {nbytes} bytes of voxels, found {max(filled - offset, 0)}")
            filled += got
    voxels = raw[offset:]
    if offset % dtype.itemsize:
        voxels = voxels.copy()
    array = voxels.view(dtype).reshape(shape, order="F")
    return header, array


def _checked_size(path: Path, shape, dtype: np.dtype, offset: int, slope: float, inter: float) -> int:
    """Voxel bytes the header declares, refused (ReadError) before any allocation when the file
    cannot hold them or the process cannot take them; decompression then stops at that size."""
    stored = path.stat().st_size
    what = "the voxel data"
    if _is_gzip(path):
        nbytes = check_compressed(path, what, shape, dtype.itemsize, stored)
    else:
        nbytes = check_raw(path, what, shape, dtype.itemsize, max(stored - offset, 0))
    scaled = 0 if (slope == 1.0 and inter == 0.0) else declared_bytes(shape, max(dtype.itemsize, 4))
    check_memory(path, what, nbytes + scaled)
    return nbytes


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == b"\x1f\x8b"


def _text(value) -> str:
    if value is None:
        return ""
    raw = value.item() if hasattr(value, "item") else value
    return raw.decode("latin-1", "replace").strip("\0 ") if isinstance(raw, bytes) else str(raw)


def _short(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
