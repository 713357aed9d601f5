"""Atlas-backed segmentation: labelled real scans registered onto the scan, fused, checked for anatomy.

``mv.segment`` calls :func:`segment_with_atlases` for a model that has atlas sets (the network is
then the appearance term) and for an atlas set named as the model (no network). On a working grid
(the scan turned to LPS, cut to the body's box, and resampled to the model's spacing, or the atlas's):

1. body mask: CT the largest connected body above -500 HU, other modalities above Otsu's threshold;
   holes filled slice by slice, so lungs and bowel gas are inside. The box around it (found on
   every n-th voxel first) is all that is resampled, registered, run through the network and
   fused; the air, the table and the arms' surroundings outside it stay background.
2. each atlas member: affine registration (``prompting.register.affine_mi``, mutual information),
   then, when atlas and scan share a modality, deformable registration (SimpleITK's fast symmetric
   forces demons, two resolutions, after histogram matching) in the box the registered atlas
   reaches. A deformable field that folds or does not raise the local correlation is dropped
   (affine kept); a member whose affine body overlap is poor is dropped; ``meta["atlases"]`` says which.
3. the warped soft labels are fused, weighted by local image similarity (``prompting.register.fuse``).
4. an intensity model fitted on the scan itself: per label a histogram of the scan's intensities
   weighted by the fused prior (two EM rounds), so the atlas says where and the scan says what it
   looks like there; times the network's probabilities to the power ``network_weight``. Fusion and
   the intensity model run in the atlases' reach; beyond it the network alone.
5. anatomy: nothing outside the body; one piece for organs that are one piece; left/right organs
   on their side of the body's midline; on CT no label below -500 HU except air-holding ones (lung, bowel).
6. labels on the scan's grid: the posterior resampled linearly and its argmax, each label only in
   its own box (:func:`labels_on_grid`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage as ndi

from ..engine.orientation import back_to_input_layout, model_layout
from ..engine.progress import CancelToken, ProgressFn, check, report
from ..engine.resample import linear_indices, to_model_grid
from ..volume import Volume
from .prompting.register import _one_itk_thread, affine_mi, fuse, local_ncc, to_sitk, warp_to

AIR_HU = -500.0  # CT: below this a voxel is air (outside the body, lung, bowel gas)


@dataclass
class AtlasOptions:
    """Knobs of atlas-backed segmentation; the defaults are what ``mv.segment`` uses.

    spacing: working grid in mm (default: the model's spacing, else the atlas's, at least 1.5 mm).
    deformable: run the demons stage (same modality only).
    network_weight: exponent on the network's probabilities in the product (0: atlas and scan only).
    registrations: affine registrations per member with different sampling seeds (the best body overlap is kept).
    min_body_overlap: members whose affinely warped body overlaps the scan's body less (Dice) are dropped.
    """

    spacing: Optional[Sequence[float]] = None
    deformable: bool = True
    # The network's exponent. On the tuning case (bench ct-deformed, seed 0: the CT atlas onto a
    # deformed, re-contrasted copy of its own scan) mean Dice falls steadily as it rises from 0 to 1:
    # there the atlas is the very anatomy, the case most in the atlas's favour. 0.25 keeps the
    # network as a weak appearance term for scans the atlas fits less well.
    network_weight: float = 0.25
    registrations: int = 1
    demons_iterations: int = 40
    demons_sigma_mm: float = 4.0
    prior_sigma_vox: float = 1.0
    em_rounds: int = 2
    min_body_overlap: float = 0.5
    max_work_voxels: int = 3_000_000


def segment_with_atlases(volume: Volume, atlas_sets: list, network=None, card=None, device: str = "cpu",
                         options: Optional[AtlasOptions] = None, progress: Optional[ProgressFn] = None,
                         cancel: Optional[CancelToken] = None) -> Volume:
    """Labels Volume on ``volume``'s grid from ``atlas_sets`` (``atlases.AtlasSet``), with ``network`` if given.

    card: the network's model card (label names, spacing, normalisation); without a network the
    labels are the union of the atlas sets' names. ``meta`` lists the atlases used, each member's
    registration, and any fallback (``meta["fallback"]``).
    """
    start = time.perf_counter()
    options = options or AtlasOptions()
    members = [(atlas, i) for atlas in atlas_sets for i in range(len(atlas))]
    if not members:
        raise ValueError("the atlas set is empty: add at least one (image, labels) pair")
    names = _label_names(atlas_sets, card)
    ids = sorted(names)
    index = {name: ids.index(k) + 1 for k, name in names.items()}  # name -> channel (0 is background)
    modality = (volume.modality or (card.modality if card else atlas_sets[0].modality) or "").upper()
    total = len(members) + 3
    report(progress, 0, total, "working grid and body mask")

    turned, ornt = model_layout(volume, {"orientation": "LPS"})
    spacing = _work_spacing(turned, atlas_sets, card, options)
    in_body = body_box(turned, modality, spacing)
    part = crop(turned, in_body)  # everything below runs on the body's box only: outside it is background
    work = to_model_grid(part, spacing)
    grey = np.asarray(work.data, dtype=np.float32)
    body = body_mask(grey, modality)
    check(cancel)

    timings = {"grid_and_body": round(time.perf_counter() - start, 2)}
    registered, used = [], []  # (soft labels, similarity, box) of each member kept
    covered = np.zeros(work.spatial_shape, bool)  # the scan's part that some registered atlas reaches
    for step, (atlas, i) in enumerate(members, start=1):
        report(progress, step, total, f"registering atlas {atlas.name} ({i + 1}/{len(atlas)})")
        image, labels = atlas.member(i)
        entry = {"atlas": atlas.name, "member": i}
        name = f"atlas {atlas.name} ({i + 1}/{len(atlas)})"
        prior, similarity, reach, box = _register_member(
            work, grey, body, modality, image, labels, index, options, entry, cancel, atlas.card,
            stage=lambda what, step=step, name=name: report(progress, step, total, f"{what}: {name}"))
        used.append(entry)
        if prior is not None:
            registered.append((prior, similarity, box))
            covered |= reach
    check(cancel)
    timings["registration"] = round(time.perf_counter() - start - sum(timings.values()), 2)

    fallback = None
    if not registered and network is not None:
        fallback = "every atlas registration failed: the network alone"
    elif not registered:
        # No network to fall back on: keep the best affine even though its overlap is poor.
        best = max(used, key=lambda e: e.get("body_dice", -1))
        atlas = next(a for a in atlas_sets if a.name == best["atlas"])
        image, labels = atlas.member(best["member"])
        kept = dict(best)
        prior, similarity, covered, box = _register_member(
            work, grey, body, modality, image, labels, index,
            AtlasOptions(**{**options.__dict__, "min_body_overlap": -1.0, "deformable": False}), kept, cancel,
            atlas.card)
        best["registration"] += "; kept anyway (affine), the only atlas there is"
        registered = [(prior, similarity, box)]
        fallback = f"every registration overlapped the body poorly; atlas {best['atlas']} affine kept anyway"
    n_channels = len(ids) + 1

    report(progress, total - 2, total, "fusing atlases with the scan")
    net = None
    if network is not None:
        net = _network_probabilities(network, card, part, work.spatial_shape, index, n_channels, device, cancel)
    if registered:
        # beyond every atlas's field of view: the network alone where there is one, else nothing
        if net is not None:
            posterior = net
        else:
            posterior = np.zeros((n_channels, *work.spatial_shape), np.float32)
            posterior[0] = 1.0
        reached = _box(covered, REACH_MARGIN)  # the atlases' reach: fusion and the intensity model run there
        posterior[(slice(None), *reached)] = _fused_posterior(
            registered, reached, grey[reached], body[reached], covered[reached],
            None if net is None else net[(slice(None), *reached)], modality, n_channels, options)
    else:
        posterior = net
    posterior[:, ~body] = 0.0  # nothing outside the body
    posterior[0][~body] = 1.0
    posterior /= posterior.sum(0, keepdims=True) + 1e-12

    timings["network_and_fusion"] = round(time.perf_counter() - start - sum(timings.values()), 2)
    report(progress, total - 1, total, "anatomy checks")
    air_holding = set().union(*(a.card.get("air_holding", []) for a in atlas_sets))
    single = set().union(*(a.card.get("single_piece", []) for a in atlas_sets))
    work_labels = posterior.argmax(0)
    kept, removed = anatomy_checks(work_labels, body, names, ids, single)
    for c in range(1, n_channels):
        posterior[c] *= ndi.binary_dilation(kept == c, iterations=1)
    labels = labels_on_grid(posterior, part.spatial_shape)
    if modality == "CT":  # no label on air but the air-holding ones (one lookup, not a pass per label)
        may_be_air = np.zeros(n_channels, bool)
        may_be_air[0] = True
        for name, c in index.items():
            may_be_air[c] = name in air_holding
        labels[(np.asarray(part.data) < AIR_HU) & ~may_be_air[labels]] = 0
    # channels are 1..K in the order of the sorted label ids: give back the ids the names came with
    lookup = np.zeros(n_channels, dtype=np.uint8 if max(ids) < 256 else np.uint16)
    lookup[1:] = ids
    full = np.zeros(turned.spatial_shape, dtype=lookup.dtype)
    full[in_body] = lookup[labels]
    full = np.ascontiguousarray(back_to_input_layout(full, ornt))
    result = volume.with_data(full, labels={k: names[k] for k in ids}, rgb=False)
    result.meta = {"model": card.id if card is not None else atlas_sets[0].name,
                   "atlases": used, "fallback": fallback, "network": card.id if network is not None else None,
                   "network_weight": options.network_weight if network is not None and registered else None,
                   "anatomy_removed_voxels": removed,
                   "atlas_coverage_of_body": round(float((covered & body).sum() / max(body.sum(), 1)), 3),
                   "working_spacing": [round(s, 3) for s in work.spacing],
                   "working_shape": list(work.spatial_shape),
                   "seconds": round(time.perf_counter() - start, 3)}
    timings["anatomy_and_output"] = round(result.meta["seconds"] - sum(timings.values()), 2)
    result.meta["timings"] = timings
    if "source" in volume.meta:
        result.meta["source"] = volume.meta["source"]
    report(progress, total, total, "done")
    return result


def _fused_posterior(registered, box, grey, body, covered, net, modality, n_channels, options) -> np.ndarray:
    """The posterior on ``box``: the members' soft labels fused by local similarity, smoothed, times the
    intensity model fitted on the scan, times the network's probabilities to ``network_weight``; where no
    atlas reaches, the network's probabilities (or background)."""
    shape = grey.shape
    priors, similarities = [], []
    for soft, similarity, member_box in registered:
        where = (slice(None), *_within(member_box, box))
        prior = np.zeros((n_channels, *shape), np.float32)
        prior[0] = 1.0
        prior[where] = soft
        score = np.full(shape, -1.0, np.float32)
        score[where[1:]] = similarity
        priors.append(prior)
        similarities.append(score)
    prior = fuse(priors, similarities)
    if options.prior_sigma_vox > 0:
        prior = np.stack([ndi.gaussian_filter(p, options.prior_sigma_vox) for p in prior])
    prior[0] = np.maximum(prior[0], 1.0 - prior[1:].sum(0))
    prior /= prior.sum(0, keepdims=True) + 1e-12
    posterior = _intensity_model(grey, modality, prior, body & covered, options.em_rounds)
    if net is not None and options.network_weight > 0:
        posterior *= np.power(np.maximum(net, 1e-4), options.network_weight)
    if net is not None:
        posterior[:, ~covered] = net[:, ~covered]
    else:
        posterior[:, ~covered] = 0.0
        posterior[0][~covered] = 1.0
    return posterior


def labels_on_grid(posterior: np.ndarray, out_shape: Sequence[int]) -> np.ndarray:
    """Argmax labels on ``out_shape`` of ``posterior`` ``(K, *work)`` resampled linearly (``align_corners=False``,
    as ``engine.resample.labels_from_probabilities``), each channel only inside the box where it is non-zero.

    After the anatomy checks every organ channel is zero away from its organ, so each is resampled over its
    own box and the background over the union of those: on a 300x512x512 chest CT a fraction of resampling
    all channels over the whole grid. Ties go to the lower channel, as with ``argmax``.
    """
    maps = [linear_indices(n_in, int(n_out)) for n_in, n_out in zip(posterior.shape[1:], out_shape)]
    labels = np.zeros(tuple(int(n) for n in out_shape), np.uint8 if posterior.shape[0] <= 256 else np.uint16)
    boxes = {c: _out_box(ndi.find_objects((posterior[c] > 0).astype(np.uint8))[0], maps)
             for c in range(1, posterior.shape[0]) if posterior[c].any()}
    for z0 in range(0, labels.shape[0], OUTPUT_SLAB):  # slabs along z: memory is a slab's, not the volume's
        slab = slice(z0, min(z0 + OUTPUT_SLAB, labels.shape[0]))
        in_slab = {c: (slice(max(b[0].start, slab.start), min(b[0].stop, slab.stop)), *b[1:])
                   for c, b in boxes.items() if b[0].start < slab.stop and b[0].stop > slab.start}
        if not in_slab:
            continue
        union = tuple(slice(min(b[a].start for b in in_slab.values()), max(b[a].stop for b in in_slab.values()))
                      for a in range(labels.ndim))
        best = _resampled(posterior[0], union, maps)
        for c, box in in_slab.items():
            value = _resampled(posterior[c], box, maps)
            where = _within(box, union)
            better = value > best[where]
            best[where][better] = value[better]
            labels[box][better] = c
    return labels


OUTPUT_SLAB = 48  # output slices per step of labels_on_grid: ~50 MB per channel of a 512x512 scan


def _out_box(box: tuple[slice, ...], maps) -> tuple[slice, ...]:
    """The output voxels whose interpolation reads any voxel of the work-grid ``box``."""
    return tuple(slice(int(np.searchsorted(i1, b.start)), int(np.searchsorted(i0, b.stop)))
                 for b, (i0, i1, _) in zip(box, maps))


def _resampled(array: np.ndarray, out_box: tuple[slice, ...], maps) -> np.ndarray:
    """``array`` linearly resampled at the output voxels ``out_box`` (separable, one axis after another)."""
    lo = [int(i0[b][0]) if b.stop > b.start else 0 for b, (i0, _, _) in zip(out_box, maps)]
    hi = [int(i1[b][-1]) + 1 if b.stop > b.start else 0 for b, (_, i1, _) in zip(out_box, maps)]
    out = np.asarray(array[tuple(slice(a, z) for a, z in zip(lo, hi))], dtype=np.float32)
    for axis, (b, (i0, i1, w), start) in enumerate(zip(out_box, maps, lo)):
        shape = [1] * out.ndim
        shape[axis] = -1
        weight = w[b].reshape(shape)
        low = out.take(i0[b] - start, axis=axis)
        out = low + (out.take(i1[b] - start, axis=axis) - low) * weight
    return out


# --- grid, masks, intensities -------------------------------------------------------------------

def _label_names(atlas_sets, card) -> dict[int, str]:
    if card is not None and card.labels:
        return dict(card.labels)
    names: dict[int, str] = {}
    for atlas in atlas_sets:
        for k, name in atlas.labels.items():
            if name not in names.values():
                names[k if k not in names else max(names) + 1] = name
    return names


def _work_spacing(turned: Volume, atlas_sets, card, options: AtlasOptions) -> tuple[float, ...]:
    if options.spacing is not None:
        spacing = tuple(float(s) for s in options.spacing)
    elif card is not None and card.input.get("spacing"):
        return tuple(float(s) for s in card.input["spacing"])  # the network's own grid
    else:
        finest = np.min([np.asarray(a.card["members"][i].get("spacing", turned.spacing), float)
                         for a in atlas_sets for i in range(len(a))], axis=0)
        spacing = tuple(np.maximum(np.maximum(finest, turned.spacing), 1.5))
    extent = np.asarray(turned.spatial_shape) * np.asarray(turned.spacing)
    voxels = float(np.prod(extent / np.asarray(spacing)))
    if voxels > options.max_work_voxels:  # a large field of view at a fine atlas spacing: coarsen evenly
        spacing = tuple(np.asarray(spacing) * (voxels / options.max_work_voxels) ** (1 / 3))
    return spacing


def body_mask(grey: np.ndarray, modality: str) -> np.ndarray:
    """The body: CT above -500 HU, other modalities above Otsu's threshold; largest piece, holes filled."""
    if modality == "CT":
        mask = grey > AIR_HU
    else:
        from skimage.filters import threshold_otsu

        smooth = ndi.gaussian_filter(grey, 1.0)
        mask = smooth > 0.5 * threshold_otsu(smooth)
    mask = ndi.binary_opening(mask, iterations=1)
    pieces, n = ndi.label(mask)
    if n > 1:
        sizes = ndi.sum_labels(np.ones_like(pieces), pieces, range(1, n + 1))
        mask = pieces == (int(np.argmax(sizes)) + 1)
    elif n == 0:
        return np.ones_like(mask)
    for z in range(mask.shape[0]):
        mask[z] = ndi.binary_fill_holes(mask[z])
    return mask


def body_box(turned: Volume, modality: str, spacing, margin: int = 15) -> tuple[slice, ...]:
    """Index box of the body (``body_mask`` on every n-th voxel, n the working spacing over the scan's) plus
    ``margin`` such steps each side: air, the table and whatever lies off the body need no registration,
    network or fusion. The whole grid when the body fills it. The margin keeps some air around the
    body: mutual information needs it (a 3-step margin left a body overlap of 0.81 on the sample CT,
    15 steps 0.97)."""
    step = [max(1, int(round(w / s))) if w else 1 for w, s in zip(spacing, turned.spacing)]
    coarse = np.asarray(turned.data[tuple(slice(None, None, k) for k in step)], dtype=np.float32)
    found = ndi.find_objects(body_mask(coarse, modality).astype(np.uint8))
    if not found or found[0] is None:
        return tuple(slice(0, n) for n in turned.spatial_shape)
    return tuple(slice(max(0, (f.start - margin) * k), min(n, (f.stop + margin) * k))
                 for f, k, n in zip(found[0], step, turned.spatial_shape))


def crop(volume: Volume, box: tuple[slice, ...]) -> Volume:
    """``volume[box]`` with its origin moved so every kept voxel stays where it was in the world."""
    if all(b.start == 0 and b.stop == n for b, n in zip(box, volume.spatial_shape)):
        return volume
    corner = np.array([b.start for b in box], float)
    origin = np.asarray(volume.origin) + np.asarray(volume.direction) @ (corner * np.asarray(volume.spacing))
    return volume.with_data(np.ascontiguousarray(volume.data[box]), origin=tuple(float(o) for o in origin))


def _grey(array: np.ndarray, modality: str, body: np.ndarray, window: str) -> np.ndarray:
    """Intensities for registration ("mi": wide) and for demons / similarity ("tissue": soft tissue), in [0, 1]."""
    array = np.asarray(array, dtype=np.float32)
    if modality == "CT":
        low, high = (-1000.0, 1000.0) if window == "mi" else (-200.0, 300.0)
    else:
        inside = array[body] if body.any() else array.ravel()
        low, high = (float(v) for v in np.percentile(inside, [0.5, 99.5]))
        if window == "mi":
            low = min(low, float(array.min()))
    out = np.clip((array - low) / max(high - low, 1e-6), 0, 1)
    out[~body] = 0.0
    return out


def _intensity_model(grey: np.ndarray, modality: str, prior: np.ndarray, body: np.ndarray, rounds: int,
                     bins: int = 48) -> np.ndarray:
    """``prior * p(intensity | label)`` with one intensity histogram per label fitted on this scan.

    Two EM rounds: the histograms from the prior's weights, then from the posterior's. Written by
    hand (a weighted histogram per label) because what is wanted is the atlas prior times a
    likelihood learnt on the very scan, which no library call gives; it is the classic
    atlas-based EM of SPM/FreeSurfer with histograms in place of Gaussians.
    """
    if modality == "CT":
        values = np.clip(grey, -1000, 1500)
    else:
        inside = grey[body]
        low, high = np.percentile(inside, [0.5, 99.5]) if inside.size else (grey.min(), grey.max())
        values = np.clip(grey, low, high)
    low, high = float(values.min()), float(values.max())
    which = np.clip(((values - low) / max(high - low, 1e-6) * bins).astype(np.int32), 0, bins - 1)
    inside = body.ravel()
    flat_which = which.ravel()[inside]
    weights = prior.reshape(prior.shape[0], -1)[:, inside]
    posterior = prior
    for _ in range(max(rounds, 1)):
        likelihood = np.empty((prior.shape[0], bins), dtype=np.float64)
        for c in range(prior.shape[0]):
            hist = np.bincount(flat_which, weights=weights[c], minlength=bins) + 1e-3
            hist = ndi.gaussian_filter1d(hist, 1.0)
            likelihood[c] = hist / hist.sum()
        posterior = prior * likelihood[:, which].astype(np.float32)
        posterior /= posterior.sum(0, keepdims=True) + 1e-12
        weights = posterior.reshape(posterior.shape[0], -1)[:, inside]
    return posterior.astype(np.float32)


# --- registration ---------------------------------------------------------------------------------

def _register_member(work, grey, body, modality, image, labels, index, options, entry, cancel, atlas_card=None,
                     stage=None):
    """``(soft labels (K+1, *box), local similarity (-1 beyond the atlas), field of view, box)`` of one atlas
    member: the field of view on the whole work grid, the rest on ``box``, the work grid's part the registered
    atlas reaches (plus a margin), where its deformable stage, warps and similarity run; ``(None,) * 4`` when
    its registration fits the scan's body poorly. ``stage(message)`` names the deformable stage when it starts."""
    atlas_card = atlas_card or {}
    atlas_modality = (image.modality or "").upper()
    atlas_grey = np.asarray(image.data, dtype=np.float32)
    atlas_body = body_mask(atlas_grey, atlas_modality)
    # A skull-stripped atlas (brain only) is matched by its brain alone against the whole head: the
    # metric samples the atlas's brain (moving mask), and fit is judged by how much of it lands in the head.
    stripped = bool(atlas_card.get("skull_stripped"))
    transforms = [affine(work, _grey(grey, modality, body, "mi"), image,
                         _grey(atlas_grey, atlas_modality, atlas_body, "mi"), seed=seed, cancel=cancel,
                         moving_mask=atlas_body if stripped else None)
                  for seed in range(max(1, options.registrations))]
    scored = []
    ones = np.ones(image.spatial_shape, np.float32)
    for transform in transforms:
        reach = warp_to(work, image, ones, transform) > 0.5  # the atlas's field of view on the scan
        warped_body = warp_to(work, image, atlas_body.astype(np.float32), transform) > 0.5
        fit = (warped_body & body).sum() / max(warped_body.sum(), 1) if stripped else _dice(warped_body, body & reach)
        scored.append((fit, transform, reach))
    body_dice, transform, reach = max(scored, key=lambda s: s[0])
    entry["body_dice"] = round(float(body_dice), 3)
    if body_dice < options.min_body_overlap:
        entry["registration"] = (f"dropped: the registered atlas body fits the scan's body poorly "
                                 f"({'share inside' if stripped else 'Dice'} {body_dice:.2f})")
        return None, None, None, None
    entry["registration"] = "affine"
    box = _box(reach, REACH_MARGIN)
    fixed = _grey(grey, modality, body, "tissue")[box]
    work, body, inside = crop(work, box), body[box], reach[box]
    moved = warp_to(work, image, _grey(atlas_grey, atlas_modality, atlas_body, "tissue"), transform)
    if stripped:  # the demons and the similarity compare brain with brain, not the skull with nothing
        fixed = fixed * ndi.binary_dilation(warp_to(work, image, atlas_body.astype(np.float32), transform) > 0.5,
                                            iterations=2)
    labels_array = np.asarray(labels.data)
    soft = np.zeros((len(index) + 1, *work.spatial_shape), dtype=np.float32)
    for k, name in labels.labels.items():
        c = index.get(name)
        if c is None or not (labels_array == k).any():
            continue
        soft[c] += warp_to(work, image, (labels_array == k).astype(np.float32), transform)
    check(cancel)
    same_modality = atlas_modality == modality and modality != ""
    if options.deformable and same_modality:
        if stage is not None:
            stage("deformable registration (demons)")
        field, note = _demons(work, fixed, moved, body, options)
        entry["deformable"] = note
        if field is not None:
            entry["registration"] = "affine + demons"
            moved = _apply_field(work, moved, field)
            soft = np.stack([_apply_field(work, s, field) if s.any() else s for s in soft])
    elif options.deformable:
        entry["deformable"] = (f"skipped: atlas {atlas_modality or '?'} onto {modality or '?'} "
                               "(demons needs one modality)")
    soft[0] = np.clip(1.0 - soft[1:].sum(0), 0, 1)
    similarity = np.where(inside, local_ncc(fixed, moved), np.float32(-1.0))
    return soft, similarity, reach, box


# Voxels kept around the atlas's reach: more than the prior's smoothing and local NCC's window reach.
REACH_MARGIN = 6


def _box(mask: np.ndarray, margin: int) -> tuple[slice, ...]:
    """The bounding box of ``mask`` plus ``margin`` voxels each side, within the array (all of it if empty)."""
    found = ndi.find_objects(mask.astype(np.uint8))
    if not found or found[0] is None:
        return tuple(slice(0, n) for n in mask.shape)
    return tuple(slice(max(0, f.start - margin), min(n, f.stop + margin)) for f, n in zip(found[0], mask.shape))


def _within(inner: tuple[slice, ...], outer: tuple[slice, ...]) -> tuple[slice, ...]:
    """``inner`` (a box of the same array) in ``outer``'s coordinates."""
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))


AFFINE_SHRINKS = (4, 2)  # the demons stage does the finest level's work
AFFINE_SAMPLES = 30_000  # metric samples per level: enough for 32-bin mutual information
AFFINE_ITERATIONS = 80


def affine(target: Volume, target_grey: np.ndarray, atlas: Volume, atlas_grey: np.ndarray, seed: int = 0,
           cancel: Optional[CancelToken] = None, moving_mask: Optional[np.ndarray] = None):
    """The SimpleITK affine transform mapping target points into the atlas (mutual information).

    ``prompting.register.affine_mi`` with two coarse levels and 3e4 samples per level: the demons
    stage refines, and this keeps a 300-slice scan within the time target. A scan that covers a
    shorter or longer stretch along z than the atlas starts from the z shift whose mutual
    information is best (one try per ~25 mm): the centres of mass of a slab and a whole abdomen
    differ by centimetres.
    """
    with _one_itk_thread() as sitk:
        fixed = to_sitk(target, target_grey)
        moving = to_sitk(atlas, atlas_grey)
        mask = None
        if moving_mask is not None:
            mask = sitk.Cast(to_sitk(atlas, moving_mask.astype(np.float32)), sitk.sitkUInt8)
        transform = affine_mi(sitk, fixed, moving, AFFINE_ITERATIONS, seed, shrinks=AFFINE_SHRINKS, share=1.0,
                              max_samples=AFFINE_SAMPLES, moving_mask=mask, cancel=cancel,
                              adjust_start=lambda method, start: _best_slab_start(sitk, method, fixed, moving, start,
                                                                                  target, atlas))
    check(cancel)
    return transform


def _best_slab_start(sitk, method, fixed, moving, start, target: Volume, atlas: Volume):
    """``start`` shifted along the scan's z axis to where it fits the atlas best (tries ~25 mm apart): a slab
    within a longer atlas, or an atlas within a longer scan (an abdominal atlas on a chest-to-pelvis CT)."""
    extent = lambda v: v.spatial_shape[0] * v.spacing[0]  # noqa: E731
    spare = abs(extent(atlas) - extent(target))
    if spare < 20.0:  # about the same stretch: the centres of mass agree
        return start
    axis = np.asarray(target.direction, float)[:, 0][::-1]  # the scan's z axis in ITK's (x, y, z) order
    method.SetMetricSamplingPercentage(1.0)
    coarse_fixed = sitk.Shrink(fixed, [max(1, n // 48) for n in fixed.GetSize()])  # ~48 voxels a side
    best, best_value = start, np.inf
    for offset in np.linspace(-spare / 2, spare / 2, int(np.clip(spare / 25.0, 5, 15))):  # ~25 mm apart
        candidate = sitk.AffineTransform(start)
        candidate.SetTranslation(tuple(np.asarray(start.GetTranslation()) + offset * axis))
        method.SetInitialTransform(candidate, inPlace=False)
        value = method.MetricEvaluate(coarse_fixed, moving)
        if value < best_value:
            best, best_value = candidate, value
    return best


# Demons at a quarter and a half of the working resolution (6 mm on a 3 mm grid), the field then
# interpolated: ITK's demons costs ~1 us per voxel and iteration on one core, which at full
# resolution would take minutes on a 300-slice scan; organ-scale corrections need no finer field.
DEMONS_SHRINKS = (4, 2)


def _demons(work, fixed, moving, body, options):
    """``(displacement field image or None, what happened)``: two-level fast symmetric forces demons."""
    import SimpleITK as sitk

    fixed_image, moving_image = to_sitk(work, fixed), to_sitk(work, moving)
    moving_image = sitk.HistogramMatching(moving_image, fixed_image, 64, 7, True)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(options.demons_iterations)
    demons.SetStandardDeviations(options.demons_sigma_mm)
    demons.SetNumberOfThreads(1)
    field = None
    for shrink in DEMONS_SHRINKS:
        f = _shrunk(fixed_image, shrink)
        m = _shrunk(moving_image, shrink)
        if field is None:
            field = demons.Execute(f, m)
        else:
            initial = sitk.Resample(field, f, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
            field = demons.Execute(f, m, initial)
    field = sitk.Resample(field, fixed_image, sitk.Transform(), sitk.sitkLinear, 0.0, field.GetPixelID())
    array = sitk.GetArrayFromImage(field)
    if not np.isfinite(array).all():
        return None, "diverged (not finite): affine kept"
    jacobian = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(field))
    folded = float((jacobian[body] <= 0).mean()) if body.any() else 0.0
    if folded > 0.01:
        return None, f"diverged ({folded:.1%} of the body folded): affine kept"
    before = float(local_ncc(fixed, moving)[body].mean())
    warped = _apply_field(work, moving, field)
    after = float(local_ncc(fixed, warped)[body].mean())
    if after < before:
        return None, f"no gain (local NCC {before:.3f} -> {after:.3f}): affine kept"
    return field, f"demons: local NCC {before:.3f} -> {after:.3f}"


def _shrunk(image, shrink):
    import SimpleITK as sitk

    if shrink == 1:
        return image
    smooth = sitk.SmoothingRecursiveGaussian(image, [0.5 * shrink * s for s in image.GetSpacing()])
    return sitk.Shrink(smooth, [shrink if n >= 4 * shrink else 1 for n in image.GetSize()])


def _apply_field(work, array: np.ndarray, field) -> np.ndarray:
    import SimpleITK as sitk

    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    image = to_sitk(work, array)
    return sitk.GetArrayFromImage(sitk.Resample(image, image, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 0.0


# --- network ----------------------------------------------------------------------------------------

def _network_probabilities(network, card, turned, work_shape, index, n_channels, device, cancel):
    """The network's class probabilities on the work grid, its channels put in the fused label order."""
    import torch

    from ..engine.inference import default_batch_size, prepare_image, sliding_window

    image = prepare_image(turned, card.input, device)
    if tuple(image.shape[1:]) != tuple(work_shape):
        raise ValueError(f"model {card.id}: its grid {tuple(image.shape[1:])} is not the atlas working grid "
                         f"{tuple(work_shape)}")
    roi = tuple(int(p) for p in card.input["patch_size"])[-3:]
    probs = sliding_window(network, image, roi, overlap=0.25, batch_size=default_batch_size(roi, str(device)),
                           device=device, cancel=cancel, out_dtype=torch.float32)
    check(cancel)
    out = np.zeros((n_channels, *work_shape), dtype=np.float32)
    out[0] = probs[0].numpy()
    for k, name in (card.labels or {}).items():
        c = index.get(name)
        if c is not None and k < probs.shape[0]:
            out[c] = probs[k].numpy()
    return out


# --- anatomy ----------------------------------------------------------------------------------------

def anatomy_checks(labels: np.ndarray, body: np.ndarray, names: dict[int, str], ids: list[int],
                   single_piece: set) -> tuple[np.ndarray, dict[str, int]]:
    """``(labels after the checks, voxels removed per label)`` on an LPS-layout grid.

    Outside the body nothing; a label named ``*_left`` / ``*_right`` keeps only the pieces whose
    centre lies on that side of the body's midline (LPS: x grows toward the patient's left); a
    one-piece organ keeps its largest piece.
    """
    out = np.where(body, labels, 0)
    removed: dict[str, int] = {}
    if body.any():
        midline = float(np.nonzero(body)[-1].mean())
    else:
        midline = labels.shape[-1] / 2
    for c, k in enumerate(ids, start=1):
        name = names[k]
        mask = out == c
        if not mask.any():
            continue
        before = int(mask.sum())
        side = "left" if name.endswith("_left") or name.startswith("left") else (
            "right" if name.endswith("_right") or name.startswith("right") else None)
        pieces, n = ndi.label(mask)
        if side is not None and n:
            centres = ndi.center_of_mass(mask, pieces, range(1, n + 1))
            wrong = [i + 1 for i, centre in enumerate(centres) if (centre[-1] < midline) == (side == "left")]
            mask &= ~np.isin(pieces, wrong)
            pieces, n = ndi.label(mask)
        if name in single_piece and n > 1:
            sizes = ndi.sum_labels(np.ones_like(pieces), pieces, range(1, n + 1))
            mask = pieces == (int(np.argmax(sizes)) + 1)
        out[(out == c) & ~mask] = 0
        if int(mask.sum()) != before:
            removed[name] = before - int(mask.sum())
    return out, removed


# --- mv.segment's entry ------------------------------------------------------------------------------

def segment_if_atlas_backed(volume, model, device=None, progress: Optional[ProgressFn] = None,
                            cancel: Optional[CancelToken] = None, options: Optional[AtlasOptions] = None,
                            network=None) -> Optional[Volume]:
    """The atlas-backed result when ``model`` names an atlas set or a model with atlas sets, else None.

    ``mv.segment`` calls this first; anything else (a model without atlases, a checkpoint path,
    a multi-contrast input) goes on to the network path. A fine-tuned model uses its own network
    with the atlas sets of the nearest model up its line that has some (``atlases.for_model``).
    network: ``model``'s network already loaded on ``device`` (``mv.segment(..., network=...)``, as a
    cohort worker passes it); it is used as given, not loaded again.
    """
    from .. import atlases
    from ..models.card import CardError, ModelCard
    from ..models.registry import get_card

    if not isinstance(volume, Volume):
        return None
    if isinstance(model, ModelCard):
        card = model
    else:
        try:
            card = get_card(model)
        except CardError:
            atlas = atlases.find(str(model)) if isinstance(model, str) else None
            if atlas is None:
                return None
            if network is not None:
                raise ValueError(f"{atlas.name} is an atlas set, which has no network: network= goes with "
                                 "a model id (a model with atlases: its network; or none)")
            _check_image(volume, atlas.name)
            return segment_with_atlases(volume, [atlas], options=options, progress=progress, cancel=cancel)
    sets = atlases.for_model(card)
    if not sets or card.architecture.get("name") == "appearance-head" or int(card.input.get("dims", 3)) != 3:
        return None
    _check_image(volume, card.id)
    from ..engine.device import resolve_device
    from ..models.registry import load_model

    device = resolve_device(device)
    if network is None:
        network, card = load_model(card, device=device)
    return segment_with_atlases(volume, sets, network=network, card=card, device=device, options=options,
                                progress=progress, cancel=cancel)


def _check_image(volume: Volume, what: str) -> None:
    source = volume.meta.get("source", "the image")
    if volume.is_labels:
        raise ValueError(f"{source}: is a label map; segment the image it was drawn on")
    if volume.ndim != 3 or volume.rgb or volume.n_leading:
        raise ValueError(f"{source}: {what} segments 3D greyscale volumes, this image is "
                         f"{'colour ' if volume.rgb else ''}{volume.ndim}D")
