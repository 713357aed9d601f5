"""Pixel values of DICOM frames, read once into one preallocated array and rescaled in place.

Uncompressed little-endian frames are read straight from disk at the offset found while the
header was parsed; everything else (JPEG 2000, JPEG lossless, JPEG-LS, RLE, big endian, colour)
goes through pydicom, which decodes compressed syntaxes with the pylibjpeg plugins. A thread
pool overlaps disk reads and decoding (numpy and the decoders release the GIL).
"""

from __future__ import annotations

import os
import struct
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pydicom
import pydicom.pixels

from .dicom_scan import CappedReader, DicomFile
from .errors import ReadError
from .limits import check_compressed, check_memory, check_raw


def _workers(n: int) -> int:
    return max(1, min(8, os.cpu_count() or 1, n))


def stored_dtype(header) -> np.dtype:
    """The dtype pixel values are stored in (before rescaling)."""
    bits = int(header.get("BitsAllocated") or 16)
    signed = int(header.get("PixelRepresentation") or 0) == 1
    if bits not in (8, 16, 32):
        raise ValueError(f"{bits} bits per pixel")
    return np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")


def _stored_range(header) -> tuple[int, int]:
    bits = int(header.get("BitsStored") or header.get("BitsAllocated") or 16)
    if int(header.get("PixelRepresentation") or 0) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def output_dtype(header, rescales: list[tuple[float, float]]) -> np.dtype:
    """Stored dtype without rescaling; int16/int32 for integer slope and intercept; else float32."""
    if int(header.get("SamplesPerPixel") or 1) != 1:
        return np.dtype(np.uint8) if int(header.get("BitsAllocated") or 8) == 8 else stored_dtype(header)
    if all(s == 1 and i == 0 for s, i in rescales):
        return stored_dtype(header)
    if not all(float(s).is_integer() and float(i).is_integer() for s, i in rescales):
        return np.dtype(np.float32)
    lo, hi = _stored_range(header)
    values = [lo, hi] + [v * s + i for s, i in rescales for v in (lo, hi)]
    for candidate in (np.int16, np.int32):
        info = np.iinfo(candidate)
        if info.min <= min(values) and max(values) <= info.max:
            return np.dtype(candidate)
    return np.dtype(np.float32)


def check_declared_size(files: list[DicomFile], rescales: list[tuple[float, float]]) -> None:
    """ReadError before any allocation when a file's header declares more pixels than the file
    holds (raw data) or could expand to (compressed data), or the output cannot fit in memory."""
    total = 0
    for f in files:
        h = f.header
        rows, cols = int(h.get("Rows") or 0), int(h.get("Columns") or 0)
        samples = int(h.get("SamplesPerPixel") or 1)
        bits = int(h.get("BitsAllocated") or 16)
        shape = (f.n_frames, rows, cols, samples)
        itemsize = max(bits // 8, 1)
        size = f.path.stat().st_size
        what = f"{f.n_frames} frame(s) of {rows}x{cols}"
        if f.pixel_offset is not None and bits in (8, 16, 32):
            check_raw(f.path, what, shape, itemsize, max(size - f.pixel_offset, 0))
        else:
            check_compressed(f.path, what, shape, itemsize, size)
        total += f.n_frames * rows * cols * samples
    try:
        itemsize = output_dtype(files[0].header, rescales).itemsize
    except ValueError:  # an unusual bit depth: the decoder decides, assume the widest output
        itemsize = 4
    check_memory(files[0].path, f"the image ({len(files)} file(s))", total * itemsize)


def _sign_extend(raw: np.ndarray, header) -> np.ndarray:
    """Signed values stored in fewer bits than allocated (e.g. 12 of 16) get their sign back."""
    bits = int(header.get("BitsStored") or 0)
    allocated = raw.dtype.itemsize * 8
    if raw.dtype.kind == "i" and 0 < bits < allocated:
        shift = allocated - bits
        raw <<= shift
        raw >>= shift
    return raw


def raw_frames(f: DicomFile, into: np.ndarray | None = None) -> np.ndarray:
    """Stored pixel values of every frame of ``f``: ``(frames, rows, columns[, samples])``.

    ``into``: an array of the stored dtype and shape to read uncompressed values straight into.
    """
    h = f.header
    rows, cols, samples = int(h.Rows), int(h.Columns), int(h.get("SamplesPerPixel") or 1)
    n = f.n_frames
    if f.pixel_offset is not None and samples == 1 and int(h.get("BitsAllocated") or 0) in (8, 16, 32):
        dtype = stored_dtype(h)
        if f.pixel_length < n * rows * cols * dtype.itemsize:
            raise ReadError(f.path, f"pixel data is shorter than {n} frame(s) of {rows}x{cols} need")
        out = into.reshape(n, rows, cols) if into is not None and into.dtype == dtype else np.empty((n, rows, cols), dtype)
        with open(f.path, "rb") as fp:
            fp.seek(f.pixel_offset)
            got = fp.readinto(memoryview(out.reshape(-1)).cast("B"))
        if got != out.nbytes:
            raise ReadError(f.path, f"is truncated: the pixel data stops after {got} of {out.nbytes} bytes")
        return _sign_extend(out, h)
    try:
        with CappedReader(f.path) as fp:
            ds = pydicom.dcmread(fp)
        _check_codestreams(f, ds, rows, cols)
        return _decode_frames(f, ds, n, into)
    except ReadError:
        raise
    except Exception as exc:  # decoder errors come in many types; name the file and the syntax
        syntax = getattr(getattr(getattr(f.header, "file_meta", None), "TransferSyntaxUID", None), "name", "?")
        raise ReadError(f.path, f"pixel data could not be decoded ({syntax}): {str(exc).splitlines()[0][:200]}") from exc


def _decode_frames(f: DicomFile, ds, n: int, into: np.ndarray | None) -> np.ndarray:
    """Frames decoded one at a time by pydicom (its sign, precision and colour corrections
    included), each written into ``into`` or into one array allocated after the first frame.

    A decoder needs several times a frame's size while it works (OpenJPEG: a 32-bit buffer per
    sample plus its stream buffer), so only one frame's decoding is in memory at a time, and a
    single frame is returned as the decoder's own array rather than copied.
    """
    decoder = pydicom.pixels.get_decoder(ds.file_meta.TransferSyntaxUID)
    out = None
    count = 0
    for frame, _properties in decoder.iter_array(ds, as_rgb=True):
        if count >= n:
            raise ReadError(f.path, f"holds more than the {n} frame(s) its header declares")
        if out is None:
            if into is not None and into.dtype == frame.dtype and into.size == n * frame.size:
                out = into.reshape((n,) + frame.shape)
            elif n == 1:
                out = frame[None]
            else:
                out = np.empty((n,) + frame.shape, frame.dtype)
        if frame.shape != out.shape[1:]:
            raise ReadError(f.path, f"frame {count + 1} decodes to {frame.shape} where frame 1 is {out.shape[1:]}")
        if not np.may_share_memory(out, frame):
            out[count] = frame
        del frame
        count += 1
    if count < n:
        raise ReadError(f.path, f"holds {count} frame(s) where its header declares {n}")
    return out


_J2K_SIZ = b"\xff\x4f\xff\x51"  # start of codestream, then the image and tile size marker
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}  # 0xF7: JPEG-LS


def _check_codestreams(f: DicomFile, ds, rows: int, cols: int) -> None:
    """ReadError when a compressed frame's own header (JPEG 2000 SIZ, JPEG/JPEG-LS SOF) declares
    a larger image than Rows x Columns: the decoder would allocate that before failing."""
    data = ds.get("PixelData")
    name = str(getattr(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None), "name", ""))
    if not isinstance(data, (bytes, bytearray)) or "JPEG" not in name:
        return
    if "2000" in name:
        at = data.find(_J2K_SIZ)
        while at != -1 and at + 24 <= len(data):
            x, y, x0, y0 = struct.unpack_from(">4I", data, at + 8)
            _refuse_larger(f, "JPEG 2000", max(x - x0, 0), max(y - y0, 0), rows, cols)
            at = data.find(_J2K_SIZ, at + 4)
        return
    at = data.find(b"\xff\xd8\xff")  # each frame starts with SOI; its frame header follows the tables
    while at != -1:
        size = _jpeg_frame_size(data, at + 2)
        if size is not None:
            _refuse_larger(f, "JPEG", size[1], size[0], rows, cols)
        at = data.find(b"\xff\xd8\xff", at + 2)


def _jpeg_frame_size(data: bytes, at: int) -> tuple[int, int] | None:
    """(height, width) from the first frame header after ``at`` (walking marker segments)."""
    while at + 4 <= len(data) and data[at] == 0xFF:
        marker = data[at + 1]
        if marker in _JPEG_SOF:
            return struct.unpack_from(">HH", data, at + 5) if at + 9 <= len(data) else None
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            at += 2
            continue
        if marker in (0xDA, 0xD9):  # scan data or end of image before any frame header
            return None
        (length,) = struct.unpack_from(">H", data, at + 2)
        at += 2 + length
    return None


def _refuse_larger(f: DicomFile, codec: str, width: int, height: int, rows: int, cols: int) -> None:
    if width * height > rows * cols:
        raise ReadError(f.path, f"holds a {codec} frame of {width}x{height} pixels where the header says "
                                f"{cols}x{rows}; the pixel data is damaged")


def _apply(target: np.ndarray, slope: float, intercept: float) -> None:
    if slope != 1:
        target *= target.dtype.type(slope)
    if intercept != 0:
        target += target.dtype.type(intercept)


def assemble(n: int, frame_shape: tuple, read, rescales: list[tuple[float, float]], header) -> np.ndarray:
    """``(n, *frame_shape)`` rescaled frames; ``read(i, into)`` gives output frame i's stored values.

    Integer output is filled in place where the stored values fit it (no temporary per frame).
    When integer rescaling could overflow int16 in theory (16 stored bits plus an intercept), the
    actual values decide: CT stays int16 unless its values really need int32.
    """
    dtype = output_dtype(header, rescales)
    stored = stored_dtype(header) if int(header.get("BitsAllocated") or 16) in (8, 16, 32) else dtype
    lo, hi = _stored_range(header)
    fits = dtype.kind in "iu" and np.iinfo(dtype).min <= lo and hi <= np.iinfo(dtype).max
    narrow = dtype == np.int32 and stored.itemsize == 2 and all(s == 1 for s, _ in rescales)
    direct = (fits and dtype.itemsize == stored.itemsize) or narrow
    if n == 1:
        # One frame is read before the output exists, so that a decoder's working memory and the
        # output are never held together; a frame already in the output dtype becomes the output.
        first = read(0, None)
        if not narrow and first.dtype == dtype and first.flags.writeable and first.size == np.prod(frame_shape):
            out = first.reshape((1,) + tuple(frame_shape))
            _apply(out[0], *rescales[0])
            return out
        read = lambda i, into, first=first: first  # noqa: E731
    out = np.empty((n,) + tuple(frame_shape), stored if narrow else dtype)
    ranges = [(0, 0)] * n

    def one(i: int) -> None:
        target = out[i]
        if direct:
            view = target.view(stored) if target.dtype != stored else target
            raw = read(i, view)
            if not np.may_share_memory(raw, view):
                np.copyto(target, raw.reshape(target.shape), casting="unsafe")
            if narrow:
                ranges[i] = (int(target.min()), int(target.max()))
            else:
                _apply(target, *rescales[i])
        else:
            raw = read(i, None)
            np.copyto(target, raw.reshape(target.shape), casting="unsafe")
            _apply(target, *rescales[i])

    _run(one, n)
    if not narrow:
        return out
    low = min(r[0] + int(c) for r, (_, c) in zip(ranges, rescales))
    high = max(r[1] + int(c) for r, (_, c) in zip(ranges, rescales))
    raw_high = max(r[1] for r in ranges)
    small = np.iinfo(np.int16)
    if small.min <= low and high <= small.max and raw_high <= small.max:
        result = out.view(np.int16)
        _run(lambda i: _apply(result[i], 1, rescales[i][1]), n)
        return result
    wide = np.empty(out.shape, np.int32)

    def widen(i: int) -> None:
        np.copyto(wide[i], out[i], casting="unsafe")
        _apply(wide[i], 1, rescales[i][1])

    _run(widen, n)
    return wide


def read_slices(files: list[DicomFile], rescales: list[tuple[float, float]]) -> np.ndarray:
    """One frame from each single-frame file, in the order given: ``(n, rows, columns[, 3])``."""
    h = files[0].header
    samples = int(h.get("SamplesPerPixel") or 1)
    frame_shape = (int(h.Rows), int(h.Columns)) + ((samples,) if samples > 1 else ())

    def read(i: int, into):
        frames = raw_frames(files[i], into)
        if frames.shape[1:] != frame_shape:
            raise ReadError(files[i].path, f"holds a {frames.shape[1:]} image where the series has {frame_shape}")
        return frames[0]

    return assemble(len(files), frame_shape, read, rescales, h)


def read_multiframe(f: DicomFile, order: list[int], rescales: list[tuple[float, float]]) -> np.ndarray:
    """The frames of one multi-frame object in ``order``, each rescaled with its own slope/intercept."""
    frames = raw_frames(f)
    return assemble(len(order), frames.shape[1:], lambda i, into: frames[order[i]],
                    [rescales[k] for k in order], f.header)


def _run(job, n: int) -> None:
    workers = _workers(n)
    if workers == 1 or n < 4:
        for i in range(n):
            job(i)
        return
    with ThreadPoolExecutor(workers) as pool:
        for _ in pool.map(job, range(n)):
            pass
