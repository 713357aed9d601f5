"""Heidelberg ``.E2E`` (Heyex database export): the OCT B-scans of its first series.

E2E is a chunked container (layout as documented by uocte and LibE2E): every data chunk starts
with the magic ``MDbData`` and a 60-byte header (patient, study, series, slice ids, chunk
type), then its payload. Image chunks (type ``0x40000000``) hold a 20-byte image header and
the pixels; OCT B-scans are 16-bit unsigned floats (10-bit mantissa, 6-bit exponent, bias 63).
Chunks are located by their magic rather than through the directory lists, because exported
or minimised files often carry stale directory offsets (oct-converter 0.7 fails on exactly
that, eyepy 0.21 finds no volume in such a file).
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

import numpy as np

from ..volume import Volume
from .errors import ReadError
from .formats import register_reader
from .oct_heidelberg import heidelberg_display, spacing_or_pixels

_MAGIC_FILE = b"CMDb"
_MAGIC_CHUNK = b"MDbData\0"
_CHUNK = struct.Struct("<12sIIIIIiiiiHHII")  # magic, ?, ?, pos, size, ?, patient, study, series, slice, ind, ?, type, ?
_IMAGE = struct.Struct("<5I")  # size, image type, number of values, height, width
_TYPE_IMAGE = 0x40000000
_TYPE_BSCAN_META = 10004
_IMAGE_OCT = 0x02200201  # B-scan, unsigned float16 pixels
_SUGGESTION = "export the scan from Heyex as .vol or XML instead"


def _is_e2e(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == _MAGIC_FILE


@register_reader("Heidelberg E2E", (".e2e",), sniff=_is_e2e)
def read_e2e(path: Path, raw: bool = False, **_options) -> list[Volume]:
    """The OCT B-scans of the first series in a Heidelberg ``.E2E`` file, stacked as a volume
    (uint8 as Heyex shows it, or float32 reflectivity with ``raw=True``)."""
    path = Path(path)
    with open(path, "rb") as f:
        if f.read(4) != _MAGIC_FILE:
            raise ReadError(path, f"is not a Heidelberg E2E file (no 'CMDb' signature); {_SUGGESTION}")
        size = f.seek(0, 2)
        if size < 100:
            raise ReadError(path, f"is too short to hold any E2E data ({size} bytes); {_SUGGESTION}")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            bscans, metas = _collect(buf)
    if not bscans:
        raise ReadError(path, f"holds no complete OCT B-scan that medvision can decode; {_SUGGESTION}")

    series = sorted(bscans)[0]  # (patient, study, series) ids
    slices = bscans[series]
    shapes = {img.shape for img in slices.values()}
    if len(shapes) != 1:
        raise ReadError(path, f"holds B-scans of different sizes {sorted(shapes)}; {_SUGGESTION}")
    order = sorted(slices)
    stored = np.stack([slices[s] for s in order])
    data = decode_ufloat16(stored)
    meta = {"e2e_series": series, "e2e_slices": order, "n_series": len(bscans)}
    spacing = spacing_or_pixels(path, _spacing(metas.get(series, {}), order, data.shape[2]) or (0.0,) * 3, meta,
                                "no usable B-scan geometry chunk (type 10004)")
    return [Volume(data=data if raw else heidelberg_display(data), spacing=spacing, modality="OCT", meta=meta)]


def decode_ufloat16(stored: np.ndarray) -> np.ndarray:
    """float32 reflectivity from Heidelberg's 16-bit unsigned floats: (1 + m/1024) * 2**(e - 63)."""
    stored = stored.astype(np.uint32)
    mantissa = (stored & 0x3FF).astype(np.float32)
    exponent = (stored >> 10).astype(np.float32) - 63
    return ((1 + mantissa / 1024) * np.exp2(exponent)).astype(np.float32)


def _collect(buf: mmap.mmap) -> tuple[dict, dict]:
    """``{(patient, study, series): {slice: uint16 B-scan}}`` and the B-scan geometry chunks."""
    bscans: dict = {}
    metas: dict = {}
    at = buf.find(_MAGIC_CHUNK)
    end = len(buf)
    while at != -1 and at + _CHUNK.size <= end:
        fields = _CHUNK.unpack_from(buf, at)
        _m, _a, _b, _pos, size, _c, patient, study, series, slice_id, _ind, _d, kind, _e = fields
        body = at + _CHUNK.size
        key = (patient, study, series)
        if kind == _TYPE_IMAGE and body + _IMAGE.size <= end:
            _size, image_type, count, height, width = _IMAGE.unpack_from(buf, body)
            pixels_at = body + _IMAGE.size
            # Only B-scans whose header agrees with itself and whose pixels are all present.
            if image_type == _IMAGE_OCT and count == height * width > 0 and pixels_at + 2 * count <= end:
                img = np.frombuffer(buf, "<u2", count, pixels_at).reshape(height, width).copy()
                bscans.setdefault(key, {})[slice_id] = img
        elif kind == _TYPE_BSCAN_META and body + 44 <= end:
            # size_y, size_x, start x/y, end x/y (degrees), zero, unknown, scale_y (mm), as in LibE2E
            _u, size_y, size_x, sx, sy, ex, ey, _z, _u1, scale_y = struct.unpack_from("<3I4fIff", buf, body)
            metas.setdefault(key, {})[slice_id] = (sx, sy, ex, ey, scale_y, size_x)
        at = buf.find(_MAGIC_CHUNK, body)
    return bscans, metas


# Heyex gives B-scan positions in degrees of visual angle; 0.2896 mm per degree is the
# Spectralis standard-eye factor eyepy uses for the same conversion (approximate).
_MM_PER_DEGREE = 0.2896


def _spacing(metas: dict, order: list, width: int) -> tuple[float, float, float] | None:
    found = [metas[s] for s in order if s in metas] or list(metas.values())
    if not found:
        return None
    pos = np.asarray([m[:4] for m in found], dtype=float)
    scale_y = float(found[0][4])
    lateral = float(np.hypot(pos[0, 2] - pos[0, 0], pos[0, 3] - pos[0, 1])) * _MM_PER_DEGREE / max(width, 1)
    if not (scale_y > 0 and lateral > 0):
        return None
    steps = np.hypot(*np.diff(pos[:, :2], axis=0).T) * _MM_PER_DEGREE if len(pos) > 1 else np.array([])
    distance = float(steps.mean()) if steps.size and steps.mean() > 0 else lateral
    return distance, scale_y, lateral
