"""``mv.prompt``: segment a whole volume from a few annotated slices or from example scans, no training.

    msk = mv.prompt(vol, annotations=partial_labels)                 # a few slices painted
    msk = mv.prompt(vol, examples=[(img, mask), ...], model=None)    # other scans with their masks

Two cues are combined: *where* (annotated slices carried slice to slice by deformable
registration, or example scans registered onto the target and fused) and *what it looks like*
(a small head fitted in seconds on the prompt's own pixels). Every variant (prior alone, head
alone, their product at three weights) is scored by leave-one-out over the given slices or
examples, the best one is used, and its score is returned as ``meta["expected_dice"]``.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from typing import Optional, Sequence

import numpy as np

from ...engine.device import resolve_device
from ...engine.progress import CancelToken, ProgressFn, check, report
from ...volume import Volume
from . import photos, runs
from .features import (DINO_COMPONENTS, PER_CHANNEL, as_slices, dino_pixels, dino_reduced, intensity_features,
                       load_backbone, normalised, window_features)
from .propagate import demons_backend, demons_key, slice_displacements
from .register import (MAX_SAMPLES, REGISTRATIONS, affine_arrays, affines_from_arrays, local_ncc, register_affines,
                       warp_to)
from .volume_cache import VolumeCache
from .refine import SOFTEN_REACH, compact_labels


def prompt(volume: Volume, examples: Optional[Sequence[tuple[Volume, Volume]]] = None,
           annotations: Optional[Volume] = None, model=None, *, annotated_slices: Optional[Sequence[int]] = None,
           labels: Optional[Sequence[int | str]] = None, variant: Optional[str] = None, device: Optional[str] = None,
           progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
           cache: bool = True, previous: Optional[Volume] = None) -> Volume:
    """Labels Volume on ``volume``'s grid, one label per structure in the prompt, names kept.

    examples: ``[(image, mask), ...]`` other scans (same modality) with their label maps.
    annotations: a label map on ``volume``'s grid with a few slices (axis 0) painted, the rest 0.
    model: a DINO backbone (model id, checkpoint path) for extra features; ``None``: intensity only.
    annotated_slices: which slices count as annotated (default: those with any label), so that a
        slice where the structure is legitimately absent can count as "annotated, empty".
    labels: restrict to these label ids or names (default: every label in the prompt).
    variant: use this variant instead of the leave-one-out choice (then nothing is checked):
        "propagation" (annotations) / "registration" (examples), "appearance", "combined:<w>",
        or (examples) "adapted": the head learnt on the target where the registered prior is sure.
    cache: keep what depends on the pixels only (demons fields between slices, the DINO PCA,
        fitted heads) in ``$MEDVISION_HOME/cache/embeddings`` and reuse it on the next prompt of
        the same volume (one more slice painted: only the prompt-dependent part is redone).
        ``False``: compute everything; the result is the same either way.
    previous: the result of the last prompt of this volume from annotated slices. When the new
        annotations only add slices (same labels, earlier slices unchanged), only the slabs those
        slices change are redone, with the earlier choice and head read from the cache: a preview
        in about a second, marked ``meta["preview"] = True`` with no ``expected_dice``. Run again
        without ``previous`` for the checked result (the Prompt panel does both while you paint).
        Anything else (other labels, a repainted slice, another image) gets the full prompt.
    Returns ``meta["expected_dice"]`` ``{name: Dice or None}`` from leave-one-out (None when the
    prompt has a single slice or example), ``meta["choice"]`` (the variant used) and
    ``meta["leave_one_out"]`` (every variant's mean Dice) and ``meta["cached"]`` (which of the
    target's pixel-only results were read from the cache, e.g. ``["prompt-demons"]``); with one
    painted slice ``meta["head_agreement"]``, the check that chose between head and carried mask.
    """
    _check_image(volume, "the image to segment")
    if (examples is None) == (annotations is None):
        raise ValueError("prompt needs either annotations= (a few painted slices) or examples= "
                         "(other scans with masks), not both and not neither")
    prior = "propagation" if annotations is not None else "registration"
    if variant is not None and variant not in runs.variants(prior) and not re.fullmatch(r"combined:[0-9.]+", variant):
        raise ValueError(f"variant must be one of {runs.variants(prior)}, not {variant!r}")
    device = resolve_device(device)
    backbone = load_backbone(model)
    store = VolumeCache(volume, enabled=cache)
    if annotations is not None:
        return _from_annotations(volume, annotations, annotated_slices, labels, backbone, device, progress, cancel,
                                 variant, store, previous)
    return _from_examples(volume, list(examples), labels, backbone, device, progress, cancel, variant, store)


# --- annotated slices ---------------------------------------------------------------------------

def _from_annotations(volume, annotations, annotated_slices, wanted_labels, backbone, device, progress, cancel,
                      variant, store, previous=None):
    if not isinstance(annotations, Volume):
        raise ValueError("annotations must be a labels Volume on the image's grid")
    if volume.ndim != 3:
        raise ValueError("annotated slices need a 3D volume; for a 2D image give examples= instead")
    if annotations.spatial_shape != volume.spatial_shape:
        raise ValueError(f"annotations have shape {annotations.spatial_shape} but the image has "
                         f"{volume.spatial_shape}; paint them on the image's grid")
    painted = np.asarray(annotations.data)
    if not np.issubdtype(painted.dtype, np.integer) or (not annotations.is_labels and len(np.unique(painted)) > 256):
        raise ValueError("annotations look like an image, not a label map: give the painted labels layer")
    depth = painted.shape[0]
    if annotated_slices is None:
        annotated = [int(z) for z in np.flatnonzero(painted.reshape(depth, -1).any(1))]
    else:
        annotated = sorted({int(z) for z in annotated_slices})
        if any(z < 0 or z >= depth for z in annotated):
            raise ValueError(f"annotated_slices must lie in 0..{depth - 1}, got {annotated}")
    if not annotated:
        raise ValueError("no annotated slice: paint at least one slice, or name it in annotated_slices=")
    present = sorted(int(v) for v in np.unique(painted[annotated]) if v != 0)
    ids = _restrict(present, annotations.labels or {}, wanted_labels, "the annotated slices")
    names = {k: (annotations.labels or {}).get(k, f"label {k}") for k in ids}
    lookup = np.zeros(int(painted.max()) + 1, dtype=np.int32)
    lookup[ids] = np.arange(1, len(ids) + 1)
    # Only the annotated slices are read as prompts; mapping every voxel of a 300x512x512 label
    # map to classes cost ~0.5 s of each prompt (np.zeros commits no memory for slices never set).
    classes = np.zeros(painted.shape, dtype=np.int32)
    classes[annotated] = lookup[painted[annotated]]
    n_classes = len(ids) + 1
    compact = compact_labels(classes, annotated, range(1, n_classes))
    stamp = {"prompt": "annotations", "image_hash": store.content_hash() if store.enabled else None,
             "features": backbone.checksum if backbone is not None else None}
    if previous is not None and variant is None:
        quick = _preview(volume, previous, annotated, classes, ids, names, compact, backbone, device, cancel,
                         store, stamp)
        if quick is not None:
            return quick

    n_folds = len(annotated) if len(annotated) >= 2 and variant is None else 0
    total = depth - 1 + n_folds + 2
    report(progress, 0, total, "computing image features")
    slices, features, _ = _features(volume, backbone, device, cancel, store)
    report(progress, 1, total, "following the anatomy from slice to slice")
    displacements = _displacements(slices, store, progress, cancel, (1, total), device)
    report(progress, depth, total, "following the anatomy from slice to slice")

    scores = {v: [] for v in runs.variants("propagation")}
    for i, hidden in enumerate(annotated if n_folds else []):
        rest = [a for a in annotated if a != hidden]
        region = _slab(hidden, rest, hidden, hidden)
        maps = runs.from_annotations(features, displacements, classes, rest, n_classes, compact, list(scores),
                                     device, cancel, store, region=region)
        for name, pred in maps.items():
            scores[name].append(runs.overlap_per_class(pred[hidden - region[0]], classes[hidden], n_classes))
        report(progress, depth + i, total, f"checking: slice {hidden} hidden")
    # Appearance alone cannot tell the painted organ from a look-alike elsewhere in the body, so
    # it may win only when no painted label is an organ-like blob (grey / white matter, vessels:
    # there every look-alike is the same tissue; on the MNI brain it then edges out combined:1).
    allowed = [v for v in scores if v != "appearance" or not compact]
    agreement = None
    if variant is None and len(annotated) == 1:
        agreement = _head_agreement(features, displacements, classes, annotated[0], n_classes, compact, device,
                                    cancel, store)
    default = "combined:2" if agreement is None or agreement >= TRUSTED_HEAD else "propagation"
    choice = variant or _choose(scores, default=default, allowed=allowed)
    result = runs.from_annotations(features, displacements, classes, annotated, n_classes, compact, [choice],
                                   device, cancel, store)[choice]
    report(progress, total, total, "done")
    meta = dict(stamp, annotated_slices=annotated, cached=list(store.hits), preview=False, head_agreement=agreement)
    return _result(volume, result, ids, names, scores, choice, meta)


NEAR = 2  # slices on each side of a single painted slice where the carried mask is trusted
TRUSTED_HEAD = 0.7


def _head_agreement(features, displacements, classes, painted, n_classes, compact, device, cancel, store):
    """Dice between the head alone and the carried mask on the ``NEAR`` slices each side of ``painted``.

    With one painted slice nothing can be held out, but next to it the carried mask is nearly
    right (Dice 0.85-0.95 within two slices on real CT, MR and the MNI brain), so a head that
    disagrees with it there is not to be trusted further away. Below ``TRUSTED_HEAD`` the carried
    mask alone is used, which on MR organs from one slice beats head times mask clearly
    (docs/evaluation/prompting.md).
    """
    depth = len(classes)
    region = (max(0, painted - NEAR), min(depth - 1, painted + NEAR))
    near = [z - region[0] for z in range(region[0], region[1] + 1) if z != painted]
    if not near:
        return None
    maps = runs.from_annotations(features, displacements, classes, [painted], n_classes, compact,
                                 ["propagation", "appearance"], device, cancel, store, region=region)
    folds = [runs.overlap_per_class(maps["appearance"][z], maps["propagation"][z], n_classes) for z in near]
    return _mean(list(runs.pooled_dice(folds).values()))


def _slab(z: int, others: list[int], first: int, last: int) -> tuple[int, int]:
    """The slices a change at slice ``z`` reaches when masks are carried from the sorted ``others``:
    from the nearest of them below ``z`` (else ``first``) to the nearest above (else ``last``)."""
    below, above = [a for a in others if a < z], [a for a in others if a > z]
    return (below[-1] if below else first, above[0] if above else last)


PREVIEW_MARGIN = 24  # pixels around the labels' box that a preview predicts
WHOLE_SLICE = (0, 0, 0, 0)  # no window, so no guard


def _preview_window(seen: np.ndarray, margin: int, guard: int):
    """``((y0, y1, x0, x1), guard per side)`` around ``seen`` ``(z, y, x)`` widened by ``margin``.

    None when the window would be the whole slice. A side at the slice's edge needs no guard:
    what lies beyond is outside the image for the whole-slice prediction too.
    """
    h, w = seen.shape[1:]
    found = seen.any(0)
    rows, cols = np.flatnonzero(found.any(1)), np.flatnonzero(found.any(0))
    if rows.size == 0:
        return None, None
    y0, y1 = max(0, rows[0] - margin), min(h, rows[-1] + 1 + margin)
    x0, x1 = max(0, cols[0] - margin), min(w, cols[-1] + 1 + margin)
    if (y1 - y0) * (x1 - x0) >= 0.8 * h * w:
        return None, None
    sides = tuple(int(guard * inside) for inside in (y0 > 0, y1 < h, x0 > 0, x1 < w))
    return (int(y0), int(y1), int(x0), int(x1)), sides


def _preview_windows(earlier, classes, fields, lo, hi):
    """``(window, guard)`` to try for slices ``lo..hi``: ever wider windows, then the whole slice (None)."""
    seen = (earlier[lo:hi + 1] != 0) | (classes[lo:hi + 1] != 0)
    reach = int(np.ceil(np.abs(fields).max())) + 2 if fields.size else 2
    for margin in (PREVIEW_MARGIN, 2 * PREVIEW_MARGIN, 4 * PREVIEW_MARGIN):
        window, guard = _preview_window(seen, margin, max(reach, SOFTEN_REACH))
        if window is None:
            break
        yield window, guard
    yield None, WHOLE_SLICE


def _preview(volume, previous, annotated, classes, ids, names, compact, backbone, device, cancel, store, stamp):
    """``previous`` with the slabs that newly annotated slices change redone, or None where that is not valid.

    Valid when ``previous`` is this image's prompt from annotated slices with the same labels and
    features, every slice it was given is still painted the same, and slices were only added. A
    slab runs from an added slice's annotated neighbours (or the volume's edge beyond the
    outermost) and is predicted exactly as the full prompt would, with the earlier choice and the
    head fitted on the earlier slices (read back from the cache, not refitted). Organs are
    predicted inside a window around them (``_preview_window``), wide enough that every filter,
    warp and blur sees what it would on the whole slice: redoing 23 slices of a liver in a
    300x512x512 CT takes about 1 s on a 2-core CPU, with the same labels as a full prompt.
    """
    meta = previous.meta or {}
    old = [int(z) for z in meta.get("annotated_slices") or []]
    if (not store.enabled or meta.get("prompt") != "annotations" or not old or meta.get("preview")
            or previous.spatial_shape != volume.spatial_shape or meta.get("image_hash") != stamp["image_hash"]
            or meta.get("features") != stamp["features"] or not set(old) < set(annotated)
            or dict(previous.labels or {}) != {int(k): names[k] for k in ids} or meta.get("choice") is None):
        return None
    earlier = np.asarray(previous.data)
    lookup = np.zeros(max(int(earlier[old].max()), max(ids)) + 1, dtype=np.int32)
    lookup[ids] = np.arange(1, len(ids) + 1)
    if earlier[old].max() > max(ids) or not np.array_equal(lookup[earlier[old]], classes[old]):
        return None  # an earlier slice was repainted: its head and folds are stale
    depth = classes.shape[0]
    regions, windows = [], []
    for z in sorted(set(annotated) - set(old)):
        lo, hi = _slab(z, annotated, 0, depth - 1)
        if regions and lo <= regions[-1][1]:
            regions[-1] = (regions[-1][0], max(hi, regions[-1][1]))
        else:
            regions.append((lo, hi))
    pairs = [z for lo, hi in regions for z in range(lo, hi)]  # the field between slices z and z + 1
    try:
        displacements = _cached_displacements(volume.spatial_shape, store, pairs, device)
    except _NotCached:
        return None  # evicted since the last prompt: the full prompt computes and stores it again
    _, learned, _ = _features(volume, backbone, device, cancel, store, only=old)
    choice = meta["choice"]
    out_ids = np.array([0] + list(ids))
    # The previous result's ids are kept as they are outside the slabs (a copy: it is not touched);
    # mapping all of a 300x512x512 volume to classes and back cost ~1.5 s of a preview.
    out = np.array(earlier, dtype=_label_dtype(ids))
    # Organs fill a part of each slice: predict around them only (their bounding box in the
    # previous result and the painted slices, widened past where the masks are carried), and on
    # the whole slices where a mask comes too close to every window tried. Thin or scattered
    # labels, or the head alone, may answer anywhere: whole slices at once.
    organs = choice != "appearance" and compact == set(range(1, len(ids) + 1))
    for lo, hi in regions:
        rows = list(range(lo, hi + 1))
        tries = _preview_windows(earlier, classes, displacements[lo:hi], lo, hi) if organs else [(None, WHOLE_SLICE)]
        for window, guard in tries:
            features = _features(volume, backbone, device, cancel, store, only=rows, window=window,
                                 into=learned)[1]
            labels = runs.from_annotations(features, displacements, classes, annotated, len(ids) + 1, compact,
                                           [choice], device, cancel, store, region=(lo, hi), learn_from=old,
                                           window=window, guard=guard)
            if labels is not None:
                break
        if window is None:
            out[lo:hi + 1] = out_ids[labels[choice]]
        else:
            y0, y1, x0, x1 = window
            out[lo:hi + 1] = 0
            out[lo:hi + 1, y0:y1, x0:x1] = out_ids[labels[choice]]
        windows.append(None if window is None else tuple(int(v) for v in window))
    meta = dict(stamp, annotated_slices=annotated, cached=list(store.hits), preview=True, redone=regions,
                windows=windows)
    return _result(volume, None, ids, names, {}, choice, meta, data=out)


# --- example scans ------------------------------------------------------------------------------

def _from_examples(volume, examples, wanted_labels, backbone, device, progress, cancel, variant, store):
    if not examples:
        raise ValueError("examples= is empty: give at least one (image, mask) pair")
    for i, pair in enumerate(examples):
        _check_example(volume, pair, i)
    ids, names, example_classes = _example_table([m for _, m in examples], wanted_labels)
    if volume.ndim == 2 and variant in (None, "appearance"):
        return _from_photos(volume, examples, ids, names, example_classes, backbone, device, progress, cancel, store)
    n_classes = len(ids) + 1
    n = len(examples)
    n_folds = n if n >= 2 and variant is None else 0
    total = 2 * n + 1 + n_folds * n
    done = [0]

    def step(message):
        done[0] += 1
        report(progress, done[0], total, message)

    report(progress, 0, total, "computing image features")
    target_slices, target_features, basis = _features(volume, backbone, device, cancel, store)
    prepared = []
    for (image, _), classes in zip(examples, example_classes):
        # read in the target's DINO basis: nothing of an example's own is worth caching
        slices, feats, _ = _features(image, backbone, device, cancel, VolumeCache(image, enabled=False), basis)
        prepared.append((image, slices.mean(-1), feats, classes.reshape(slices.shape[:3])))
        step("computing image features")
    step("registering examples")
    compact = _compact_in_all([p[3] for p in prepared], n_classes)

    # Registrations are kept in the cache by the pixels of both scans: prompting again with one
    # more example (the Prompt panel's "Add pair") registers only what is new.
    stores = [VolumeCache(image, enabled=store.enabled) for image, *_ in prepared]

    def onto(target, target_grey, members, target_store):
        priors, similarities = [], []
        for (image, grey, _, classes), example_store in members:
            prior, similarity = _register_example(target, target_grey, image, grey, classes, n_classes,
                                                  target_store, example_store, cancel)
            priors.append(prior)
            similarities.append(similarity)
            step("registering examples")
        return priors, similarities

    fitted = {}

    def heads(indices):
        """The appearance head of each example in ``indices``, each fitted once (then reused by every fold)."""
        def get():
            for i in indices:
                if i not in fitted:
                    check(cancel)
                    fitted[i] = runs.fit_head([prepared[i][2]], [prepared[i][3]], n_classes, device)
            return [fitted[i] for i in indices]
        return get

    scores = {v: [] for v in runs.variants("registration")}
    for j in range(n_folds):
        target_image, grey, feats, truth = prepared[j]
        rest = [(p, stores[i]) for i, p in enumerate(prepared) if i != j]
        priors, similarities = onto(target_image, grey, rest, stores[j])
        maps = runs.from_examples(feats, priors, similarities, heads([i for i in range(n) if i != j]),
                                  n_classes, compact, list(scores), device, cancel)
        for name, pred in maps.items():
            scores[name].append(runs.overlap_per_class(pred, truth, n_classes))
    priors, similarities = onto(volume, target_slices.mean(-1), list(zip(prepared, stores)), store)
    # Without a check, trust the registration in 3D, with the head learnt on the target under it
    # (safe when the example comes from another scanner or modality); 2D photos of different
    # eyes or patients do not line up, so there the appearance head alone is the safer guess.
    choice = variant or _choose(scores, default="adapted" if volume.ndim == 3 else "appearance")
    result = runs.from_examples(target_features, priors, similarities, heads(list(range(n))), n_classes, compact,
                                [choice], device, cancel)[choice]
    report(progress, total, total, "done")
    cached = list(store.hits) + [kind for one in stores for kind in one.hits]
    return _result(volume, result.reshape(volume.spatial_shape), ids, names, scores, choice,
                   {"prompt": "examples", "n_examples": n, "cached": cached})


def _from_photos(volume, examples, ids, names, example_classes, backbone, device, progress, cancel, store):
    """2D target and examples (``photos``): one head per example on photo features, averaged; no
    registration prior (vessels of two eyes do not correspond). With one label, the probability
    threshold is chosen by leave-one-example-out on the examples."""
    n_classes, n = len(ids) + 1, len(examples)
    masks = [c.reshape(image.spatial_shape) for (image, _), c in zip(examples, example_classes)]
    layered = volume.modality == "OCT" or all(photos.drawn_as_layers(m, n_classes) for m in masks)
    total = 2 * n + 2 + (n if n >= 2 else 0)
    report(progress, 0, total, "computing image features")
    target_features, target_fov = photos.photo_features(volume, layered)
    basis = None
    if backbone is not None:
        dino, basis = _dino_pixels(volume, backbone, device, cancel, store)
        target_features = np.concatenate([target_features, dino], axis=-1)
    prepared = []
    for i, ((image, _), classes) in enumerate(zip(examples, masks)):
        check(cancel)
        features, fov = photos.photo_features(image, layered)
        if backbone is not None:
            features = np.concatenate([features, _dino_pixels(image, backbone, device, cancel, None, basis)[0]], -1)
        prepared.append((features, classes, fov))
        report(progress, 1 + i, total, "computing image features")
    heads = []
    for i, (features, classes, fov) in enumerate(prepared):
        check(cancel)
        heads.append(photos.fit_photo_head(features, classes, fov, n_classes, device))
        report(progress, 1 + n + i, total, "fitting a head per example")
    folds = photos.leave_one_out(prepared, heads, n_classes, cancel) if n >= 2 else {}
    threshold = photos.best_threshold(folds) if folds else None
    if threshold is None and n_classes == 2:
        threshold = photos.DEFAULT_THRESHOLD
    report(progress, total - 1, total, "segmenting")
    classes = photos.label_map(photos.mean_probability(heads, target_features), target_fov, threshold)
    report(progress, total, total, "done")
    chosen = folds.get(threshold if n_classes == 2 else None, [])
    meta = {"prompt": "examples", "n_examples": n, "cached": list(store.hits), "threshold": threshold,
            "layered": layered, "leave_one_out_thresholds": {str(t): photos.pooled(f) for t, f in folds.items()}}
    return _result(volume, classes, ids, names, {"appearance": chosen}, "appearance", meta)


def _dino_pixels(volume, backbone, device, cancel, store, basis=None):
    """``(DINO features (y, x, F), PCA basis)`` of a 2D image: ``_features``' DINO columns."""
    store = store if store is not None else VolumeCache(volume, enabled=False)
    _, features, basis = _features(volume, backbone, device, cancel, store, basis)
    channels = 3 if volume.rgb else 1
    return features[0, ..., PER_CHANNEL * channels:], basis


def _register_example(target, target_grey, image, grey, classes, n_classes, target_store, example_store,
                      cancel=None):
    """``(prior (K+1, n, y, x), local similarity (n, y, x))`` of one example registered onto ``target``.

    The prior is the mean of the masks warped by each of the example's affine registrations, the
    similarity the mean of their local correlations with the target. The transforms are read from
    ``target_store`` when these two scans were registered before.
    """
    import SimpleITK as sitk

    shape = target_grey.shape
    t_grey, e_grey = target_grey.reshape(target.spatial_shape), grey.reshape(image.spatial_shape)
    params = {"version": "affine-2", "count": REGISTRATIONS, "max_samples": MAX_SAMPLES,
              "example": example_store.content_hash() if example_store.enabled else None,
              "example_modality": image.modality, "example_rgb": bool(image.rgb),
              "simpleitk": sitk.Version_VersionString()}
    arrays = target_store.get("prompt-affine", params, {"parameters": (None, "float64"), "fixed": (None, "float64")},
                              lambda: affine_arrays(register_affines(target, t_grey, image, e_grey, REGISTRATIONS,
                                                                    cancel)))
    hot = runs.onehot(classes.reshape(image.spatial_shape), n_classes)
    sigma = (0, 3, 3) if shape[0] > 1 else (0, 6, 6)
    prior = np.zeros((n_classes,) + shape, dtype=np.float32)
    similarity = np.zeros(shape, dtype=np.float32)
    transforms = affines_from_arrays(arrays, len(target.spatial_shape))
    for transform in transforms:
        warped = np.stack([warp_to(target, image, hot[k], transform, fill=1.0 if k == 0 else 0.0)
                           for k in range(n_classes)]).reshape((n_classes,) + shape)
        prior += warped / np.maximum(warped.sum(0, keepdims=True), 1e-6)
        similarity += local_ncc(warp_to(target, image, e_grey, transform).reshape(shape), target_grey, sigma)
    return prior / len(transforms), similarity / len(transforms)


# --- shared -------------------------------------------------------------------------------------

def _features(volume, backbone, device, cancel, store, basis=None, only=None, window=None, into=None):
    """``(normalised slices (n, y, x, c), features (n, y, x, F) float32, DINO PCA basis or None)``.

    store: a ``VolumeCache`` for ``volume`` (disabled: compute everything); the DINO PCA is cached
    only where the volume sets its own basis (a target, not an example read in the target's).
    only: compute the features of these slices only (then only they are normalised and returned
    as ``slices``); the other rows of ``features`` are left unset (a preview reads nothing else,
    and ``np.empty`` commits no memory for rows never written).
    window: with ``only``, ``(y0, y1, x0, x1)``: set the features inside this part of those
    slices only (``_features.window_features``: the same numbers as the whole slice's).
    into: the ``features`` of an earlier call with ``only`` on this volume, filled in further.
    """
    from ...engine.embeddings import EmbeddingConfig
    check(cancel)
    rows = slice(None) if only is None else np.asarray(sorted(only), dtype=int)
    slices = as_slices(normalised(volume, None if only is None else rows, store.intensity_ranges()), volume.rgb)
    # Not cached: computing the filters costs ~25 ms per 256x256 slice, storing them 40 bytes per
    # voxel (3 GB for a 300x512x512 CT) for no measurable gain.
    features = (intensity_features(slices, device=device) if window is None
                else window_features(slices, window, device=device))
    if backbone is not None:
        def reduce():
            reduced, (mean, components) = dino_reduced(volume, backbone, device, cancel=cancel)
            return {"reduced": reduced, "mean": mean, "components": components}

        if basis is None:
            params = {"version": "dino-pca-1", "backbone": backbone.checksum, "components": DINO_COMPONENTS,
                      "config": asdict(EmbeddingConfig())}
            got = store.get("prompt-dino-pca", params, {"reduced": (None, "float32"), "mean": (None, "float32"),
                                                        "components": (None, "float32")}, reduce)
            reduced, basis = got["reduced"], (got["mean"], got["components"])
        else:
            reduced, basis = dino_reduced(volume, backbone, device, cancel=cancel, basis=basis)
        dino = dino_pixels(reduced[rows], slices.shape[1:3], backbone)
        if window is not None:
            dino = dino[:, window[0]:window[1], window[2]:window[3]]
        features = np.concatenate([features, dino], axis=-1)
    if only is not None:
        chosen = features
        features = into if into is not None else np.empty((len(volume.data),) + slices.shape[1:3] + chosen.shape[-1:],
                                                          dtype=np.float32)
        if window is None:
            features[rows] = chosen
        else:
            features[rows, window[0]:window[1], window[2]:window[3]] = chosen
    return slices, features, basis


def _displacements(slices, store, progress, cancel, step, device):
    """Demons fields between neighbouring slices (``_propagate.slice_displacements``), cached per volume."""
    backend = demons_backend(device)
    got = store.get(*_demons_entry(slices.shape[:3], backend),
                    lambda: {"displacements": slice_displacements(slices.mean(-1), progress=progress, cancel=cancel,
                                                                  step=step, device=device, backend=backend)})
    return got["displacements"]


class _NotCached(Exception):
    pass


def _cached_displacements(shape, store, rows, device):
    """The ``rows`` of the cached demons fields of a volume of ``shape``; ``_NotCached`` when there are none."""
    def missing():
        raise _NotCached()

    return store.get(*_demons_entry(shape, demons_backend(device)), missing,
                     rows={"displacements": rows})["displacements"]


def _demons_entry(shape, backend) -> tuple:
    """``(kind, params, expect)`` of the demons fields of a volume of ``shape`` ``(z, y, x)`` in the cache."""
    z, y, x = shape
    return "prompt-demons", demons_key(backend), {"displacements": ((max(z - 1, 0), 2, y, x), "float32")}


def _compact_in_all(example_classes, n_classes):
    """Labels compact (one blob per slice) in every example that shows them."""
    shown, compact = set(), set()
    for classes in example_classes:
        present = {int(k) for k in np.unique(classes) if k != 0}
        found = compact_labels(classes, range(len(classes)), sorted(present))
        shown |= present - found
        compact |= found
    return compact - shown


def _choose(scores: dict[str, list[dict[int, float]]], default: str, allowed=None) -> str:
    """The variant with the best leave-one-out Dice (``default`` when there was nothing to check).

    On near-ties (0.01) the prior-based variants win over appearance alone, and the combined one
    over the prior alone: a few folds are a noisy judge, and those degrade most gracefully.
    allowed: the variants that may be chosen (all scored ones by default).
    """
    means = {v: _mean(list(runs.pooled_dice(folds).values())) for v, folds in scores.items()}
    means = {v: m for v, m in means.items() if m is not None and (allowed is None or v in allowed)}
    if not means:
        return default
    best = max(means.values())
    rank = lambda v: (v == "appearance", not v.startswith(("combined", "adapted")), -means[v])  # noqa: E731
    return min((v for v in means if means[v] >= best - 0.01), key=rank)


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _label_dtype(ids):
    return np.uint8 if max(ids) < 256 else np.uint16


def _result(volume, classes, ids, names, scores, choice, meta, data=None):
    """The labels Volume of ``classes`` (0..K) with the labels' own ids (or ``data``, already in ids)."""
    if data is None:
        data = np.array([0] + list(ids))[classes].astype(_label_dtype(ids))
    pooled = runs.pooled_dice(scores.get(choice, []))
    expected = {names[k]: pooled.get(i + 1) for i, k in enumerate(ids)}
    summary = {v: _mean(list(runs.pooled_dice(folds).values())) for v, folds in scores.items()}
    meta = dict(meta, source=volume.meta.get("source", "prompt"), choice=choice, expected_dice=expected,
                leave_one_out=summary)
    return Volume(data, spacing=volume.spacing, origin=volume.origin, direction=volume.direction,
                  modality=volume.modality, labels={int(k): names[k] for k in ids}, meta=meta)


def _restrict(present, names, wanted, where):
    ids = list(present)
    if wanted is not None:
        keys = {str(w) for w in wanted}
        ids = [k for k in present if str(k) in keys or names.get(k) in keys]
        if not ids:
            raise ValueError(f"none of the labels {list(wanted)} appear in {where} (found {present})")
    if not ids:
        raise ValueError(f"{where} hold no label: paint at least one structure")
    return ids


def _check_image(volume, what):
    if not isinstance(volume, Volume):
        raise ValueError(f"{what} must be a Volume (use mv.load)")
    if volume.is_labels:
        raise ValueError(f"{what} is a label map; prompt with the image it was drawn on")
    if volume.n_leading:
        raise ValueError(f"{what} is a series of {volume.data.shape[0]} volumes; pick one time point first")


def _check_example(volume, pair, i):
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise ValueError(f"example {i + 1} must be an (image, mask) pair of Volumes")
    image, mask = pair
    _check_image(image, f"example {i + 1}'s image")
    if not isinstance(mask, Volume):
        raise ValueError(f"example {i + 1}'s mask must be a labels Volume")
    if mask.spatial_shape != image.spatial_shape:
        raise ValueError(f"example {i + 1}: image shape {image.spatial_shape} and mask shape "
                         f"{mask.spatial_shape} differ; the mask must be drawn on its image's grid")
    if image.ndim != volume.ndim or image.rgb != volume.rgb:
        raise ValueError(f"example {i + 1} is a {image.ndim}D {'colour' if image.rgb else 'grey'} image, "
                         f"the target a {volume.ndim}D {'colour' if volume.rgb else 'grey'} one")


def _generic(name):
    return name is None or re.fullmatch(r"label \d+", name) is not None


def _example_table(masks, wanted):
    """``(ids, names, classes per example)``: labels matched by name where the masks name them, else by id."""
    keys, ids, names = [], [], {}
    per_mask = []
    for mask in masks:
        data = np.asarray(mask.data)
        found = {}
        for k in (int(v) for v in np.unique(data) if v != 0):
            name = (mask.labels or {}).get(k)
            key = f"#{k}" if _generic(name) else name
            found[k] = key
            if key not in keys:
                keys.append(key)
                new_id = k if k not in ids else max(ids) + 1
                ids.append(new_id)
                names[new_id] = name or f"label {k}"
        per_mask.append((data, found))
    chosen = _restrict(ids, names, wanted, "the example masks")
    key_of = {i: keys[ids.index(i)] for i in chosen}
    class_of_key = {key_of[i]: c + 1 for c, i in enumerate(chosen)}
    classes = []
    for data, found in per_mask:
        lookup = np.zeros(int(data.max()) + 1, dtype=np.int32)
        for k, key in found.items():
            lookup[k] = class_of_key.get(key, 0)
        classes.append(lookup[data])
    return chosen, {i: names[i] for i in chosen}, classes
