"""Which reader or writer handles a path: by suffix first, then by sniffing the first bytes.

Each format module registers itself with :func:`register_reader` / :func:`register_writer`.
A reader takes a path (plus keyword options such as ``series=``) and returns a list of
Volumes: the image first, then any label maps stored with it (OCT layer annotations,
a fundus field-of-view mask). A writer takes ``(volume, path)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..volume import Volume

ReadFn = Callable[..., list[Volume]]
WriteFn = Callable[[Volume, Path], None]
SniffFn = Callable[[Path], bool]


@dataclass(frozen=True)
class Reader:
    name: str
    suffixes: tuple[str, ...]
    read: ReadFn
    sniff: SniffFn | None = None
    folders: bool = False


@dataclass(frozen=True)
class Writer:
    name: str
    suffixes: tuple[str, ...]
    write: WriteFn


READERS: list[Reader] = []
WRITERS: list[Writer] = []


def register_reader(name: str, suffixes: tuple[str, ...], sniff: SniffFn | None = None, folders: bool = False):
    def deco(fn: ReadFn) -> ReadFn:
        READERS.append(Reader(name, tuple(s.lower() for s in suffixes), fn, sniff, folders))
        return fn

    return deco


def register_writer(name: str, suffixes: tuple[str, ...]):
    def deco(fn: WriteFn) -> WriteFn:
        WRITERS.append(Writer(name, tuple(s.lower() for s in suffixes), fn))
        return fn

    return deco


def suffix_of(path: Path) -> str:
    """Lower-case suffix, keeping double ones such as ``.nii.gz`` and ``.ome.zarr``."""
    name = path.name.lower()
    for double in (".nii.gz", ".ome.zarr", ".ome.tif", ".ome.tiff", ".nrrd.gz"):
        if name.endswith(double):
            return double
    return path.suffix.lower()


def readers_for(path: Path) -> list[Reader]:
    """Readers whose suffix matches ``path`` (for a folder without one: the folder readers)."""
    suffix = suffix_of(path)
    by_suffix = [r for r in READERS if suffix in r.suffixes]
    if path.name.upper() == "DICOMDIR" and path.is_file():  # the index of a DICOM tree, read even when damaged
        by_suffix = [r for r in READERS if ".dcm" in r.suffixes]
    if suffix == ".ome.zarr":
        by_suffix += [r for r in READERS if ".zarr" in r.suffixes]
    if path.is_dir() and not by_suffix:
        return [r for r in READERS if r.folders and (r.sniff is None or _safe_sniff(r, path))] or [
            r for r in READERS if r.folders]
    return by_suffix


def sniffed_readers(path: Path, exclude: list[Reader] = ()) -> list[Reader]:
    """Readers that recognise the content of ``path`` from its first bytes."""
    return [r for r in READERS if r.sniff is not None and r not in exclude and _safe_sniff(r, path)]


def _safe_sniff(reader: Reader, path: Path) -> bool:
    try:
        return bool(reader.sniff(path))
    except Exception:
        return False


def writer_for(path: Path) -> Writer | None:
    suffix = suffix_of(path)
    if suffix == ".ome.zarr":
        suffix = ".zarr"
    for w in WRITERS:
        if suffix in w.suffixes:
            return w
    return None
