"""Running an in-context generator (MVG) over whole slices and volumes.

The model sees fixed-size tiles. A slice is cut into overlapping tiles; each query tile is paired
with the prompt tile at the same relative place in the example (same anatomy where the example is
of the same kind), the tiles of many slices run in batches, and overlapping outputs are blended
with MONAI's Gaussian importance map. Images travel in a "unit" space (``UnitScale``) so that CT in
HU, MR in scanner units and label maps share one range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
from scipy import ndimage as ndi

from .progress import CancelToken, ProgressFn, check, report

CT_WINDOW = (-1000.0, 1000.0)  # HU mapped onto [0, 1]: air to dense bone, the same for every CT
PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class UnitScale:
    """Maps an image's values onto the model's [0, 1] range and back (``low`` -> 0, ``high`` -> 1).

    levels: for label maps, the label ids drawn as evenly spaced grey levels (id k at k / max id).
    """

    low: float
    high: float
    kind: str = "percentile"
    levels: tuple[int, ...] | None = None

    def to_unit(self, values: np.ndarray) -> np.ndarray:
        return ((np.asarray(values, dtype=np.float32) - self.low) / max(self.high - self.low, 1e-6)).astype(np.float32)

    def from_unit(self, unit: np.ndarray) -> np.ndarray:
        return (np.asarray(unit, dtype=np.float32) * (self.high - self.low) + self.low).astype(np.float32)

    def decode_labels(self, unit: np.ndarray) -> np.ndarray:
        """Label ids from generated grey levels: each pixel takes the nearest level of the example's ids."""
        levels = np.asarray(self.levels if self.levels else (0, 1), dtype=np.float32)
        values = self.from_unit(unit)
        nearest = np.abs(values[..., None] - levels).argmin(-1)
        return levels.astype(np.int32)[nearest]

    def same_units_as(self, other: "UnitScale") -> bool:
        """Whether two images share units (CT with CT, or an image and its denoised/inpainted self)."""
        if self.levels is not None or other.levels is not None:
            return False
        if self.kind == "window" and other.kind == "window":
            return True
        span = max(abs(self.high - self.low), 1e-6)
        return abs(self.low - other.low) + abs(self.high - other.high) < 0.1 * span


def unit_scale(values: np.ndarray, modality: str = "", is_labels: bool = False) -> UnitScale:
    """The ``UnitScale`` of an image: CT by a fixed HU window, labels by their ids, others by percentiles."""
    values = np.asarray(values)
    if is_labels:
        ids = tuple(int(v) for v in np.unique(values))
        top = max(max(ids), 1)
        return UnitScale(0.0, float(top), kind="labels", levels=tuple(sorted(set(ids) | {0})))
    if modality.upper() == "CT":
        return UnitScale(*CT_WINDOW, kind="window")
    finite = values[np.isfinite(values)] if values.dtype.kind == "f" else values.ravel()
    if finite.size == 0:
        return UnitScale(0.0, 1.0)
    low, high = np.percentile(finite, PERCENTILES)
    return UnitScale(float(low), float(high) if high > low else float(low) + 1.0)


def greyscale(values: np.ndarray, rgb: bool) -> np.ndarray:
    """One channel of an image: the green channel of a colour photo (where retinal vessels show best)."""
    return np.asarray(values[..., 1] if rgb else values, dtype=np.float32)


def resize_slice(image: np.ndarray, shape: Sequence[int], order: int = 1) -> np.ndarray:
    """A 2D array resampled onto ``shape`` (linear for images, nearest for labels)."""
    if tuple(image.shape) == tuple(shape):
        return image
    factors = [s / max(d, 1) for s, d in zip(shape, image.shape)]
    out = ndi.zoom(image, factors, order=order, mode="nearest", grid_mode=True)
    return out[: shape[0], : shape[1]] if out.shape != tuple(shape) else out


def tile_starts(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of tiles of ``tile`` pixels covering ``length`` with at least ``overlap`` shared."""
    if length <= tile:
        return [0]
    stride = max(1, int(tile * (1.0 - overlap)))
    count = math.ceil((length - tile) / stride) + 1
    return sorted({round(i * (length - tile) / (count - 1)) for i in range(count)})


def _pad_to(image: np.ndarray, tile: int) -> np.ndarray:
    pad = [(0, max(0, tile - s)) for s in image.shape]
    return np.pad(image, pad, mode="reflect" if all(s > 1 for s in image.shape) else "edge") if any(p[1] for p in pad) else image


def _prompt_tile(image: np.ndarray, start: tuple[int, int], query_shape: tuple[int, int], tile: int) -> np.ndarray:
    """The tile of a (padded) prompt image at the same relative place as the query tile at ``start``."""
    out = []
    for s, q, p in zip(start, query_shape, image.shape):
        centre = (s + tile / 2) / max(q, 1) * p
        out.append(int(np.clip(round(centre - tile / 2), 0, max(p - tile, 0))))
    return image[out[0]: out[0] + tile, out[1]: out[1] + tile]


PromptFor = Callable[[int], tuple[np.ndarray, np.ndarray]]


def generate_slices(network, queries: Sequence[np.ndarray], prompt_for: PromptFor, device: str = "cpu",
                    overlap: float = 0.5, batch_size: int = 16, steps: int = 1,
                    progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None) -> list[np.ndarray]:
    """Generated unit-space outputs, one per query slice (same shape as the slice).

    queries: 2D unit-space slices; prompt_for(i): the (image, target) unit-space prompt pair for
    slice i, at the pixel spacing the task should see (``tasks.synthesize`` brings the query to the
    example's, except for pairs in one unit space). Tiles of all slices share batches.
    """
    import torch
    from monai.data.utils import compute_importance_map

    tile = network.tile
    weight = compute_importance_map((tile, tile), mode="gaussian", sigma_scale=0.25).numpy().astype(np.float32)
    jobs = []  # (slice index, start, query tile, prompt image tile, prompt target tile)
    padded_shapes = []
    for i, query in enumerate(queries):
        padded = _pad_to(query, tile)
        padded_shapes.append(padded.shape)
        prompt_image, prompt_target = (_pad_to(a, tile) for a in prompt_for(i))
        for y in tile_starts(padded.shape[0], tile, overlap):
            for x in tile_starts(padded.shape[1], tile, overlap):
                jobs.append((i, (y, x), padded[y:y + tile, x:x + tile],
                             _prompt_tile(prompt_image, (y, x), padded.shape, tile),
                             _prompt_tile(prompt_target, (y, x), padded.shape, tile)))
    sums = [np.zeros(s, np.float32) for s in padded_shapes]
    norms = [np.zeros(s, np.float32) for s in padded_shapes]
    total = len(jobs)
    network.eval()
    for begin in range(0, total, batch_size):
        check(cancel)
        batch = jobs[begin: begin + batch_size]

        def stack(k):
            return torch.from_numpy(np.stack([job[k] for job in batch])[:, None]).to(device)

        with torch.inference_mode():
            out = network.generate(stack(3), stack(4), stack(2), steps=steps).float().cpu().numpy()[:, 0]
        for (i, (y, x), *_), tile_out in zip(batch, out):
            sums[i][y:y + tile, x:x + tile] += tile_out * weight
            norms[i][y:y + tile, x:x + tile] += weight
        report(progress, min(begin + batch_size, total), total, "generating tiles")
    return [(s / np.maximum(n, 1e-6))[: q.shape[0], : q.shape[1]] for s, n, q in zip(sums, norms, queries)]


def smooth_along_slices(stack: np.ndarray, sigma: float = 0.7) -> np.ndarray:
    """``stack`` (z, y, x) with a Gaussian of ``sigma`` slices along z: slice-wise generation decides each
    slice alone, so its errors flicker from slice to slice; a short filter along z removes the flicker
    and keeps in-plane detail (a 2D model has no other view of the third axis)."""
    if stack.shape[0] < 2 or sigma <= 0:
        return stack
    return ndi.gaussian_filter1d(stack, sigma=sigma, axis=0, mode="nearest")
