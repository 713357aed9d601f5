"""The scans of a cohort run: from a folder, a glob, a CSV or a list of paths.

A folder holds one scan per readable file, per zarr store and per DICOM series (a series may
sit in its own subfolder or among others). A CSV names the scans in a ``path`` column, an
optional ``id`` column, and for prompting pairs of ``example_image`` / ``example_mask``
columns (``example_image_2`` / ``example_mask_2`` for a second pair, and so on).
"""

from __future__ import annotations

import csv
import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .io import ReadError, readable_suffixes
from .io.dicom_scan import find_dicom_files, group_series, has_dicom_marker, read_headers
from .io.formats import suffix_of

GLOB_CHARS = set("*?[")
SKIPPED_NAMES = {"DICOMDIR", ".DS_Store", "Thumbs.db"}


@dataclass(frozen=True)
class Scan:
    """One input of a cohort run: where it is, how to load it, what it is called in the outputs."""

    id: str  # unique in the run, safe as a file name
    path: str
    series: str | None = None  # DICOM series key when the folder holds several
    examples: tuple[tuple[str, str], ...] = field(default=())  # (image, mask) pairs for prompting

    def load_options(self) -> dict:
        return {} if self.series is None else {"series": self.series}


def find_scans(inputs, out_dir: Path | None = None) -> list[Scan]:
    """The scans named by ``inputs``: a folder, a glob pattern, a .csv file, or a list of paths.

    Paths under ``out_dir`` are left out, so a rerun never takes its own outputs for inputs.
    """
    if isinstance(inputs, (list, tuple)):
        found = [s for item in inputs for s in _scans_at(Path(item), out_dir)]
    else:
        text = os.fspath(inputs)
        if GLOB_CHARS & set(text):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise ValueError(f"{text}: no file matches this pattern")
            found = [s for m in matches for s in _scans_at(Path(m), out_dir, top=False)]
        elif suffix_of(Path(text)) == ".csv":
            found = _from_csv(Path(text))
        else:
            found = _scans_at(Path(text), out_dir)
    if not found:
        raise ValueError(f"{inputs}: holds no scan medvision reads ({', '.join(readable_suffixes())}, DICOM folders)")
    return _unique_ids(found)


def _scans_at(path: Path, out_dir: Path | None, top: bool = True) -> list[Scan]:
    """Scans at ``path``: the file itself, or (for a folder) its files, stores and DICOM series."""
    path = path.expanduser()
    if not path.exists():
        raise ReadError(path, "no such file or folder")
    if out_dir is not None and _inside(path, out_dir):
        return []
    if path.is_file() or suffix_of(path) in (".zarr", ".ome.zarr"):
        return [Scan(_stem(path), str(path.resolve()))]
    series = _dicom_series(path)
    if not top:
        return series
    scans = list(series)
    for child in sorted(path.iterdir()):
        if child.name in SKIPPED_NAMES or child.name.startswith("."):
            continue
        if child.is_dir():
            scans += _scans_at(child, out_dir, top=True) if suffix_of(child) not in (".zarr", ".ome.zarr") else [
                Scan(_stem(child), str(child.resolve()))]
        elif _readable_file(child) and not _is_dicom(child):
            scans.append(Scan(_stem(child), str(child.resolve())))
    return scans


def _dicom_series(folder: Path) -> list[Scan]:
    """One scan per image series among the DICOM files directly in ``folder`` (SEGs are outputs, not scans)."""
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and _is_dicom(p)]
    if not files:
        return []
    images = [s for s in group_series(read_headers(files, skip_unreadable=True)) if s.kind != "seg"]
    # io.load reads a folder with its subfolders: name the series unless it is the only one there.
    alone = len(images) == 1 and len(find_dicom_files(folder)) == len(files)
    if alone:
        return [Scan(_stem(folder), str(folder.resolve()))]
    return [Scan(f"{_stem(folder)}_{s.header.get('SeriesNumber', i)}", str(folder.resolve()), series=s.key)
            for i, s in enumerate(images)]


def _is_dicom(path: Path) -> bool:
    return suffix_of(path) in (".dcm", ".dicom", ".ima") or has_dicom_marker(path)


def _readable_file(path: Path) -> bool:
    return suffix_of(path) in readable_suffixes() and suffix_of(path) != ".xml"


def _from_csv(table: Path) -> list[Scan]:
    if not table.is_file():
        raise ReadError(table, "no such file")
    with open(table, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.DictReader(f))
    if not rows or "path" not in rows[0]:
        raise ReadError(table, "needs a header row with a 'path' column (and optionally id, example_image, example_mask)")
    here = table.parent

    def resolve(value: str) -> str:
        p = Path(value.strip()).expanduser()
        return str((p if p.is_absolute() else here / p).resolve())

    scans = []
    for n, row in enumerate(rows, start=2):
        if not (row.get("path") or "").strip():
            raise ReadError(table, f"line {n} has an empty path")
        pairs = []
        for key in sorted(k for k in row if k and k.startswith("example_image")):
            mask_key = key.replace("example_image", "example_mask")
            image, mask = (row.get(key) or "").strip(), (row.get(mask_key) or "").strip()
            if image and mask:
                pairs.append((resolve(image), resolve(mask)))
            elif image or mask:
                raise ReadError(table, f"line {n}: {key} and {mask_key} go together; one of them is empty")
        path = resolve(row["path"])
        scans.append(Scan((row.get("id") or "").strip() or _stem(Path(path)), path, series=(row.get("series") or None),
                          examples=tuple(pairs)))
    return scans


def _stem(path: Path) -> str:
    name = path.name[: -len(suffix_of(path))] if suffix_of(path) else path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "scan"


def _unique_ids(scans: list[Scan]) -> list[Scan]:
    """Scan ids made unique (``name``, ``name-2``, ...) and safe as file names."""
    seen: dict[str, int] = {}
    out = []
    for s in scans:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", s.id).strip("._") or "scan"
        seen[base] = seen.get(base, 0) + 1
        out.append(Scan(base if seen[base] == 1 else f"{base}-{seen[base]}", s.path, s.series, s.examples))
    return out


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False
