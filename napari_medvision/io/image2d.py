"""Photos and stacks: PNG, JPEG, TIFF, GIF (fundus photos, OCT B-scans, masks).

Colour is kept (``rgb=True``). Files we write carry the Volume geometry as JSON (a PNG text
chunk, the TIFF description) so they round-trip; other files get 1 pixel = 1 unit unless the
TIFF states a metric resolution. A colour photo also yields its field-of-view mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from scipy import ndimage

from ..volume import Volume
from .errors import ReadError
from .limits import check_compressed, check_memory, check_raw
from .formats import register_reader, register_writer

GEOMETRY_KEY = "medvision"
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff", ".ome.tif", ".ome.tiff")
FOV_LABELS = {1: "field of view"}
FOV_MAX_PIXELS = 1_000_000  # larger photos get their field of view from a subsample


def _sniff_photo(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(8)
    return head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM"))


def _sniff_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+")


@register_reader("PNG/JPEG", PHOTO_SUFFIXES, sniff=_sniff_photo)
def read_photo(path: Path, **_) -> list[Volume]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:  # reads the header only
            bands = max(len(img.getbands()), 3 if img.mode in ("P", "PA") else 1)
            check_compressed(path, "the image", (img.height, img.width, bands), 2 if ";16" in img.mode or
                             img.mode.startswith("I") else 1, path.stat().st_size)
            check_memory(path, "the image", 4 * img.width * img.height * bands)
            img.load()
            text = dict(getattr(img, "text", {}) or {})
            if img.mode == "P" and "transparency" not in img.info:
                data = _palette_to_rgb(img)
            else:
                if img.mode in ("P", "PA"):
                    img = img.convert("RGBA" if "transparency" in img.info or img.mode == "PA" else "RGB")
                elif img.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                    img = img.convert("RGB")
                elif img.mode == "LA":
                    img = img.convert("L")
                data = _pixels(img)
            img.close()  # frees Pillow's copy of the pixels before the field of view is computed
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ReadError(path, f"is not a readable image ({exc})") from exc
    return _volumes(path, data, text.get(GEOMETRY_KEY))


_BAND_BYTES = 256 << 10  # output rows copied out of Pillow at a time


def _rows(img, band: int):
    """``(first row, that band's pixels as an array)`` for consecutive bands of ``band`` rows."""
    for top in range(0, img.height, band):
        yield top, np.asarray(img.crop((0, top, img.width, min(top + band, img.height))))


def _pixels(img) -> np.ndarray:
    """Pillow's pixels as one array, copied a band of rows at a time: ``np.asarray(img)`` holds
    two more whole copies while it converts (Pillow joins the chunks of ``tobytes``)."""
    first = np.asarray(img.crop((0, 0, img.width, 1)))
    out = np.empty((img.height,) + first.shape[1:], first.dtype)
    for top, rows in _rows(img, max(1, _BAND_BYTES // max(first.nbytes, 1))):
        out[top:top + len(rows)] = rows
    return out


def _palette_to_rgb(img) -> np.ndarray:
    """An opaque palette image as RGB, looked up band by band straight into the output (Pillow's
    own conversion keeps a 4-byte-per-pixel RGB image beside the palette image)."""
    palette = np.zeros((256, 3), np.uint8)
    values = np.frombuffer(bytes(img.getpalette("RGB") or b""), np.uint8)[: 768]
    palette.reshape(-1)[: values.size] = values
    out = np.empty((img.height, img.width, 3), np.uint8)
    for top, rows in _rows(img, max(1, _BAND_BYTES // max(3 * img.width, 1))):
        np.take(palette, rows, axis=0, out=out[top:top + len(rows)])
    return out


@register_reader("TIFF", TIFF_SUFFIXES, sniff=_sniff_tiff)
def read_tiff(path: Path, **_) -> list[Volume]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            check_ome(path, tif)
            check_tiff_size(path, tif)
            data = tif.asarray()
            description = tif.pages[0].description if tif.pages else ""
            spacing = _tiff_metric_spacing(tif)
    except ReadError:
        raise
    except (tifffile.TiffFileError, ValueError, OSError) as exc:
        raise ReadError(path, f"is not a readable TIFF ({exc})") from exc
    geometry = None
    if description.startswith("{"):
        try:
            geometry = json.loads(description).get(GEOMETRY_KEY)
        except (json.JSONDecodeError, AttributeError):
            geometry = None
    return _volumes(path, data, geometry, fallback_spacing=spacing)


MAX_OME_PLANES = 1 << 20  # planes (SizeZ x SizeC x SizeT), or pages they fill, an OME-XML may declare


def check_ome(path: Path, tif) -> None:
    """ReadError before tifffile reads an OME-TIFF's XML when that XML uses entities or declares
    sizes that are not positive whole numbers or more than :data:`MAX_OME_PLANES` planes:
    tifffile parses it with the standard library and lists every declared plane first."""
    if not tif.is_ome:
        return
    import defusedxml.ElementTree as ET
    from defusedxml import DefusedXmlException

    try:
        root = ET.fromstring(tif.pages[0].description)
    except DefusedXmlException as exc:
        raise ReadError(path, f"has OME-XML that uses XML features refused for safety ({type(exc).__name__})") from None
    except ET.ParseError:
        return  # tifffile reads the pages without the broken XML
    page_pixels = max(int(np.prod(tif.pages[0].shape)), 1)
    for pixels in (e for e in root.iter() if str(e.tag).endswith("}Pixels") or e.tag == "Pixels"):
        sizes = {}
        for axis in ("SizeX", "SizeY", "SizeZ", "SizeC", "SizeT"):
            value = pixels.get(axis, "1")
            try:
                sizes[axis] = int(value)
            except ValueError:
                sizes[axis] = 0
            if sizes[axis] < 1:
                raise ReadError(path, f"has OME-XML declaring {axis}={value!r}, not a positive whole number")
        planes = sizes["SizeZ"] * sizes["SizeC"] * sizes["SizeT"]
        # tifffile lists one entry per page the declared pixels fill
        pages = sizes["SizeX"] * sizes["SizeY"] * planes // page_pixels
        if max(planes, pages) > MAX_OME_PLANES:
            described = " x ".join(f"{axis}={n}" for axis, n in sizes.items())
            raise ReadError(path, f"has OME-XML declaring {described}, more than {MAX_OME_PLANES} pages of "
                                  f"{page_pixels} pixels: the metadata is damaged")


def check_tiff_size(path: Path, tif) -> None:
    """ReadError before tifffile allocates, when the first series declares more pixels than the
    file's strips and tiles could hold (raw or compressed) or than this process can take."""
    if not tif.series:
        raise ReadError(path, "holds no image")
    series = tif.series[0]
    stored = path.stat().st_size
    compressed = any(int(getattr(page, "compression", 1)) != 1 for page in series.pages[:1] if page is not None)
    if compressed:
        need = check_compressed(path, "the image", series.shape, series.dtype.itemsize, stored)
    else:
        need = check_raw(path, "the image", series.shape, series.dtype.itemsize, stored)
    check_memory(path, "the image", 2 * need)
    for index, page in enumerate(series.pages):  # tifffile reads each strip by its stated length
        if page is None:
            continue
        for offset, count in zip(page.dataoffsets, page.databytecounts):
            if offset + count > stored:
                raise ReadError(path, f"is truncated or damaged: page {index + 1} has image data up to byte "
                                      f"{offset + count}, the file has {stored}")


def _volumes(path: Path, data: np.ndarray, geometry, fallback_spacing=None) -> list[Volume]:
    if isinstance(geometry, str):
        geometry = json.loads(geometry)
    if geometry is not None:
        return [Volume.from_geometry(data, geometry)]
    rgb = data.ndim == 3 and data.shape[-1] in (3, 4) and data.shape[0] > 4
    ndim = data.ndim - (1 if rgb else 0)
    if ndim not in (2, 3):
        raise ReadError(path, f"has an array of shape {data.shape}; expected a 2D image, a colour photo or a 3D stack")
    spacing = fallback_spacing if fallback_spacing and len(fallback_spacing) == ndim else (1.0,) * ndim
    meta = {"spacing_known": fallback_spacing is not None}
    if rgb:
        if data.shape[-1] == 4:
            data = data[..., :3]
        image = Volume(data=data, spacing=spacing, modality="fundus", rgb=True, meta=meta)
        return [image, Volume(data=field_of_view(data).astype(np.uint8), spacing=spacing,
                              modality="fundus", labels=dict(FOV_LABELS), meta={"role": "field of view"})]
    return [Volume(data=data, spacing=spacing, modality=None, meta=meta)]


def field_of_view(rgb: np.ndarray, threshold: float = 0.08) -> np.ndarray:
    """Boolean mask of the camera's circular field of view in a fundus photo.

    The outside is near black in every channel; the retina is bright in red. A low threshold on the
    red channel, closed and hole-filled, keeping the largest component, recovers the disc that
    DRIVE's hand-made masks mark. Photos above :data:`FOV_MAX_PIXELS` are measured on every
    n-th pixel and the mask scaled back up (the disc edge moves by under n pixels): a 63-megapixel
    photo otherwise spent 23 s here, and a 2-megapixel one needed 3x its size in temporaries.
    """
    step = int(np.ceil(np.sqrt(rgb.shape[0] * rgb.shape[1] / FOV_MAX_PIXELS)))
    if step > 1:
        small = field_of_view(rgb[::step, ::step], threshold)
        return np.repeat(np.repeat(small, step, axis=0), step, axis=1)[: rgb.shape[0], : rgb.shape[1]]
    red = rgb[..., 0]
    scale = float(np.percentile(red, 99.5)) or 1.0
    # The 5x5 mean compared as a 5x5 sum, held in 16 bits (a float copy of the channel, or of the
    # filtered result, would be 4-8 bytes a pixel); 8-bit photos' sums stay below 6376.
    if red.dtype.itemsize == 1:
        box = ndimage.correlate1d(red, np.ones(5), axis=0, output=np.uint16)
        ndimage.correlate1d(box, np.ones(5), axis=1, output=box)
        mask = box > 25 * threshold * scale
    else:
        box = ndimage.uniform_filter(red, 5, output=np.float32)
        mask = box > threshold * scale
    del box
    mask = ndimage.binary_opening(mask, iterations=2)
    try:  # 16-bit labels unless the mask falls into more than 65535 pieces
        labelled, n = ndimage.label(mask, output=np.uint16)
    except RuntimeError:
        labelled, n = ndimage.label(mask)
    if n > 1:
        flat = labelled.reshape(-1)
        sizes = np.zeros(n + 1, np.int64)
        for start in range(0, flat.size, 1 << 16):  # bincount widens to 64 bits: a slice at a time
            sizes += np.bincount(flat[start:start + (1 << 16)], minlength=n + 1)
        mask = labelled == (int(np.argmax(sizes[1:])) + 1)
    del labelled
    return ndimage.binary_fill_holes(mask)


def _tiff_metric_spacing(tif) -> tuple[float, ...] | None:
    """Pixel size in mm from a TIFF's resolution tags when stated in centimetres."""
    page = tif.pages[0]
    tags = page.tags
    unit = tags.get("ResolutionUnit")
    if unit is None or int(unit.value) != 3:  # 3 = centimetre; inch DPI on photos is meaningless here
        return None
    try:
        xres = tags["XResolution"].value
        yres = tags["YResolution"].value
        sx = 10.0 * xres[1] / xres[0]
        sy = 10.0 * yres[1] / yres[0]
    except (KeyError, ZeroDivisionError, TypeError):
        return None
    return (sy, sx)


def _geometry_json(vol: Volume) -> str:
    return json.dumps({GEOMETRY_KEY: vol.geometry()})


@register_writer("PNG", (".png",))
def write_png(vol: Volume, path: Path) -> None:
    from PIL import Image, PngImagePlugin

    data = np.asarray(vol.data)
    if vol.ndim != 2 or vol.n_leading:
        raise ValueError(f"PNG holds one 2D image; this volume has shape {data.shape}: save it as .nii.gz or .tif")
    if data.dtype == bool:
        data = data.astype(np.uint8)
    if data.dtype not in (np.uint8, np.uint16) or (vol.rgb and data.dtype != np.uint8):
        raise ValueError(f"PNG holds 8-bit colour or 8/16-bit grey; this image is {data.dtype}: save it as .tif")
    info = PngImagePlugin.PngInfo()
    info.add_text(GEOMETRY_KEY, json.dumps(vol.geometry()))
    tmp = path.with_name(path.name + ".partial")
    try:
        Image.fromarray(data).save(tmp, format="PNG", pnginfo=info)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


@register_writer("TIFF", (".tif", ".tiff"))
def write_tiff(vol: Volume, path: Path) -> None:
    import tifffile

    data = np.asarray(vol.data)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    tmp = path.with_name(path.name + ".partial")
    try:
        tifffile.imwrite(tmp, data, description=_geometry_json(vol), photometric="rgb" if vol.rgb else "minisblack",
                         metadata=None, compression="zlib")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
