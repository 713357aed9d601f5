"""Scenario on real data: a few corrected slices of a real CT make the shipped model better on the rest.

The shipped ``ct-abdomen-organs-3d`` model never trained on slices 20-29 of TotalSegmentator's
example CT. A user corrects four of them (here: the reference labels, mapped as the recipe maps
them); fine-tuning must raise the Dice on the six slices between them, which it never saw, by
at least ``GAIN``, and must not lose more than ``FORGETTING`` on the model's own held-out
synthetic phantom (its card's other validation set).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import napari_medvision as mv  # noqa: E402

MODEL = "ct-abdomen-organs-3d"
CORRECTED = [20, 23, 26, 29]
UNSEEN = [21, 22, 24, 25, 27, 28]
GAIN = 0.05          # mean Dice over the structures present, unseen slices
FORGETTING = 0.05    # largest allowed drop on the held-out phantom
STEPS = 40


def mean_dice(prediction, truth, slices=None) -> float:
    """Mean Dice over the structures present in ``truth`` (pooled over ``slices``), checked by hand."""
    p = np.asarray(prediction)[slices] if slices is not None else np.asarray(prediction)
    t = np.asarray(truth)[slices] if slices is not None else np.asarray(truth)
    return float(np.mean([2 * ((p == c) & (t == c)).sum() / ((p == c).sum() + (t == c).sum())
                          for c in np.unique(t) if c]))


@pytest.fixture
def shipped_ct_model():
    if MODEL not in [c.id for c in mv.models.available()]:
        pytest.skip(f"shipped model {MODEL} is absent; train it: python -m napari_medvision.recipes.ct_organs")
    return mv.models.get_card(MODEL)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_four_corrected_ct_slices_improve_the_slices_between(data_dir, shipped_ct_model, two_threads):
    from napari_medvision.recipes.ct_organs import real_ct
    from napari_medvision.synthetic import ct_abdomen

    image, truth = real_ct()
    corrected = image.with_data(truth.astype(np.uint8), labels=shipped_ct_model.labels)
    phantom, phantom_truth = ct_abdomen(seed=1000, shape=(40, 112, 128), spacing=(3.0, 3.0, 3.0), contrast=None)

    before = mean_dice(mv.segment(image, model=MODEL, device="cpu").data, truth, UNSEEN)
    phantom_before = mean_dice(mv.segment(phantom, model=MODEL, device="cpu").data, phantom_truth.data)
    card = mv.finetune(MODEL, images=[image], labels=[corrected], slices=[CORRECTED], steps=STEPS, device="cpu",
                       seed=0, new_id="ct-organs-corrected")
    after = mean_dice(mv.segment(image, model=card.id, device="cpu").data, truth, UNSEEN)
    phantom_after = mean_dice(mv.segment(phantom, model=card.id, device="cpu").data, phantom_truth.data)

    print(f"unseen slices: {before:.3f} -> {after:.3f}; phantom: {phantom_before:.3f} -> {phantom_after:.3f}; "
          f"{card.training['wall_time_s']} s")
    assert card.parent == MODEL and card.training["data"]["volumes"][0]["corrected_slices"] == CORRECTED
    assert after >= before + GAIN
    assert phantom_after >= phantom_before - FORGETTING
