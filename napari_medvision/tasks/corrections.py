"""Checking a user's corrected label maps, and where a model trained on them goes.

Shared by every kind of fine-tuning (a network, a prompting head): each checks the same things
before any training starts and writes only into the user model folder.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Optional

import numpy as np

from ..models.card import CardError, ModelCard
from ..models.registry import user_dir, weights_dir
from ..volume import Volume

VAL_FRACTION = 0.2        # share of the corrected slices held out for validation (3 slices at least)


def display_name(volume: Volume, kind: str, i: int) -> str:
    meta = volume.meta or {}
    return str(meta.get("name") or meta.get("source") or f"{kind} {i + 1}")


def labelled_slices(labels: np.ndarray) -> list[int]:
    """Indices along axis 0 holding at least one non-zero label."""
    data = np.asarray(labels)
    return np.flatnonzero(data.reshape(data.shape[0], -1).any(axis=1)).tolist()


def check_corrections(card: ModelCard, images, labels, slices) -> list[list[int]]:
    """The corrected slice indices per volume, after checking everything against the model card.

    Raises ValueError naming the image or label map and the problem (one sentence).
    """
    images, labels = list(images), list(labels)
    if not images or not labels:
        raise ValueError("fine-tuning needs at least one image and its corrected label map")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} label maps: give one corrected map per image")
    if slices is None:
        slices = [None] * len(images)
    slices = list(slices)
    if len(slices) != len(images):
        raise ValueError(f"slices lists {len(slices)} volumes, but there are {len(images)} images")
    dims = int(card.input.get("dims", 3))
    channels = int(card.input.get("channels", 1))
    known = set(card.labels or {}) | {0}
    n_classes = card.architecture.get("config", {}).get("n_classes")
    if not card.labels and n_classes:
        known = set(range(int(n_classes)))
    chosen = []
    for i, (image, label, picked) in enumerate(zip(images, labels, slices)):
        name, lname = display_name(image, "image", i), display_name(label, "label map", i)
        if image.is_labels:
            raise ValueError(f"{name}: is a label map; give the image the corrections were drawn on")
        if image.n_leading:
            raise ValueError(f"{name}: is a series; fine-tune on one time point at a time")
        if (3 if image.rgb else 1) != channels and not card.input.get("contrasts"):
            raise ValueError(f"{name}: model {card.id} expects {'colour' if channels == 3 else 'greyscale'} images")
        if dims == 3 and image.ndim != 3:
            raise ValueError(f"{name}: model {card.id} is a 3D model, this image is {image.ndim}D")
        shape = tuple(np.shape(label.data))
        if shape != image.spatial_shape:
            raise ValueError(f"{lname}: has shape {shape} but image {name} has {image.spatial_shape}; "
                             "corrections must lie on the image's grid")
        if label.spacing and len(label.spacing) == image.ndim and not np.allclose(label.spacing, image.spacing,
                                                                                   rtol=1e-3):
            raise ValueError(f"{lname}: spacing {tuple(round(s, 4) for s in label.spacing)} mm differs from image "
                             f"{name}'s {tuple(round(s, 4) for s in image.spacing)} mm")
        data = np.asarray(label.data)
        if not (np.issubdtype(data.dtype, np.integer) or np.issubdtype(data.dtype, np.bool_)
                or np.array_equal(data, np.round(data))):
            raise ValueError(f"{lname}: holds non-integer values; a label map holds label ids")
        found = set(np.unique(data).astype(int).tolist())
        unknown = sorted(found - known)
        if unknown:
            names = ", ".join(f"{k}={v}" for k, v in sorted((card.labels or {}).items()))
            raise ValueError(f"{lname}: holds label ids {unknown} that model {card.id} does not have "
                             f"(its labels: {names or sorted(known)})")
        if picked is None:
            # a 2D label map is one corrected picture (its unlabelled rows are background too);
            # in a 3D one only the slices holding a label were looked at
            picked = (range(shape[0]) if data.any() else []) if image.ndim == 2 else labelled_slices(data)
        picked = sorted({int(s) for s in picked})
        bad = [s for s in picked if not 0 <= s < shape[0]]
        if bad:
            raise ValueError(f"{lname}: corrected slices {bad} lie outside its {shape[0]} slices")
        chosen.append(picked)
    if not any(chosen):
        raise ValueError("no corrections to learn from: the label maps hold no labelled slice; paint the "
                         "corrections (or give slices=) first")
    return chosen


def destination(parent: ModelCard, prefix: str, new_id: Optional[str], folder) -> tuple[str, Path]:
    """The new model's id (default ``<prefix>-ft-<date-time>``) and folder, checked before any training."""
    new_id = new_id or f"{prefix}-ft-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    folder = Path(folder) if folder is not None else user_dir()
    _check_new_id(new_id, parent, folder, weights_dir())
    _check_writable(folder)
    return new_id, folder


def _check_new_id(new_id: str, parent: ModelCard, folder: Path, shipped: Path) -> None:
    if not new_id or any(c in new_id for c in "/\\:") or new_id.startswith("."):
        raise ValueError(f"model id {new_id!r} cannot name a file; use letters, digits, '-' and '_'")
    if new_id == parent.id or (shipped / f"{new_id}.json").exists():
        raise ValueError(f"model id {new_id!r} is taken by an existing model; choose a new id")
    if (folder / f"{new_id}.json").exists():
        raise ValueError(f"{folder / (new_id + '.json')}: a model with id {new_id!r} exists; choose a new id")


def _check_writable(folder: Path) -> None:
    """Fail before training, not after it, when the model folder cannot be written."""
    if folder.resolve() == weights_dir().resolve():
        raise CardError(folder, "fine-tuned models are not written into the shipped weights folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise CardError(folder, f"cannot write to the model folder ({exc.strerror or exc})") from exc


def split_slices(slices: list[list[int]], fraction: float = VAL_FRACTION) -> tuple[list[list[int]], list[list[int]]]:
    """``(train, validation)`` slices per volume: every k-th corrected slice is held out (3 or more)."""
    pooled = [(v, s) for v, picked in enumerate(slices) for s in picked]
    n_val = int(round(len(pooled) * fraction)) if len(pooled) >= 3 else 0
    n_val = max(n_val, 1) if len(pooled) >= 3 else 0
    held = set()
    if n_val:
        # evenly spread and never the first or last one: validation sees the middle of the corrections
        positions = np.linspace(0, len(pooled) - 1, n_val + 2)[1:-1].round().astype(int)
        held = {pooled[p] for p in positions}
    train = [[s for s in picked if (v, s) not in held] for v, picked in enumerate(slices)]
    val = [[s for s in picked if (v, s) in held] for v, picked in enumerate(slices)]
    return train, val
