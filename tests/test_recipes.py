"""The recipes that made the shipped weights still run end to end (a few steps, into a temp folder)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")


def test_fundus_recipe_trains_and_writes_a_loadable_model_with_a_card(data_dir, tmp_path):
    from napari_medvision import models
    from napari_medvision.recipes import fundus_vessels

    assert fundus_vessels.main(["--steps", "2", "--batch-size", "2", "--preset", "tiny", "--synthetic", "1",
                                "--threads", "1", "--out", str(tmp_path)]) == 0
    card = json.loads((tmp_path / "fundus-vessels-2d.json").read_text())
    assert card["training"]["steps"] == 2 and card["metrics"]
    network, loaded = models.load_model(tmp_path / "fundus-vessels-2d.safetensors")
    assert loaded.labels == {1: "vessel"}


def test_mvg_training_learns_a_context_task_the_intensity_prior_cannot():
    """Blurring needs neighbours: the prompt pair's grey-level map alone cannot do it, training must."""
    import numpy as np
    import torch
    from scipy import ndimage as ndi

    from napari_medvision.models.mvg import build_mvg, make_canvas
    from napari_medvision.recipes.mvg_data import Family, PairSampler
    from napari_medvision.recipes.mvg_generalist import train

    rng = np.random.default_rng(0)
    family = Family("blur", 1.0)
    for _ in range(4):
        images = [ndi.gaussian_filter(rng.random((40, 40)), 1.0).astype(np.float32) * 4 - 1.5 for _ in range(3)]
        family.add("blur", images, [ndi.gaussian_filter(i, 2.0) for i in images])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    network = build_mvg({"preset": "tiny"})
    held_out = PairSampler([family], network.tile, seed=99, inpaint_weight=0.0).batch(16)

    def error():
        with torch.no_grad():
            return float((network.eval()(make_canvas(*held_out[:3])) - held_out[3]).abs().mean())

    before = error()
    summary = train(network, PairSampler([family], network.tile, seed=1, inpaint_weight=0.0), "cpu", steps=150,
                    batch_size=8, time_budget=None, lr=2e-3, log=lambda *_: None)
    assert summary["steps"] == 150 and summary["loss_curve"]
    after = error()
    assert after < 0.9 * before


@pytest.mark.parametrize("aligned", [True, False])
def test_mvg_prompt_tiles_sit_at_the_query_place_only_for_tasks_that_change_units(aligned):
    """Denoising-like families (aligned=False) take the prompt crop anywhere, so copying it cannot help."""
    import numpy as np

    from napari_medvision.recipes.mvg_data import Family, PairSampler

    position = np.arange(96 * 96, dtype=np.float32).reshape(96, 96)  # each pixel names its place
    family = Family("task", 1.0, aligned=aligned)
    family.add("task", [position], [position])
    sampler = PairSampler([family], tile=16, seed=0, inpaint_weight=0.0)
    offsets = []
    for _ in range(40):
        prompt, _, query, _ = sampler.sample()
        offsets.append(np.hypot(*np.subtract(divmod(prompt.min(), 96), divmod(query.min(), 96))))
    if aligned:
        assert max(offsets) <= 0.05 * 80 * 4  # a few sigma of the 5 % jitter over the 80-pixel range
    else:
        assert np.median(offsets) > 15


def test_skull_stripped_brain_phantom_is_zero_and_unlabelled_outside_the_brain():
    np = pytest.importorskip("numpy")
    from napari_medvision.recipes.brain_tissue import skull_strip

    labels = np.zeros((24, 24, 24), dtype=np.int64)
    labels[4:20, 4:20, 4:20] = 1  # CSF rim
    labels[6:18, 6:18, 6:18] = 2  # grey matter
    labels[9:15, 9:15, 9:15] = 3  # white matter
    head = np.full(labels.shape, 5.0, dtype=np.float32)  # scalp and skull everywhere else
    head[labels > 0] = 1.0 + labels[labels > 0]

    for seed in range(6):
        image, stripped = skull_strip(head, labels, np.random.default_rng(seed))
        assert (image[stripped == 0] == 0).all(), "no scalp or skull left outside the mask"
        assert (image[stripped > 0] == head[stripped > 0]).all(), "the brain keeps its intensities"
        assert ((stripped == labels) | (stripped == 0)).all()
        assert (stripped[6:18, 6:18, 6:18] == labels[6:18, 6:18, 6:18]).all(), "erosion stops in the CSF rim"
        assert (stripped[4:20, 4:20, 4:20] > 0).sum() <= (labels > 0).sum()


def test_recipes_keep_their_test_data_out_of_training_and_of_the_checkpoint_choice():
    """A card's held-out numbers mean something only if the test images neither trained the model
    nor picked its checkpoint (the recipes' ``validate`` uses the validation split only)."""
    from napari_medvision.recipes import ct_organs, fundus_vessels, oct_layers

    fit, chosen, test = (set(fundus_vessels.FIT_IDS), set(fundus_vessels.VALIDATION_IDS),
                         set(fundus_vessels.HELD_OUT_IDS))
    assert not (fit & chosen) and not ((fit | chosen) & test)
    slices = range(30)  # the real CT's axial slices
    assert not set(slices[ct_organs.REAL_TRAIN_SLICES]) & set(slices[ct_organs.REAL_HELD_OUT])
    for recipe in (ct_organs, oct_layers):
        validation = set(getattr(recipe, "VALIDATION_SEEDS", [getattr(recipe, "VALIDATION_SEED", None)]))
        assert not validation & set(recipe.TEST_SEEDS) and min(validation | set(recipe.TEST_SEEDS)) >= 1000


def test_the_real_ct_trains_in_the_phantoms_layout(data_dir):
    """On disk the example CT runs toward anterior and patient-right, the phantoms toward posterior
    and patient-left; turned, both put the spleen left of the liver and the kidneys behind it."""
    import numpy as np

    from napari_medvision.recipes import ct_organs
    from napari_medvision.synthetic import ct_abdomen
    from napari_medvision.synthetic.ct import LABELS

    ids = {name: i for i, name in LABELS.items()}

    def centre(labels, organ):  # (y, x) centroid in voxels
        return np.argwhere(labels == ids[organ])[:, 1:].mean(axis=0)

    _, phantom = ct_abdomen(seed=0, shape=(32, 96, 96), spacing=(3.0, 3.5, 3.5))
    _, stored = ct_organs.real_ct()
    turned, labels = ct_organs.real_ct_in_model_layout()
    np.testing.assert_allclose(turned.direction, np.eye(3), atol=1e-6)
    for organs in (np.asarray(phantom.data), labels):
        assert centre(organs, "spleen")[1] > centre(organs, "liver")[1]  # x toward patient-left
        assert centre(organs, "kidney_left")[0] > centre(organs, "stomach")[0]  # y toward posterior
    assert centre(stored, "spleen")[1] < centre(stored, "liver")[1]  # as stored: the mirror image


def test_ct_card_scores_only_organs_the_real_slab_holds():
    import numpy as np

    from napari_medvision.recipes.ct_organs import real_slab_metrics
    from napari_medvision.synthetic.ct import LABELS

    ids = {name: i for i, name in LABELS.items()}
    truth = np.zeros((2, 8, 8), np.uint8)
    truth[:, :4] = ids["liver"]
    prediction = truth.copy()
    prediction[0, 6, 6] = ids["pancreas"]  # a false positive of an organ the slab does not hold
    metrics = real_slab_metrics(prediction, truth)
    assert metrics["dice"] == {"liver": 1.0} and metrics["mean dice over the organs present"] == 1.0
    assert metrics["false-positive voxels of organs absent"]["pancreas"] == 1
