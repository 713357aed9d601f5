"""npe2 reader: open any file or folder ``napari_medvision.io`` reads, at its true geometry.

A file that cannot be read gives one error notification naming the file and the problem, and
no layer: the reader returns napari's "read fine, nothing to show" value ``[(None,)]`` rather
than raising (napari would print a traceback) or returning None (napari would add its own
second error, "returned no data").
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..io import MultipleSeriesError, ReadError, load_all, readable_suffixes
from ..io.formats import READERS, suffix_of
from .layers import LayerDataTuple, volume_to_layers
from .notify import qt_app_running, show_notice, show_problem

NOTHING_TO_SHOW: list = [(None,)]
# Files looked at when deciding whether a folder is a DICOM series (keeps napari's open fast).
FOLDER_PEEK = 64
# Suffixes other programs use too (Analyze/Cirrus .img, any XML): taken only when a reader's sniffer agrees.
GENERIC_SUFFIXES = {".xml", ".img"}


def get_reader(path: str | list[str]) -> Callable[[Any], list[LayerDataTuple]] | None:
    """The read function for ``path`` when medvision can read it, else None (napari tries others)."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths or not all(_can_read(Path(p)) for p in paths):
        return None
    return read


def read(path: str | list[str]) -> list[LayerDataTuple]:
    """Layers for ``path`` (or each of several paths): the image first, then its label maps."""
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: list[LayerDataTuple] = []
    for p in paths:
        layers += _read_one(Path(p))
    return layers or NOTHING_TO_SHOW


def _read_one(path: Path, **options: Any) -> list[LayerDataTuple]:
    try:
        volumes = load_all(path, **options)
        layers = volume_to_layers(volumes, stem=layer_name(path))
        _mark_pixel_spacing(path, volumes, layers)
        return layers
    except MultipleSeriesError as exc:
        if "series" in options:  # asked once already: do not loop
            show_problem(_sentence(path, exc.problem))
            return []
        index = ask_series(path, exc.choices)
        if index is None:
            if not qt_app_running():
                show_problem(_sentence(path, exc.problem))
            return []
        return _read_one(path, series=index, **options)
    except ReadError as exc:
        show_problem(_sentence(exc.path, exc.problem))
    except MemoryError:
        show_problem(_sentence(path, "is too large to fit in memory"))
    except Exception as exc:  # a bug or a library error: still one sentence, never a traceback
        text = str(exc).strip().splitlines()
        show_problem(_sentence(path, f"could not be opened ({type(exc).__name__}: {text[0] if text else ''})"))
    return []


def _mark_pixel_spacing(path: Path, volumes, layers: list[LayerDataTuple]) -> None:
    """Tell the user when a file gave no pixel size: a warning notification, and
    ``metadata["spacing_unit"] = "pixel"`` on each of its layers (measurements are then in pixels)."""
    if not any(v.meta.get("spacing_unit") == "pixel" for v in volumes):
        return
    for layer in layers:
        if len(layer) > 1 and isinstance(layer[1], dict):
            layer[1].setdefault("metadata", {})["spacing_unit"] = "pixel"
    show_notice(f"{Path(path).name}: the file gives no pixel size; distances and the voxel scale are in pixels, not mm")


def ask_series(path: Path, choices: list[str]) -> int | None:
    """Index of the series the user picks in a dialog, or None (cancelled, or no GUI to ask in)."""
    if not qt_app_running():
        return None
    from qtpy.QtWidgets import QInputDialog

    parent = _main_window()
    item, ok = QInputDialog.getItem(
        parent, "Choose a series", f"{path.name} holds {len(choices)} image series. Open:", list(choices), 0, False
    )
    if not ok or item not in choices:
        return None
    return list(choices).index(item)


def layer_name(path: Path) -> str:
    """The file name without its (possibly double) suffix, or the folder name."""
    name = path.name
    lowered = name.lower()
    for suffix in (".nii.gz", ".ome.zarr", ".nrrd.gz", ".ome.tiff", ".ome.tif"):
        if lowered.endswith(suffix):
            return name[: -len(suffix)]
    return name if path.is_dir() else (path.stem or name)


def _sentence(path: Path, problem: str) -> str:
    return f"Could not open {Path(path).name}: {problem}"


def _can_read(path: Path) -> bool:
    if path.is_dir():
        return (_is_image_folder(path) or any(r.folders and _sniffs(r, path) for r in READERS)
                or _holds_no_image(path))
    suffix = suffix_of(path)
    if suffix in GENERIC_SUFFIXES:  # many programs write these: only take the file if a reader knows it
        return any(suffix in r.suffixes and _sniffs(r, path) for r in READERS)
    return suffix in readable_suffixes()


def _sniffs(reader, path: Path) -> bool:
    if reader.sniff is None:
        return False
    try:
        return bool(reader.sniff(path))
    except Exception:
        return False


def _is_image_folder(path: Path) -> bool:
    """A zarr store, or a folder with DICOM files (by their 'DICM' marker) within two levels."""
    if path.name.lower().endswith(".zarr") or any((path / m).exists() for m in (".zattrs", ".zgroup", "zarr.json")):
        return True
    if (path / "DICOMDIR").exists():
        return True
    return any(file.name.lower().endswith(".dcm") or _has_dicom_marker(file) for file in _first_files(path))


def _holds_no_image(path: Path) -> bool:
    """An empty folder, or one whose first files (two levels down) have no image suffix at all.

    medvision takes these so that the user gets its one-sentence error naming the folder, not
    napari's generic refusal; a folder of pictures stays with the readers that stack them.
    """
    image_suffixes = set(readable_suffixes())
    files = list(_first_files(path, FOLDER_PEEK + 1))
    return len(files) <= FOLDER_PEEK and not any(suffix_of(file) in image_suffixes for file in files)


def _first_files(path: Path, most: int = FOLDER_PEEK):
    """The first ``most`` files of a folder and its subfolders, two levels down at most: a peek, not a walk."""
    seen = 0
    for root, dirs, files in os.walk(path):
        if len(Path(root).relative_to(path).parts) >= 2:
            dirs[:] = []
        for f in files:
            if seen == most:
                return
            seen += 1
            yield Path(root) / f


def _has_dicom_marker(file: Path) -> bool:
    try:
        with open(file, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _main_window():
    try:
        import napari

        viewer = napari.current_viewer()
        return viewer.window._qt_window if viewer is not None else None
    except Exception:
        return None
