"""Intensity normalisation named by a model card's ``input.normalisation``.

Training and inference must prepare images identically, so both call :func:`normalise` with the
card's entry. Every function takes a numpy array or torch tensor and returns a float32 tensor
(a new one unless ``inplace``). Statistics are computed in float32 by torch, so a 300x512x512
CT never gets a float64 copy.

    {"kind": "ct_window", "low": -200, "high": 300}   HU clipped to [low, high], scaled to [0, 1]
    {"kind": "zscore"}                                  (x - mean) / std over the whole image
    {"kind": "percentile", "low": 0.5, "high": 99.5}    clipped to those percentiles, scaled to [0, 1]
    {"kind": "rgb_unit"}                                uint8 colour / 255 -> [0, 1]
    {"kind": "channel_zscore", "mask_above": 20}        each channel to zero mean, unit std over the
                                                        pixels whose channel mean exceeds mask_above
    {"kind": "none"}                                    float32, unchanged
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

# torch.quantile refuses inputs above 2**24 elements; larger images use a regular subsample
# (every k-th voxel), which moves a 0.5 % percentile by far less than the HU noise.
_QUANTILE_MAX = 1 << 24


def _as_float(image, inplace: bool = False) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        if inplace and image.dtype == torch.float32:
            return image
        return image.to(torch.float32, copy=True)
    return torch.from_numpy(np.array(image, dtype=np.float32, copy=True))


def ct_window(image, low: float, high: float, inplace: bool = False) -> torch.Tensor:
    """Hounsfield units clipped to ``[low, high]`` and mapped linearly onto ``[0, 1]``."""
    if not high > low:
        raise ValueError(f"CT window needs high > low, got low={low}, high={high}")
    out = _as_float(image, inplace).clamp_(low, high)
    return out.sub_(low).div_(high - low)


def zscore(image, eps: float = 1e-6, inplace: bool = False) -> torch.Tensor:
    """Zero mean, unit standard deviation over the whole image (MR: arbitrary units)."""
    out = _as_float(image, inplace)
    std, mean = torch.std_mean(out)
    return out.sub_(mean).div_(max(float(std), eps))


def percentile(image, low: float = 0.5, high: float = 99.5, inplace: bool = False) -> torch.Tensor:
    """Clipped to the ``low``/``high`` percentiles and mapped onto ``[0, 1]`` (robust to hot pixels)."""
    if not 0 <= low < high <= 100:
        raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {low}, {high}")
    out = _as_float(image, inplace)
    flat = out.reshape(-1)
    if flat.numel() > _QUANTILE_MAX:
        flat = flat[:: -(-flat.numel() // _QUANTILE_MAX)]
    lo, hi = torch.quantile(flat, torch.tensor([low / 100, high / 100], device=flat.device)).tolist()
    out.clamp_(lo, hi).sub_(lo)
    return out.div_(hi - lo) if hi > lo else out


def channel_zscore(image, mask_above: float | None = None, eps: float = 1e-6,
                   inplace: bool = False) -> torch.Tensor:
    """Each channel of ``(C, *spatial)`` to zero mean and unit std, measured where the mean over
    channels exceeds ``mask_above`` (a fundus photo's field of view, not its black surround), so
    photos from brighter or darker cameras, or with a larger black border, look alike."""
    out = _as_float(image, inplace)
    flat = out.reshape(out.shape[0], -1)
    inside = flat.mean(0) > mask_above if mask_above is not None else None
    if inside is not None and int(inside.sum()) < 2:
        inside = None  # an all-dark image: fall back to every pixel rather than divide by nothing
    values = flat[:, inside] if inside is not None else flat
    std, mean = torch.std_mean(values, dim=1)
    shape = (-1,) + (1,) * (out.ndim - 1)
    return out.sub_(mean.view(shape)).div_(std.clamp(min=eps).view(shape))


def rgb_unit(image, inplace: bool = False) -> torch.Tensor:
    """8-bit colour mapped onto ``[0, 1]``."""
    return _as_float(image, inplace).div_(255.0)


def normalise(image, spec: dict[str, Any] | None, inplace: bool = False) -> torch.Tensor:
    """``image`` normalised as a model card's ``input.normalisation`` entry says (``None``: unchanged).

    inplace: reuse ``image`` when it already is a float32 tensor (saves a volume-sized copy).
    """
    kind = (spec or {}).get("kind", "none")
    if kind == "ct_window":
        return ct_window(image, float(spec["low"]), float(spec["high"]), inplace)
    if kind == "zscore":
        return zscore(image, inplace=inplace)
    if kind == "percentile":
        return percentile(image, float(spec.get("low", 0.5)), float(spec.get("high", 99.5)), inplace)
    if kind == "rgb_unit":
        return rgb_unit(image, inplace)
    if kind == "channel_zscore":
        mask_above = spec.get("mask_above")
        return channel_zscore(image, None if mask_above is None else float(mask_above), inplace=inplace)
    if kind == "none":
        return _as_float(image, inplace)
    raise ValueError(f"unknown normalisation {kind!r}; known: ct_window, zscore, percentile, rgb_unit, channel_zscore, none")
