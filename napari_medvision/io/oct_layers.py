"""Retinal layer boundaries (row heights per A-scan) turned into a region label map.

OCT devices store layer segmentations as boundary lines: for every B-scan and A-scan the row
where a boundary lies. napari and the segmentation models want a label map, so the region
between two consecutive boundaries becomes one label id, named ``"<upper>-<lower>"``.
"""

from __future__ import annotations

import numpy as np

from ..volume import Volume


def boundaries_volume(oct_volume: Volume, boundaries: dict[str, np.ndarray]) -> Volume | None:
    """A label Volume on the OCT grid, or ``None`` when no boundary has a single valid row.

    ``boundaries``: ``{layer name: (n_bscans, width) float rows, NaN where absent}``. They are
    ordered from the vitreous down by their median row, so vendor naming quirks (a "PR2" line
    drawn above "PR1") do not matter. The raw lines ride along in ``meta["boundaries"]``.
    """
    n, depth, width = oct_volume.spatial_shape
    kept = {}
    for name, rows in boundaries.items():
        rows = np.asarray(rows, dtype=np.float32)
        if rows.shape != (n, width):
            raise ValueError(f"boundary {name!r} has shape {rows.shape}, expected {(n, width)}")
        if np.isfinite(rows).any():
            kept[name] = rows
    if not kept:
        return None
    order = sorted(kept, key=lambda name: float(np.nanmedian(kept[name])))
    labels_map = region_labels([kept[name] for name in order], depth)
    names = {i + 1: f"{upper}-{lower}" for i, (upper, lower) in enumerate(zip(order[:-1], order[1:]))}
    return Volume(
        data=labels_map,
        spacing=oct_volume.spacing,
        origin=oct_volume.origin,
        direction=oct_volume.direction,
        modality=oct_volume.modality,
        labels=names,
        meta={"boundaries": kept, "boundary_order": order},
    )


def region_labels(ordered_rows: list[np.ndarray], depth: int) -> np.ndarray:
    """``(n_bscans, depth, width)`` uint8/uint16 map: id ``k`` between boundary ``k-1`` and ``k``.

    A pixel row ``r`` lies in region ``k`` when ``upper <= r < lower``; where either line is
    missing (NaN) or the lines cross, that A-scan gets no label for the region.
    """
    n, width = ordered_rows[0].shape
    dtype = np.uint8 if len(ordered_rows) < 256 else np.uint16
    out = np.zeros((n, depth, width), dtype=dtype)
    rows = np.arange(depth, dtype=np.float32)[None, :, None]
    with np.errstate(invalid="ignore"):
        for k, (upper, lower) in enumerate(zip(ordered_rows[:-1], ordered_rows[1:]), start=1):
            inside = (rows >= upper[:, None, :]) & (rows < lower[:, None, :])
            out[inside] = k
    return out
