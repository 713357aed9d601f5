"""``mv.measure``: what a label map holds, per label, and how it agrees with a reference.

A radiologist reports a structure's volume in mL and checks a segmentation against a reference
drawing; both read the label map's physical spacing, so they are correct on anisotropic scans.
Dice and the 95th-percentile Hausdorff distance are MONAI's (``compute_dice``,
``compute_hausdorff_distance`` with the voxel spacing), the field's reference implementations.

    rows = mv.measure(organs, image=ct)                    # volume_ml, voxels, mean_intensity
    rows = mv.measure(organs, reference=manual)            # + dice, hd95_mm
    print(mv.measure_csv(rows))
"""

from __future__ import annotations

import csv
import io
import warnings
from typing import Optional

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from ..volume import Volume

COLUMNS = ("label", "name", "voxels", "volume_ml", "mean_intensity", "dice", "hd95_mm")


def measure(labels: Volume, image: Optional[Volume] = None, reference: Optional[Volume] = None) -> list[dict]:
    """One row per label of ``labels``: id, name, voxel count, volume in mL, and where given the
    mean intensity of ``image`` inside it and Dice / HD95 (mm) against ``reference``.

    Labels present only in ``reference`` get a row too (0 voxels, Dice 0): a missed structure is
    part of the comparison. Raises ValueError naming the volume when grids differ.
    """
    data = _label_array(labels, "labels")
    _check_grid(labels, image, "image")
    ref = None
    if reference is not None:
        _check_grid(labels, reference, "reference")
        ref = _label_array(reference, "reference")
    voxel_ml = float(np.prod(labels.spacing)) / 1000.0
    ids = set(np.unique(data).tolist()) | (set(np.unique(ref).tolist()) if ref is not None else set())
    names = {**(reference.labels or {} if reference is not None else {}), **(labels.labels or {})}
    pixels = None if image is None else np.asarray(image.data, dtype=np.float64)
    rows = []
    for label in sorted(int(i) for i in ids if i != 0):
        inside = data == label
        count = int(inside.sum())
        row = {"label": label, "name": names.get(label, f"label {label}"), "voxels": count,
               "volume_ml": round(count * voxel_ml, 3)}
        if pixels is not None:
            row["mean_intensity"] = round(float(pixels[inside].mean()), 3) if count else None
        if ref is not None:
            row.update(_agreement(inside, ref == label, labels.spacing))
        rows.append(row)
    return rows


def measure_csv(rows: list[dict]) -> str:
    """The rows as CSV text with a header (the columns that any row has, in a fixed order)."""
    present = [c for c in COLUMNS if any(c in row for row in rows)]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=present, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _agreement(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, ...]) -> dict:
    """Dice and symmetric HD95 in mm; HD95 is None where either side is empty (it is undefined)."""
    p = torch.from_numpy(np.ascontiguousarray(pred))[None, None]
    t = torch.from_numpy(np.ascontiguousarray(truth))[None, None]
    if not pred.any() and not truth.any():
        return {"dice": 1.0, "hd95_mm": 0.0}
    dice = float(compute_dice(p.float(), t.float(), include_background=True, ignore_empty=False)[0, 0])
    hd95 = None
    if pred.any() and truth.any():
        with warnings.catch_warnings():  # MONAI 1.5 warns about an argument its own metric passes
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            hd95 = round(float(compute_hausdorff_distance(p, t, include_background=True, percentile=95,
                                                          spacing=list(spacing))[0, 0]), 3)
    return {"dice": round(dice, 4), "hd95_mm": hd95}


def _label_array(volume: Volume, what: str) -> np.ndarray:
    data = np.asarray(volume.data)
    if volume.rgb or volume.n_leading:
        raise ValueError(f"{what}: a label map has one value per voxel; got shape {data.shape}")
    if not (np.issubdtype(data.dtype, np.integer) or data.dtype == bool or np.array_equal(data, np.round(data))):
        raise ValueError(f"{what}: holds non-integer values; measure takes a label map")
    return data.astype(np.int64, copy=False)


def _check_grid(labels: Volume, other: Optional[Volume], what: str) -> None:
    if other is None:
        return
    if tuple(other.spatial_shape) != tuple(labels.spatial_shape):
        raise ValueError(f"{what}: shape {other.spatial_shape} differs from the label map's "
                         f"{labels.spatial_shape}; both must lie on one grid")
    if not np.allclose(other.spacing, labels.spacing, rtol=1e-3):
        raise ValueError(f"{what}: spacing {other.spacing} mm differs from the label map's {labels.spacing} mm")
