"""Per-slice DINO features of a volume, computed once and cached on disk in zarr.

Prompting a volume reads the same features again each time the user paints one more slice, so
(as micro-sam does for SAM embeddings) they are stored under a key that changes when the pixels,
the model or the preprocessing change::

    $MEDVISION_HOME/cache/embeddings/<key>.zarr      one chunk per slice, float16

Stores are written and verified by :mod:`napari_medvision.engine.cache`.

    feats = slice_features(volume, backbone)     # FeatureVolume
    feats.features.shape                         # (n_slices, C, h, w) float16
    feats.at_pixels(12).shape                    # (C, H, W) float32, on slice 12's pixel grid
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..volume import Volume
from .cache import CACHE_FORMAT, cache_dir, content_hash, read_arrays, wait_for_write, write_arrays_later
from .device import resolve_device
from .progress import CancelToken, ProgressFn, check, report



@dataclass(frozen=True)
class EmbeddingConfig:
    """How slices are prepared for the backbone; part of the cache key.

    short_side: pixels of the slice's shorter side after resizing (DINO sees detail at ~14-16 px
    per patch, so small slices are enlarged and large ones reduced to a steady token count).
    low/high: percentiles mapped to 0 and 1 over the whole volume (RGB images: divided by 255).
    """

    short_side: int = 448
    low: float = 0.5
    high: float = 99.5


@dataclass
class FeatureVolume:
    """Patch features of every slice and how they sit on the slice's pixel grid.

    features: ``(n_slices, C, h, w)`` float16 (a 2D image has one slice).
    image_shape: ``(H, W)`` pixels of one original slice.
    resized_shape: ``(H', W')`` the slice was resized to before the backbone (padded to ``h*p, w*p``).
    patch_size: backbone patch size ``p`` in resized pixels.
    """

    features: np.ndarray
    image_shape: tuple[int, int]
    resized_shape: tuple[int, int]
    patch_size: int
    key: str = ""
    from_cache: bool = False
    config: EmbeddingConfig = field(default_factory=EmbeddingConfig)

    @property
    def n_slices(self) -> int:
        return int(self.features.shape[0])

    @property
    def patch_grid(self) -> tuple[int, int]:
        return int(self.features.shape[2]), int(self.features.shape[3])

    @property
    def channels(self) -> int:
        return int(self.features.shape[1])

    def _grid(self, ys: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel-centre coordinates mapped into grid_sample's [-1, 1] over the padded patch grid."""
        (H, W), (rh, rw), (h, w) = self.image_shape, self.resized_shape, self.patch_grid
        p = self.patch_size
        gy = 2 * (ys + 0.5) * (rh / H) / (h * p) - 1
        gx = 2 * (xs + 0.5) * (rw / W) / (w * p) - 1
        return gy, gx

    def slice_tensor(self, slice_index: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """Features of one slice ``(C, h, w)`` as float32 on ``device``."""
        return torch.from_numpy(np.asarray(self.features[slice_index])).to(device, torch.float32)

    def at_pixels(self, slice_index: int, device: str | torch.device = "cpu") -> torch.Tensor:
        """Features of slice ``slice_index`` bilinearly upsampled to its pixels: ``(C, H, W)`` float32."""
        H, W = self.image_shape
        grid_features = self.slice_tensor(slice_index, device)[None]
        gy, gx = self._grid(torch.arange(H, device=device, dtype=torch.float32),
                            torch.arange(W, device=device, dtype=torch.float32))
        grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), dim=-1)[None]
        return F.grid_sample(grid_features, grid, mode="bilinear", padding_mode="border", align_corners=False)[0]

    def at_points(self, slice_index: int, points: np.ndarray | torch.Tensor,
                  device: str | torch.device = "cpu") -> torch.Tensor:
        """Features at pixel positions ``points`` ``(N, 2)`` as ``(y, x)`` of one slice: ``(N, C)``.

        Cheaper than :meth:`at_pixels` when only the annotated pixels are needed.
        """
        pts = torch.as_tensor(np.asarray(points), dtype=torch.float32, device=device).reshape(-1, 2)
        gy, gx = self._grid(pts[:, 0], pts[:, 1])
        grid = torch.stack([gx, gy], dim=-1)[None, None]
        grid_features = self.slice_tensor(slice_index, device)[None]
        out = F.grid_sample(grid_features, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out[0, :, 0].T


# --- preparing slices ------------------------------------------------------------------------

def _as_slices(volume: Any) -> tuple[Any, bool]:
    """``(array (n, H, W[, 3]), rgb)`` from a Volume or array; 2D images become one slice."""
    rgb = bool(volume.rgb) if isinstance(volume, Volume) else False
    data = volume.data if isinstance(volume, Volume) else volume  # numpy's own .data is a buffer
    if not hasattr(data, "shape"):
        data = np.asarray(data)
    spatial = data.ndim - (1 if rgb else 0)
    if spatial == 2:
        data = data[None]
    elif spatial != 3:
        raise ValueError(f"features need a 2D image or a 3D volume, got {data.ndim} axes "
                         f"(shape {tuple(data.shape)}); pick one time point of a series first")
    return data, rgb


def _intensity_range(data: Any, rgb: bool, config: EmbeddingConfig) -> tuple[float, float]:
    """The volume-wide values mapped to 0 and 1 (percentiles on a regular subsample)."""
    if rgb:
        return 0.0, 255.0
    sample = np.asarray(data[:: max(1, math.ceil(data.shape[0] / 64))]).reshape(-1)  # <= 64 slices
    flat = sample[:: max(1, math.ceil(sample.size / (1 << 22)))]  # ~4 M voxels estimate 0.5 % well
    lo, hi = np.percentile(flat.astype(np.float32), [config.low, config.high])
    return float(lo), float(hi)


def resized_shape(image_shape: tuple[int, int], short_side: int) -> tuple[int, int]:
    """``(H', W')`` with the shorter side at ``short_side`` and the aspect ratio kept."""
    H, W = image_shape
    scale = short_side / min(H, W)
    return max(1, round(H * scale)), max(1, round(W * scale))


def _prepare(block: np.ndarray, rgb: bool, lo: float, hi: float, size: tuple[int, int],
             device: str | torch.device = "cpu") -> torch.Tensor:
    """Slices ``(b, H, W[, 3])`` as ``(b, 1 or 3, H', W')`` float32 in [0, 1] on ``device``.

    The raw slices travel in their own dtype and are scaled and resized there: done on the CPU,
    scaling and the antialiased resize to 448 px are about a fifth of what embedding costs
    outside the network.
    """
    x = torch.from_numpy(np.ascontiguousarray(block)).to(device, non_blocking=True).to(torch.float32)
    x = x.permute(0, 3, 1, 2) if rgb else x[:, None]
    x = ((x - lo) / max(hi - lo, 1e-6)).clamp_(0, 1)
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True).clamp_(0, 1)
    return x


# --- cache keys ---------------------------------------------------------------------------

def cache_key(data_hash: str, backbone_checksum: str, config: EmbeddingConfig) -> str:
    text = json.dumps([CACHE_FORMAT, data_hash, backbone_checksum, asdict(config)], sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def _read_cache(path: Path, expect: dict[str, Any]) -> Optional[np.ndarray]:
    """The cached features if the store is complete and intact, else ``None`` (and it is removed)."""
    wait_for_write(path)
    arrays = read_arrays(path, expect["key"], {"features": (expect["shape"], "float16")})
    return None if arrays is None else arrays["features"]


def _write_cache(path: Path, features: np.ndarray, key: str) -> None:
    """Store ``features`` in the background (not to be changed afterwards: the write may still be reading them)."""
    write_arrays_later(path, key, {"features": features})


# --- public ----------------------------------------------------------------------------------

def slice_features(volume: Any, backbone, device: str | None = None, batch_size: int = 8, cache: bool = True,
                   progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
                   config: EmbeddingConfig | None = None) -> FeatureVolume:
    """Backbone features of every slice (axis 0) of ``volume``; read from the cache when present.

    volume: a Volume or array, ``(z, y, x)``, ``(y, x)`` or RGB ``(y, x, 3)``.
    backbone: a :class:`napari_medvision.models.dino.Backbone` (anything with ``features``,
    ``patch_size``, ``embed_dim`` and ``checksum``).
    cache: read and write ``$MEDVISION_HOME/cache/embeddings``; ``False`` always computes.
    """
    config = config or EmbeddingConfig()
    data, rgb = _as_slices(volume)
    n, H, W = (int(s) for s in data.shape[:3])
    size = resized_shape((H, W), config.short_side)
    p = int(backbone.patch_size)
    grid = (math.ceil(size[0] / p), math.ceil(size[1] / p))
    shape = [n, int(backbone.embed_dim), grid[0], grid[1]]

    key, path = "", None
    if cache:
        key = cache_key(content_hash(data, rgb), backbone.checksum, config)
        path = cache_dir() / f"{key}.zarr"
        cached = _read_cache(path, {"shape": shape, "key": key})
        if cached is not None:
            report(progress, n, n, "features read from cache")
            return FeatureVolume(cached, (H, W), size, p, key, True, config)

    device = resolve_device(device)
    backbone.to(device)
    lo, hi = _intensity_range(data, rgb, config)
    # On a GPU the batches stay there and come to the host in one copy at the end: a copy per
    # batch makes the host wait for every batch before it can queue the next one.
    on_host = torch.device(device).type == "cpu"
    features = np.empty(shape, dtype=np.float16) if on_host else None
    batches = []
    report(progress, 0, n, "computing image features")
    for start in range(0, n, batch_size):
        check(cancel)
        stop = min(n, start + batch_size)
        images = _prepare(np.asarray(data[start:stop]), rgb, lo, hi, size, device)
        out = backbone.features(images).to(torch.float16)
        if on_host:
            features[start:stop] = out.numpy()
        else:
            batches.append(out)
        report(progress, stop, n, "computing image features")
    if not on_host:
        features = torch.cat(batches).cpu().numpy()
        del batches
    if cache and path is not None:
        _write_cache(path, features, key)
    return FeatureVolume(features, (H, W), size, p, key, False, config)
