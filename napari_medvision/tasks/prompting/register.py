"""Example scans onto the target: affine registration (SimpleITK) and locally weighted label fusion.

Each example image is registered to the target with affine transforms (centre-of-mass start,
Mattes mutual information, three resolutions; five sampling seeds, their warped masks averaged);
its mask's labels are resampled as soft probabilities. Several examples are fused voxel by
voxel, each weighted by how well its warped image matches the target around that voxel (local
normalised cross-correlation), so the example that fits the liver best decides the liver and
another may decide the spleen. There is no B-spline stage: on a real CT liver it scores well
below affine alone.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Optional

import numpy as np
from scipy import ndimage as ndi

from ...engine.progress import CancelToken, check
from ...volume import Volume, to_itk_geometry

REGISTRATIONS = 5  # affine registrations per example, averaged (see register_affines)


def to_sitk(volume: Volume, array: np.ndarray):
    """``array`` (on ``volume``'s spatial grid) as a SimpleITK image with ``volume``'s geometry."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    spacing, origin, direction = to_itk_geometry(volume)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    return image


def register_affine(target: Volume, target_image: np.ndarray, example: Volume, example_image: np.ndarray,
                    iterations: int = 120, seed: int = 0):
    """The SimpleITK affine transform mapping target points into the example (ITK's resampling convention).

    target_image, example_image: normalised grey intensities on each Volume's grid. Both are
    shifted to be non-negative first so that the centre-of-mass start weighs tissue, not air.
    seed: of the random metric sampling; the same seed gives the same transform.
    """
    with _one_itk_thread() as sitk:
        return _register_affine(sitk, target, target_image, example, example_image, iterations, seed)


def register_affines(target: Volume, target_image: np.ndarray, example: Volume, example_image: np.ndarray,
                     count: int = REGISTRATIONS, cancel: Optional[CancelToken] = None) -> list:
    """``count`` affine registrations of one pair, each sampling the metric with another seed.

    Why several: with 20 % of the voxels sampled, the seed alone moves a real MR onto a real CT
    by more than 0.1 Dice; the mean of their warped masks is steadier than any one. They run
    side by side, one Python thread each (SimpleITK lets go of the GIL while it registers), and
    each gives what it gives alone.
    cancel: stops every registration at its next iteration and raises ``Cancelled``.
    """
    workers = max(1, min(count, os.cpu_count() or 1))
    with _one_itk_thread() as sitk, ThreadPoolExecutor(workers) as pool:
        transforms = list(pool.map(lambda seed: _register_affine(sitk, target, target_image, example,
                                                                 example_image, 120, seed, cancel), range(count)))
    check(cancel)
    return transforms


@contextmanager
def _one_itk_thread():
    """SimpleITK with one ITK thread per filter for as long as the block runs.

    ITK's multi-threaded metric sums per-thread partial results in whatever order the threads
    finish: on a busy machine the same call gives a slightly different Dice from run to run. One
    thread (set before anything is built: filters read the default when they are made) makes it
    repeatable, which prompting needs (leave-one-out choices, cache=False giving
    the cached result). One registration of a 150x256x256 CT takes ~45 s on one core
    (docs/benchmarks.md); ``register_affines`` runs several at once instead.
    """
    import SimpleITK as sitk

    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        yield sitk
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _register_affine(sitk, target, target_image, example, example_image, iterations, seed, cancel=None):
    fixed = to_sitk(target, target_image - min(0.0, float(target_image.min())))
    moving = to_sitk(example, example_image - min(0.0, float(example_image.min())))
    return affine_mi(sitk, fixed, moving, iterations, seed, cancel=cancel)


def affine_mi(sitk, fixed, moving, iterations: int, seed: int, shrinks: Optional[tuple[int, ...]] = None,
              share: Optional[float] = None, max_samples: Optional[int] = None, moving_mask=None,
              adjust_start=None, cancel: Optional[CancelToken] = None):
    """The affine transform mapping ``fixed`` points into ``moving`` (SimpleITK images), by mutual information.

    One set-up for prompting's examples and the atlases: moments start, Mattes MI over 32 bins,
    random sampling (``sampling_shares(size, shrinks, share, max_samples)`` per level, seeded
    with ``seed + 1``), regular step gradient descent, smoothing of half the shrink factor, one
    ITK thread. The defaults are prompting's (three levels, a fifth of the voxels up to 1e5).
    moving_mask: a UInt8 image; the metric samples only there.
    adjust_start: ``f(method, start) -> start`` run before the sampling is set (e.g. a search
    that evaluates the metric at a few starts).
    cancel: stops the optimiser at its next iteration.
    """
    shrinks = tuple(shrinks or SHRINKS)
    dims = fixed.GetDimension()
    start = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(dims),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=iterations,
                                                    gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(list(shrinks))
    method.SetSmoothingSigmasPerLevel([shrink // 2 for shrink in shrinks])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetNumberOfThreads(1)
    if moving_mask is not None:
        method.SetMetricMovingMask(moving_mask)
    if adjust_start is not None:
        start = adjust_start(method, start)
    # SimpleITK reads a sampling seed of 0 as "seed from the wall clock" (sitkWallClock), which
    # made every registration, and so every cross-scan prompt, differ from run to run.
    shares = sampling_shares(tuple(fixed.GetSize())[::-1], shrinks, share if share is not None else SAMPLED,
                             max_samples if max_samples is not None else MAX_SAMPLES)
    method.SetMetricSamplingPercentagePerLevel(shares, seed + 1)
    method.SetInitialTransform(start, inPlace=False)
    if cancel is not None:  # a registration of a large scan takes a while: stop it, not just what follows
        method.AddCommand(sitk.sitkIterationEvent, lambda: cancel.cancelled and method.StopRegistration())
    return method.Execute(fixed, moving)


SHRINKS = (4, 2, 1)  # resolution levels of the affine registration, coarse to fine
SAMPLED = 0.2  # share of the target's voxels the metric samples at each level...
MAX_SAMPLES = 100_000  # ...up to this many


def sampling_shares(shape: tuple[int, ...], shrinks=SHRINKS, share: float = SAMPLED,
                    max_samples: int = MAX_SAMPLES) -> list[float]:
    """Per resolution level, the share of the target's voxels that the metric samples.

    Prompting's defaults: a fifth of them, but at most ``MAX_SAMPLES``: mutual information over
    32 bins is as well estimated from 1e5 samples as from 1e7, and a fifth of a 150x256x256 CT made one
    registration take minutes. Every scan of docs/evaluation/prompting.md has fewer than 5e5 voxels, so
    their registrations are those of a plain fifth, sample for sample (the same transforms as
    ``SetMetricSamplingPercentage(0.2)``, checked on the real CT and MR).
    """
    out = []
    for shrink in shrinks:
        voxels = float(np.prod([max(1, size // shrink) for size in shape]))
        out.append(min(share, max_samples / voxels))
    return out


def affine_arrays(transforms: list) -> dict[str, np.ndarray]:
    """Registered affine transforms as stacked arrays, one row each (to keep them in the prompt cache)."""
    return {"parameters": np.stack([np.asarray(t.GetParameters(), dtype=np.float64) for t in transforms]),
            "fixed": np.stack([np.asarray(t.GetFixedParameters(), dtype=np.float64) for t in transforms])}


def affines_from_arrays(arrays: dict[str, np.ndarray], dims: int) -> list:
    """The ``AffineTransform`` of each row of ``affine_arrays``: warps exactly as the registered one did."""
    import SimpleITK as sitk

    transforms = []
    for parameters, fixed in zip(np.atleast_2d(arrays["parameters"]), np.atleast_2d(arrays["fixed"])):
        transform = sitk.AffineTransform(dims)
        transform.SetParameters(tuple(float(v) for v in parameters))
        transform.SetFixedParameters(tuple(float(v) for v in fixed))
        transforms.append(transform)
    return transforms


def warp_to(target: Volume, example: Volume, array: np.ndarray, transform, fill: float = 0.0) -> np.ndarray:
    """``array`` on ``example``'s grid resampled (linear) onto ``target``'s grid through ``transform``."""
    import SimpleITK as sitk

    reference = to_sitk(target, np.zeros(target.spatial_shape, dtype=np.float32))
    moved = sitk.Resample(to_sitk(example, array), reference, transform, sitk.sitkLinear, fill, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(moved)


def local_ncc(a: np.ndarray, b: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    """Normalised cross-correlation of ``a`` and ``b`` in a Gaussian window of ``sigma`` voxels, in [-1, 1]."""
    blur = lambda x: ndi.gaussian_filter(x, sigma)  # noqa: E731
    ma, mb = blur(a), blur(b)
    cov = blur(a * b) - ma * mb
    va = np.maximum(blur(a * a) - ma * ma, 0)
    vb = np.maximum(blur(b * b) - mb * mb, 0)
    return (cov / np.sqrt(va * vb + 1e-6)).astype(np.float32)


# How strongly the local similarity picks between examples. Set by leave-one-out among example
# scans, not on a target's labels: with each of four CT phantoms predicted from two others (every
# choice of three; mean Dice over the four choices), 5 is level with or above 10 for every
# variant, plain averaging (0) loses and 20 does not gain. Local correlation of intensities says
# less across scanners than between phantoms of one generator, so the softer of the two is also
# the safer side.
FUSION_SHARPNESS = 5.0


def fuse(priors: list[np.ndarray], similarities: list[np.ndarray], sharpness: float = FUSION_SHARPNESS) -> np.ndarray:
    """Locally weighted vote: ``sum_i w_i p_i / sum_i w_i`` with ``w_i = exp(sharpness * ncc_i)``."""
    if len(priors) == 1:
        return priors[0]
    stack = np.stack(similarities) * sharpness
    weights = np.exp(stack - stack.max(0, keepdims=True))
    weights /= weights.sum(0, keepdims=True)
    return np.sum([w[None] * p for w, p in zip(weights, priors)], axis=0)
