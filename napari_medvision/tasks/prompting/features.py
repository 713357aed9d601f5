"""Per-pixel appearance features for prompting: intensities at several scales, edges, ridges, DINO.

Features are computed slice by slice (2D filters along the last two axes), as the prompt head
judges each slice on its own pixel grid. Channels, per image channel, with sigma in pixels:
intensity; Gaussian-smoothed at 1, 2, 4; gradient magnitude at 1, 2; Hessian eigenvalues at 1
and 2 (ridges: vessels, thin cortex). DINO patch features, when a backbone is named, are reduced
by PCA and upsampled bilinearly to pixels (``engine.embeddings.FeatureVolume.at_pixels``).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
from scipy import ndimage as ndi

from ...volume import Volume

SMOOTH = (1.0, 2.0, 4.0)
EDGES = (1.0, 2.0)
DINO_COMPONENTS = 16


def intensity_ranges(volume: Volume) -> Optional[list]:
    """Per image channel, the (0.5, 99.5) percentiles ``normalised`` scales by; None for CT (a fixed window).

    Reading them touches every voxel (~0.25 s for a 300x512x512 MR), so a caller that normalises
    a few slices at a time computes them once (``VolumeCache.intensity_ranges``).
    """
    if volume.modality == "CT" and not volume.rgb:
        return None
    data = np.asarray(volume.data).astype(np.float32, copy=False)
    channels = data[..., None] if not volume.rgb else data
    ranges = []
    for c in range(channels.shape[-1]):
        one = channels[..., c]
        sample = one[one != 0] if np.count_nonzero(one) > one.size // 10 else one.ravel()
        ranges.append(tuple(np.percentile(sample[:: max(1, sample.size // 2_000_000)], [0.5, 99.5])))
    return ranges


def normalised(volume: Volume, rows: Optional[np.ndarray] = None, ranges: Optional[list] = None) -> np.ndarray:
    """Image as float32 ``(z, y, x[, c])`` in about [0, 1], comparable between scans of one modality.

    CT keeps Hounsfield units meaningful (a soft-tissue window), so a head fitted on one scan
    reads another; other images are scaled by their own 0.5-99.5 percentiles (MR units are arbitrary).
    rows: only these slices (axis 0) of a 3D volume, scaled as in the whole volume; a preview
    needs a few slices of 300, and the CT window of all of them cost ~0.3 s at 512x512.
    ranges: ``intensity_ranges(volume)`` when the caller already has them.
    """
    data = np.asarray(volume.data)
    part = data if rows is None else data[rows]
    if volume.modality == "CT" and not volume.rgb:
        return np.clip((part.astype(np.float32) + 250.0) / 600.0, -0.5, 1.5, dtype=np.float32)
    ranges = intensity_ranges(volume) if ranges is None else ranges
    part = part.astype(np.float32, copy=False)
    chosen = part[..., None] if not volume.rgb else part
    out = np.empty(chosen.shape, dtype=np.float32)
    for c, (lo, hi) in enumerate(ranges):
        out[..., c] = np.clip((chosen[..., c] - lo) / max(hi - lo, 1e-6), 0, 1)
    return out if volume.rgb else out[..., 0]


def as_slices(image: np.ndarray, rgb: bool) -> np.ndarray:
    """``(n, y, x, c)``: 2D images become one slice, grey images one channel."""
    if not rgb:
        image = image[..., None]
    return image[None] if image.ndim == 3 else image


INTENSITY_VERSION = "intensity-1"  # bump when the filters below change meaning (stored heads record it)
PER_CHANNEL = 1 + len(SMOOTH) + 3 * len(EDGES)


def intensity_features(slices: np.ndarray, workers: Optional[int] = None, device=None) -> np.ndarray:
    """``(n, y, x, F)`` float32 filter responses of ``slices`` ``(n, y, x, c)``, ``F = 10 c``.

    device: a GPU (``"cuda"``) computes the same filters there (``_torch_filters``: equal to
    scipy's to float32 rounding); otherwise scipy on the CPU, where every published number was
    measured.

    workers: threads over blocks of slices (default: one per CPU core). Every filter works
    within a slice and scipy.ndimage releases the GIL, so blocks give the same numbers as one
    pass, and at 512x512 the filters are about a third of a preview's time on one core. Blocks of
    ``BLOCK`` slices written into one output also keep the peak memory near the output's own
    size (one pass over 300x512x512 would hold every filter response twice: 6 GB).
    """
    if device is not None and str(device).startswith("cuda"):
        return _torch_filters(slices, device)
    n, y, x, c = slices.shape
    out = np.empty((n, y, x, PER_CHANNEL * c), dtype=np.float32)

    def fill(start: int) -> None:
        out[start:start + BLOCK] = _filter_responses(slices[start:start + BLOCK])

    starts = range(0, n, BLOCK)
    workers = max(1, min(workers or os.cpu_count() or 1, len(starts)))
    if workers == 1:
        for start in starts:
            fill(start)
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(fill, starts))
    return out


BLOCK = 8  # slices per block of intensity_features
# Pixels beyond which no filter of intensity_features reaches (scipy truncates a Gaussian at 4
# sigma; the widest is sigma 4): inside a crop this far from its edge the responses are the
# whole slice's, bit for bit.
FILTER_REACH = int(4 * max(SMOOTH + EDGES) + 0.5) + 1


def window_features(slices: np.ndarray, window: tuple[int, int, int, int], device=None) -> np.ndarray:
    """``intensity_features`` of ``slices`` inside ``window`` ``(y0, y1, x0, x1)`` only.

    The crop is widened by ``FILTER_REACH`` (within the slice) before filtering and cut back
    after, so the values equal those of the whole slice (on a GPU, to float32 rounding): a
    preview of an organ in a 512x512 slice filters a few hundred pixels square instead of every
    pixel.
    """
    y0, y1, x0, x1 = window
    h, w = slices.shape[1:3]
    a0, a1 = max(0, y0 - FILTER_REACH), min(h, y1 + FILTER_REACH)
    b0, b1 = max(0, x0 - FILTER_REACH), min(w, x1 + FILTER_REACH)
    wide = intensity_features(np.ascontiguousarray(slices[:, a0:a1, b0:b1]), device=device)
    return wide[:, y0 - a0:y1 - a0, x0 - b0:x1 - b0]


def _filter_responses(slices: np.ndarray) -> np.ndarray:
    """``intensity_features`` of one block of slices, in this thread.

    Kept float32: rounding to float16 (relative error 5e-4) costs the real-CT "appearance
    alone" variant several points of Dice, so the head is not robust to it.
    """
    out = []
    for c in range(slices.shape[-1]):
        image = slices[..., c]
        out.append(image)
        for s in SMOOTH:
            out.append(ndi.gaussian_filter(image, (0, s, s)))
        for s in EDGES:
            out.append(ndi.gaussian_gradient_magnitude(image, (0, s, s)))
            hyy = ndi.gaussian_filter(image, (0, s, s), order=(0, 2, 0))
            hxx = ndi.gaussian_filter(image, (0, s, s), order=(0, 0, 2))
            hxy = ndi.gaussian_filter(image, (0, s, s), order=(0, 1, 1))
            half_trace, root = (hxx + hyy) / 2, np.sqrt(((hxx - hyy) / 2) ** 2 + hxy ** 2)
            out += [(half_trace + root) * s * s, (half_trace - root) * s * s]  # scale-normalised
    return np.stack(out, axis=-1).astype(np.float32)


def _torch_filters(slices: np.ndarray, device, block: int = 32) -> np.ndarray:
    """``_filter_responses`` computed with torch on ``device``, ``block`` slices at a time.

    Written by hand because neither torch nor MONAI has scipy's filters with its edge handling
    (``mode="reflect"``, repeated for kernels wider than the slice) and its quirk that a
    gradient magnitude with sigma 0 along axis 0 counts the smoothed image itself as that axis's
    derivative. The kernels are scipy's own (its response to an impulse), so the responses
    differ from scipy's by float32 rounding only, and the GPU spares the CPU tens of ms a slice.
    """
    import torch

    n, y, x, c = slices.shape
    out = np.empty((n, y, x, PER_CHANNEL * c), dtype=np.float32)
    kernels = {(s, order): torch.as_tensor(_scipy_kernel(s, order), device=device)
               for s in set(SMOOTH + EDGES) for order in (0, 1, 2)}

    with torch.no_grad():
        for start in range(0, n, block):
            part = torch.as_tensor(np.ascontiguousarray(slices[start:start + block]), device=device)
            responses = []
            for ch in range(c):
                image = part[..., ch].unsqueeze(1).float()  # (b, 1, y, x)
                done = {}  # each pass along y (and each whole filter) once: 3 y-passes serve 6 filters a sigma

                def along(sigma, order_y, order_x):
                    if (sigma, order_y) not in done:
                        done[(sigma, order_y)] = correlate_along(image, kernels[(sigma, order_y)], 2)
                    if (sigma, order_y, order_x) not in done:
                        done[(sigma, order_y, order_x)] = correlate_along(done[(sigma, order_y)],
                                                                          kernels[(sigma, order_x)], 3)
                    return done[(sigma, order_y, order_x)]

                responses.append(image)
                responses += [along(s, 0, 0) for s in SMOOTH]
                for s in EDGES:
                    smooth, dy, dx = along(s, 0, 0), along(s, 1, 0), along(s, 0, 1)
                    responses.append(torch.sqrt(smooth ** 2 + dy ** 2 + dx ** 2))
                    hyy, hxx, hxy = along(s, 2, 0), along(s, 0, 2), along(s, 1, 1)
                    half_trace, root = (hxx + hyy) / 2, torch.sqrt(((hxx - hyy) / 2) ** 2 + hxy ** 2)
                    responses += [(half_trace + root) * s * s, (half_trace - root) * s * s]
            out[start:start + block] = torch.cat(responses, 1).permute(0, 2, 3, 1).cpu().numpy()
    return out


def correlate_along(image, kernel, axis: int):
    """``image`` ``(b, 1, y, x)`` (a tensor) correlated with the 1D ``kernel`` along ``axis`` (2: y,
    3: x), its edges reflected as scipy's ``mode="reflect"`` does: with ``_scipy_kernel``, one pass
    of scipy's ``gaussian_filter1d`` on the tensor's device."""
    import torch

    padded = image.index_select(axis, _reflect_index(image.shape[axis], (len(kernel) - 1) // 2, image.device))
    shape = (1, 1, -1, 1) if axis == 2 else (1, 1, 1, -1)
    return torch.nn.functional.conv2d(padded, kernel.view(shape))


def _scipy_kernel(sigma: float, order: int) -> np.ndarray:
    """The correlation kernel scipy's ``gaussian_filter1d`` applies (truncated at 4 sigma), float32."""
    radius = int(4.0 * sigma + 0.5)
    impulse = np.zeros(2 * radius + 1)
    impulse[radius] = 1.0
    response = ndi.gaussian_filter1d(impulse, sigma, order=order, mode="constant")
    return np.ascontiguousarray(response[::-1], dtype=np.float32)


def _reflect_index(size: int, radius: int, device):
    """Indices that pad an axis of ``size`` by ``radius`` as scipy's ``mode="reflect"`` does (d c b a | a b c d)."""
    import torch

    i = torch.arange(-radius, size + radius, device=device) % (2 * size)
    return torch.where(i < size, i, 2 * size - 1 - i)


def dino_reduced(volume: Volume, backbone, device: Optional[str], progress=None, cancel=None,
                 basis: Optional[tuple[np.ndarray, np.ndarray]] = None):
    """``(reduced (n, 16, h, w) float32, basis)``: DINO patch features in PCA coordinates.

    The PCA basis of the first image is passed on to the others (examples and target) so the
    head reads every image in the same coordinates.
    """
    from ...engine.embeddings import slice_features

    feats = slice_features(volume, backbone, device=device, progress=progress, cancel=cancel)
    grid = feats.features.astype(np.float32)  # (n, C, h, w)
    flat = grid.transpose(0, 2, 3, 1).reshape(-1, grid.shape[1])
    if basis is None:
        mean = flat.mean(0)
        _, _, vt = np.linalg.svd(flat[:: max(1, len(flat) // 20000)] - mean, full_matrices=False)
        basis = (mean, vt[:DINO_COMPONENTS].T.copy())
    mean, components = basis
    reduced = ((flat - mean) @ components).reshape(grid.shape[0], grid.shape[2], grid.shape[3], -1)
    return np.ascontiguousarray(reduced.transpose(0, 3, 1, 2), dtype=np.float32), basis


def dino_pixels(reduced: np.ndarray, image_shape: tuple[int, int], backbone) -> np.ndarray:
    """``(n, y, x, 16)`` float32: reduced patch features upsampled bilinearly to the slices' pixels."""
    import torch

    from ...engine.embeddings import EmbeddingConfig, FeatureVolume, resized_shape

    size = resized_shape(tuple(image_shape), EmbeddingConfig().short_side)
    small = FeatureVolume(reduced, tuple(image_shape), size, int(backbone.patch_size))
    with torch.no_grad():
        pixels = np.stack([small.at_pixels(i).numpy().transpose(1, 2, 0) for i in range(small.n_slices)])
    return pixels.astype(np.float32)


def load_backbone(model):
    """The DINO backbone for ``model`` (id, checkpoint path or Backbone); ``None`` for no DINO."""
    if model is None:
        return None
    if hasattr(model, "features") and hasattr(model, "patch_size"):
        return model
    from ...models.dino import load_backbone as load

    return load(model)
