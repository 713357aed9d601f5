"""The prompt's spatial prior is built in torch on its device: the same numbers as scipy's.

Each step (warping a mask along a demons field, carrying it over many slices, the blur that
grows with the distance from a painted slice, the product with the head, the class map) is
checked here on the CPU against scipy / numpy, the way these steps were computed until
2026-11-24; on a GPU the whole prompt is checked against the CPU's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_medvision as mv
from napari_medvision.synthetic import ct_abdomen
from napari_medvision.tasks.prompting import runs
from napari_medvision.tasks.prompting.propagate import propagate, warp
from napari_medvision.tasks.prompting.refine import _soften_torch, combine, soften

torch.set_num_threads(1)


def smooth_field(rng, shape, scale):
    """A smooth random ``(n, 2, y, x)`` displacement field of a few times ``scale`` pixels."""
    from scipy import ndimage as ndi

    return ndi.gaussian_filter(rng.normal(0, scale * 8, shape), (0, 0, 6, 6)).astype(np.float32)


def blobs(rng, n_classes, shape):
    """``(K+1, *shape)`` probabilities of a few soft discs (a stand-in for a painted mask)."""
    from scipy import ndimage as ndi

    classes = np.zeros(shape, dtype=np.int64)
    yy, xx = np.mgrid[: shape[-2], : shape[-1]]
    for k in range(1, n_classes):
        cy, cx = rng.uniform(0.25, 0.75, 2) * shape[-2:]
        classes[..., (yy - cy) ** 2 + (xx - cx) ** 2 < (shape[-1] / 5) ** 2] = k
    hot = (classes[None] == np.arange(n_classes).reshape((-1,) + (1,) * len(shape))).astype(np.float32)
    return ndi.gaussian_filter(hot, (0,) * (1 + len(shape) - 2) + (1, 1)).astype(np.float32)


def test_warping_in_torch_equals_scipy_even_past_the_edges():
    rng = np.random.default_rng(0)
    prob = blobs(rng, 3, (30, 41))
    field = smooth_field(rng, (1, 2, 30, 41), scale=4.0)[0]
    field[:, :3] -= 8.0  # some pixels pull from well outside the slice: the edge value, as in scipy

    np.testing.assert_allclose(warp(torch.from_numpy(prob), torch.from_numpy(field)).numpy(),
                               warp(prob, field), atol=1e-5)


def test_carrying_masks_over_many_slices_in_torch_equals_scipy():
    rng = np.random.default_rng(1)
    depth, n_classes = 24, 3
    hot = np.repeat(0.7 * blobs(rng, n_classes, (36, 40))[:, None] + 0.1, depth, axis=1)  # unsure masks
    fields = smooth_field(rng, (depth - 1, 2, 36, 40), scale=1.0)
    head = hot.copy()
    head[:, :3], head[:, 21:] = 0, 0
    head[0, :3], head[0, 21:] = 1, 1  # the head sees no label beyond slices 3-20: there the masks end
    annotated = [6, 11, 17]

    prior, distance = propagate(hot, annotated, fields, head=head)
    in_torch, distance_torch = propagate(torch.from_numpy(hot), annotated, torch.from_numpy(fields),
                                         head=torch.from_numpy(head))

    np.testing.assert_allclose(in_torch.numpy(), prior, atol=1e-4)
    np.testing.assert_array_equal(distance_torch, distance)
    assert prior[1:, 4].sum() > 0 and prior[1:, 20].sum() > 0
    assert prior[1:, :3].sum() == 0 and prior[1:, 22:].sum() == 0 and in_torch[1:, 22:].sum() == 0
    np.testing.assert_allclose(in_torch.sum(0).numpy(), 1.0, atol=1e-5)  # where every label ended: background


def test_the_growing_blur_and_the_product_with_the_head_equal_scipy_in_torch():
    rng = np.random.default_rng(2)
    prior = blobs(rng, 4, (15, 20, 9))  # slices narrower than the widest kernel (25 px)
    head = blobs(rng, 4, (15, 20, 9))
    distance = np.abs(np.arange(15) - 4)  # sigmas from 0.5 up to the 3-pixel cap

    soft = soften(prior, distance)
    soft_torch = soften(torch.from_numpy(prior), distance)  # on a CPU: scipy, around the labels
    sigmas = [min(3.0, 0.5 + 0.25 * d) for d in distance]
    np.testing.assert_allclose(soft_torch.numpy(), soft, atol=1e-6)
    np.testing.assert_allclose(_soften_torch(torch.from_numpy(prior), sigmas).numpy(), soft, atol=1e-6)  # a GPU's way
    np.testing.assert_allclose(combine(torch.from_numpy(head), soft_torch, 2.0).numpy(),
                               combine(head, soft, 2.0), atol=1e-6)


def test_blurring_only_around_the_labels_gives_the_whole_slices_blur():
    from scipy import ndimage as ndi

    rng = np.random.default_rng(5)
    prior = np.zeros((3, 6, 64, 80), dtype=np.float32)
    prior[0] = 1.0
    prior[1, :, 20:30, 10:25] = rng.uniform(0.2, 1.0, (6, 10, 15))  # an unsure organ far from the edges
    prior[2, :, 50:64, 70:80] = rng.uniform(0.2, 1.0, (6, 14, 10))  # one at the slice's corner
    prior[2, 4] = 0  # slice 4: the organ at the corner is gone
    prior[1:, 5] = 0  # slice 5: background alone
    prior[0] = 1.0 - prior[1:].sum(0) / 2
    prior[1:] /= 2
    prior[0, 4, 40:, 36:] = 0  # slice 4: background unsure away from the labels, so the whole slice is blurred
    distance = np.array([0, 2, 4, 10, 7, 3])

    whole = np.empty_like(prior)
    for z, d in enumerate(distance):
        sigma = min(3.0, 0.5 + 0.25 * d)
        whole[:, z] = ndi.gaussian_filter(prior[:, z], (0, sigma, sigma))
    whole /= np.maximum(whole.sum(0, keepdims=True), 1e-6)

    np.testing.assert_allclose(soften(prior, distance), whole, atol=1e-6)
    np.testing.assert_allclose(soften(torch.from_numpy(prior), distance).numpy(), whole, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_a_prompt_on_a_gpu_gives_the_cpus_labels():
    image, labels = ct_abdomen(seed=2, shape=(20, 64, 64), spacing=(6.0, 4.0, 4.0))
    truth = np.asarray(labels.data)
    painted = np.where(np.isin(np.arange(20), [5, 10, 15])[:, None, None], truth, 0).astype(truth.dtype)
    annotations = labels.with_data(painted)

    on_cpu = mv.prompt(image, annotations=annotations, device="cpu", cache=False)
    on_gpu = mv.prompt(image, annotations=annotations, device="cuda", cache=False)
    assert np.mean(np.asarray(on_gpu.data) == np.asarray(on_cpu.data)) > 0.999


def test_the_class_map_of_a_tensor_is_numpys_argmax_ties_included():
    prob = np.random.default_rng(3).integers(0, 3, (4, 6, 7, 5)).astype(np.float32)  # many ties
    np.testing.assert_array_equal(runs._class_map(torch.from_numpy(prob)), runs._class_map(prob))
