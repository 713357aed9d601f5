"""npe2 writers: save an image or labels layer with ``napari_medvision.io.save``, geometry kept.

A labels layer painted on a loaded scan is written onto the scan's grid, in the scan file's own
axis order: its geometry comes from the medvision metadata when present, else from the scan
open in the viewer that the layer lies on (napari copies the scan's transform into a new labels
layer made with the scan selected), else from the layer's own transform.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..io import WriteError, save
from .layers import METADATA_KEY, layer_to_volume, scan_metadata_for
from .notify import show_problem

SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".ome.zarr", ".zarr", ".png", ".tif", ".tiff")


def write_image(path: str, data: Any, meta: dict) -> list[str]:
    """Paths written for one image layer (empty, with a notification, when saving failed)."""
    return _write(path, data, meta, "image")


def write_labels(path: str, data: Any, meta: dict) -> list[str]:
    """Paths written for one labels layer, stored as integers with their label names."""
    if not (meta.get("metadata") or {}).get(METADATA_KEY):
        scan = _scan_under(data, meta)
        if scan is not None:
            meta = {**meta, "metadata": {**(meta.get("metadata") or {}), METADATA_KEY: scan}}
    return _write(path, data, meta, "labels")


def _write(path: str, data: Any, meta: dict, layer_type: str) -> list[str]:
    target = Path(path)
    what = meta.get("name") or layer_type
    try:
        volume = layer_to_volume(data, meta, layer_type)
        written = save(volume, target)
    except WriteError as exc:
        show_problem(f"Could not save {what} to {exc.path.name}: {exc.problem}")
        return []
    except Exception as exc:  # the layer could not become a Volume (odd shape, geometry)
        text = str(exc).strip().splitlines()
        show_problem(f"Could not save {what} to {target.name}: {text[0] if text else type(exc).__name__}")
        return []
    return [str(written)]


def _scan_under(data: Any, meta: dict) -> dict | None:
    """Metadata of the loaded scan, open in the current viewer, that this labels layer lies on."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:
        return None
    if viewer is None:
        return None
    shape = tuple((data[0] if isinstance(data, (list, tuple)) else data).shape)
    return scan_metadata_for(shape, meta, viewer.layers)
