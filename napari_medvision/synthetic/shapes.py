"""Shared building blocks of the phantoms: smooth random fields, deformations, simple solids.

Everything takes a :class:`numpy.random.Generator` so that a phantom is a pure function of its
seed. Fields are float32 to keep a 160x160x64 phantom well under a second on a laptop CPU.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def make_rng(seed: int | np.random.Generator) -> np.random.Generator:
    """A generator from ``seed`` (an int, or a generator passed through)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(int(seed))


def upsample_linear(grid: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """``grid`` stretched to ``shape`` by separable linear interpolation (corners aligned).

    Written by hand because it is several times faster than ``scipy.ndimage.zoom`` for the
    coarse-to-fine case, which dominates the cost of every smooth field here.
    """
    out = np.asarray(grid, dtype=np.float32)
    for axis, n in enumerate(shape):
        m = out.shape[axis]
        if m == n:
            continue
        pos = np.linspace(0.0, m - 1.0, n, dtype=np.float32)
        i0 = np.clip(np.floor(pos).astype(np.intp), 0, max(m - 2, 0))
        i1 = np.minimum(i0 + 1, m - 1)
        w = pos - i0
        w_shape = [1] * out.ndim
        w_shape[axis] = n
        w = w.reshape(w_shape)
        out = out.take(i0, axis=axis) * (1 - w) + out.take(i1, axis=axis) * w
    return out.astype(np.float32, copy=False)


def smooth_noise(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    scale: float | tuple[float, ...],
) -> np.ndarray:
    """Gaussian random field of zero mean and unit standard deviation, correlated over ``scale`` voxels.

    scale: correlation length in voxels per axis (roughly the size of one blob). The field is
    drawn on a coarse grid (two samples per blob), smoothed there and stretched to ``shape``.
    """
    scales = np.broadcast_to(np.asarray(scale, dtype=float), (len(shape),))
    coarse = tuple(int(max(4, np.ceil(2 * n / max(s, 1e-3)) + 3)) for n, s in zip(shape, scales))
    grid = rng.standard_normal(coarse).astype(np.float32)
    grid = ndi.gaussian_filter(grid, sigma=1.0, mode="wrap")
    # Stretch only the interior so that the wrapped borders never reach the output.
    inner = grid[tuple(slice(1, -1) for _ in coarse)]
    field = upsample_linear(inner, shape)
    field -= field.mean()
    std = field.std()
    return field / (std if std > 0 else 1.0)


def displacement_field(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    scale: float | tuple[float, ...],
    amplitude: float | tuple[float, ...],
) -> list[np.ndarray]:
    """One smooth random displacement per axis, in the units of ``amplitude`` (mm or voxels)."""
    amps = np.broadcast_to(np.asarray(amplitude, dtype=float), (len(shape),))
    return [smooth_noise(rng, shape, scale) * np.float32(a) for a in amps]


def centred_grid(shape: tuple[int, ...], spacing: tuple[float, ...]) -> list[np.ndarray]:
    """Open (broadcastable) mm coordinates per axis, zero at the centre of the volume."""
    axes = []
    for axis, (n, s) in enumerate(zip(shape, spacing)):
        c = (np.arange(n, dtype=np.float32) - (n - 1) / 2.0) * np.float32(s)
        view = [1] * len(shape)
        view[axis] = n
        axes.append(c.reshape(view))
    return axes


def centred_origin(shape: tuple[int, ...], spacing: tuple[float, ...]) -> tuple[float, ...]:
    """Origin (first voxel centre, mm) that puts the volume's centre at world zero."""
    return tuple(-(n - 1) / 2.0 * s for n, s in zip(shape, spacing))


def ellipsoid(coords, centre, radii, rotations=()) -> np.ndarray:
    """Normalised radius of an ellipsoid: < 1 inside, 1 on the surface.

    coords: mm coordinates per axis (arrays that broadcast), centre and radii in mm.
    rotations: ``(degrees, (axis_a, axis_b))`` pairs turning the ellipsoid in those planes,
    applied in order (for example a kidney's axial turn and then its coronal tilt).
    """
    rel = [c - np.float32(m) for c, m in zip(coords, centre)]
    for angle_deg, (a, b) in rotations:
        t = np.deg2rad(angle_deg)
        ca, sa = np.float32(np.cos(t)), np.float32(np.sin(t))
        rel[a], rel[b] = ca * rel[a] + sa * rel[b], -sa * rel[a] + ca * rel[b]
    total = 0
    for r, rad in zip(rel, radii):
        total = total + (r / np.float32(rad)) ** 2
    return np.sqrt(total)


def tube(coords, axis: int, start: float, stop: float, centre_fn, radius) -> np.ndarray:
    """Distance (mm) to the centre line of a tube that runs along ``axis`` from ``start`` to ``stop``.

    centre_fn(t) gives the centre's other two coordinates at position ``t`` along the axis;
    ``radius`` (a number or a function of t) scales the distance so that < 1 is inside.
    Ends are rounded (the position is clamped to the tube's extent).
    """
    t = np.clip(coords[axis], start, stop)
    others = [i for i in range(3) if i != axis]
    u0, v0 = centre_fn(t)
    d2 = (coords[axis] - t) ** 2 + (coords[others[0]] - u0) ** 2 + (coords[others[1]] - v0) ** 2
    r = radius(t) if callable(radius) else np.float32(radius)
    return np.sqrt(d2) / r


def curve_network(noise_a: np.ndarray, noise_b: np.ndarray, width: float) -> np.ndarray:
    """Branching tubes where two random fields both cross zero (vessels, mesenteric strands).

    The zero set of one smooth field is a surface; the intersection of two is a set of curves,
    which looks like a vessel tree at the fraction of the cost of growing one.
    """
    return (np.abs(noise_a) < width) & (np.abs(noise_b) < width)
