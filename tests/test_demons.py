"""Demons between neighbouring slices in torch (the GPU path of prompting) against SimpleITK's."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_medvision.tasks.prompting.demons import demons, itk_gaussian_kernel  # noqa: E402
from napari_medvision.tasks.prompting.propagate import demons_backend, demons_key, slice_displacements  # noqa: E402

DATA = Path(os.environ.get("MEDVISION_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def blob(shift_y: float = 0.0, shift_x: float = 0.0, size: int = 48) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    return np.exp(-((yy - 24 - shift_y) ** 2 + (xx - 22 - shift_x) ** 2) / (2 * 6.0 ** 2)).astype(np.float32)


def test_the_field_points_to_where_each_pixel_came_from():
    # slice z has the blob 1.5 px higher and 1 px further left than slice z+1: each pixel of z+1
    # comes from (-1.5, -1) away in z. Demons creep up on a smooth blob; 25 iterations (what
    # prompting runs) cover three quarters of the way.
    stack = np.stack([blob(-1.5, -1.0), blob()])
    field = demons(torch.from_numpy(stack[1:]), torch.from_numpy(stack[:-1]), iterations=25, smoothing=1.5)[0]
    core = blob() > 0.3
    assert field.shape == (2, 48, 48)
    assert -1.5 < field[0].numpy()[core].mean() < -1.5 * 0.7
    assert -1.0 < field[1].numpy()[core].mean() < -1.0 * 0.7


def test_it_is_simpleitks_algorithm():
    pytest.importorskip("SimpleITK")
    stack = np.stack([blob(-1.5, -1.0), blob(), blob(0.5, 2.0)])

    ours = slice_displacements(stack, backend="torch")
    theirs = slice_displacements(stack, backend="simpleitk")

    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_identical_slices_give_no_motion_and_odd_shapes_pass_through():
    same = torch.from_numpy(np.stack([blob(), blob()]))
    assert demons(same[1:], same[:-1], iterations=5, smoothing=1.5).abs().max() == 0
    assert demons(torch.zeros(0, 8, 8), torch.zeros(0, 8, 8), 5, 1.5).shape == (0, 2, 8, 8)
    assert demons(torch.ones(3, 1, 8), torch.ones(3, 1, 8), 5, 1.5).shape == (3, 2, 1, 8)


def test_the_smoothing_kernel_is_itks_discrete_gaussian():
    kernel = itk_gaussian_kernel(1.5)
    assert kernel.numel() == 5  # cut at 90 % of the mass, as ITK's registration filters do
    assert float(kernel.sum()) == pytest.approx(1.0)
    np.testing.assert_allclose(kernel.numpy(), kernel.numpy()[::-1])


def test_the_gpu_path_is_torch_and_each_backend_has_its_own_cache_key():
    assert demons_backend("cuda") == "torch" and demons_backend("cuda:1") == "torch"
    assert demons_key("torch") != demons_key("simpleitk")


@pytest.mark.parametrize("scan", ["example_ct_sm.nii.gz", "example_mr_sm.nii.gz"])
def test_torch_fields_match_simpleitk_on_real_scans(scan):
    pytest.importorskip("SimpleITK")
    path = DATA / "ct_mr_totalseg" / scan
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set MEDVISION_DATA)")
    import napari_medvision as mv

    data = np.asarray(mv.load(path).data, dtype=np.float32)
    low, high = np.percentile(data, [0.5, 99.5])
    grey = np.clip((data - low) / (high - low), 0, 1)

    ours = slice_displacements(grey, backend="torch")
    theirs = slice_displacements(grey, backend="simpleitk")

    # Equal but for a few faint pixels, where rounding decides whether the intensity difference
    # clears ITK's threshold (pixels; the fields themselves average 0.34-0.41)
    distance = np.sqrt(((ours - theirs) ** 2).sum(1))
    assert distance.mean() < 1e-3
    assert (distance > 0.01).mean() < 0.005
    assert distance.max() < 0.25


def test_a_prompt_on_the_torch_path_gives_the_simpleitk_paths_masks(monkeypatch):
    # What a GPU machine runs (torch demons), here on the CPU: the same liver from two painted slices.
    pytest.importorskip("SimpleITK")
    import napari_medvision as mv
    import napari_medvision.tasks.prompting.propagate as propagate
    from napari_medvision.synthetic import ct_abdomen

    image, labels = ct_abdomen(seed=2, shape=(12, 40, 48), spacing=(8.0, 6.0, 6.0))
    liver = (np.asarray(labels.data) == 1).astype(np.uint8)
    painted = np.zeros_like(liver)
    rows = np.flatnonzero(liver.reshape(12, -1).any(1))
    for z in (rows[1], rows[-2]):
        painted[z] = liver[z]
    annotations = labels.with_data(painted, labels={1: "liver"})

    reference = mv.prompt(image, annotations=annotations, device="cpu", cache=False)
    prompt_module = importlib.import_module("napari_medvision.tasks.prompting.prompt")  # the package exports the function
    for module in (propagate, prompt_module):  # prompt.py calls the name it imported
        monkeypatch.setattr(module, "demons_backend", lambda device=None: "torch")
    on_torch = mv.prompt(image, annotations=annotations, device="cpu", cache=False)

    np.testing.assert_array_equal(on_torch.data, reference.data)
    assert (np.asarray(reference.data) == 1).sum() > 0
