"""Heidelberg Spectralis OCT: ``.vol`` files and Heyex XML exports (a folder of B-scan TIFFs).

Both give the OCT volume first, then (when the file holds layer segmentations) a label map
of the regions between boundaries, with the raw boundary rows in ``meta["boundaries"]``.

The ``.vol`` layout is Heidelberg's published "HSF-OCT" specification: a 2048-byte file
header, the SLO fundus image, then per B-scan a header (with the segmentation lines) and the
float32 reflectivity. It is parsed here with ``struct``/numpy rather than through eyepy so
that reading needs no extra dependency (eyepy is used by the tests as an independent check).
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import defusedxml.ElementTree as ET
import numpy as np
import tifffile
from defusedxml import DefusedXmlException

from ..volume import Volume
from .errors import GeometryWarning, ReadError
from .formats import register_reader
from .image2d import check_tiff_size, read_photo
from .limits import check_memory, check_raw
from .oct_layers import boundaries_volume

if TYPE_CHECKING:
    from xml.etree.ElementTree import Element  # the type defusedxml's parser returns

# File header (HSF-OCT spec), little endian, 258 bytes used of 2048.
_VOL_HEADER = struct.Struct("<12s3I3d2I2dId4sQiI16s16sI24sdI24sd4I34s")
_VOL_HEADER_SIZE = 2048
# B-scan header: version, header size, start/end x/y (mm), num_seg, seg_offset, quality, shift.
_BSCAN_HEADER = struct.Struct("<12sI4d2IfI")
# Index of each segmentation line in a .vol B-scan header (as eyepy's HeVolReader names them).
VOL_LAYER_NAMES = (
    "ILM", "BM", "RNFL", "GCL", "IPL", "INL", "OPL", "ONL", "ELM",
    "IOS", "OPT", "CHO", "VIT", "ANT", "PR1", "PR2", "RPE",
)
_INVALID = 3.0e38  # Heidelberg marks missing pixels and boundary points with FLT_MAX
_SCAN_PATTERNS = {0: "unknown", 1: "single line", 2: "circle", 3: "volume (ART)", 4: "fast volume", 5: "radial"}


def heidelberg_display(raw: np.ndarray) -> np.ndarray:
    """uint8 image as Heyex shows it, from the linear reflectivity stored in ``.vol``/E2E.

    The log mapping is the one eyepy and oct-converter use (oct-converter issue #21): it
    matches the grey values of Heyex's own TIFF export.
    """
    raw = np.asarray(raw, dtype=np.float32)
    invalid = raw >= _INVALID
    out = np.ones(raw.shape, dtype=np.float32)
    low = raw <= 1
    out[low] = (np.log(raw[low] + 2.44e-4) + 8.3) / 8.285
    out[invalid] = 0
    return np.rint(np.clip(out, 0, 1) * 255).astype(np.uint8)


PIXEL_SPACING_NOTE = "spacing is given in pixels, not mm"


def spacing_or_pixels(path: Path, spacing, meta: dict, why: str) -> tuple[float, ...]:
    """``spacing`` when every value is positive and finite; else 1 per axis, with
    ``meta["spacing_unit"] = "pixel"`` and a GeometryWarning so the user is told, not only the log."""
    values = tuple(float(v) for v in spacing)
    if all(np.isfinite(v) and v > 0 for v in values):
        return values
    warnings.warn(f"{path}: {why}; {PIXEL_SPACING_NOTE}", GeometryWarning, stacklevel=3)
    meta["spacing_unit"] = "pixel"
    return (1.0,) * len(values)


# --- .vol -----------------------------------------------------------------------------------
def _is_vol(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(12)
    return head.startswith(b"HSF-OCT") or head.startswith(b"ep-v")  # eyepy writes its own tag


@register_reader("Heidelberg VOL", (".vol",), sniff=_is_vol)
def read_vol(path: Path, raw: bool = False, **_options) -> list[Volume]:
    """The OCT volume of a Heidelberg ``.vol`` file (uint8 as Heyex shows it, or the float32
    reflectivity with ``raw=True``), followed by its layer label map if it holds segmentations."""
    path = Path(path)
    buf = path.read_bytes()
    if len(buf) < _VOL_HEADER_SIZE:
        raise ReadError(path, f"is too short for a Heidelberg .vol file ({len(buf)} bytes, the header alone is 2048)")
    h = _VOL_HEADER.unpack_from(buf, 0)
    (version, width, n_bscans, depth, scale_x, distance, scale_y, slo_w, slo_h, slo_sx, slo_sy,
     field_deg, focus, eye, _exam_time, scan_pattern, bscan_hdr, exam_id) = h[:18]
    if not (version.startswith(b"HSF-OCT") or version.startswith(b"ep-v")):
        raise ReadError(path, f"is not a Heidelberg .vol file (starts with {version[:8]!r}, expected 'HSF-OCT')")
    if min(width, n_bscans, depth) == 0:
        raise ReadError(path, f"has an invalid .vol header ({n_bscans} B-scans of {depth}x{width} pixels)")
    slo_start = _VOL_HEADER_SIZE
    if slo_start + slo_w * slo_h > len(buf):
        raise ReadError(path, f"is truncated inside its {slo_w}x{slo_h} SLO image ({len(buf)} bytes)")
    # Every B-scan stores its header and depth x width float32 pixels: check before allocating.
    check_raw(path, "the B-scans", (n_bscans, depth * width * 4 + _BSCAN_HEADER.size), 1,
              len(buf) - slo_start - slo_w * slo_h)
    check_memory(path, "the B-scans", n_bscans * depth * width * (4 if raw else 5))
    slo = np.frombuffer(buf, np.uint8, slo_w * slo_h, slo_start).reshape(slo_h, slo_w).copy()

    # Each B-scan says how long its own header is; eyepy-written files leave the file header's
    # default (61440) in place, so the B-scan's value is the one to trust.
    pixels = np.empty((n_bscans, depth, width), np.float32)
    positions, boundaries = [], {}
    start = slo_start + slo_w * slo_h
    for i in range(n_bscans):
        if start + _BSCAN_HEADER.size > len(buf):
            raise ReadError(path, f"is truncated: it ends before B-scan {i + 1} of {n_bscans}")
        _v, hdr, sx, sy, ex, ey, num_seg, seg_offset, _quality, _shift = _BSCAN_HEADER.unpack_from(buf, start)
        end = start + hdr + 4 * width * depth
        if hdr < _BSCAN_HEADER.size or end > len(buf):
            raise ReadError(path, f"is truncated: B-scan {i + 1} of {n_bscans} ({depth}x{width} pixels) needs "
                                  f"bytes up to {end}, the file has {len(buf)}")
        if num_seg and seg_offset + 4 * num_seg * width > hdr:
            raise ReadError(path, f"B-scan {i + 1} claims {num_seg} segmentation lines that do not fit its header")
        pixels[i] = np.frombuffer(buf, "<f4", depth * width, start + hdr).reshape(depth, width)
        positions.append((sx, sy, ex, ey))
        lines = np.frombuffer(buf, "<f4", num_seg * width, start + seg_offset).reshape(num_seg, width)
        for k, line in enumerate(lines):
            name = VOL_LAYER_NAMES[k] if k < len(VOL_LAYER_NAMES) else f"layer{k}"
            boundaries.setdefault(name, np.full((n_bscans, width), np.nan, np.float32))[i] = line
        start = end
    for name in list(boundaries):
        rows = boundaries[name]
        rows[rows >= _INVALID] = np.nan
        if not np.any(np.nan_to_num(rows)):  # all zero or missing: the layer was never segmented
            del boundaries[name]

    pattern = _SCAN_PATTERNS.get(scan_pattern, str(scan_pattern))
    if scan_pattern in (2, 5):
        warnings.warn(f"{path}: a {pattern} scan; its B-scans are stacked but do not form a cube",
                      GeometryWarning, stacklevel=2)
    image = pixels if raw else heidelberg_display(pixels)
    meta: dict = {}
    spacing = spacing_or_pixels(path, (distance if distance > 0 else scale_x, scale_y, scale_x), meta,
                                f"the header's scale ({scale_y} x {scale_x} mm) is not a pixel size")
    oct_volume = Volume(
        data=image,
        spacing=spacing,
        modality="OCT",
        meta=meta | {
            "laterality": eye.split(b"\0")[0].decode("ascii", "replace"),
            "scan_pattern": pattern,
            "exam_id": exam_id.split(b"\0")[0].decode("ascii", "replace"),
            "bscan_positions_mm": np.asarray(positions),  # start x, start y, end x, end y on the SLO
            "slo": slo,
            "slo_spacing": (slo_sy, slo_sx),
            "slo_field_deg": field_deg,
            "scan_focus_dpt": focus,
        },
    )
    return _with_layers(oct_volume, boundaries)


def _with_layers(oct_volume: Volume, boundaries: dict[str, np.ndarray]) -> list[Volume]:
    labels = boundaries_volume(oct_volume, boundaries) if boundaries else None
    return [oct_volume] if labels is None else [oct_volume, labels]


# --- Heyex XML export -----------------------------------------------------------------------
def _heyex_xml_in(path: Path) -> Path | None:
    """The Heyex XML file at ``path`` (a file or a folder holding one), else ``None``."""
    candidates = [path] if path.is_file() else sorted(path.glob("*.xml")) + sorted(path.glob("*.XML"))
    for candidate in candidates:
        with open(candidate, "rb") as f:
            head = f.read(512).lstrip()
        if head.startswith(b"<HEDX") or (head.startswith(b"<?xml") and b"<HEDX" in head):
            return candidate
    return None


@register_reader("Heyex XML", (".xml",), sniff=lambda p: _heyex_xml_in(p) is not None, folders=True)
def read_heyex_xml(path: Path, **_options) -> list[Volume]:
    """The OCT volume of a Heyex XML export (the ``.xml`` file or its folder), followed by the
    label map of the layer segmentation written in the XML."""
    path = Path(path)
    xml_path = _heyex_xml_in(path)
    if xml_path is None:
        raise ReadError(path, "is not a Heidelberg Heyex XML export (no XML file starting with <HEDX>)")
    try:  # defusedxml: entity expansion ("billion laughs") and external entities are refused
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as exc:
        raise ReadError(xml_path, f"is not valid XML ({exc})") from None
    except DefusedXmlException as exc:
        raise ReadError(xml_path, f"uses XML features refused for safety ({type(exc).__name__})") from None

    bscans, positions, seglines, slo, slo_spacing = [], [], [], None, None
    for image in root.iter("Image"):
        kind = image.findtext("ImageType/Type", "")
        context = image.find("OphthalmicAcquisitionContext")
        pixels = _read_exported_image(xml_path, image)
        if kind == "LOCALIZER":
            slo = pixels
            slo_spacing = (_float(context, "ScaleY"), _float(context, "ScaleX"))
        elif kind == "OCT":
            bscans.append((pixels, _float(context, "ScaleY"), _float(context, "ScaleX")))
            positions.append(tuple(_float(context, tag) for tag in
                                    ("Start/Coord/X", "Start/Coord/Y", "End/Coord/X", "End/Coord/Y")))
            seglines.append({line.findtext("Name"): line.findtext("Array", "") for line in image.iter("SegLine")})
    if not bscans:
        raise ReadError(xml_path, "is a Heyex XML export without OCT B-scans")
    shapes = {b[0].shape for b in bscans}
    if len(shapes) != 1:
        raise ReadError(xml_path, f"lists B-scans of different sizes {sorted(shapes)}; they do not form one volume")
    data = np.stack([b[0] for b in bscans])
    n, depth, width = data.shape

    boundaries: dict[str, np.ndarray] = {}
    for i, lines in enumerate(seglines):
        for name, text in lines.items():
            values = np.array(text.split(), dtype=np.float32)
            if values.size != width:
                raise ReadError(xml_path, f"layer {name} of B-scan {i + 1} has {values.size} points for {width} A-scans")
            values[values >= _INVALID] = np.nan
            boundaries.setdefault(name, np.full((n, width), np.nan, np.float32))[i] = values

    scale_y, scale_x = bscans[0][1], bscans[0][2]
    meta: dict = {}
    spacing = spacing_or_pixels(xml_path, (_bscan_distance(np.asarray(positions), fallback=scale_x), scale_y, scale_x),
                                meta, f"the export gives no usable B-scan scale ({scale_y} x {scale_x} mm)")
    oct_volume = Volume(
        data=data,
        spacing=spacing,
        modality="OCT",
        meta=meta | {
            "laterality": root.findtext(".//Series/Laterality", ""),
            "scan_pattern": root.findtext(".//Series/Type", ""),
            "bscan_positions_mm": np.asarray(positions),
            **({"slo": slo, "slo_spacing": slo_spacing} if slo is not None else {}),
        },
    )
    return _with_layers(oct_volume, boundaries)


def _read_exported_image(xml_path: Path, image: Element) -> np.ndarray:
    url = image.findtext("ImageData/ExamURL", "")
    # Heyex writes the exporting PC's Windows path; the image lies beside the XML.
    name = url.replace("\\", "/").rsplit("/", 1)[-1]
    file = xml_path.parent / name
    if not name or not file.is_file():
        raise ReadError(xml_path, f"refers to the image {name or url!r}, which is not in {xml_path.parent}")
    pixels = _read_tiff(file) if file.suffix.lower() in (".tif", ".tiff") else _imread(file)
    return pixels[..., 0] if pixels.ndim == 3 else pixels  # grey B-scans sometimes saved as RGB


def _read_tiff(file: Path) -> np.ndarray:
    try:
        with tifffile.TiffFile(file) as tif:
            check_tiff_size(file, tif)
            return tif.asarray()
    except (tifffile.TiffFileError, ValueError, OSError) as exc:
        if isinstance(exc, ReadError):
            raise
        raise ReadError(file, f"is not a readable TIFF B-scan ({exc})") from None


def _imread(file: Path) -> np.ndarray:
    return read_photo(file)[0].data


def _float(context: Element | None, tag: str) -> float:
    text = None if context is None else context.findtext(tag)
    return float(text) if text else float("nan")


def _bscan_distance(positions: np.ndarray, fallback: float) -> float:
    """Mean distance (mm) between consecutive B-scans, from their start and end points."""
    if len(positions) < 2 or not np.isfinite(positions).all():
        return fallback
    steps = np.concatenate([
        np.hypot(*np.diff(positions[:, 0:2], axis=0).T),
        np.hypot(*np.diff(positions[:, 2:4], axis=0).T),
    ])
    distance = float(steps.mean())
    return distance if distance > 0 else fallback
