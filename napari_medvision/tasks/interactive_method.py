"""The computation behind interactive prompts: a working grid, an appearance model fitted on the
prompts, connectivity, geodesic growth that stops where it leaks, and cuts at the mask's necks.

The session (``tasks.interactive``) calls these in a region of interest on a coarser working grid
(at most ``WORK_VOXELS`` voxels for the whole scan, its smoothed intensities computed once by
``WorkGrid.build``):

1. appearance (``appearance``): a kernel density of two smoothed intensities (fine, coarse) per
   prompt group (a click's ball, a scribble, a lasso's inside; a negative click, a box's or a
   lasso's surroundings); a voxel looks like the object where a positive group's density is
   within ``UNKNOWN`` of its peak and above every negative group's; the object then grows ``RIM``
   voxels where the fine intensity alone fits;
2. connectivity (``connected_to``): the components that hold a positive prompt, after an opening
   that cuts one-voxel bridges, holes filled; a box or lasso is a hard limit; in CT soft tissue
   the object grows from its prompt in order of geodesic cost only until the growth leaks
   (``geodesic_grown``: costs grow with the gradient, and the growth rate rises again once the
   front passes a faint edge into a neighbour of the same HU); a correcting click adds only what
   lies within ``ADD_DEPTH`` times its depth in the candidate (``near_by_depth``);
3. negative prompts: a positive prompt's growth keeps to voxels geodesically closer to it than to
   a negative one (``geodesic_closer``); a negative click on the mask (``cut_roi``) takes the part
   of the mask around it up to the neck that joins it to the parts holding positive prompts
   (``split_at_necks``, a watershed of the mask's depth), and the voxels near it that look like
   it rather than like the object (``looks_negative``): it never takes the object with it;
4. a box alone (``box_split``): what in the box stands out from its surroundings, or else its
   centre taken as a click.

Written here rather than taken from scikit-image's random_walker: on a 2-core CPU the walker
takes about 8 s for one 64^3 ball (mode ``cg_j``); an interaction here takes 0.05-0.4 s at 256^3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from scipy import ndimage as ndi

WORK_VOXELS = 2_500_000  # the working grid of a scan holds at most this many voxels
BINS = 64  # histogram bins per feature
UNKNOWN = 0.06  # share of a positive group's peak density down to which an intensity is the object's
BANDWIDTH = 1.0  # kernel width in noise units
GEODESIC_VOXELS = 60_000  # the geodesic split runs on at most this many voxels
EDGE_WEIGHT = 3.0  # geodesic cost per noise unit of gradient
MARGIN_MM = 40.0  # first region of interest: the prompts' box plus this much each side
CT_SOFT_TISSUE = 0.0  # CT: growth is watched for leaks where the clicked intensity is above this (-250 HU)
POINT_RADIUS_MM = 4.0  # a click samples the appearance in a ball this large


@dataclass
class WorkGrid:
    """The scan on its working grid: two smoothed intensities and the gradient, normalised units.

    factors: the integer block size per axis from the scan's grid to this one.
    """

    shape: tuple[int, ...]
    factors: tuple[int, int, int]
    spacing: np.ndarray
    fine: np.ndarray
    coarse: np.ndarray
    edge: np.ndarray
    noise: float
    ranges: tuple[tuple[float, float], tuple[float, float]]

    @classmethod
    def build(cls, image: np.ndarray, spacing) -> "WorkGrid":
        """The working grid of ``image`` ``(z, y, x)`` float32 (already normalised) with ``spacing`` mm."""
        spacing = np.asarray(spacing, dtype=float)
        factors = working_factors(image.shape, spacing)
        small = block_mean(image, factors)
        work_spacing = spacing * np.asarray(factors)
        rel = work_spacing.min() / work_spacing
        fine = ndi.gaussian_filter(small, 0.7 * rel, mode="nearest")
        coarse = ndi.gaussian_filter(small, 2.0 * rel, mode="nearest")
        edge = ndi.gaussian_gradient_magnitude(small, 1.0 * rel, mode="nearest")
        step = max(1, small.size // 500_000)
        residual = np.abs(small - fine).ravel()[::step]
        residual = residual[residual > 1e-6]  # the flat air around a scan is not its noise
        noise = float(max(1.4826 * np.median(residual), 1e-3)) if residual.size else 1e-3
        ranges = tuple((float(np.percentile(f.ravel()[::step], 0.1)) - 1e-3,
                        float(np.percentile(f.ravel()[::step], 99.9)) + 1e-3) for f in (fine, coarse))
        return cls(tuple(image.shape), factors, work_spacing, fine, coarse, edge / noise, noise, ranges)

    @property
    def work_shape(self) -> tuple[int, int, int]:
        return tuple(self.fine.shape)

    def to_work(self, index) -> tuple[int, int, int]:
        """The working-grid voxel holding scan voxel ``index``."""
        return tuple(int(i) // f for i, f in zip(index, self.factors))

    def bins(self, where) -> np.ndarray:
        """Flat 2D histogram bin of the voxels ``where`` (a tuple of slices or of index arrays)."""
        out = np.zeros(self.fine[where].shape, dtype=np.int32)
        for feature, (lo, hi), scale in ((self.fine, self.ranges[0], BINS), (self.coarse, self.ranges[1], 1)):
            idx = ((feature[where] - lo) * (BINS / (hi - lo))).astype(np.int32)
            out += np.clip(idx, 0, BINS - 1) * scale
        return out


def working_factors(shape, spacing, budget: int = WORK_VOXELS) -> tuple[int, int, int]:
    """Integer block sizes per axis so the grid holds at most ``budget`` voxels, coarsening the
    finest axis (in mm) first so the working voxels stay about isotropic."""
    factors = [1, 1, 1]
    while np.prod([-(-n // f) for n, f in zip(shape, factors)]) > budget:
        axis = int(np.argmin([s * f if n // f > 8 else np.inf for s, f, n in zip(spacing, factors, shape)]))
        factors[axis] += 1
    return tuple(factors)


def block_mean(image: np.ndarray, factors) -> np.ndarray:
    """Mean of ``factors``-sized blocks (edges padded by repetition), float32."""
    if tuple(factors) == (1, 1, 1):
        return np.ascontiguousarray(image, dtype=np.float32)
    pad = [(0, -n % f) for n, f in zip(image.shape, factors)]
    padded = np.pad(image, pad, mode="edge") if any(p for _, p in pad) else image
    z, y, x = (n // f for n, f in zip(padded.shape, factors))
    fz, fy, fx = factors
    return padded.reshape(z, fz, y, fy, x, fx).mean(axis=(1, 3, 5), dtype=np.float32)


@dataclass
class Seeds:
    """Prompts on the working grid: groups of voxels for the appearance model, hard constraints.

    positive / negative: lists of ``(z, y, x)`` index arrays (one per prompt), in working voxels.
    limit: a hard box ``(lo, hi)`` (working voxels, hi exclusive) the object lies in, or None.
    refine_box: a box with no other prompts (``box_split``, or the box's ``core`` as a click).
    core: the central voxels of each box (a third of its size per axis), as index arrays.
    watch_leaks: the object grows from its prompts only until the growth leaks (``geodesic_grown``).
    distinct: the object's intensities set it apart from all around it (air in CT: hundreds of HU
    darker): what looks like it is it, and a correcting click adds all of it it lands in.
    """

    positive: list = field(default_factory=list)
    negative: list = field(default_factory=list)
    force_on: list = field(default_factory=list)
    force_off: list = field(default_factory=list)
    limit: Optional[tuple[np.ndarray, np.ndarray]] = None
    refine_box: bool = False
    core: list = field(default_factory=list)
    watch_leaks: bool = False
    distinct: bool = False

    def extent(self, shape) -> tuple[np.ndarray, np.ndarray]:
        """The working-grid box ``(lo, hi)`` around every prompt."""
        points = [np.stack(g, 1) for g in self.positive + self.negative if len(g[0])]
        if self.limit is not None:
            points.append(np.stack(self.limit) - np.array([0, 0, 0, 1, 1, 1]).reshape(2, 3))
        if not points:
            return np.zeros(3, int), np.asarray(shape)
        allp = np.concatenate(points)
        return allp.min(0), allp.max(0) + 1


def density(group, grid: WorkGrid, fine_only: bool = False) -> Optional[np.ndarray]:
    """Smoothed 2D histogram of the voxels ``group`` (index arrays), summing to 1 (``None`` for none).

    The kernel is as wide as the image noise, or as the group's own spread where that is wider
    (``SPREAD``). fine_only: the density of the fine intensity alone (the same for every coarse bin).
    """
    if len(group[0]) == 0:
        return None
    bins = grid.bins(group)
    hist = np.bincount(bins.ravel(), minlength=BINS * BINS).reshape(BINS, BINS).astype(np.float32)
    width = [max(BANDWIDTH * grid.noise, SPREAD * float(np.std(f[group]))) * BINS / (hi - lo)
             for f, (lo, hi) in zip((grid.fine, grid.coarse), grid.ranges)]
    if fine_only:
        hist = ndi.gaussian_filter1d(hist.sum(1), max(width[0], 0.5), mode="constant", truncate=3.0)
        hist = np.repeat(hist[:, None], BINS, 1)
    else:
        hist = ndi.gaussian_filter(hist, (max(width[0], 0.5), max(width[1], 0.5)), mode="constant", truncate=3.0)
    return hist / max(float(hist.sum()), 1e-12)


SPREAD = 0.0  # kernel width per standard deviation of a prompt's own voxels


def appearance(groups_on, groups_off, grid: WorkGrid, floor: float = UNKNOWN, fine_only: bool = False) -> np.ndarray:
    """``(BINS*BINS,)`` look-up table: True where a bin looks like the object.

    A bin is the object's where a positive group's density reaches ``floor`` of that group's
    peak (near what was clicked) and is above every negative group's density.
    """
    on = [d for d in (density(g, grid, fine_only) for g in groups_on) if d is not None]
    off = [d for d in (density(g, grid, fine_only) for g in groups_off) if d is not None]
    if not on:
        return np.zeros(BINS * BINS, dtype=bool)
    near = np.any([d >= floor * d.max() for d in on], 0)
    best_on = np.max(on, 0)
    best_off = np.max(off, 0) if off else 0.0
    return (near & (best_on > best_off)).ravel()


RIM = 2  # working voxels the object may grow past its core where only the fine intensity fits


def segment_roi(grid: WorkGrid, seeds: Seeds, roi: tuple[slice, ...], connect: Optional[list] = None,
                near_depth: float = 0.0) -> np.ndarray:
    """The object's mask inside ``roi`` of the working grid (bool, the roi's shape).

    connect: the groups (working voxels) whose components are kept (default: every positive
    prompt): the part a new positive click adds is the component it lands in.
    near_depth: with ``connect``, keep only what lies within this many times the depth of
    ``connect`` in the candidate (``near_by_depth``; 0: no limit).
    """
    offset = np.array([s.start for s in roi])
    shape = tuple(s.stop - s.start for s in roi)
    bins = grid.bins(roi)

    def local(groups):
        out = []
        for g in groups:
            idx = np.stack(g, 1) - offset
            inside = np.all((idx >= 0) & (idx < shape), 1)
            out.append(tuple(idx[inside].T))
        return out

    pos, neg = local(seeds.positive), local(seeds.negative)
    on_voxels, off_voxels = local(seeds.force_on), local(seeds.force_off)
    limit = None
    if seeds.limit is not None:
        limit = np.zeros(shape, dtype=bool)
        lo, hi = np.maximum(seeds.limit[0] - offset, 0), np.minimum(seeds.limit[1] - offset, shape)
        limit[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
    if seeds.refine_box:
        mask = connected_to(box_split(grid, roi, limit, seeds.positive, seeds.negative), pos, limit)
        core = [g for g in local(seeds.core) if len(g[0])]
        if core and np.mean(np.concatenate([mask[g] for g in core])) < 0.5:
            # the box's centre is not what stands out in it (an organ among brighter and darker
            # neighbours): its centre is taken as a click, the surroundings as "not"
            candidate = appearance(seeds.core, seeds.negative, grid)[bins] & limit
            candidate = _grow_rim(candidate, seeds.core, seeds.negative, grid, bins)
            mask = connected_to(candidate, core, limit)
    else:
        candidate = appearance(seeds.positive, seeds.negative, grid)[bins]
        candidate = _grow_rim(candidate, seeds.positive, seeds.negative, grid, bins)
        if limit is not None:
            candidate &= limit
        if any(len(g[0]) for g in neg):
            candidate &= geodesic_closer(grid.edge[roi], grid.spacing, pos + on_voxels, neg + off_voxels, candidate)
        sources = pos + on_voxels if connect is None else local(connect)
        if seeds.watch_leaks:  # grown from the prompt being added (all of them for the first)
            candidate &= geodesic_grown(grid.edge[roi], grid.spacing, sources, candidate)
        mask = connected_to(candidate, sources, limit)
        if connect is not None and near_depth:
            mask &= near_by_depth(candidate, sources, grid.spacing, near_depth)
    for g in on_voxels:
        mask[g] = True
    for g in off_voxels:
        mask[g] = False
    return mask


ADD_DEPTH = 2.0  # a correcting click adds within this many times its depth in the candidate


def near_by_depth(candidate: np.ndarray, groups, spacing, scale: float) -> np.ndarray:
    """Voxels within ``scale`` times the depth (mm from the candidate's border) of the deepest
    voxel of ``groups``, from ``groups``: a correcting click, placed in the middle of what is
    missing, adds a region of about that size around it rather than all of a neighbour that
    looks the same and touches it."""
    seed = np.zeros(candidate.shape, dtype=bool)
    for g in groups:
        seed[g] = True
    if not seed.any():
        return seed
    depth = depth_mm(candidate, spacing)
    reach = scale * max(float(depth[seed].max()), float(np.max(spacing)))
    return ndi.distance_transform_edt(~seed, sampling=spacing) <= reach


def depth_mm(mask: np.ndarray, spacing) -> np.ndarray:
    """Distance (mm) from each voxel of ``mask`` to the nearest voxel outside it, the array's faces
    counting as outside except along an axis one voxel thick (a slice: its neighbours above and
    below are unknown, and counting them as outside would make every depth one slice)."""
    thin = [n == 1 and max(mask.shape) > 1 for n in mask.shape]
    pad = [(0, 0) if t else (1, 1) for t in thin]
    inner = tuple(slice(None) if t else slice(1, -1) for t in thin)
    return ndi.distance_transform_edt(np.pad(mask, pad), sampling=spacing)[inner]


def _grow_rim(candidate, groups_on, groups_off, grid: WorkGrid, bins) -> np.ndarray:
    """``candidate`` grown ``RIM`` voxels where the fine intensity alone fits: the coarse
    intensity blurs an object's edge, which the two together would leave out."""
    if not RIM or not candidate.any():
        return candidate
    fine_only = appearance(groups_on, groups_off, grid, fine_only=True)[bins]
    return ndi.binary_dilation(candidate, iterations=RIM, mask=fine_only) | candidate


def box_split(grid: WorkGrid, roi: tuple[slice, ...], limit: np.ndarray, within, around) -> np.ndarray:
    """A box alone: the voxels of its inside brighter (or darker) than nearly all its surroundings.

    A box is drawn around an object that stands out from what surrounds it; whether the inside
    (``within``: the box's voxels, on its slice for a box on one slice) is brighter or darker than
    the surroundings (a tumour in FLAIR, a lung in CT) picks the side.
    """
    fine = grid.fine[roi]
    outside = np.concatenate([grid.fine[g] for g in around]) if around else np.zeros(0)
    if outside.size < 10:
        return limit.copy()
    inside = np.concatenate([grid.fine[g] for g in within])
    if np.median(inside) >= np.median(outside):
        return limit & (fine > np.percentile(outside, 100 - BOX_TAIL))
    return limit & (fine < np.percentile(outside, BOX_TAIL))


BOX_TAIL = 1.0  # percent of the box's surroundings that may look like the object


def cut_roi(grid: WorkGrid, mask: np.ndarray, seeds: Seeds, roi: tuple[slice, ...]) -> np.ndarray:
    """The voxels of ``mask`` (the object in ``roi``) that a negative prompt takes away: the part of
    the mask around it, split from the parts holding positive prompts where the mask narrows
    (``split_at_necks``), and the voxels near it that look like it (``looks_negative``).

    A negative click marks a wrongly included region (a leak into a neighbour, a bulge): it takes
    that region and stops at the neck joining it to the object, so the object itself never
    collapses (a cut halfway between the prompts took large parts of the object with it).
    """
    offset = np.array([s.start for s in roi])

    def local(groups):
        out = []
        for g in groups:
            idx = np.stack(g, 1) - offset
            inside = np.all((idx >= 0) & (idx < mask.shape), 1)
            out.append(tuple(idx[inside].T))
        return out

    pos = local(seeds.positive + seeds.force_on)
    neg = local(seeds.negative + seeds.force_off)
    removed = split_at_necks(mask, grid.spacing, pos, neg)
    if any(len(g[0]) for g in neg):
        removed |= looks_negative(grid, mask, roi, seeds, pos, neg)
    return removed


NEG_LOOK = 2.0  # a voxel looks like a negative prompt where its density is this many times a positive one's


def looks_negative(grid: WorkGrid, mask, roi, seeds: Seeds, pos, neg) -> np.ndarray:
    """The voxels of ``mask`` that look like a negative prompt (its density ``NEG_LOOK`` times
    every positive group's), geodesically closer to it than to a positive prompt, and joined to
    it through such voxels: a rim or a neighbour of another brightness the object took in."""
    on = [d for d in (density(g, grid) for g in seeds.positive) if d is not None]
    off = [d for d in (density(g, grid) for g in seeds.negative) if d is not None]
    if not on or not off:
        return np.zeros(mask.shape, dtype=bool)
    table = (np.max(off, 0) > NEG_LOOK * np.max(on, 0)).ravel()
    region = mask & table[grid.bins(roi)]
    if not region.any():
        return region
    region &= ~geodesic_closer(grid.edge[roi], grid.spacing, pos, neg, mask, outside=1000.0)
    labels, _ = ndi.label(region)
    hit = np.unique(np.concatenate([labels[g] for g in neg if len(g[0])]))
    return np.isin(labels, hit[hit > 0])


NECK_VOXELS = 400_000  # the split runs on at most this many voxels (a coarser grid beyond)


def split_at_necks(mask: np.ndarray, spacing, positive, negative) -> np.ndarray:
    """The part of ``mask`` that belongs with the ``negative`` prompts rather than the ``positive``
    ones: a marker watershed of the mask's depth (distance to its border, mm), so two parts meet
    where the mask is thinnest between them.

    Negative prompts outside the mask take nothing; where a negative prompt overlaps a positive
    one, the positive one holds; with no positive prompt in the mask, the components holding a
    negative prompt go.
    """
    from skimage.segmentation import watershed

    out = np.zeros(mask.shape, dtype=bool)
    if not mask.any():
        return out
    shape = np.asarray(mask.shape)
    step = 1
    while np.prod(-(-shape // step)) > NECK_VOXELS:
        step += 1
    small = mask[::step, ::step, ::step]
    markers = np.zeros(small.shape, dtype=np.int32)
    for value, groups in ((1, positive), (2, negative)):
        for g in groups:
            if len(g[0]):
                idx = tuple(np.minimum(np.asarray(a) // step, n - 1) for a, n in zip(g, small.shape))
                markers[idx] = np.where(small[idx] & (markers[idx] != 1), value, markers[idx])
    if not (markers == 2).any():
        return out
    if not (markers == 1).any():
        labels, _ = ndi.label(small)
        hit = np.unique(labels[markers == 2])
        gone = np.isin(labels, hit[hit > 0])
    else:
        sampling = tuple(float(s) * step for s in spacing)
        depth = depth_mm(small, sampling)
        gone = watershed(-depth, markers, mask=small) == 2
    if step == 1:
        return gone & mask
    index = [np.minimum(np.arange(n) // step, m - 1) for n, m in zip(mask.shape, small.shape)]
    return gone[np.ix_(*index)] & mask


def connected_to(candidate: np.ndarray, groups, limit: Optional[np.ndarray]) -> np.ndarray:
    """The components of ``candidate`` that hold a voxel of ``groups``, holes filled.

    Thin bridges (one voxel) are cut first by an opening, so a leak through a narrow gap into a
    neighbour of the same brightness stops there; the opened parts are given back at the edge.
    A prompt on a part the opening removed keeps its own component unopened.
    """
    structure = ndi.generate_binary_structure(3, 1)
    for axis, n in enumerate(candidate.shape):  # a single slice: open within the slice
        if n == 1:
            outer = [slice(None)] * 3
            outer[axis] = [0, 2]
            structure[tuple(outer)] = False
    opened = ndi.binary_opening(candidate, structure)
    labels, n = ndi.label(opened, structure)
    keep = np.zeros(n + 1, dtype=bool)
    extra = np.zeros(candidate.shape, dtype=bool)
    plain = None
    for g in groups:
        if not len(g[0]):
            continue
        hit = labels[g]
        if (hit > 0).any():
            keep[hit[hit > 0]] = True
        else:
            if plain is None:
                plain, _ = ndi.label(candidate, structure)
            own = plain[g]
            extra |= np.isin(plain, own[own > 0])
    kept = keep[labels]
    kept = (ndi.binary_dilation(kept, structure) & candidate) | kept | extra
    return _filled(kept, limit)


def _filled(mask: np.ndarray, limit: Optional[np.ndarray]) -> np.ndarray:
    filled = ndi.binary_fill_holes(mask)
    return filled & limit if limit is not None else filled


def geodesic_closer(edge: np.ndarray, spacing, positive, negative, candidate: np.ndarray,
                    outside: float = 4.0) -> np.ndarray:
    """Voxels whose geodesic distance to a positive prompt is below that to a negative one.

    The cost of a step is its length (mm) times ``1 + EDGE_WEIGHT * gradient``, plus ``outside``
    out of the candidate, so the split follows the object's edges.
    """
    if not any(len(g[0]) for g in negative):
        return np.ones(edge.shape, dtype=bool)
    if not any(len(g[0]) for g in positive):
        return np.zeros(edge.shape, dtype=bool)
    d_pos = _geodesic_costs(edge, spacing, positive, candidate, outside)
    d_neg = _geodesic_costs(edge, spacing, negative, candidate, outside)
    return d_pos < d_neg


def _geodesic_costs(edge: np.ndarray, spacing, groups, candidate: np.ndarray, outside: float) -> Optional[np.ndarray]:
    """Geodesic cost from the voxels of ``groups`` to every voxel (None for no voxel), computed on
    a grid of at most ``GEODESIC_VOXELS`` (skimage's MCP is ~2 us a voxel), read back by nearest
    neighbour."""
    from skimage.graph import MCP_Geometric

    shape = np.asarray(edge.shape)
    step = 1
    while np.prod(-(-shape // step)) > GEODESIC_VOXELS:
        step += 1
    cost = (1.0 + EDGE_WEIGHT * edge + outside * ~candidate)[::step, ::step, ::step].astype(np.float64)
    small_shape = np.asarray(cost.shape)
    points = [np.stack(g, 1) // step for g in groups if len(g[0])]
    if not points:
        return None
    starts = np.minimum(np.unique(np.concatenate(points), axis=0), small_shape - 1)
    sampling = tuple(float(s) * step for s in spacing)
    d, _ = MCP_Geometric(cost, fully_connected=False, sampling=sampling).find_costs([tuple(p) for p in starts])
    if step == 1:
        return d
    index = [np.minimum(np.arange(n) // step, m - 1) for n, m in zip(edge.shape, small_shape)]
    return d[np.ix_(*index)]


GROW_START = 10.0  # geodesic cost (mm on a flat region) from which the growth is watched
GROW_RATIO = 1.1  # growth watched at costs this factor apart
GROW_SMOOTH = 5  # ... its rate averaged over this many steps
GROW_RISE = 0.5  # a leak: the rate rises this far above its lowest so far
GROW_MIN_MM3 = 8000.0  # ... once the object holds this much
GROW_LOW = 1.8  # ... and only after the rate fell below this (filling an organ, not noise in free growth)


def geodesic_grown(edge: np.ndarray, spacing, positive, candidate: np.ndarray) -> np.ndarray:
    """Voxels of ``candidate`` reached from a positive prompt before the growth leaks.

    The object grows from the prompts in order of geodesic cost (``_geodesic_costs``: mm times
    ``1 + EDGE_WEIGHT * gradient``, leaving the candidate all but barred). Its volume's growth
    rate (d log V / d log cost: 3 for a ball in open space) falls while the front fills an organ
    bounded by edges and rises again when the front breaks through a faint edge into the
    neighbours beyond (a kidney into the bowel, the IVC into the liver: all soft tissue of about
    the same HU); the growth stops where the rate was lowest before it rose (``leak_cost``).
    Growth that never leaks (an organ that a candidate of its own brightness holds) is unbounded.
    """
    d = _geodesic_costs(edge, spacing, positive, candidate, outside=1000.0)
    if d is None:
        return np.ones(edge.shape, dtype=bool)
    return d < leak_cost(d[candidate & (d < 1000.0)], float(np.prod(spacing)))


def leak_cost(costs: np.ndarray, voxel_mm3: float, min_mm3: float = GROW_MIN_MM3) -> float:
    """The geodesic cost at which growth over ``costs`` (one per voxel reached) starts to leak:
    where the smoothed growth rate was lowest (below ``GROW_LOW``) before it rose ``GROW_RISE``
    above that (inf: never)."""
    if costs.size == 0:
        return np.inf
    v = np.sort(costs.ravel())
    n = int(np.log(max(float(v[-1]), 2 * GROW_START) / GROW_START) / np.log(GROW_RATIO)) + 2
    ts = GROW_START * GROW_RATIO ** np.arange(n)
    volume = np.maximum(np.searchsorted(v, ts), 1)
    rate = np.gradient(np.log(volume), np.log(ts))
    if GROW_SMOOTH > 1:
        rate = ndi.uniform_filter1d(rate, int(GROW_SMOOTH), mode="nearest")
    lowest, at = np.inf, None
    for i in np.nonzero(volume * voxel_mm3 >= min_mm3)[0]:
        if rate[i] < lowest:
            lowest, at = rate[i], i
        elif lowest < GROW_LOW and rate[i] > lowest + GROW_RISE:
            return float(ts[at])
    return np.inf


def touches_open_side(mask: np.ndarray, roi: tuple[slice, ...], shape) -> bool:
    """Whether the mask reaches a face of ``roi`` that is not a face of the grid (the roi is too small)."""
    for axis, s in enumerate(roi):
        take = [slice(None)] * 3
        if s.start > 0:
            take[axis] = 0
            if mask[tuple(take)].any():
                return True
        if s.stop < shape[axis]:
            take[axis] = -1
            if mask[tuple(take)].any():
                return True
    return False
