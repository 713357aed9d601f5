"""Where each DICOM frame lies in the patient (LPS mm), and how a stack of frames becomes a grid.

Slices are ordered by their position projected on the slice normal (the cross product of the
two orientation rows), never by file name or InstanceNumber, and the spacing between slices
comes from those positions (the SliceThickness tag describes the beam, not the grid).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset

from .errors import GeometryWarning

GAP_FACTOR = 1.5  # a step this many times the median one means slices are missing
SAME_POSITION_MM = 1e-3


@dataclass
class Plane:
    """One frame's placement: top-left pixel centre, row/column directions, pixel spacing."""

    position: np.ndarray  # (3,) LPS mm of the first pixel's centre
    row_dir: np.ndarray  # (3,) direction of increasing column index (first IOP triplet)
    col_dir: np.ndarray  # (3,) direction of increasing row index (second IOP triplet)
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.row_dir, self.col_dir)
        return n / np.linalg.norm(n)


@dataclass
class Grid:
    """A regular grid in Volume order (z, y, x): what a Volume needs besides its data."""

    order: list[int]  # frame indices, first slice first
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray  # (3, 3), Volume (reversed) order
    repeats: int = 1  # frames per position (a 4D series when > 1)


def in_plane_spacing(header: Dataset) -> tuple[float, float] | None:
    """PixelSpacing, else ImagerPixelSpacing (projection radiographs), as (rows, columns) mm."""
    for tag in ("PixelSpacing", "ImagerPixelSpacing"):
        value = header.get(tag)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return float(value[0]), float(value[1])
    return None


def plane_of(header: Dataset) -> Plane | None:
    """The plane of a single-frame image, or None when position or orientation is missing."""
    return _plane(header.get("ImagePositionPatient"), header.get("ImageOrientationPatient"),
                  in_plane_spacing(header))


def _plane(position, orientation, spacing) -> Plane | None:
    if position is None or orientation is None or len(position) != 3 or len(orientation) != 6:
        return None
    iop = np.asarray([float(v) for v in orientation])
    row, col = iop[:3], iop[3:]
    if np.linalg.norm(row) < 1e-6 or np.linalg.norm(col) < 1e-6:
        return None
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    return Plane(np.asarray([float(v) for v in position]), row, col, spacing or (1.0, 1.0))


def _functional(header: Dataset, frame: int, group: str, attribute: str):
    """An attribute of a functional group, per-frame first, then shared (Enhanced CT/MR, SEG)."""
    for seq_name, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        seq = header.get(seq_name)
        if seq is None or len(seq) <= index:
            continue
        items = seq[index].get(group)
        if items and attribute in items[0]:
            return items[0].get(attribute)
    return None


def frame_planes(header: Dataset) -> list[Plane | None]:
    """The plane of every frame of a multi-frame object (None for frames without geometry)."""
    n = int(header.get("NumberOfFrames") or 1)
    top_position, top_orientation = header.get("ImagePositionPatient"), header.get("ImageOrientationPatient")
    planes = []
    for i in range(n):
        position = _functional(header, i, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _functional(header, i, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _functional(header, i, "PixelMeasuresSequence", "PixelSpacing")
        spacing = (float(spacing[0]), float(spacing[1])) if spacing is not None else in_plane_spacing(header)
        if position is None and n == 1:
            position = top_position
        planes.append(_plane(position, orientation if orientation is not None else top_orientation, spacing))
    return planes


def frame_rescale(header: Dataset, frame: int | None = None) -> tuple[float, float]:
    """(slope, intercept) of a frame: Pixel Value Transformation group, else the top-level tags."""
    slope = intercept = None
    if frame is not None:
        slope = _functional(header, frame, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(header, frame, "PixelValueTransformationSequence", "RescaleIntercept")
    if slope is None:
        slope = header.get("RescaleSlope")
    if intercept is None:
        intercept = header.get("RescaleIntercept")
    slope = float(slope) if slope not in (None, "") else 1.0
    intercept = float(intercept) if intercept not in (None, "") else 0.0
    return (slope if slope != 0 else 1.0), intercept


def slice_gap_fallback(header: Dataset) -> float:
    """Slice spacing for a lone slice: SpacingBetweenSlices, else SliceThickness, else 1 mm."""
    for tag in ("SpacingBetweenSlices", "SliceThickness"):
        value = header.get(tag)
        try:
            if value not in (None, "") and abs(float(value)) > 0:
                return abs(float(value))
        except (TypeError, ValueError):
            continue
    return 1.0


def stack(planes: list[Plane], lone_spacing: float, source: str) -> Grid:
    """The grid through ``planes`` (all sharing one orientation), warning about missing slices.

    ``source`` names the files in warnings. Positions repeated the same number of times make a
    4D series (``repeats``), e.g. the phases of a cardiac cine, in their given order.
    """
    first = planes[0]
    normal = first.normal
    along = np.array([p.position @ normal for p in planes])
    order = np.argsort(along, kind="stable")
    sorted_along = along[order]
    steps = np.diff(sorted_along)
    repeats = 1
    if steps.size and (steps < SAME_POSITION_MM).any():
        order, sorted_along, repeats = _split_repeats(order, sorted_along, source)
        steps = np.diff(sorted_along)
    if steps.size:
        step = float(np.median(steps))
        _warn_gaps(sorted_along, steps, step, source)
    else:
        step = lone_spacing
    itk_direction = np.stack([first.row_dir, first.col_dir, normal], axis=1)  # columns: x, y, z
    origin = planes[int(order[0])].position
    spacing_xyz = (first.pixel_spacing[1], first.pixel_spacing[0], step)
    return Grid(
        order=[int(i) for i in np.asarray(order).ravel()],
        spacing=tuple(float(s) for s in spacing_xyz[::-1]),
        origin=tuple(float(o) for o in origin[::-1]),
        direction=itk_direction[::-1, ::-1].copy(),
        repeats=repeats,
    )


def _split_repeats(order, sorted_along, source):
    """Frames sharing positions: a 4D series when each position repeats equally, else keep the first."""
    starts = np.concatenate([[True], np.diff(sorted_along) >= SAME_POSITION_MM])
    group_id = np.cumsum(starts) - 1
    counts = np.bincount(group_id)
    if counts.min() == counts.max():
        n = int(counts[0])
        # position-major order, repeats inner: reshaped later to (repeat, z)
        per_position = np.asarray(order).reshape(-1, n)
        return per_position.T.ravel(), sorted_along[starts], n
    warnings.warn(
        f"{source}: {int((counts > 1).sum())} slice positions hold more than one slice, unevenly; "
        "the first slice at each position is used",
        GeometryWarning, stacklevel=4,
    )
    return np.asarray(order)[starts], sorted_along[starts], 1


def _warn_gaps(sorted_along, steps, step, source) -> None:
    gaps = np.nonzero(steps > GAP_FACTOR * step)[0]
    if not gaps.size:
        return
    where = "; ".join(
        f"between slice {i} at {sorted_along[i]:.2f} mm and slice {i + 1} at {sorted_along[i + 1]:.2f} mm "
        f"(about {round(steps[i] / step) - 1} missing)"
        for i in gaps[:5]
    )
    warnings.warn(
        f"{source}: slices are missing {where}; loaded without them at {step:.3g} mm spacing, "
        "so distances across the gap are too short",
        GeometryWarning, stacklevel=4,
    )
