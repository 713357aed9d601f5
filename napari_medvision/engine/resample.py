"""Moving images, labels and class probabilities between the input grid and a model's grid.

A model sees voxels of the spacing it was trained on. ``to_model_grid`` resamples a Volume onto
that spacing (images linearly, label maps by nearest neighbour) keeping the same field of view;
``to_input_grid`` brings a result back so that it lies voxel for voxel on the original grid.
Both use the pixel-area convention of ``torch.nn.functional.interpolate(align_corners=False)``
(voxel centres at ``(i + 0.5) * n_in / n_out - 0.5``), so the round trip is exact in geometry
and the effective model spacing is ``spacing * n_in / n_out``.

Written by hand (rather than one ``scipy.ndimage.zoom`` or ``interpolate`` call on the whole
volume) so that a 300x512x512 CT is processed in slabs along axis 0: only a few slices are ever
held in float32, never a float copy of the whole volume, and class probabilities are turned
into labels slab by slab without an (n_classes x input volume) array.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..volume import Volume

SLAB_BYTES = 32 << 20  # float32 working memory per slab (a few times this is live at once)


def grid_shape(shape: Sequence[int], spacing: Sequence[float], target: Sequence[float | None]) -> tuple[int, ...]:
    """Shape of the same field of view at ``target`` spacing (mm); ``None`` keeps an axis as it is."""
    return tuple(int(n) if t is None else max(1, int(round(n * s / float(t))))
                 for n, s, t in zip(shape, spacing, target))


def linear_indices(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(i0, i1, w)``: output ``k`` is ``(1 - w) * in[i0] + w * in[i1]``, as torch's linear modes."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, (src - i0).astype(np.float32)


def nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    """Source index of each output voxel for nearest-neighbour resampling (torch's 'nearest-exact')."""
    return np.minimum(np.floor((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


def _slab(data, lo: int, hi: int, device) -> torch.Tensor:
    """Rows ``lo:hi`` of axis 1 of a (C, Z, ...) numpy/dask/torch array as float32 on ``device``."""
    part = data[:, lo:hi]
    if not isinstance(part, torch.Tensor):
        part = torch.from_numpy(np.ascontiguousarray(np.asarray(part)))
    return part.to(device=device, dtype=torch.float32)


def _rows_per_slab(channels: int, plane: int) -> int:
    return max(1, SLAB_BYTES // (4 * max(1, channels * plane)))


def _resample_rows(rows: torch.Tensor, i0, i1, w, lo: int, out_plane: tuple[int, ...]) -> torch.Tensor:
    """Linear along axis 1 at the given indices, then (bi)linear over the remaining axes."""
    out = rows.index_select(1, torch.as_tensor(i0 - lo, device=rows.device))
    upper = rows.index_select(1, torch.as_tensor(i1 - lo, device=rows.device))
    out.lerp_(upper, torch.as_tensor(w, device=rows.device).view(1, -1, *([1] * (rows.ndim - 2))))
    del upper
    if tuple(out.shape[2:]) != tuple(out_plane):
        mode = "bilinear" if len(out_plane) == 2 else "linear"
        out = F.interpolate(out, size=tuple(out_plane), mode=mode, align_corners=False)
    return out


def resample_linear(data, out_shape: Sequence[int], device: str | torch.device = "cpu") -> torch.Tensor:
    """``data`` (C, *spatial), 2D or 3D, linearly resampled to ``(C, *out_shape)`` float32 on ``device``.

    Identical to ``F.interpolate(mode="bilinear"/"trilinear", align_corners=False)`` but done in
    slabs along the first spatial axis, so only the output is held in full.
    """
    out_shape = tuple(int(n) for n in out_shape)
    channels, n_in, plane = data.shape[0], data.shape[1], tuple(data.shape[2:])
    if len(plane) not in (1, 2) or len(out_shape) != len(plane) + 1:
        raise ValueError(f"resample_linear takes (C, y, x) or (C, z, y, x) data, got shape {tuple(data.shape)}")
    out = torch.empty((channels, *out_shape), dtype=torch.float32, device=device)
    i0, i1, w = linear_indices(n_in, out_shape[0])
    step = _rows_per_slab(channels, int(np.prod(plane)))
    for k0 in range(0, out_shape[0], step):
        k1 = min(k0 + step, out_shape[0])
        lo, hi = int(i0[k0]), int(i1[k1 - 1]) + 1
        rows = _slab(data, lo, hi, device)
        if len(plane) == 1:  # 2D image: the "plane" is a row; interpolate wants (N, C, L)
            rows = rows[:, :, None, :]
            out[:, k0:k1] = _resample_rows(rows, i0[k0:k1], i1[k0:k1], w[k0:k1], lo, (1, out_shape[1]))[:, :, 0]
        else:
            out[:, k0:k1] = _resample_rows(rows, i0[k0:k1], i1[k0:k1], w[k0:k1], lo, out_shape[1:])
    return out


def resample_nearest(labels, out_shape: Sequence[int]) -> np.ndarray:
    """A label map (spatial axes only) resampled by nearest neighbour; the dtype is kept."""
    out = np.asarray(labels)
    for axis, n_out in enumerate(out_shape):
        if out.shape[axis] != n_out:
            out = np.take(out, nearest_indices(out.shape[axis], int(n_out)), axis=axis)
    return np.ascontiguousarray(out)


def labels_from_probabilities(probs: torch.Tensor, out_shape: Sequence[int]) -> np.ndarray:
    """Argmax labels on ``out_shape`` from class probabilities ``(K, *model_shape)``.

    The probabilities are resampled linearly and the argmax taken afterwards (smoother borders
    than resampling labels), slab by slab on the tensor's device; uint8 up to 256 classes.
    """
    out_shape = tuple(int(n) for n in out_shape)
    n_classes, spatial = probs.shape[0], tuple(probs.shape[1:])
    dtype = np.uint8 if n_classes <= 256 else np.uint16
    labels = np.empty(out_shape, dtype=dtype)
    if len(spatial) == 2:
        probs = probs[:, None]
        out_rows = (1, *out_shape)
    else:
        out_rows = out_shape
    i0, i1, w = linear_indices(probs.shape[1], out_rows[0])
    step = _rows_per_slab(n_classes, int(np.prod(out_rows[1:])))
    flat = labels.reshape(out_rows)
    for k0 in range(0, out_rows[0], step):
        k1 = min(k0 + step, out_rows[0])
        lo, hi = int(i0[k0]), int(i1[k1 - 1]) + 1
        rows = probs[:, lo:hi].float()
        slab = _resample_rows(rows, i0[k0:k1], i1[k0:k1], w[k0:k1], lo, out_rows[1:])
        flat[k0:k1] = slab.argmax(0).to(torch.uint8 if dtype == np.uint8 else torch.int32).cpu().numpy()
    return labels


# --- Volume level -------------------------------------------------------------------------

def model_grid(volume: Volume, spacing: Sequence[float | None] | None) -> tuple[tuple[int, ...], tuple, tuple]:
    """``(shape, spacing, origin)`` of ``volume``'s field of view resampled to ``spacing`` (mm)."""
    shape = volume.spatial_shape
    if spacing is None:
        return shape, volume.spacing, volume.origin
    new_shape = grid_shape(shape, volume.spacing, spacing)
    scale = np.asarray(shape, float) / np.asarray(new_shape, float)
    new_spacing = np.asarray(volume.spacing) * scale
    shift = volume.direction @ (np.asarray(volume.spacing) * (0.5 * scale - 0.5))
    return new_shape, tuple(new_spacing), tuple(np.asarray(volume.origin) + shift)


def _channels_first(volume: Volume):
    data = volume.data
    if volume.n_leading:
        raise ValueError(f"{volume!r}: resample one time point of a series at a time")
    return np.moveaxis(data, -1, 0) if volume.rgb else data[None]


def to_model_grid(volume: Volume, spacing: Sequence[float | None] | None) -> Volume:
    """``volume`` resampled to ``spacing`` mm (images: linear, float32; labels: nearest, same dtype).

    ``None`` (or a ``None`` entry) keeps the input's spacing along that axis. The field of view
    and world position are unchanged; the effective spacing is adjusted to a whole voxel count.
    """
    shape, new_spacing, origin = model_grid(volume, spacing)
    if shape == volume.spatial_shape:
        data = volume.data if volume.is_labels else np.asarray(volume.data, dtype=np.float32)
    elif volume.is_labels:
        data = resample_nearest(volume.data, shape)
    else:
        data = resample_linear(_channels_first(volume), shape).numpy()
        data = np.moveaxis(data, 0, -1) if volume.rgb else data[0]
    return volume.with_data(data, spacing=new_spacing, origin=origin)


def to_input_grid(result: Volume, reference: Volume) -> Volume:
    """``result`` (on a model grid) brought back onto ``reference``'s grid: same shape and geometry.

    Label maps by nearest neighbour, images linearly.
    """
    shape = reference.spatial_shape
    if result.spatial_shape == shape:
        data = result.data
    elif result.is_labels:
        data = resample_nearest(result.data, shape)
    else:
        data = resample_linear(_channels_first(result), shape).numpy()
        data = np.moveaxis(data, 0, -1) if result.rgb else data[0]
    return result.with_data(data, spacing=reference.spacing, origin=reference.origin,
                            direction=reference.direction)
