"""Brain MR contrast synthesis by a model fitted on real co-registered pairs (T1, T2, FLAIR).

The named tasks ``t1-to-t2``, ``t2-to-t1``, ``t1-to-flair``, ... run a small per-voxel network
(``models.contrast_mlp``) over multi-scale features of the input: its intensity, its quantile
within the brain, Gaussian means and spreads at 1-8 mm, the share of brain around the voxel
(cortex and CSF near the surface), gradient and Laplacian. The weights were fitted on three
real brains (``recipes/mr_contrast.py``, metrics leave-one-subject-out in each card); a user's
own pair (``mv.synthesize(..., examples=)``) still goes to the in-context generator (MVG).
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage as ndi

from ..engine.progress import CancelToken, ProgressFn, check, report
from ..engine.synthesis import greyscale
from ..models.card import ModelCard
from ..models.registry import load_model
from ..volume import Volume

MODEL_TASK = "mr-contrast"  # the ``task`` of these models' cards
SIGMAS_MM = (1.0, 2.0, 4.0, 8.0)
SPREAD_SIGMAS_MM = (1.0, 2.0, 4.0)
EDGE_SIGMAS_MM = (1.0, 2.0)
COARSE_FROM_MM = 4.0  # features at and above this scale are computed on a 2x coarser grid
N_FEATURES = 2 + 3 * len(SIGMAS_MM) + len(SPREAD_SIGMAS_MM) + 2 * len(EDGE_SIGMAS_MM)
OUTPUT_SCALE = 1000.0  # output units: 1000 = the 99th percentile of the synthesized brain
BACKGROUND_SHARE = 0.05  # a volume with this share of voxels at 0 (or its minimum) is skull-stripped


def model_id(source: str, target: str) -> str:
    """The shipped model's id for one contrast pair, e.g. ``mr-contrast-t1-to-t2``."""
    return f"mr-contrast-{source.lower()}-to-{target.lower()}"


def background_value(data: np.ndarray) -> float | None:
    """The constant that fills a skull-stripped scan's background (0 or the minimum), None if there is none."""
    for value in (0.0, float(data.min())):
        if np.count_nonzero(data == value) >= BACKGROUND_SHARE * data.size:
            return value
    return None


def brain_mask(data: np.ndarray) -> np.ndarray:
    """The voxels to synthesize: all but a skull-stripped scan's constant background (interpolation
    leaves some brain voxels below it), else all of them."""
    value = background_value(data)
    return data != value if value is not None else np.ones(data.shape, bool)


def normalised(data: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """``data`` with the background at 0 and the brain's 99th percentile at 1."""
    inside = data[brain]
    value = background_value(data)
    floor = value if value is not None else float(np.percentile(inside, 0.5))
    top = float(np.percentile(inside, 99))
    return ((data - floor) / max(top - floor, 1e-6)).astype(np.float32)


def _sigma(mm: float, spacing: Sequence[float]) -> list[float]:
    return [mm / float(s) for s in spacing]


def _coarse(volume: np.ndarray) -> np.ndarray:
    """``volume`` averaged over 2x2x2 blocks (odd edges padded by repetition)."""
    pad = [(0, s % 2) for s in volume.shape]
    even = np.pad(volume, pad, mode="edge") if any(p[1] for p in pad) else volume
    z, y, x = even.shape
    return even.reshape(z // 2, 2, y // 2, 2, x // 2, 2).mean(axis=(1, 3, 5))


def _fine(coarse: np.ndarray, points: np.ndarray) -> np.ndarray:
    """A coarse-grid volume read at fine voxel ``points`` (3, N) by linear interpolation."""
    return ndi.map_coordinates(coarse, (points + 0.5) / 2 - 0.5, order=1, mode="nearest")


def _crop(brain: np.ndarray) -> tuple[slice, ...]:
    """The brain's bounding box: outside it a skull-stripped scan is background (zero after ``normalised``)."""
    found = [np.nonzero(brain.any(axis=tuple(a for a in range(3) if a != axis)))[0] for axis in range(3)]
    return tuple(slice(int(f[0]), int(f[-1]) + 1) for f in found)


def _derivatives(smooth: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Gradient magnitude and Laplacian of an already smoothed volume by central differences.

    Hand-written rather than scipy's ``gaussian_gradient_magnitude``/``gaussian_laplace``: those
    smooth again for every axis, which tripled the time of a whole brain's features.
    """
    squared = np.zeros_like(smooth)
    laplacian = np.zeros_like(smooth)
    for axis, step in enumerate(spacing):
        if smooth.shape[axis] < 3:
            continue
        squared += np.gradient(smooth, step, axis=axis) ** 2
        padded = np.moveaxis(np.pad(smooth, [(1, 1) if a == axis else (0, 0) for a in range(3)], mode="edge"), axis, 0)
        laplacian += np.moveaxis((padded[2:] - 2 * padded[1:-1] + padded[:-2]) / step ** 2, 0, axis)
    return np.sqrt(squared), laplacian


def voxel_features(data: np.ndarray, spacing: Sequence[float], cancel: Optional[CancelToken] = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``(N, N_FEATURES)`` float32 features of the brain voxels of a (z, y, x) volume, and the brain mask.

    Scales are in millimetres, so anisotropic scans see the same anatomy; scales of 4 mm and
    more are computed on a 2x coarser grid (they change little within 2 voxels), and everything
    within the brain's bounding box, to keep a whole 240x240x155 brain within seconds. A single
    slice (z of 1) gets in-plane filters only.
    """
    data = np.asarray(data, dtype=np.float32)
    spacing = [float(s) for s in spacing]
    if data.shape[0] == 1:
        spacing[0] = 1e9  # no smoothing along an axis of one slice
    whole_brain = brain_mask(data)
    box = _crop(whole_brain)
    brain = whole_brain[box]
    unit = normalised(data, whole_brain)[box] * brain  # the background at exactly 0
    inside = unit[brain]
    grid = np.percentile(inside, np.linspace(0, 100, 257))
    columns = [inside, np.interp(inside, grid, np.linspace(0, 1, 257)).astype(np.float32)]
    share = brain.astype(np.float32)
    points = None
    coarse = {}
    edges = []
    for mm in SIGMAS_MM:
        check(cancel)
        if mm >= COARSE_FROM_MM and min(unit.shape) >= 8:
            if not coarse:
                coarse = {"unit": _coarse(unit), "square": _coarse(unit * unit), "share": _coarse(share)}
                points = np.stack(np.nonzero(brain)).astype(np.float32)
            sigma = _sigma(mm, [2 * s for s in spacing])
            smooth = {k: _fine(ndi.gaussian_filter(v, sigma, truncate=3.0, mode="constant"), points)
                      for k, v in coarse.items()}
        else:
            sigma = _sigma(mm, spacing)
            blurred = ndi.gaussian_filter(unit, sigma, truncate=3.0, mode="constant")
            smooth = {"unit": blurred[brain],
                      "share": ndi.gaussian_filter(share, sigma, truncate=3.0, mode="constant")[brain]}
            if mm in SPREAD_SIGMAS_MM:
                smooth["square"] = ndi.gaussian_filter(unit * unit, sigma, truncate=3.0, mode="constant")[brain]
            if mm in EDGE_SIGMAS_MM:
                edges += [d[brain] for d in _derivatives(blurred, spacing)]
        weight = np.maximum(smooth["share"], 1e-3)
        mean = smooth["unit"] / weight
        columns += [smooth["unit"], smooth["share"], mean]
        if mm in SPREAD_SIGMAS_MM:
            columns.append(np.sqrt(np.maximum(smooth["square"] / weight - mean * mean, 0.0)))
    return np.stack(columns + edges, axis=1).astype(np.float32), whole_brain


def target_values(target: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The target contrast inside ``brain`` in model units (its 99th percentile there = 1)."""
    return normalised(np.asarray(target, np.float32), brain)[brain]


def fit_contrast_model(pairs: Sequence[tuple[np.ndarray, np.ndarray, Sequence[float]]], samples: int = 150_000,
                       steps: int = 3000, hidden: int = 64, seed: int = 0, progress: Optional[ProgressFn] = None,
                       cancel: Optional[CancelToken] = None, features: Optional[Sequence[tuple]] = None):
    """A ``ContrastMLP`` fitted on co-registered ``(source, target, spacing)`` volumes, and its training log.

    ``samples`` brain voxels are drawn from each pair; Adam with a one-cycle learning rate and
    an L1 loss (robust to the tumours and vessels that no intensity model can predict).
    features: each source's ``voxel_features`` where already computed (a recipe fitting many models).
    """
    import torch

    from ..models.contrast_mlp import ContrastMLP

    rng = np.random.default_rng(seed)
    inputs, outputs = [], []
    for k, (source, target, spacing) in enumerate(pairs):
        columns, brain = features[k] if features is not None else voxel_features(source, spacing, cancel)
        values = target_values(target, brain)
        pick = rng.choice(len(values), min(samples, len(values)), replace=False)
        inputs.append(columns[pick])
        outputs.append(values[pick])
    x = torch.from_numpy(np.concatenate(inputs))
    y = torch.from_numpy(np.concatenate(outputs))
    torch.manual_seed(seed)
    network = ContrastMLP(x.shape[1], hidden=hidden)
    network.mean.copy_(x.mean(0))
    network.std.copy_(x.std(0) + 1e-6)
    optimiser = torch.optim.Adam(network.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    start, losses = time.perf_counter(), []
    for step in range(steps):
        batch = torch.randint(0, len(x), (1024,), generator=generator)
        loss = (network(x[batch]) - y[batch]).abs().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if (step + 1) % 250 == 0:
            check(cancel)
            report(progress, step + 1, steps, "fitting the contrast model")
    log = {"steps": steps, "samples": len(x), "wall_time_s": round(time.perf_counter() - start, 1),
           "final_loss": round(float(np.mean(losses[-100:])), 5)}
    return network.eval(), log


def predict(network, data: np.ndarray, spacing: Sequence[float], cancel: Optional[CancelToken] = None,
            chunk: int = 262_144, features: Optional[tuple] = None) -> np.ndarray:
    """The synthesized contrast of a (z, y, x) volume: 1 = its brain's 99th percentile, 0 outside the brain.

    features: the volume's ``voxel_features`` where already computed.
    """
    import torch

    features, brain = features if features is not None else voxel_features(data, spacing, cancel)
    values = np.empty(len(features), np.float32)
    with torch.inference_mode():
        for begin in range(0, len(features), chunk):
            check(cancel)
            values[begin: begin + chunk] = network(torch.from_numpy(features[begin: begin + chunk])).numpy()
    out = np.zeros(brain.shape, np.float32)
    out[brain] = np.maximum(values, 0.0)
    return out


def synthesize_contrast(volume: Volume, card: ModelCard, progress: Optional[ProgressFn] = None,
                        cancel: Optional[CancelToken] = None) -> Volume:
    """``volume`` in the card's target contrast, on its grid (``meta["model"]`` names the model)."""
    network, card = load_model(card, device="cpu")
    report(progress, 0, 2, "computing features")
    data = greyscale(np.asarray(volume.data), volume.rgb)
    spacing = tuple(volume.spacing[-data.ndim:])
    stack = data[None] if data.ndim == 2 else data
    out = predict(network, stack, (1.0, *spacing) if data.ndim == 2 else spacing, cancel) * OUTPUT_SCALE
    report(progress, 2, 2, "done")
    result = volume.with_data(out[0] if data.ndim == 2 else out, rgb=False, labels=None)
    result.meta.update(model=card.id, contrast=card.input.get("target", ""))
    return result
