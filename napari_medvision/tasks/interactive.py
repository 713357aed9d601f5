"""Interactive 3D prompts: clicks, boxes, scribbles and lassos that segment one object at a time.

::

    s = mv.InteractiveSession(volume)
    s.add_point((z, y, x))                      # the 3D mask of the object clicked
    s.add_point((z, y, x), positive=False)      # not this part
    s.undo(); s.redo()
    s.next_object("liver")                      # accept it; the next prompts start a new object
    s.labels                                    # a labels Volume with every accepted object

Coordinates are array indices of ``volume``. Every prompt returns the updated mask: the first
prompt (and a box) computes the object from all prompts; a later one corrects the mask near it
(``interactive_method``), on a working grid built once per scan and kept in the zarr cache
(``VolumeCache``): a scan opened again starts warm. Undo and redo step through the masks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage as ndi

from ..engine.progress import CancelToken, ProgressFn, check, report
from ..volume import Volume
from .interactive_method import (
    ADD_DEPTH,
    CT_SOFT_TISSUE,
    MARGIN_MM,
    POINT_RADIUS_MM,
    Seeds,
    WorkGrid,
    block_mean,
    cut_roi,
    segment_roi,
    touches_open_side,
)

GRID_VERSION = "interactive-grid-1"  # bump when WorkGrid.build changes meaning
ADD_MIN_MM = 15.0  # a correcting click adds at least this far around itself
ADD_SCALE = 1.5  # ... and as far as this many times the object's own radius


class InteractionError(ValueError):
    """A prompt that cannot be used (outside the volume, a box of zero size, a bad shape)."""


@dataclass(frozen=True)
class Point:
    index: tuple[int, int, int]
    positive: bool


@dataclass(frozen=True)
class Box:
    lo: tuple[int, int, int]
    hi: tuple[int, int, int]  # inclusive


@dataclass(frozen=True)
class Scribble:
    voxels: tuple[np.ndarray, np.ndarray, np.ndarray]
    positive: bool


@dataclass(frozen=True)
class Lasso:
    inside: np.ndarray  # (y, x) bool on slice z
    z: int


class InteractiveSession:
    """One scan, the prompts of the object being drawn, and the objects accepted so far.

    volume: a 3D image Volume (CT, MR, ...); device: accepted for the common signature of the
    API; the method runs on the CPU (tens to hundreds of milliseconds an interaction).
    progress / cancel: for building the working grid on the first use of a scan.
    use_cache: read and keep the working grid in the zarr cache (``$MEDVISION_HOME``).
    """

    def __init__(self, volume: Volume, device: Optional[str] = None, progress: Optional[ProgressFn] = None,
                 cancel: Optional[CancelToken] = None, use_cache: bool = True):
        if volume.rgb or len(volume.spatial_shape) != 3 or volume.n_leading:
            raise InteractionError(f"interactive prompts need a 3D grey image; this volume has shape "
                                   f"{tuple(volume.data.shape)}{' (RGB)' if volume.rgb else ''}")
        self.volume, self.device = volume, device
        self.shape = tuple(int(n) for n in volume.spatial_shape)
        self.spacing = np.asarray(volume.spacing, dtype=float)
        self.grid = _working_grid(volume, progress, cancel, use_cache)
        self._history: list[tuple[tuple, np.ndarray]] = []  # (prompts, mask packed 8 voxels a byte)
        self._at = -1
        self._shown: Optional[tuple[int, np.ndarray]] = None
        self._record((), np.zeros(self.shape, dtype=bool))
        self._labels = np.zeros(self.shape, dtype=np.uint16)
        self._names: dict[int, str] = {}

    # --- the object being drawn -----------------------------------------------------------
    @property
    def mask(self) -> np.ndarray:
        """The current object's mask (bool, the volume's grid)."""
        if self._shown is None or self._shown[0] != self._at:
            self._shown = (self._at, self._unpack(self._at))
        return self._shown[1]

    @property
    def prompts(self) -> tuple:
        return self._history[self._at][0]

    def add_point(self, index: Sequence[float], positive: bool = True) -> np.ndarray:
        """The mask after a click at ``index`` ``(z, y, x)``: on the object (positive) or not."""
        return self._push(self.point(index, positive))

    def add_box(self, corner0: Sequence[float], corner1: Sequence[float]) -> np.ndarray:
        """The mask after a box from ``corner0`` to ``corner1`` (inclusive; z0 == z1: a box on one slice)."""
        a, b = self._voxel(corner0, "the box's first corner"), self._voxel(corner1, "the box's second corner")
        lo, hi = tuple(map(min, a, b)), tuple(map(max, a, b))
        if hi[1] == lo[1] or hi[2] == lo[2]:
            raise InteractionError(f"the box from {tuple(a)} to {tuple(b)} has no area in the slice; "
                                   "drag a box around the object")
        return self._push(Box(lo, hi))

    def add_scribble(self, mask: np.ndarray, positive: bool = True) -> np.ndarray:
        """The mask after a scribble: ``mask`` (bool, the volume's grid) marks voxels on the object (or not)."""
        mask = np.asarray(mask)
        if mask.shape != self.shape:
            raise InteractionError(f"the scribble has shape {mask.shape}; it must match the volume's {self.shape}")
        voxels = np.nonzero(mask)
        if not len(voxels[0]):
            raise InteractionError("the scribble is empty: draw on the object first")
        return self._push(Scribble(voxels, bool(positive)))

    def add_lasso(self, polygon_yx: np.ndarray, z: int) -> np.ndarray:
        """The mask after a lasso: ``polygon_yx`` ``(n, 2)`` (y, x) is the object's outline on slice ``z``."""
        from skimage.draw import polygon2mask

        polygon = np.asarray(polygon_yx, dtype=float)
        if polygon.ndim != 2 or polygon.shape[1] != 2 or len(polygon) < 3:
            raise InteractionError(f"a lasso needs at least 3 (y, x) vertices; got an array of shape {polygon.shape}")
        if not 0 <= int(round(z)) < self.shape[0]:
            raise InteractionError(f"the lasso's slice {z} is outside the volume (0 to {self.shape[0] - 1})")
        inside = polygon2mask(self.shape[1:], polygon)
        if not inside.any():
            raise InteractionError("the lasso encloses no voxel of the slice")
        return self._push(Lasso(inside, int(round(z))))

    def undo(self) -> np.ndarray:
        """The mask before the last prompt (unchanged when there is nothing to undo)."""
        self._at = max(0, self._at - 1)
        return self.mask

    def redo(self) -> np.ndarray:
        """The mask after the prompt undone last (unchanged when there is nothing to redo)."""
        self._at = min(len(self._history) - 1, self._at + 1)
        return self.mask

    @property
    def can_undo(self) -> bool:
        return self._at > 0

    @property
    def can_redo(self) -> bool:
        return self._at < len(self._history) - 1

    def reset(self) -> np.ndarray:
        """Drop the current object's prompts (an empty mask; undo brings them back)."""
        if self.prompts:
            self._record((), np.zeros(self.shape, dtype=bool))
        return self.mask

    # --- accepted objects -------------------------------------------------------------------
    def next_object(self, name: Optional[str] = None) -> int:
        """Accept the current mask as an object named ``name`` and start a new one; its label value.

        Voxels of objects accepted earlier are kept (a new object fills only unlabelled voxels).
        An empty mask is not accepted: 0 is returned and nothing changes.
        """
        if not self.mask.any():
            return 0
        value = max(self._names, default=0) + 1
        self._labels[self.mask & (self._labels == 0)] = value
        self._names[value] = str(name) if name else f"object {value}"
        self._history, self._at = [], -1
        self._record((), np.zeros(self.shape, dtype=bool))
        return value

    @property
    def labels(self) -> Volume:
        """Every accepted object as a labels Volume on the scan's grid, with their names."""
        return self.volume.with_data(self._labels.copy(), labels=dict(self._names), modality=self.volume.modality)

    # --- previews -------------------------------------------------------------------------------
    def preview_slice(self, z: int, pending=None) -> np.ndarray:
        """The object on slice ``z`` only (``(y, x)`` bool) after the last prompt, or after ``pending``
        (a prompt from ``point``/``box``/``scribble``/``lasso``, not yet added): a first answer in
        tens of milliseconds while the 3D mask is computed."""
        z = int(np.clip(z, 0, self.shape[0] - 1))
        previous = self.mask[z] if pending is not None else (self._unpack(self._at - 1)[z] if self._at else
                                                             np.zeros(self.shape[1:], dtype=bool))
        prompts = self.prompts + ((pending,) if pending is not None else ())
        if not prompts:
            return previous.copy()
        new = prompts[-1]
        seeds, hard = self._seeds(prompts)
        wz = z // self.grid.factors[0]
        if not getattr(new, "positive", True):
            return hard.apply_slice(previous & ~self._cut_slice(previous, seeds, z), z)
        focus = None if isinstance(new, Box) or not previous.any() else self._seeds((new,))[0]
        lo, hi = (focus or seeds).extent(self.grid.work_shape)
        if seeds.limit is not None:
            lo, hi = seeds.limit
        margin = self._margin(1.0)
        lo, hi = np.maximum(lo - margin, 0), np.minimum(hi + margin, self.grid.work_shape)
        roi = (slice(wz, wz + 1), slice(int(lo[1]), int(hi[1])), slice(int(lo[2]), int(hi[2])))
        connect = None if focus is None else focus.positive + focus.force_on
        near_depth = ADD_DEPTH if isinstance(new, Point) and not seeds.distinct else 0.0
        plane = self._plane(segment_roi(self.grid, seeds, roi, connect, near_depth), roi, z)
        return hard.apply_slice(plane | previous if focus is not None else plane, z)

    def _plane(self, work: np.ndarray, roi: tuple[slice, ...], z: int) -> np.ndarray:
        """Slice ``z`` of a one-slice working-grid result ``work`` on the scan's grid."""
        out = np.zeros(self.shape[1:], dtype=bool)
        full = self._upsample(work, roi)
        (y0, y1), (x0, x1) = [(s.start * f, min(s.stop * f, n)) for s, f, n in
                              zip(roi[1:], self.grid.factors[1:], self.shape[1:])]
        out[y0:y1, x0:x1] = full[z - roi[0].start * self.grid.factors[0]]
        return out

    def _cut_slice(self, previous: np.ndarray, seeds: Seeds, z: int) -> np.ndarray:
        """What a negative prompt removes from slice ``z`` (``previous``: the object there)."""
        if not previous.any():
            return previous
        f = np.asarray(self.grid.factors)
        wz = z // f[0]
        ys, xs = np.nonzero(previous.any(1))[0], np.nonzero(previous.any(0))[0]
        roi = (slice(wz, wz + 1), slice(int(ys[0] // f[1]), int(min(ys[-1] // f[1] + 2, self.grid.work_shape[1]))),
               slice(int(xs[0] // f[2]), int(min(xs[-1] // f[2] + 2, self.grid.work_shape[2]))))
        region = (slice(roi[1].start * f[1], min(roi[1].stop * f[1], self.shape[1])),
                  slice(roi[2].start * f[2], min(roi[2].stop * f[2], self.shape[2])))
        work = block_mean(previous[region][None].astype(np.float32), (1, f[1], f[2])) >= 0.5
        on_slice = [g for g in seeds.positive + seeds.force_on if np.any(g[0] == wz)]
        if not on_slice:  # nothing positive here: the click takes the part of the object it lies in
            off = [g for g in seeds.force_off if np.any(g[0] == wz)]
            labels, _ = ndi.label(work[0])
            hit = np.unique(np.concatenate([labels[g[1] - roi[1].start, g[2] - roi[2].start] for g in off]
                                           or [np.zeros(0, int)]))
            removed = np.isin(labels, hit[hit > 0])[None]
        else:
            removed = cut_roi(self.grid, work[:, :roi[1].stop - roi[1].start, :roi[2].stop - roi[2].start], seeds, roi)
        return self._plane(removed, roi, z)

    # --- prompts not yet added (for previews) --------------------------------------------------
    def point(self, index: Sequence[float], positive: bool = True) -> Point:
        """A click as a prompt object (checked), for ``preview_slice(z, pending=...)``."""
        return Point(self._voxel(index, "the click"), bool(positive))

    # --- internals ------------------------------------------------------------------------------
    def _voxel(self, index: Sequence[float], what: str) -> tuple[int, int, int]:
        index = np.asarray(index, dtype=float)
        if index.shape != (3,) or not np.all(np.isfinite(index)):
            raise InteractionError(f"{what} must be a (z, y, x) index; got {tuple(np.ravel(index))}")
        voxel = tuple(int(round(v)) for v in index)
        if any(not 0 <= v < n for v, n in zip(voxel, self.shape)):
            raise InteractionError(f"{what} at {voxel} is outside the volume of shape {self.shape}")
        return voxel

    def _push(self, prompt) -> np.ndarray:
        prompts = self.prompts + (prompt,)
        self._record(prompts, self._apply(self.mask, prompts, prompt))
        return self.mask

    def _apply(self, previous: np.ndarray, prompts: tuple, new) -> np.ndarray:
        """The mask after prompt ``new``: a correction changes the previous mask near it only.

        The first prompt and a box compute the object afresh; a later positive prompt adds the
        component it lands in; a negative one takes away what it is geodesically closer to.
        """
        if isinstance(new, Box) or not previous.any():
            return self._compute(prompts)
        seeds, hard = self._seeds(prompts)
        if not getattr(new, "positive", True):
            return hard.apply(previous & ~self._cut(previous, seeds))
        own, _ = self._seeds((new,))
        if isinstance(new, Point):
            near, bound = self._near(new.index, previous)
            return hard.apply(previous | (self._compute(prompts, focus=own, bound=bound) & near))
        return hard.apply(previous | self._compute(prompts, focus=own))

    def _near(self, index, previous: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Voxels a correcting click may add, and their box ``(lo, hi)``: those within ``ADD_SCALE``
        times the object's own radius (that of a ball of its volume; at least ``ADD_MIN_MM``) of
        the click, so a click on an edge does not pour the object into everything as bright."""
        volume = float(previous.sum()) * float(np.prod(self.spacing))
        radius = max(ADD_MIN_MM, ADD_SCALE * (3 * volume / (4 * np.pi)) ** (1 / 3))
        reach = np.ceil(radius / self.spacing).astype(int)
        lo = np.maximum(np.asarray(index) - reach, 0)
        hi = np.minimum(np.asarray(index) + reach + 1, self.shape)
        axes = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        d2 = sum(((a - i) * sp) ** 2 for a, i, sp in zip(axes, index, self.spacing))
        out = np.zeros(self.shape, dtype=bool)
        out[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = d2 <= radius ** 2
        return out, (lo, hi)

    def _cut(self, previous: np.ndarray, seeds: Seeds) -> np.ndarray:
        """The voxels of ``previous`` a negative prompt removes (``interactive_method.cut_roi``)."""
        f = np.asarray(self.grid.factors)
        where = [np.nonzero(previous.any(axes))[0] for axes in ((1, 2), (0, 2), (0, 1))]
        lo = np.array([w[0] for w in where]) // f
        hi = np.minimum(np.array([w[-1] for w in where]) // f + 2, self.grid.work_shape)
        roi = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))
        region = tuple(slice(s.start * n, min(s.stop * n, m)) for s, n, m in zip(roi, f, self.shape))
        work = block_mean(previous[region].astype(np.float32), f) >= 0.5
        removed = cut_roi(self.grid, work[tuple(slice(0, s.stop - s.start) for s in roi)], seeds, roi)
        out = np.zeros(self.shape, dtype=bool)
        out[region] = self._upsample(removed, roi)
        return out

    def _record(self, prompts: tuple, mask: np.ndarray) -> None:
        # packed: a session of many clicks on a 512x512x300 scan keeps 10 MB a step, not 80 MB
        del self._history[self._at + 1:]
        self._history.append((prompts, np.packbits(mask, axis=None)))
        self._at += 1
        self._shown = (self._at, mask)

    def _unpack(self, at: int) -> np.ndarray:
        packed = self._history[at][1]
        return np.unpackbits(packed, count=int(np.prod(self.shape))).reshape(self.shape).astype(bool)

    def _margin(self, scale: float) -> np.ndarray:
        return np.ceil(scale * MARGIN_MM / self.grid.spacing).astype(int)

    def _compute(self, prompts: tuple, focus: Optional[Seeds] = None, bound=None) -> np.ndarray:
        """The object from all ``prompts``; with ``focus``, only the components holding its prompts,
        in a region around them; with ``bound`` (``(lo, hi)`` scan voxels: a correcting click),
        only within that box and, unless the object is ``distinct``, near the click (``ADD_DEPTH``)."""
        seeds, hard = self._seeds(prompts)
        out = np.zeros(self.shape, dtype=bool)
        if not seeds.positive and not seeds.force_on:
            return hard.apply(out)
        work_shape = np.asarray(self.grid.work_shape)
        lo, hi = (focus or seeds).extent(work_shape)
        connect = None if focus is None else focus.positive + focus.force_on
        f = np.asarray(self.grid.factors)
        blo, bhi = (np.zeros(3, int), work_shape) if bound is None else (bound[0] // f, (bound[1] - 1) // f + 1)
        scale = 1.0
        while True:
            if seeds.limit is not None:
                a, b = np.maximum(seeds.limit[0] - 1, 0), np.minimum(seeds.limit[1] + 1, work_shape)
            else:
                margin = self._margin(scale)
                a, b = np.maximum(lo - margin, blo), np.minimum(hi + margin, bhi)
            roi = tuple(slice(int(s), int(e)) for s, e in zip(a, b))
            work = segment_roi(self.grid, seeds, roi, connect, 0.0 if bound is None or seeds.distinct else ADD_DEPTH)
            whole = bool(np.all(a <= blo) and np.all(b >= bhi))
            if seeds.limit is not None or whole or not touches_open_side(work, roi, work_shape):
                break
            scale *= 2.5  # the object reaches past the region: look wider
        full = self._upsample(work, roi)
        region = tuple(slice(s.start * f, min(s.stop * f, n)) for s, f, n in zip(roi, self.grid.factors, self.shape))
        out[region] = full
        return hard.apply(out)

    def _upsample(self, work: np.ndarray, roi: tuple[slice, ...]) -> np.ndarray:
        """The working-grid mask ``work`` of ``roi`` on the scan's grid (nearest neighbour)."""
        index = []
        for s, f, n in zip(roi, self.grid.factors, self.shape):
            full = np.arange(s.start * f, min(s.stop * f, n))
            index.append(full // f - s.start)
        return work[np.ix_(*index)]

    def _seeds(self, prompts: tuple) -> tuple[Seeds, "_HardLimits"]:
        """The prompts as working-grid seeds, and the constraints applied on the scan's grid."""
        grid, seeds, hard = self.grid, Seeds(), _HardLimits(self.shape)
        f = np.asarray(grid.factors)
        radius = np.maximum(np.round(POINT_RADIUS_MM / grid.spacing).astype(int), 0)
        boxes = [p for p in prompts if isinstance(p, Box)]
        for p in prompts:
            if isinstance(p, Point):
                centre = np.asarray(grid.to_work(p.index))
                ball = _ball(centre, radius, grid.spacing, grid.work_shape)
                (seeds.positive if p.positive else seeds.negative).append(ball)
                (seeds.force_on if p.positive else seeds.force_off).append(tuple(centre[:, None]))
                hard.voxels.append((p.index, p.positive))
            elif isinstance(p, Scribble):
                work = np.unique(np.stack(p.voxels, 1) // f, axis=0)
                group = tuple(work.T)
                (seeds.positive if p.positive else seeds.negative).append(group)
                (seeds.force_on if p.positive else seeds.force_off).append(group)
                hard.scribbles.append(p)
            elif isinstance(p, Lasso):
                wz = p.z // f[0]
                inside = _work_slice(p.inside, f[1:])
                core = ndi.binary_erosion(inside) if ndi.binary_erosion(inside).any() else inside
                ring = ndi.binary_dilation(inside, iterations=3) & ~_work_slice_any(p.inside, f[1:])
                ys, xs = np.nonzero(core)
                seeds.positive.append((np.full(ys.size, wz), ys, xs))
                seeds.force_on.append((np.full(ys.size, wz), ys, xs))
                ys, xs = np.nonzero(ring)
                seeds.negative.append((np.full(ys.size, wz), ys, xs))
                hard.lassos.append(p)
        for box in boxes:
            lo, hi = np.asarray(box.lo), np.asarray(box.hi)
            if lo[0] == hi[0]:  # a box on one slice: the object reaches about as far in z as in-plane
                reach = 0.6 * max((hi[1:] - lo[1:] + 1) * self.spacing[1:]) / self.spacing[0]
                lo[0], hi[0] = max(0, lo[0] - int(reach)), min(self.shape[0] - 1, hi[0] + int(reach))
                ring_z = (box.lo[0] // f[0], box.lo[0] // f[0] + 1)
            else:
                ring_z = None
            wlo, whi = lo // f, hi // f + 1
            seeds.limit = (wlo, whi) if seeds.limit is None else (np.maximum(seeds.limit[0], wlo),
                                                                  np.minimum(seeds.limit[1], whi))
            inside_z = (slice(*ring_z) if ring_z else slice(wlo[0], whi[0]))
            zz, yy, xx = np.mgrid[inside_z, wlo[1]:whi[1], wlo[2]:whi[2]]
            seeds.positive.append((zz.ravel(), yy.ravel(), xx.ravel()))
            centre, third = (wlo + whi) // 2, np.maximum((whi - wlo) // 6, 1)
            core_z = slice(*ring_z) if ring_z else slice(centre[0] - third[0], centre[0] + third[0] + 1)
            zz, yy, xx = np.mgrid[core_z, centre[1] - third[1]:centre[1] + third[1] + 1,
                                  centre[2] - third[2]:centre[2] + third[2] + 1]
            seeds.core.append((zz.ravel(), yy.ravel(), xx.ravel()))
            seeds.negative.append(_ring(wlo, whi, ring_z, grid.work_shape))
            hard.boxes.append((lo, hi))
        if self.volume.modality == "CT" and seeds.positive:
            # a soft-tissue organ's neighbours are often as bright, parted by a faint edge: its
            # growth is watched for leaks; air-filled lung is hundreds of HU darker than all
            # around it: what looks like it is it
            clicked = np.concatenate([grid.fine[g] for g in seeds.positive])
            seeds.watch_leaks = bool(np.median(clicked) > CT_SOFT_TISSUE)
            seeds.distinct = not seeds.watch_leaks
        seeds.refine_box = bool(boxes) and not any(isinstance(p, (Point, Scribble, Lasso)) and
                                                   getattr(p, "positive", True) for p in prompts)
        return seeds, hard


class _HardLimits:
    """What a prompt decides exactly, on the scan's grid: boxes limit, scribbles and lassos set voxels."""

    def __init__(self, shape):
        self.shape, self.boxes, self.scribbles, self.lassos, self.voxels = shape, [], [], [], []

    def apply(self, mask: np.ndarray) -> np.ndarray:
        for lo, hi in self.boxes:
            inside = np.zeros(self.shape, dtype=bool)
            inside[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = True
            mask &= inside
        for p in self.lassos:
            mask[p.z] = p.inside
        for p in self.scribbles:
            mask[p.voxels] = p.positive
        for index, positive in self.voxels:
            mask[index] = positive
        return mask

    def apply_slice(self, plane: np.ndarray, z: int) -> np.ndarray:
        for lo, hi in self.boxes:
            inside = np.zeros(self.shape[1:], dtype=bool)
            if lo[0] <= z <= hi[0]:
                inside[lo[1]:hi[1] + 1, lo[2]:hi[2] + 1] = True
            plane &= inside
        for p in self.lassos:
            if p.z == z:
                plane[:] = p.inside
        for p in self.scribbles:
            on = p.voxels[0] == z
            plane[p.voxels[1][on], p.voxels[2][on]] = p.positive
        for index, positive in self.voxels:
            if index[0] == z:
                plane[index[1:]] = positive
        return plane


def _ball(centre, radius, spacing, shape) -> tuple[np.ndarray, ...]:
    """Working-grid voxels within ``POINT_RADIUS_MM`` of ``centre`` (at least the centre)."""
    lo, hi = np.maximum(centre - radius, 0), np.minimum(centre + radius + 1, shape)
    grids = np.mgrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]].reshape(3, -1)
    d = (((grids - centre[:, None]) * spacing[:, None]) ** 2).sum(0)
    near = grids[:, d <= POINT_RADIUS_MM ** 2]
    return tuple(near) if near.size else tuple(centre[:, None])


def _ring(lo, hi, ring_z, shape, width: int = 3) -> tuple[np.ndarray, ...]:
    """Working-grid voxels just outside the box ``lo``..``hi`` (in-plane only for a box on one slice)."""
    z0, z1 = ring_z if ring_z else (max(lo[0] - width, 0), min(hi[0] + width, shape[0]))
    a = (z0, max(lo[1] - width, 0), max(lo[2] - width, 0))
    b = (z1, min(hi[1] + width, shape[1]), min(hi[2] + width, shape[2]))
    zz, yy, xx = np.mgrid[a[0]:b[0], a[1]:b[1], a[2]:b[2]].reshape(3, -1)
    inside = ((yy >= lo[1]) & (yy < hi[1]) & (xx >= lo[2]) & (xx < hi[2]) &
              (ring_z is not None or ((zz >= lo[0]) & (zz < hi[0]))))
    return zz[~inside], yy[~inside], xx[~inside]


def _work_slice(plane: np.ndarray, factors) -> np.ndarray:
    """A ``(y, x)`` mask on the working grid: blocks mostly inside."""
    return _block_fraction(plane, factors) >= 0.5


def _work_slice_any(plane: np.ndarray, factors) -> np.ndarray:
    return _block_fraction(plane, factors) > 0


def _block_fraction(plane: np.ndarray, factors) -> np.ndarray:
    fy, fx = int(factors[0]), int(factors[1])
    pad = ((0, -plane.shape[0] % fy), (0, -plane.shape[1] % fx))
    p = np.pad(plane.astype(np.float32), pad)
    return p.reshape(p.shape[0] // fy, fy, p.shape[1] // fx, fx).mean(axis=(1, 3))


def _working_grid(volume: Volume, progress, cancel, use_cache: bool) -> WorkGrid:
    """The scan's ``WorkGrid``, read from the zarr cache when this scan was seen before."""
    from .prompting.features import normalised
    from .prompting.volume_cache import VolumeCache

    report(progress, 0, 2, "reading the scan")
    check(cancel)
    built: dict = {}

    def compute() -> dict[str, np.ndarray]:
        report(progress, 1, 2, "preparing the scan for interactive prompts")
        grid = WorkGrid.build(normalised(volume), volume.spacing)
        built["grid"] = grid
        return {"fine": grid.fine, "coarse": grid.coarse, "edge": grid.edge,
                "numbers": np.array([*grid.factors, grid.noise, *grid.ranges[0], *grid.ranges[1]], dtype=np.float64)}

    arrays = VolumeCache(volume, enabled=use_cache).get(
        "interactive-grid", {"version": GRID_VERSION},
        {"fine": (None, "float32"), "coarse": (None, "float32"), "edge": (None, "float32"),
         "numbers": ((8,), "float64")}, compute)
    check(cancel)
    report(progress, 2, 2, "ready")
    if "grid" in built:
        return built["grid"]
    n = arrays["numbers"]
    factors = tuple(int(v) for v in n[:3])
    return WorkGrid(tuple(int(s) for s in volume.spatial_shape), factors,
                    np.asarray(volume.spacing, dtype=float) * np.asarray(factors),
                    arrays["fine"], arrays["coarse"], arrays["edge"], float(n[3]),
                    ((float(n[4]), float(n[5])), (float(n[6]), float(n[7]))))
