"""Several MR contrasts of one subject as one model input (brain tumour models: FLAIR, T1c, T1, T2).

``mv.segment({"flair": flair, "t1c": t1c}, model=...)`` lands here. The contrasts are put on the
first one's grid (resampled by their world coordinates where the grids differ), turned to the
model's array layout, resampled to its spacing, and each normalised inside the brain; contrasts
the model was trained on but the user lacks enter as zero channels, as in training with random
contrast drop-out. A card opts in with ``input.contrasts`` (the channel order).
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Mapping, Optional

import numpy as np
import torch

from ..engine.orientation import back_to_input_layout, in_model_layout, model_layout
from ..engine.progress import CancelToken, ProgressFn, check, report
from ..engine.resample import grid_shape, labels_from_probabilities, resample_linear
from ..volume import Volume
from .prompting.register import to_sitk

# What users call each contrast -> the name model cards use.
CONTRAST_ALIASES = {
    "flair": "flair", "t2flair": "flair", "t2-flair": "flair", "fla": "flair",
    "t1c": "t1c", "t1ce": "t1c", "t1gd": "t1c", "t1-gd": "t1c", "t1post": "t1c", "t1+c": "t1c",
    "t1": "t1", "t1w": "t1", "t1n": "t1",
    "t2": "t2", "t2w": "t2",
}
# Normalised intensity outside the brain (inside: zero mean, unit std); a missing contrast is all 0.
OUTSIDE_BRAIN = -3.0
CLIP = (-5.0, 10.0)
# A skull-stripped scan: its lowest value fills at least this share of it (the constant background
# brain extraction leaves) and what lies above it is no larger than a brain. Adult brains are
# 1.0-1.7 L (BraTS here: 1.25-1.69 L); a whole head, which raw scans with an air background of
# exactly 0 also show above their lowest value, is 3 L or more (the ITK head T1 here: 3.0 L).
STRIPPED_BACKGROUND_SHARE = 0.2
BRAIN_MAX_ML = 2200.0


class ContrastError(ValueError):
    """The contrasts given cannot make one model input (unknown name, no geometry, none given)."""


def contrast_name(name: str) -> str:
    """The canonical name (``flair``, ``t1c``, ``t1``, ``t2``) of a user's contrast name."""
    key = str(name).strip().lower().replace("_", "").replace(" ", "")
    if key not in CONTRAST_ALIASES:
        raise ContrastError(f"contrast {name!r} is not one this project knows; use flair, t1c, t1 or t2")
    return CONTRAST_ALIASES[key]


def as_contrasts(volume: Volume | Mapping[str, Any], card_input: dict[str, Any]) -> dict[str, Volume]:
    """``{canonical name: Volume}`` from a dict of contrasts, or a single Volume taken as the card's
    first contrast. Bare arrays are accepted where they share the first Volume's shape."""
    known = list(card_input.get("contrasts", []))
    if isinstance(volume, Volume):
        return {known[0]: volume}
    if not isinstance(volume, Mapping) or not volume:
        raise ContrastError(f"give at least one contrast, as {{name: Volume}} with names from {', '.join(known)}")
    out: dict[str, Volume] = {}
    first: Volume | None = None
    for name, item in volume.items():
        canonical = contrast_name(name)
        if canonical in out:
            raise ContrastError(f"contrast {canonical!r} was given twice (as {name!r})")
        if not isinstance(item, Volume):
            array = np.asarray(item)
            if first is None or array.shape != first.spatial_shape:
                raise ContrastError(f"contrast {name!r} is a bare array of shape {array.shape} with no geometry "
                                    "to resample it onto the other contrasts; load it as a Volume (mv.load)")
            item = first.with_data(array, labels=None, meta={"source": f"contrast {name}"})
        if item.ndim != 3 or item.rgb or item.n_leading or item.is_labels:
            raise ContrastError(f"contrast {name!r} ({item.meta.get('source', 'image')}) is not a 3D greyscale "
                                "image")
        first = first or item
        out[canonical] = item
    return out


def on_first_grid(contrasts: dict[str, Volume]) -> tuple[Volume, dict[str, np.ndarray], list[str]]:
    """The first contrast (the reference grid), every contrast's array on that grid, and notes.

    Contrasts on other grids are resampled linearly by their world coordinates (SimpleITK): right
    for series of one session, which share the scanner frame; series from different sessions need
    registering first, which the note says.
    """
    names = list(contrasts)
    reference = contrasts[names[0]]
    arrays, notes = {}, []
    for name in names:
        item = contrasts[name]
        if item.same_grid(reference):
            arrays[name] = np.asarray(item.data, dtype=np.float32)
            continue
        arrays[name] = _resample_onto(item, reference)
        notes.append(f"{name} lay on a different grid from {names[0]} ({item.spatial_shape} at {item.spacing} mm) "
                     f"and was resampled onto it by world coordinates; if the two were not co-registered, "
                     "register them first")
    return reference, arrays, notes


def _resample_onto(moving: Volume, reference: Volume) -> np.ndarray:
    import SimpleITK as sitk

    moving_array = np.asarray(moving.data, dtype=np.float32)
    ref = to_sitk(reference, np.zeros(reference.spatial_shape, dtype=np.float32))
    out = sitk.Resample(to_sitk(moving, moving_array), ref, sitk.Transform(), sitk.sitkLinear,
                        float(moving_array.min()), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def stripped_background(image: np.ndarray, spacing) -> float | None:
    """The constant background value of a skull-stripped scan, or ``None`` where there is none.

    The background is the lowest value (z-scored BraTS files) or 0 (brain-extraction tools that
    leave a few negative values inside the brain after interpolation).
    """
    for value in (float(image.min()), 0.0):
        outside = int(np.count_nonzero(image == value))
        inside_ml = (image.size - outside) * float(np.prod(spacing)) / 1000.0
        if outside >= STRIPPED_BACKGROUND_SHARE * image.size and inside_ml <= BRAIN_MAX_ML:
            return value
    return None


def brain_mask(arrays: dict[str, np.ndarray], spacing, skull_model: str | None = "mr-brain-tissue-3d",
               device: str = "cpu") -> tuple[np.ndarray, str]:
    """Brain mask on the arrays' grid and how it was found.

    Skull-stripped scans (BraTS, brain-extraction output): every voxel off a contrast's constant
    background. Scans with skull: CSF, grey and white matter of ``skull_model`` on the first
    contrast, holes filled, closed by 2 voxels, the largest connected part.
    """
    from scipy import ndimage as ndi

    mask = None
    for image in arrays.values():
        background = stripped_background(image, spacing)
        if background is not None:
            inside = image != background
            mask = inside if mask is None else (mask | inside)
    if mask is not None:
        return mask, "skull-stripped: voxels off the constant background"
    if skull_model is None:
        return np.ones(next(iter(arrays.values())).shape, dtype=bool), "whole image (no background found)"
    from ..engine.inference import predict_labels
    from ..models.registry import load_model

    network, card = load_model(skull_model, device=device)
    first = next(iter(arrays.values()))
    # the arrays are in the tumour model's layout (LPS), which an identity direction states
    tissue = predict_labels(network, card, Volume(first, spacing=spacing, modality="MR"), device=device,
                            overlap=0.25)
    mask = ndi.binary_closing(np.asarray(tissue.data) > 0, iterations=2)
    mask = ndi.binary_fill_holes(mask)
    parts, n = ndi.label(mask)
    if n > 1:
        mask = parts == (np.argmax(np.bincount(parts.ravel())[1:]) + 1)
    return mask, f"brain mask from {skull_model} (the scan is not skull-stripped)"


def normalise_in_brain(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``image`` z-scored over the brain voxels, clipped to ``CLIP``, ``OUTSIDE_BRAIN`` elsewhere.

    Raw scans (any scanner scale) and BraTS's already z-scored files then look alike.
    """
    values = image[mask]
    if values.numel() < 2:
        raise ContrastError("the brain mask is empty: no voxel above the scan's background")
    std, mean = torch.std_mean(values)
    out = (image - mean) / max(float(std), 1e-6)
    out = out.clamp_(*CLIP)
    out[~mask] = OUTSIDE_BRAIN
    return out


def model_input(arrays: dict[str, np.ndarray], mask: np.ndarray, contrasts: list[str], shape) -> tuple[
        torch.Tensor, torch.Tensor]:
    """``(len(contrasts), *shape)`` float32 channels in the card's order (absent ones all 0) and the
    brain mask, both on the model grid ``shape``."""
    brain = resample_linear(mask[None].astype(np.float32), shape)[0] > 0.5
    channels = torch.zeros((len(contrasts), *shape), dtype=torch.float32)
    for k, name in enumerate(contrasts):
        if name in arrays:
            channels[k] = normalise_in_brain(resample_linear(arrays[name][None], shape)[0], brain)
    return channels, brain


def prepare_contrasts(arrays: dict[str, np.ndarray], spacing, card_input: dict[str, Any],
                      device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, str]:
    """Model channels ``(C, *model grid)``, the brain mask on that grid, and how the mask was found,
    from ``{contrast: array}`` already in the model's array layout at ``spacing`` (mm)."""
    mask, how = brain_mask(arrays, spacing, device=device)
    shape = grid_shape(next(iter(arrays.values())).shape, spacing, card_input["spacing"])
    image, brain = model_input(arrays, mask, list(card_input["contrasts"]), shape)
    return image, brain, how


def prepare_first_contrast(volume: Volume, card_input: dict[str, Any]) -> torch.Tensor:
    """``(C, *model grid)`` channels of one image (already in the model layout) taken as the card's
    first contrast, the others absent: what fine-tuning on a corrected scan trains on."""
    arrays = {card_input["contrasts"][0]: np.asarray(volume.data, dtype=np.float32)}
    return prepare_contrasts(arrays, volume.spacing, card_input)[0]


def brain_box(brain: torch.Tensor, margin: int, minimum) -> tuple[slice, ...]:
    """Slices of the brain's bounding box plus ``margin`` voxels, at least ``minimum`` wide, in the grid."""
    where = torch.nonzero(brain)
    if where.numel() == 0:
        return tuple(slice(0, n) for n in brain.shape)
    box = []
    for axis, n in enumerate(brain.shape):
        lo, hi = int(where[:, axis].min()) - margin, int(where[:, axis].max()) + 1 + margin
        grow = max(0, int(minimum[axis]) - (hi - lo))
        lo, hi = lo - grow // 2, hi + (grow - grow // 2)
        shift = max(0, -lo) - max(0, hi - n)
        lo, hi = max(0, lo + shift), min(n, hi + shift)
        box.append(slice(lo, hi))
    return tuple(box)


def segment_contrasts(
    network: torch.nn.Module,
    card,
    volume: Volume | Mapping[str, Any],
    device: str = "cpu",
    overlap: float = 0.5,
    batch_size: Optional[int] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
) -> Volume:
    """Labels Volume on the first contrast's grid from a multi-contrast model (``card.input.contrasts``).

    ``meta`` holds the contrasts used, notes (resampling, unused contrasts, how the brain was
    found), and where the card names ``regions``, each region's volume in mL.
    """
    from ..engine.inference import default_batch_size, sliding_window

    start = time.perf_counter()
    spec = card.input
    known = list(spec["contrasts"])
    given = as_contrasts(volume, spec)
    reference, arrays, notes = on_first_grid(given)
    unused = [name for name in arrays if name not in known]
    if unused:
        notes.append(f"{', '.join(unused)} not used: model {card.id} was trained on {', '.join(known)}")
    arrays = {name: a for name, a in arrays.items() if name in known}
    if not arrays:
        raise ContrastError(f"model {card.id} needs at least one of {', '.join(known)}; got "
                            f"{', '.join(given)}")
    report(progress, 0, 1, "brain mask")
    turned, ornt = model_layout(reference, spec)
    arrays = {name: in_model_layout(a, ornt) for name, a in arrays.items()}
    image, brain, how = prepare_contrasts(arrays, turned.spacing, spec, device)
    check(cancel)
    shape = tuple(image.shape[1:])
    patch = tuple(int(p) for p in spec["patch_size"])
    box = brain_box(brain, margin=4, minimum=patch)
    stats: dict[str, Any] = {}
    part = sliding_window(network, image[(slice(None), *box)].contiguous(), patch, overlap=overlap,
                          batch_size=batch_size or default_batch_size(patch, device), device=device,
                          progress=progress, cancel=cancel, out_dtype=torch.float32, stats=stats)
    probs = torch.zeros((part.shape[0], *shape), dtype=torch.float32)
    probs[0] = 1.0  # background outside the brain box
    probs[(slice(None), *box)] = part
    probs[1:, ~brain] = 0.0  # no tumour outside the brain
    probs[0, ~brain] = 1.0
    check(cancel)
    labels = np.ascontiguousarray(back_to_input_layout(labels_from_probabilities(probs, turned.spatial_shape), ornt))
    if spec.get("enclosed"):
        labels = fill_enclosed(labels, reference.spacing, **spec["enclosed"])
    names = card.labels or {k: f"class {k}" for k in range(1, probs.shape[0])}
    result = reference.with_data(labels.astype(np.uint8), labels=names, rgb=False)
    voxel_ml = float(np.prod(reference.spacing)) / 1000.0
    result.meta = {"model": card.id, "contrasts": list(arrays), "brain_mask": how, "device": stats["device"],
                   "seconds": round(time.perf_counter() - start, 3)}
    regions = spec.get("regions") or {}
    if regions:
        counts = np.bincount(labels.ravel(), minlength=max(names) + 1)
        result.meta["regions"] = {region: [int(k) for k in ids] for region, ids in regions.items()}
        result.meta["volumes_ml"] = {region: round(float(counts[list(ids)].sum()) * voxel_ml, 2)
                                     for region, ids in regions.items()}
    if notes:
        result.meta["notes"] = notes
        for note in notes:
            warnings.warn(note, UserWarning, stacklevel=4)
    if "source" in reference.meta:
        result.meta["source"] = reference.meta["source"]
    report(progress, 1, 1, "labels on the input grid")
    return result


def fill_enclosed(labels: np.ndarray, spacing, rim: int, becomes: int, closing_mm: float = 4.0) -> np.ndarray:
    """``labels`` with every voxel enclosed by label ``rim`` (closed by ``closing_mm``) set to ``becomes``.

    BraTS annotators call everything inside the enhancing rim tumour core (necrosis), but a network
    sees the dark necrotic centre as oedema or background; on the four BraTS patients the filled
    true enhancing rim covers the true core at Dice 0.94-0.99 where the core is rim-enclosed.
    """
    from scipy import ndimage as ndi

    shell = labels == rim
    if not shell.any():
        return labels
    margin = [int(np.ceil(closing_mm / s)) + 1 for s in spacing]
    box = tuple(slice(max(int(i.min()) - m, 0), int(i.max()) + m + 1) for i, m in zip(np.nonzero(shell), margin))
    part = shell[box]
    radius = [max(int(round(closing_mm / s)), 0) for s in spacing]
    ball = np.ones([2 * r + 1 for r in radius], bool)
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    ball &= sum((g / max(r, 1)) ** 2 for g, r in zip(grid, radius)) <= 1.0
    closed = ndi.binary_closing(np.pad(part, [(r + 1, r + 1) for r in radius]), structure=ball)
    closed = closed[tuple(slice(r + 1, -(r + 1)) for r in radius)]
    inside = ndi.binary_fill_holes(closed) & ~part
    out = labels.copy()
    region = out[box]
    region[inside & (region != rim)] = becomes
    return out


def region_masks(labels: np.ndarray, regions: dict[str, list[int]]) -> dict[str, np.ndarray]:
    """Boolean mask of each nested region (e.g. whole tumour = all tumour labels) of a label map."""
    return {region: np.isin(labels, list(ids)) for region, ids in regions.items()}


def segment_multicontrast(volume, card, device: Optional[str] = None, overlap: float = 0.5,
                          batch_size: Optional[int] = None, progress: Optional[ProgressFn] = None,
                          cancel: Optional[CancelToken] = None, network=None) -> Volume:
    """``mv.segment`` for a dict of contrasts or a model with ``input.contrasts``: checks, loads, runs."""
    from ..engine.device import resolve_device
    from ..models.registry import load_model

    if not card.input.get("contrasts"):
        raise ContrastError(f"model {card.id} takes one image, not a dict of contrasts; give it one Volume "
                            "(multi-contrast models list their contrasts in mv.models.available())")
    device = resolve_device(device)
    if network is None:
        network, card = load_model(card, device=device)
    return segment_contrasts(network, card, volume, device=device, overlap=overlap, batch_size=batch_size,
                             progress=progress, cancel=cancel)


def contrasts_from_arguments(args) -> dict[str, Volume] | None:
    """``{contrast: Volume}`` from the CLI's ``--flair/--t1c/--t1/--t2`` files (``None`` if none given);
    refuses a positional image beside them, which would leave its contrast unnamed."""
    from .. import io

    paths = {name: getattr(args, name, None) for name in ("flair", "t1c", "t1", "t2")}
    paths = {name: path for name, path in paths.items() if path}
    if not paths:
        if args.input is None:
            raise ContrastError("give an image to segment, or MR contrasts with --flair/--t1c/--t1/--t2")
        return None
    if args.input is not None:
        raise ContrastError(f"{args.input}: give the image either as the input or by its contrast "
                            "(--flair/--t1c/--t1/--t2), not both")
    return {name: io.load(path) for name, path in paths.items()}
