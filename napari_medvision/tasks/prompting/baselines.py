"""The two simple answers ``mv.prompt`` has to beat, as functions with the same inputs.

    slice_copy(annotations)                    every slice gets a copy of its nearest annotated slice
    affine_registration(volume, image, mask)   one example registered affinely, its mask warped
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ...volume import Volume
from .features import normalised
from .register import register_affine, to_sitk


def slice_copy(annotations: Volume, annotated_slices: Optional[Sequence[int]] = None) -> Volume:
    """Labels Volume where each slice (axis 0) is a copy of the nearest annotated slice (ties: the lower)."""
    painted = np.asarray(annotations.data)
    if annotated_slices is None:
        annotated = np.flatnonzero(painted.reshape(painted.shape[0], -1).any(1))
    else:
        annotated = np.asarray(sorted(set(int(z) for z in annotated_slices)))
    if len(annotated) == 0:
        raise ValueError("no annotated slice: paint at least one slice, or name it in annotated_slices=")
    nearest = annotated[np.argmin(np.abs(np.arange(painted.shape[0])[:, None] - annotated[None, :]), axis=1)]
    copied = annotations.with_data(painted[nearest].copy())
    copied.meta["baseline"] = "slice_copy"
    return copied


def affine_registration(volume: Volume, image: Volume, mask: Volume) -> Volume:
    """Labels Volume on ``volume``'s grid: ``mask`` carried through an affine registration of ``image``.

    Labels are warped by nearest neighbour, as a user of a registration tool would do.
    """
    import SimpleITK as sitk

    if mask.spatial_shape != image.spatial_shape:
        raise ValueError(f"example image shape {image.spatial_shape} and mask shape {mask.spatial_shape} differ")
    grey = lambda v: normalised(v).mean(-1) if v.rgb else normalised(v)  # noqa: E731
    transform = register_affine(volume, grey(volume), image, grey(image))
    reference = to_sitk(volume, np.zeros(volume.spatial_shape, dtype=np.float32))
    moved = sitk.Resample(to_sitk(image, np.asarray(mask.data, dtype=np.float32)), reference, transform,
                          sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)
    data = sitk.GetArrayFromImage(moved).astype(np.asarray(mask.data).dtype)
    return Volume(data, spacing=volume.spacing, origin=volume.origin, direction=volume.direction,
                  modality=volume.modality, labels=dict(mask.labels or {}), meta={"baseline": "affine_registration"})
