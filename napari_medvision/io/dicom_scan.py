"""Finding DICOM files and grouping them into series, from headers only (no pixels read).

A series is what a user would call one image: the single-frame slices sharing a
SeriesInstanceUID *and* a geometry (orientation, pixel spacing, matrix size), or one
multi-frame object, or one DICOM SEG. GDCM groups by SeriesInstanceUID alone, which merges a
multi-frame copy with the slices it was made from; we keep them apart.
"""

from __future__ import annotations

import io
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from .errors import FolderTooLargeError, GeometryWarning, MultipleSeriesError, ReadError
from . import limits

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
SEG_CLASSES = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")  # Segmentation, Label Map SEG
PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
RAW_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def has_dicom_marker(path: Path) -> bool:
    """True when the file carries the ``DICM`` marker at byte 128 (the DICOM Part 10 preamble)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


@dataclass
class DicomFile:
    """One file's header plus where its raw pixel values sit, when stored uncompressed."""

    path: Path
    header: Dataset
    pixel_offset: int | None = None  # byte offset of native little-endian pixel values
    pixel_length: int | None = None

    @property
    def n_frames(self) -> int:
        return int(self.header.get("NumberOfFrames") or 1)

    @property
    def is_multiframe(self) -> bool:
        return self.n_frames > 1 or "PerFrameFunctionalGroupsSequence" in self.header


class CappedReader(io.BufferedReader):
    """A binary file whose ``read(n)`` never asks for more than the bytes left in the file.

    pydicom reads an element by its declared length; a damaged length (up to 4 GiB) would make
    Python allocate that much before the read comes back short.
    """

    def __init__(self, path: str | os.PathLike):
        super().__init__(io.FileIO(path, "r"))
        self._size = os.fstat(self.fileno()).st_size

    def read(self, size: int | None = -1) -> bytes:
        if size is not None and size > 0:
            size = max(min(size, self._size - self.tell()), 0)
            if size == 0:
                return b""
        return super().read(size)


def read_header(path: Path, force: bool = False) -> DicomFile:
    """The header of ``path`` (pixels skipped); ReadError when it is not a readable DICOM file."""
    try:
        with CappedReader(path) as fp:
            header = pydicom.dcmread(fp, stop_before_pixels=True, force=force)
            offset, length = _locate_raw_pixels(fp, header)
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise ReadError(path, f"is not a readable DICOM file ({_first_line(exc)})") from exc
    return DicomFile(Path(path), header, offset, length)


def _locate_raw_pixels(fp, header: Dataset) -> tuple[int | None, int | None]:
    """Offset and length of the pixel values when they can be read straight from disk.

    pydicom leaves the file positioned at the Pixel Data tag after ``stop_before_pixels``; reading
    the values from there with numpy skips a second parse of the header for every slice.
    """
    syntax = header.file_meta.get("TransferSyntaxUID") if hasattr(header, "file_meta") else None
    if syntax not in RAW_SYNTAXES:
        return None, None
    start = fp.tell()
    element = fp.read(12)
    if len(element) < 8 or element[:4] != PIXEL_DATA_TAG:
        return None, None
    if syntax == ImplicitVRLittleEndian:
        length, value_at = int.from_bytes(element[4:8], "little"), start + 8
    else:
        length, value_at = int.from_bytes(element[8:12], "little"), start + 12
    if length == 0xFFFFFFFF:
        return None, None
    return value_at, length


def files_in(folder: Path, max_files: int | None = None):
    """Files under ``folder`` in path order, recursively, never leaving it.

    Symbolic links to folders are not entered, and links to files outside ``folder`` are skipped
    (a link could otherwise point the reader at any file on the machine, or loop). More than
    ``max_files`` files (default :data:`.limits.MAX_FOLDER_FILES`) give a ReadError: open the
    series' own folder instead.
    """
    folder = Path(folder)
    inside = folder.resolve()
    max_files = limits.MAX_FOLDER_FILES if max_files is None else max_files
    seen = 0
    for root, dirs, names in os.walk(folder):  # os.walk does not follow linked folders
        dirs.sort()
        for name in sorted(names):
            path = Path(root) / name
            if path.is_symlink() and not _within(path, inside):
                continue
            seen += 1
            if seen > max_files:
                raise FolderTooLargeError(folder, f"holds more than {max_files} files; open the folder of one "
                                                  "study or series instead (medvision stops searching there)")
            yield path


def _within(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder)
    except (ValueError, OSError, RuntimeError):  # outside, unreadable, or a link loop
        return False
    return True


def find_dicom_files(folder: Path) -> list[Path]:
    """Every file under ``folder`` (recursively, see :func:`files_in`) with the DICOM marker, in path order."""
    return [p for p in files_in(folder) if p.name.upper() != "DICOMDIR" and has_dicom_marker(p)]


def read_headers(paths: list[Path], skip_unreadable: bool) -> list[DicomFile]:
    """Headers of ``paths`` (threads overlap the disk reads); images only, DICOMDIRs dropped."""
    def one(path: Path) -> DicomFile | ReadError:
        try:
            return read_header(path)
        except ReadError as exc:
            return exc

    workers = min(8, os.cpu_count() or 1, max(1, len(paths)))
    if workers > 1 and len(paths) > 16:
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(one, paths))
    else:
        results = [one(p) for p in paths]
    files = []
    for result in results:
        if isinstance(result, ReadError):
            if not skip_unreadable:
                raise result
            warnings.warn(f"{result.path}: skipped, {result.problem}", GeometryWarning, stacklevel=3)
            continue
        header = result.header
        if header.get("SOPClassUID") == DICOMDIR_CLASS or "DirectoryRecordSequence" in header:
            continue
        if "Rows" not in header:  # reports, structure sets, presentation states: no image
            continue
        files.append(result)
    return files


@dataclass
class Series:
    """One loadable image: slices of one series and geometry, a multi-frame object, or a SEG."""

    kind: str  # "slices", "multiframe" or "seg"
    files: list[DicomFile]
    key: str = ""  # unique among the series found: what ``series=`` accepts besides the index

    @property
    def header(self) -> Dataset:
        return self.files[0].header

    @property
    def series_uid(self) -> str:
        return str(self.header.get("SeriesInstanceUID", ""))

    def description(self) -> str:
        """One line a user can choose from: modality, number, name, size."""
        h = self.header
        name = str(h.get("SeriesDescription") or "").strip()
        text = f"{h.get('Modality') or '?'} series {h.get('SeriesNumber', '?')}"
        if name:
            text += f" '{name}'"
        size = f"{h.get('Rows')}x{h.get('Columns')}"
        if self.kind == "seg":
            n_seg = len(h.get("SegmentSequence") or [])
            return f"{text}: segmentation, {n_seg} segment(s), {self.files[0].n_frames} frame(s) of {size}"
        plane = _orientation_name(h.get("ImageOrientationPatient"))
        if self.kind == "multiframe":
            return f"{text}: multi-frame object, {self.files[0].n_frames} frames of {size}"
        if len(self.files) == 1:
            return f"{text}: 1 {plane}image of {size} (image {h.get('InstanceNumber', '?')})"
        return f"{text}: {len(self.files)} {plane}slices of {size}"


def _orientation_name(orientation) -> str:
    """'axial ', 'coronal ', 'sagittal ' or 'oblique ' from ImageOrientationPatient ('' when absent)."""
    if orientation is None or len(orientation) != 6:
        return ""
    normal = np.cross([float(v) for v in orientation[:3]], [float(v) for v in orientation[3:]])
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.9 * np.linalg.norm(normal):
        return "oblique "
    return ("sagittal ", "coronal ", "axial ")[axis]


def _rounded(values, digits: int = 4) -> tuple:
    return tuple(round(float(v), digits) for v in values) if values is not None else ()


def group_series(files: list[DicomFile]) -> list[Series]:
    """Series in a stable order (study, series number, description), each with a unique key."""
    groups: dict[tuple, Series] = {}
    for f in files:
        h = f.header
        sop_class = str(h.get("SOPClassUID", ""))
        if sop_class in SEG_CLASSES or h.get("Modality") == "SEG":
            key = ("seg", str(h.get("SOPInstanceUID", f.path)))
            kind = "seg"
        elif f.is_multiframe:
            key = ("multiframe", str(h.get("SOPInstanceUID", f.path)))
            kind = "multiframe"
        else:
            key = (
                "slices",
                str(h.get("SeriesInstanceUID", "")),
                _rounded(h.get("ImageOrientationPatient")),
                _rounded(h.get("PixelSpacing")),
                int(h.get("Rows") or 0),
                int(h.get("Columns") or 0),
                int(h.get("SamplesPerPixel") or 1),
            )
            kind = "slices"
        groups.setdefault(key, Series(kind, [])).files.append(f)

    def order(s: Series):
        h = s.header
        number = h.get("SeriesNumber")
        return (str(h.get("StudyDate", "")), str(h.get("StudyTime", "")), str(h.get("StudyInstanceUID", "")),
                int(number) if number not in (None, "") else 1 << 30,
                s.kind == "seg", str(h.get("SeriesDescription", "")), s.series_uid, str(s.files[0].path))

    series = sorted(groups.values(), key=order)
    _assign_keys(series)
    return series


def _assign_keys(series: list[Series]) -> None:
    """SeriesInstanceUID where it names one series; else the object's SOPInstanceUID or uid#n."""
    counts: dict[str, int] = {}
    for s in series:
        counts[s.series_uid] = counts.get(s.series_uid, 0) + 1
    seen: dict[str, int] = {}
    for s in series:
        if counts[s.series_uid] == 1 and s.series_uid:
            s.key = s.series_uid
        elif s.kind != "slices":
            s.key = str(s.header.get("SOPInstanceUID", s.series_uid))
        else:
            seen[s.series_uid] = seen.get(s.series_uid, 0) + 1
            s.key = f"{s.series_uid}#{seen[s.series_uid]}"


def choose_series(path: Path, series: list[Series], choice: int | str | None) -> Series:
    """The series ``choice`` names (index, key or SeriesInstanceUID); ask when it is ambiguous."""
    def ask() -> MultipleSeriesError:
        return MultipleSeriesError(path, [s.description() for s in series], [s.key for s in series])

    if choice is None:
        if len(series) == 1:
            return series[0]
        raise ask()
    if isinstance(choice, int) or (isinstance(choice, str) and choice.isdigit() and "." not in choice):
        index = int(choice)
        if not 0 <= index < len(series):
            raise ReadError(path, f"has no series number {index} (there are {len(series)}, counted from 0)")
        return series[index]
    by_key = [s for s in series if s.key == choice]
    if by_key:
        return by_key[0]
    by_uid = [s for s in series if s.series_uid == choice]
    if len(by_uid) == 1:
        return by_uid[0]
    if by_uid:
        raise ask()
    raise ReadError(path, f"holds no series with UID {choice!r}")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
