"""Array layout: a 3D model sees every scan with its axes running the way they ran in training.

A NIfTI from one scanner may store the patient's right on the array's high x and the anterior
on high y; a DICOM series stores them the other way round, and some heads are stored sagittal.
All are correct in world space, but a network that tells the liver from the spleen by side has
learnt one layout. A card's ``input.orientation`` names that layout as ITK does, one letter per
axis in ``(x, y, z)`` order toward which each runs: ``"LPS"`` (DICOM's; our ``direction`` is then
the identity) or ``"RAS"`` (many NIfTI files). Scans are turned to it by flips and axis swaps only
(no resampling, exact both ways) and results turned back. ``nibabel.orientations`` finds the
flips and swaps; this module applies them to a Volume and to results.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from nibabel.orientations import (aff2axcodes, apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation,
                                  ornt_transform)

from ..volume import Volume

# Our world axes in array order (z, y, x) = (S, P, L) of LPS: each pair is (negative, positive).
_WORLD_AXES = (("I", "S"), ("A", "P"), ("R", "L"))


def layout_ornt(code: str) -> np.ndarray:
    """nibabel ``ornt`` (per array axis: world axis, flip) of an array in the ITK layout ``code``."""
    letters = str(code).upper()
    axes = {k for c in letters for k, pair in enumerate(_WORLD_AXES) if c in pair}
    if len(letters) != 3 or axes != {0, 1, 2}:  # three letters, one per world axis
        raise ValueError(f"the model card's array layout {code!r} is not an orientation code such as 'LPS' or 'RAS'")
    return axcodes2ornt(tuple(letters[::-1]), _WORLD_AXES)


def layout_of(volume: Volume) -> str:
    """The ITK layout code of a 3D volume's array axes (nearest axis per direction column)."""
    return "".join(aff2axcodes(volume.affine(), _WORLD_AXES))[::-1]


def model_layout(volume: Volume, card_input: dict[str, Any]) -> tuple[Volume, np.ndarray | None]:
    """``volume`` turned to the card's layout, and the nibabel ``ornt`` that turned it (``None``
    where nothing changed: no ``orientation`` entry, not a 3D image, or already in that layout)."""
    code = card_input.get("orientation")
    if code is None or volume.ndim != 3 or volume.rgb or volume.n_leading:
        return volume, None
    ornt = ornt_transform(io_orientation(volume.affine()), layout_ornt(code))
    if np.array_equal(ornt, [[0, 1], [1, 1], [2, 1]]):
        return volume, None
    affine = volume.affine() @ inv_ornt_aff(ornt, volume.spatial_shape)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    turned = Volume(in_model_layout(np.asarray(volume.data), ornt),
                    spacing=tuple(float(s) for s in spacing), origin=tuple(affine[:3, 3]),
                    direction=affine[:3, :3] / spacing[None, :], modality=volume.modality,
                    labels=volume.labels, meta=dict(volume.meta))
    return turned, ornt


def in_model_layout(array: np.ndarray, ornt: np.ndarray | None) -> np.ndarray:
    """A spatial array on the input's grid (labels, masks) turned as :func:`model_layout` turned its volume."""
    if ornt is None:
        return array
    return np.ascontiguousarray(apply_orientation(array, ornt))


def back_to_input_layout(array, ornt: np.ndarray | None):
    """A result in the model layout (numpy or torch, spatial axes last, e.g. ``(classes, z, y, x)``)
    back to the input's layout: the inverse flips and axis swaps."""
    if ornt is None:
        return array
    inverse = np.zeros_like(ornt)
    for axis, (target, flip) in enumerate(ornt):
        inverse[int(target)] = (axis, flip)
    lead = array.ndim - 3
    flips = [lead + i for i, (_, flip) in enumerate(inverse) if flip < 0]
    order = list(range(lead)) + [lead + int(axis) for axis in np.argsort(inverse[:, 0])]
    if isinstance(array, np.ndarray):
        return np.transpose(np.flip(array, flips) if flips else array, order)
    return (array.flip(flips) if flips else array).permute(order)  # a torch tensor
