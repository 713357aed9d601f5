"""Volume: one image or label map with everything needed to put it back on disk exactly.

Axis order is napari's: ``(z, y, x)`` for 3D, ``(y, x)`` for 2D, ``(y, x, 3)`` for RGB and a
leading axis for 4D series ``(t, z, y, x)``. World space is LPS millimetres (DICOM/ITK), written
in the same reversed order as the array axes, so that for array index ``i`` (spatial axes only)::

    world = origin + direction @ (spacing * i)

``spacing``, ``origin`` and ``direction`` therefore relate to ITK's ``(x, y, z)`` ones by
reversing every axis (see :func:`from_itk_geometry`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

MODALITIES = ("CT", "MR", "OCT", "fundus", "PET", "US", "XR", "SEG", "other")


@dataclass
class Volume:
    """An image or label map plus its physical geometry.

    data: numpy or dask array in napari axis order.
    spacing: mm per spatial axis, array order (``(z, y, x)`` for 3D).
    origin: world position (LPS mm, reversed order) of the first voxel's centre.
    direction: ``(n, n)`` matrix whose columns are the unit world directions of the array axes.
    modality: ``"CT"``, ``"MR"``, ``"OCT"``, ``"fundus"``, ... or ``None`` when unknown.
    labels: ``{label id: name}`` for a label map, ``None`` for an image.
    rgb: the last array axis holds colour channels (fundus photos).
    meta: source header fields worth keeping (never needed to restore geometry).
    """

    data: Any
    spacing: tuple[float, ...]
    origin: tuple[float, ...] | None = None
    direction: np.ndarray | None = None
    modality: str | None = None
    labels: dict[int, str] | None = None
    rgb: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.spacing)
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in (self.origin if self.origin is not None else (0.0,) * n))
        self.direction = np.eye(n) if self.direction is None else np.asarray(self.direction, dtype=float)
        if len(self.origin) != n or self.direction.shape != (n, n):
            raise ValueError(
                f"Volume geometry does not agree: {n} spacings, {len(self.origin)} origin values, "
                f"direction of shape {self.direction.shape}"
            )
        if any(not np.isfinite(s) or s <= 0 for s in self.spacing):
            raise ValueError(f"Volume spacing must be positive and finite, got {self.spacing}")
        extra = self.data.ndim - n - (1 if self.rgb else 0)
        if extra < 0:
            raise ValueError(f"Volume data has {self.data.ndim} axes but {n} spacings (rgb={self.rgb})")
        if self.labels is not None:
            self.labels = {int(k): str(v) for k, v in self.labels.items()}

    # --- shape helpers -------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        """Number of spatial axes (2 or 3)."""
        return len(self.spacing)

    @property
    def n_leading(self) -> int:
        """Number of non-spatial leading axes (1 for a 4D series, else 0)."""
        return self.data.ndim - self.ndim - (1 if self.rgb else 0)

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        start = self.n_leading
        return tuple(int(s) for s in self.data.shape[start : start + self.ndim])

    @property
    def is_labels(self) -> bool:
        return self.labels is not None

    def with_data(self, data: Any, **changes: Any) -> "Volume":
        """A new Volume on the same grid holding ``data`` (for results: masks, syntheses)."""
        return replace(self, data=data, meta=dict(self.meta), **changes)

    # --- geometry ------------------------------------------------------------------------
    def affine(self) -> np.ndarray:
        """``(n+1, n+1)`` matrix mapping spatial array index to world (reversed LPS mm)."""
        n = self.ndim
        a = np.eye(n + 1)
        a[:n, :n] = self.direction * np.asarray(self.spacing)[None, :]
        a[:n, n] = self.origin
        return a

    def same_grid(self, other: "Volume", tol: float = 1e-4) -> bool:
        """True when ``other`` lies voxel for voxel on this volume's grid."""
        return (
            self.spatial_shape == other.spatial_shape
            and np.allclose(self.spacing, other.spacing, atol=tol)
            and np.allclose(self.origin, other.origin, atol=tol)
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def geometry(self) -> dict[str, Any]:
        """Plain-JSON geometry, as stored in ``layer.metadata`` and OME-Zarr attributes."""
        return {
            "spacing": list(self.spacing),
            "origin": list(self.origin),
            "direction": self.direction.tolist(),
            "modality": self.modality,
            "labels": None if self.labels is None else {str(k): v for k, v in self.labels.items()},
            "rgb": self.rgb,
        }

    @classmethod
    def from_geometry(cls, data: Any, geometry: dict[str, Any], meta: dict | None = None) -> "Volume":
        labels = geometry.get("labels")
        return cls(
            data=data,
            spacing=tuple(geometry["spacing"]),
            origin=tuple(geometry["origin"]),
            direction=np.asarray(geometry["direction"], dtype=float),
            modality=geometry.get("modality"),
            labels=None if labels is None else {int(k): v for k, v in labels.items()},
            rgb=bool(geometry.get("rgb", False)),
            meta=dict(meta or {}),
        )

    def __repr__(self) -> str:
        kind = "labels" if self.is_labels else "image"
        return (
            f"Volume({kind}, shape={tuple(self.data.shape)}, dtype={self.data.dtype}, "
            f"spacing={tuple(round(s, 4) for s in self.spacing)}, modality={self.modality!r})"
        )


def from_itk_geometry(spacing, origin, direction_flat) -> tuple[tuple, tuple, np.ndarray]:
    """Convert ITK ``(x, y, z)`` geometry to Volume's reversed order."""
    n = len(spacing)
    d = np.asarray(direction_flat, dtype=float).reshape(n, n)
    return tuple(spacing)[::-1], tuple(origin)[::-1], d[::-1, ::-1].copy()


def to_itk_geometry(vol: Volume) -> tuple[tuple, tuple, tuple]:
    """Volume geometry as ITK ``(spacing, origin, flat direction)`` in ``(x, y, z)`` order."""
    d = vol.direction[::-1, ::-1]
    return tuple(vol.spacing[::-1]), tuple(vol.origin[::-1]), tuple(d.ravel().tolist())
