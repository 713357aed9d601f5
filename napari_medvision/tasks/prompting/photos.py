"""Prompting a 2D image from other labelled 2D images: photos of other eyes, other B-scans.

Vessels of two eyes do not lie in corresponding places, so a 2D target gets no registration
prior: one appearance head per example is fitted on that example's pixels inside its field
of view, and their probabilities on the target are averaged. The features add to the
intensity filters (``features.intensity_features``) what tells these structures apart:

- layered labels (OCT B-scans, or example masks drawn as horizontal bands): each pixel's depth
  below the tissue's top edge and relative to the brightest band of its column, and the mean
  intensity between the top edge and the pixel, since retinal layers look alike and differ
  mostly by where they lie;
- any other labels (vessels), on the contrast channel (green for colour photos): local
  contrast, CLAHE, morphological top-hats, Hessian eigenvalues at more scales and Frangi's
  vesselness. On the B-scans at half size these ridge filters do not help the layers (and hurt
  with one of the two example B-scans), so layers go without.

Each channel is scaled by its own percentiles inside the field of view (photos of one camera
differ in brightness), and the image outside the field of view is filled with the nearest pixel
inside, so that no filter answers to the field's dark rim. A single label (vessels) is cut at
the probability threshold that leave-one-example-out finds best on the examples themselves.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from scipy import ndimage as ndi

from ...engine.progress import CancelToken, check
from ...volume import Volume
from .features import as_slices, intensity_features
from .refine import AppearanceHead
from .runs import overlap_per_class, pooled_dice

# Pixels; DRIVE vessels are 1-10 px wide at 565 x 584. The intensity features hold the Hessian at
# 1 and 2 px; these scales add the rest.
HESSIAN_SIGMAS = (1.5, 3.0, 4.0)
FRANGI_SIGMAS = (1.0, 2.0, 3.0, 4.0)
TOPHAT_RADII = (3, 6, 10)
CONTRAST_WINDOW = 15.0  # pixels: the Gaussian window of the local contrast normalisation
THRESHOLDS = tuple(round(0.2 + 0.05 * i, 2) for i in range(16))  # 0.2 ... 0.95
DEFAULT_THRESHOLD = 0.5


def field_of_view(volume: Volume) -> np.ndarray:
    """``(y, x)`` bool: the lit disc of a colour photo (its dark surround excluded), else every pixel.

    A fundus camera's field of view is the bright disc; its rim is the strongest edge in the
    photo and no part of the retina. Lit: smoothed brightness above 0.15 of its 90th percentile
    (the surround is near black, the retina's darkest rim well above; a crop's optic disc does
    not move it as Otsu's threshold would); the disc kept whole (largest component, holes filled)
    and 2 px eroded off its rim. On DRIVE 21-40 this matches the FOV masks with Dice 0.995 or
    more. The rim is kept out of even a small dark corner of a crop: its pixels would set the
    0.5 percentile that scales the channels.
    """
    data = np.asarray(volume.data, dtype=np.float32)
    whole = np.ones(volume.spatial_shape, dtype=bool)
    if not volume.rgb:
        return whole
    brightness = ndi.gaussian_filter(data.mean(-1), 2)
    if brightness.max() <= brightness.min():
        return whole
    lit = brightness > 0.15 * np.percentile(brightness, 90)
    lit = ndi.binary_fill_holes(ndi.binary_opening(lit, iterations=2))
    parts, n = ndi.label(lit)
    if n > 1:
        lit = parts == np.argmax(np.bincount(parts.ravel())[1:]) + 1
    if lit.all():
        return whole
    lit = ndi.binary_erosion(lit, iterations=2, border_value=1)
    return lit if lit.any() else whole


def scaled_channels(volume: Volume, fov: np.ndarray) -> np.ndarray:
    """``(y, x, c)`` float32 in [0, 1]: each channel scaled by its 0.5 and 99.5 percentiles inside
    ``fov`` (as ``features.normalised`` does over the whole image), the pixels outside ``fov`` set
    to the nearest one inside.

    The scale is kept, not centred: the gradient-magnitude features also carry the smoothed
    intensity (``features._torch_filters`` says why), and on the OCT B-scans centring each
    channel on its median cost the layers half their Dice."""
    data = np.asarray(volume.data, dtype=np.float32)
    channels = data if volume.rgb else data[..., None]
    out = np.empty(channels.shape, dtype=np.float32)
    for c in range(channels.shape[-1]):
        lo, hi = np.percentile(channels[..., c][fov], [0.5, 99.5])
        out[..., c] = np.clip((channels[..., c] - lo) / max(hi - lo, 1e-6), 0, 1)
    if not fov.all():
        nearest = ndi.distance_transform_edt(~fov, return_distances=False, return_indices=True)
        out = out[tuple(nearest)]
    return out


def ridge_features(channel: np.ndarray, dark: bool) -> list[np.ndarray]:
    """Ridge and vessel filters of one ``(y, x)`` channel: local contrast, CLAHE, top-hats at
    ``TOPHAT_RADII``, the Hessian's eigenvalues at ``HESSIAN_SIGMAS`` and multi-scale Frangi.

    dark: ridges darker than their surround (vessels in the green channel); else both kinds.
    The Hessian's eigenvalues stand in for scikit-image's Sato filter, which is built on them:
    on DRIVE they give a slightly higher Dice than Sato's at five scales, at a fifth of the time
    (Sato costs about 1 s per scale on a 565 x 584 photo).
    """
    from skimage import exposure, filters, morphology

    centred = channel - ndi.gaussian_filter(channel, CONTRAST_WINDOW)
    out = [centred / np.sqrt(ndi.gaussian_filter(centred ** 2, CONTRAST_WINDOW) + 1e-4)]
    span = max(float(channel.max() - channel.min()), 1e-6)
    out.append(exposure.equalize_adapthist((channel - channel.min()) / span, clip_limit=0.01))
    polarities = (True,) if dark else (True, False)
    for black in polarities:
        tophat = morphology.black_tophat if black else morphology.white_tophat
        out += [tophat(channel, morphology.disk(r)) for r in TOPHAT_RADII]
        out.append(filters.frangi(channel, sigmas=FRANGI_SIGMAS, black_ridges=black))
    for sigma in HESSIAN_SIGMAS:
        out += hessian_eigenvalues(channel, sigma)
    return [np.asarray(f, dtype=np.float32) for f in out]


def hessian_eigenvalues(channel: np.ndarray, sigma: float) -> list[np.ndarray]:
    """The two eigenvalues of the Hessian of ``channel`` at ``sigma`` px, scale-normalised (times
    sigma squared), as ``features.intensity_features`` gives them at 1 and 2 px."""
    hyy = ndi.gaussian_filter(channel, sigma, order=(2, 0))
    hxx = ndi.gaussian_filter(channel, sigma, order=(0, 2))
    hxy = ndi.gaussian_filter(channel, sigma, order=(1, 1))
    half_trace, root = (hxx + hyy) / 2, np.sqrt(((hxx - hyy) / 2) ** 2 + hxy ** 2)
    return [(half_trace + root) * sigma ** 2, (half_trace - root) * sigma ** 2]


def depth_features(channel: np.ndarray) -> list[np.ndarray]:
    """Where each pixel of a B-scan lies in its column: rows below the tissue's top edge, rows from
    the column's brightest band, and the mean intensity from the top edge down to the pixel.

    The top edge is the first row above Otsu's threshold of the smoothed scan, the brightest band
    the row of the column's maximum, each median-filtered along the columns; sizes scale with the
    scan's height (a 1050-row scan: smoothing 8 rows, medians over 31 columns, depths per 210 rows).
    """
    from skimage.filters import threshold_otsu

    height = channel.shape[0]
    smooth = ndi.gaussian_filter(channel, height / 130)
    inside = smooth > threshold_otsu(smooth)
    width = 2 * int(height / 70) + 1
    top = ndi.median_filter(np.where(inside.any(0), inside.argmax(0), 0).astype(np.float32), width, mode="nearest")
    peak = np.argmax(ndi.gaussian_filter(channel, height / 175), axis=0).astype(np.float32)
    peak = ndi.median_filter(peak, width, mode="nearest")
    rows = np.arange(height, dtype=np.float32)[:, None]
    below = rows >= top[None]
    mean_above = np.cumsum(np.where(below, channel, 0), 0) / np.maximum(np.cumsum(below, 0), 1)
    unit = height / 5
    below_top = np.broadcast_to((rows - top[None]) / unit, channel.shape)
    from_peak = np.broadcast_to((rows - peak[None]) / unit, channel.shape)
    return [below_top.astype(np.float32), from_peak.astype(np.float32), mean_above.astype(np.float32)]


def photo_features(volume: Volume, layered: bool, workers: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(features (y, x, F) float32, field of view (y, x) bool)`` of a 2D image for the photo head."""
    fov = field_of_view(volume)
    channels = scaled_channels(volume, fov)
    contrast = channels[..., 1] if volume.rgb and channels.shape[-1] >= 3 else channels.mean(-1)
    extra = depth_features(contrast) if layered else ridge_features(contrast, dark=bool(volume.rgb))
    parts = [intensity_features(as_slices(channels, True), workers=workers)[0], np.stack(extra, axis=-1)]
    return np.concatenate(parts, axis=-1).astype(np.float32, copy=False), fov


def drawn_as_layers(classes: np.ndarray, n_classes: int) -> bool:
    """Whether every label of a 2D class map is a horizontal band: present in at least half of the
    columns, one run of rows in at least 90 % of them (retinal layers; vessels are many runs)."""
    if n_classes < 2:
        return False
    for k in range(1, n_classes):
        mask = classes == k
        shown = mask.any(0)
        if shown.mean() < 0.5:
            return False
        starts = (mask[1:] & ~mask[:-1]).sum(0) + mask[0]
        if (starts[shown] == 1).mean() < 0.9:
            return False
    return True


def fit_photo_head(features: np.ndarray, classes: np.ndarray, fov: np.ndarray, n_classes: int,
                   device: str) -> AppearanceHead:
    """One example's head, fitted on its pixels inside the field of view (class-balanced sample)."""
    x = np.ascontiguousarray(features[fov], dtype=np.float32)
    return AppearanceHead(n_classes, device=device).fit(x, classes[fov].astype(np.int64))


def mean_probability(heads: Sequence[AppearanceHead], features: np.ndarray) -> np.ndarray:
    """``(K+1, y, x)``: the heads' class probabilities averaged."""
    return np.mean([h.predict(features) for h in heads], axis=0)


def label_map(prob: np.ndarray, fov: np.ndarray, threshold: Optional[float]) -> np.ndarray:
    """Class map: label 1 where its probability passes ``threshold`` (one label), else the most
    probable class; background outside ``fov``."""
    if threshold is None or prob.shape[0] != 2:
        out = np.argmax(prob, axis=0).astype(np.int32)
    else:
        out = (prob[1] > threshold).astype(np.int32)
    out[~fov] = 0
    return out


def leave_one_out(prepared, heads, n_classes: int, cancel: Optional[CancelToken] = None):
    """``{threshold: [per-fold overlaps]}``: each example predicted by the others' heads.

    prepared: ``[(features, classes, fov), ...]``; heads: one per example. With one label
    every threshold of ``THRESHOLDS`` is scored; with several, the most probable class (key None).
    """
    keys = list(THRESHOLDS) if n_classes == 2 else [None]
    folds = {t: [] for t in keys}
    for j, (features, classes, fov) in enumerate(prepared):
        check(cancel)
        prob = mean_probability([h for i, h in enumerate(heads) if i != j], features)
        for t in keys:
            folds[t].append(overlap_per_class(label_map(prob, fov, t), np.where(fov, classes, 0), n_classes))
    return folds


def pooled(folds) -> Optional[float]:
    """Mean over labels of Dice pooled over the folds."""
    values = list(pooled_dice(folds).values())
    return float(np.mean(values)) if values else None


def best_threshold(folds) -> Optional[float]:
    """The threshold with the best pooled leave-one-out Dice; the first of near-equals (0.002)
    closest to ``DEFAULT_THRESHOLD``; None for several labels (most probable class)."""
    scores = {t: pooled(f) for t, f in folds.items()}
    scores = {t: s for t, s in scores.items() if s is not None}
    if not scores or None in scores:
        return None
    top = max(scores.values())
    return min((t for t, s in scores.items() if s >= top - 0.002), key=lambda t: abs(t - DEFAULT_THRESHOLD))
