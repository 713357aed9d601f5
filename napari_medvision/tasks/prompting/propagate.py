"""Carry annotated slices to their neighbours along axis 0 by slice-to-slice deformable registration.

Between two neighbouring slices an organ moves and changes shape a little; a demons registration
(SimpleITK's fast symmetric forces; on a GPU the same algorithm in torch, ``_demons``) of slice z
onto slice z+1 follows that, so a mask warped step
by step stays on the organ far longer than a copied one (on a real CT liver, 14 slices away,
clearly better Dice than a copy). Between two annotated slices the two propagations are blended with
weights falling linearly with distance; beyond the outermost annotated slice the mask is carried
on, checked at each step by the appearance head, until the structure vanishes.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage as ndi

from ...engine.progress import CancelToken, ProgressFn, check, report
from .refine import combine


ITERATIONS, SMOOTHING = 25, 1.5


def demons_backend(device=None) -> str:
    """Who computes the fields: ``"torch"`` (``_demons``, every slice pair at once) on a GPU or where
    SimpleITK is not installed, ``"simpleitk"`` on a CPU, where every published number was measured."""
    if device is not None and str(device).startswith("cuda"):
        return "torch"
    try:
        import SimpleITK  # noqa: F401
    except ImportError:
        return "torch"
    return "simpleitk"


def demons_key(backend: Optional[str] = None) -> dict:
    """What the fields depend on besides the pixels: the prompt cache's key for them."""
    backend = backend or demons_backend()
    # Bump "version" when slice_displacements changes meaning.
    if backend == "torch":
        return {"version": "demons-torch-1", "iterations": ITERATIONS, "smoothing": SMOOTHING}
    import SimpleITK as sitk

    return {"version": "demons-1", "iterations": ITERATIONS, "smoothing": SMOOTHING,
            "simpleitk": sitk.Version_VersionString()}


def slice_displacements(image: np.ndarray, iterations: int = ITERATIONS, smoothing: float = SMOOTHING,
                        progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
                        step: tuple[int, int] = (0, 1), device=None, backend: Optional[str] = None) -> np.ndarray:
    """``(z-1, 2, y, x)`` float32: where each pixel of slice z+1 comes from in slice z (dy, dx).

    image: ``(z, y, x)`` normalised intensities (grey; colour is averaged). The reverse direction
    uses the negated field, which for the small, smooth motions between neighbours is accurate to
    well under a pixel and halves the cost.
    device, backend: where and by whom (``demons_backend(device)`` unless named).
    """
    if (backend or demons_backend(device)) == "torch":
        return _torch_displacements(image, iterations, smoothing, progress, cancel, step, device)
    import SimpleITK as sitk

    z = image.shape[0]
    out = np.zeros((max(z - 1, 0), 2) + image.shape[1:3], dtype=np.float32)
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetStandardDeviations(smoothing)
    for i in range(z - 1):
        check(cancel)
        fixed = sitk.GetImageFromArray(np.ascontiguousarray(image[i + 1], dtype=np.float32))
        moving = sitk.GetImageFromArray(np.ascontiguousarray(image[i], dtype=np.float32))
        field = sitk.GetArrayFromImage(demons.Execute(fixed, moving))  # (y, x, 2) in (dx, dy) order
        out[i, 0], out[i, 1] = field[..., 1], field[..., 0]
        report(progress, step[0] + i + 1, step[1], "following the anatomy from slice to slice")
    return out


def _torch_displacements(image, iterations, smoothing, progress, cancel, step, device) -> np.ndarray:
    """``slice_displacements`` by ``_demons.demons``, in chunks of about 2 M pixels per call.

    In float64, as ITK computes: in float32 the update's on/off test at ITK's intensity threshold
    flips for many faint pixels and the fields drift up to 0.1 pixel from SimpleITK's; in float64
    they differ by 5e-6 pixel on average on real CT and MR, and prompting gives the same masks on
    either path (Apple's MPS has no float64 and runs float32)."""
    import torch

    from .demons import demons

    dev = torch.device(device or "cpu")
    dtype = torch.float32 if dev.type == "mps" else torch.float64
    z, h, w = image.shape[:3]
    out = np.zeros((max(z - 1, 0), 2, h, w), dtype=np.float32)
    chunk = max(1, (1 << 21) // max(h * w, 1))
    stack = torch.from_numpy(np.ascontiguousarray(image)).to(dtype)
    for start in range(0, z - 1, chunk):
        check(cancel)
        stop = min(start + chunk, z - 1)
        pairs = stack[start:stop + 1].to(dev)
        out[start:stop] = demons(pairs[1:], pairs[:-1], iterations, smoothing).cpu().numpy()
        report(progress, step[0] + stop, step[1], "following the anatomy from slice to slice")
    return out


def warp(prob, displacement):
    """``prob`` ``(K, y, x)`` pulled along ``displacement`` ``(2, y, x)`` (bilinear, edges repeated).

    Torch tensors (what ``mv.prompt`` gives it, on any device) go through ``grid_sample``;
    numpy arrays through scipy, the reference the torch path is tested against (they agree to
    float32 rounding).
    """
    if not isinstance(prob, np.ndarray):
        return _warp_torch(prob, displacement)
    yy, xx = np.mgrid[: prob.shape[1], : prob.shape[2]].astype(np.float32)
    coords = [yy + displacement[0], xx + displacement[1]]
    return np.stack([ndi.map_coordinates(p, coords, order=1, mode="nearest") for p in prob])


def _warp_torch(prob, displacement):
    """``warp`` for torch tensors: ``grid_sample`` with ``border`` padding is scipy's order-1
    ``mode="nearest"`` (a point past the edge takes the edge's value)."""
    import torch

    height, width = prob.shape[1:]
    yy = torch.arange(height, device=prob.device, dtype=prob.dtype).view(-1, 1)
    xx = torch.arange(width, device=prob.device, dtype=prob.dtype).view(1, -1)
    # grid_sample wants x, y in [-1, 1] (align_corners: -1 and 1 are the edge pixels' centres)
    gx = (xx + displacement[1]) * (2.0 / max(width - 1, 1)) - 1.0
    gy = (yy + displacement[0]) * (2.0 / max(height - 1, 1)) - 1.0
    grid = torch.stack([gx, gy], dim=-1).unsqueeze(0)
    return torch.nn.functional.grid_sample(prob.unsqueeze(0), grid, mode="bilinear", padding_mode="border",
                                           align_corners=True)[0]


def propagate(onehot, annotated: list[int], displacements, head=None, vanish: float = 0.3,
              limit: Optional[int] = None) -> tuple:
    """``(prior (K+1, z, y, x), distance (z,))`` from annotated slices of ``onehot``.

    Arrays are torch tensors on one device (``mv.prompt``: every step stays there) or numpy
    (scipy, the tests' reference); ``distance`` is numpy either way.

    onehot: ``(K+1, z, y, x)`` class probabilities, meaningful on the ``annotated`` slices only.
    head: appearance probabilities ``(K+1, z, y, x)``; when given, a label carried beyond the
    outermost annotated slices stops where the head no longer sees it (its product with the
    head keeps less than ``vanish`` of the carried area). Without it masks run on to ``limit``
    slices beyond (default: the volume's edge).
    distance: slices from each slice to the nearest annotated slice.
    """
    n_classes, depth = onehot.shape[:2]
    annotated = sorted(set(int(a) for a in annotated))
    prior = onehot * 0  # zeros of onehot's kind: a numpy array or a tensor on its device
    prior[0] = 1.0
    distance = np.min(np.abs(np.arange(depth)[:, None] - np.asarray(annotated)[None, :]), axis=1)
    for a in annotated:
        prior[:, a] = onehot[:, a]
    for a, b in zip(annotated[:-1], annotated[1:]):
        if b - a < 2:
            continue
        forward, backward = {}, {}
        current = onehot[:, a]
        for z in range(a + 1, b):
            current = warp(current, displacements[z - 1])
            forward[z] = current
        current = onehot[:, b]
        for z in range(b - 1, a, -1):
            current = warp(current, -displacements[z])
            backward[z] = current
        for z in range(a + 1, b):
            prior[:, z] = (forward[z] * (b - z) + backward[z] * (z - a)) / (b - a)
    for start, stop, direction in ((annotated[-1], depth, 1), (annotated[0], -1, -1)):
        _beyond(prior, onehot[:, start], start, stop, direction, displacements, head, vanish, limit)
    return prior, distance


def _beyond(prior, start_prob, start, stop, direction, displacements, head, vanish, limit) -> None:
    """Carry ``start_prob`` outward from slice ``start`` until ``stop``, in place in ``prior``.

    The mask itself is only warped (feeding the head's output back in would compound its errors
    from slice to slice); the head decides where each label ends: once its product with the
    carried mask keeps less than ``vanish`` of the mask's area.
    """
    current = start_prob
    alive = current[1:].reshape(current.shape[0] - 1, -1).sum(1) > 0
    steps = 0
    for z in range(start + direction, stop, direction):
        steps += 1
        field = displacements[z - 1] if direction > 0 else -displacements[z]
        current = warp(current, field)
        if head is not None:
            alive &= _kept(current, head[:, z]) >= vanish
        if limit is not None and steps > limit:
            alive[:] = False
        out = current * 1  # a copy, numpy or torch
        gone = ~alive
        if gone.any():  # labels that ended hand their probability back to background
            out[0] += out[1:][gone].sum(0)
            out[1:][gone] = 0
        prior[:, z] = out
        if not alive.any():
            break  # every label has ended: the slices beyond stay background, as ``prior`` starts


def _kept(prob: np.ndarray, head: np.ndarray) -> np.ndarray:
    """``(K,)`` share of each label's carried area that survives the product with the head."""
    posterior = combine(head, prob, weight=2.0)
    carried = prob[1:].reshape(prob.shape[0] - 1, -1).sum(1)
    return posterior[1:].reshape(carried.shape[0], -1).sum(1) / carried.clip(min=1e-6)
