"""Example scans onto the target: affine registration (SimpleITK) and locally weighted label fusion.

Each example image is registered to the target with an affine transform (centre-of-mass start,
Mattes mutual information, three resolutions); its mask's labels are resampled as soft
probabilities. Several examples are fused voxel by voxel, each weighted by how well its warped
image matches the target around that voxel (local normalised cross-correlation), so the example
that fits the liver best decides the liver and another may decide the spleen. A B-spline stage
was tried in the design probe (real CT liver: 0.76 affine, 0.60 with B-spline) and is not used.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from ..volume import Volume, to_itk_geometry


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
    import SimpleITK as sitk

    # ITK's multi-threaded metric sums per-thread partial results in whatever order the threads
    # finish: the same call gave Dice 0.364-0.373 (real MR onto CT) from run to run on a busy
    # machine. One thread (set before anything is built: filters read the default when they are
    # made) makes it repeatable, which prompting needs (leave-one-out choices, cache=False giving
    # the cached result); an affine fit on a few shrunk levels stays a matter of seconds.
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    try:
        return _register_affine(sitk, target, target_image, example, example_image, iterations, seed)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _register_affine(sitk, target, target_image, example, example_image, iterations, seed):
    fixed = to_sitk(target, target_image - min(0.0, float(target_image.min())))
    moving = to_sitk(example, example_image - min(0.0, float(example_image.min())))
    dims = fixed.GetDimension()
    start = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(dims),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    # SimpleITK reads a sampling seed of 0 as "seed from the wall clock" (sitkWallClock), which
    # made every registration, and so every cross-scan prompt, differ from run to run.
    method.SetMetricSamplingPercentage(0.2, seed + 1)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=iterations,
                                                    gradientMagnitudeTolerance=1e-6)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([4, 2, 1])
    method.SetSmoothingSigmasPerLevel([2, 1, 0])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(start, inPlace=False)
    method.SetNumberOfThreads(1)
    return method.Execute(fixed, moving)


def affine_arrays(transform) -> dict[str, np.ndarray]:
    """A registered affine transform as arrays (to keep it in the prompt cache)."""
    return {"parameters": np.asarray(transform.GetParameters(), dtype=np.float64),
            "fixed": np.asarray(transform.GetFixedParameters(), dtype=np.float64)}


def affine_from_arrays(arrays: dict[str, np.ndarray], dims: int):
    """The ``AffineTransform`` of ``affine_arrays``: warps exactly as the registered transform did."""
    import SimpleITK as sitk

    transform = sitk.AffineTransform(dims)
    transform.SetParameters(tuple(float(v) for v in arrays["parameters"]))
    transform.SetFixedParameters(tuple(float(v) for v in arrays["fixed"]))
    return transform


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


def fuse(priors: list[np.ndarray], similarities: list[np.ndarray], sharpness: float = 10.0) -> np.ndarray:
    """Locally weighted vote: ``sum_i w_i p_i / sum_i w_i`` with ``w_i = exp(sharpness * ncc_i)``."""
    if len(priors) == 1:
        return priors[0]
    stack = np.stack(similarities) * sharpness
    weights = np.exp(stack - stack.max(0, keepdims=True))
    weights /= weights.sum(0, keepdims=True)
    return np.sum([w[None] * p for w, p in zip(weights, priors)], axis=0)
