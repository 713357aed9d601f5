"""Scenarios on real data: corrections on part of a real scan make a shipped model better on the rest.

OCT: the shipped ``oct-retinal-layers-2d`` model never trained on the real B-scan
``exampleOCTimage0002.tif`` (its held-out image). A user corrects the layers over the left 40 %
of the A-scans (here: the reference boundaries); fine-tuning must raise the mean layer Dice on
the right 40 %, which it never saw (a 20 % gap between), by at least ``OCT_GAIN``; lose at most
``FORGETTING`` on the other real B-scan (``exampleOCTimage0001.tif``, which the parent trained
on), and at most ``OCT_SYNTHETIC_DROP`` on synthetic B-scans the parent never trained on (seeds
1000-1001): learning the real scanner's look costs some accuracy on the simulator's. The default
L2-SP anchor toward the parent's weights (``anchor=0.3``) keeps these drops about half of what
they are without it (0.12 and 0.09, docs/evaluation/finetuning.md).

Skips with the reason when the shipped model or the real data is absent. The same question on
the real CT (a few corrected axial slices) is ``bench/finetune.py --scenario ct``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import napari_medvision as mv  # noqa: E402

OCT_MODEL = "oct-retinal-layers-2d"
OCT_GAIN = 0.08      # mean layer Dice, unseen A-scans (measured, anchor 0.3: +0.150, 0.493 -> 0.643, in 30 steps)
OCT_STEPS = 30
OCT_SYNTHETIC_DROP = 0.10  # measured, anchor 0.3: -0.049 (0.910 -> 0.861)
FORGETTING = 0.09    # largest allowed drop on the other real B-scan (measured, anchor 0.3: -0.073, 0.888 -> 0.815;
                     # the parent of 2026-11-23 before: -0.065, and -0.12 without the anchor)


def mean_dice(prediction, truth, slices=None) -> float:
    """Mean Dice over the structures present in ``truth`` (pooled over ``slices``), checked by hand."""
    p = np.asarray(prediction)[slices] if slices is not None else np.asarray(prediction)
    t = np.asarray(truth)[slices] if slices is not None else np.asarray(truth)
    return float(np.mean([2 * ((p == c) & (t == c)).sum() / ((p == c).sum() + (t == c).sum())
                          for c in np.unique(t) if c]))


def shipped(model_id: str, recipe: str):
    if model_id not in [c.id for c in mv.models.available() if c.source == "shipped"]:
        pytest.skip(f"shipped model {model_id} is absent; train it: python -m napari_medvision.recipes.{recipe}")
    return mv.models.get_card(model_id)


def real_bscan_with_layers(data_dir, name: str = "exampleOCTimage0002.tif"):
    """A real B-scan (the A-scans with all 7 boundaries) as a Volume, and its layer regions."""
    import json

    from napari_medvision.recipes.oct_layers import BOUNDARIES, regions_from_boundaries

    scan = mv.load(data_dir / "oct_bscans_layers" / name)
    table = json.loads((data_dir / "oct_bscans_layers" / "boundaries_row_per_column.json").read_text())[name]
    rows = {b: np.array([np.nan if v is None else v for v in table[b]], dtype=float) for b in BOUNDARIES}
    columns = np.flatnonzero(np.all([np.isfinite(r) for r in rows.values()], axis=0))
    regions = regions_from_boundaries({b: np.nan_to_num(r, nan=-1) for b, r in rows.items()}, scan.data.shape[0])
    keep = slice(columns.min(), columns.max() + 1)
    return scan.with_data(np.ascontiguousarray(np.asarray(scan.data)[:, keep])), regions[:, keep].astype(np.uint8)


def test_correcting_part_of_a_real_oct_bscan_improves_the_rest(data_dir, two_threads):
    from napari_medvision.recipes.oct_layers import synthetic_bscans

    card0 = shipped(OCT_MODEL, "oct_layers")
    scan, layers = real_bscan_with_layers(data_dir)
    width = scan.data.shape[1]
    left, right = slice(0, int(0.4 * width)), slice(int(0.6 * width), width)
    corrected_part = scan.with_data(np.ascontiguousarray(np.asarray(scan.data)[:, left]))
    unseen_part = scan.with_data(np.ascontiguousarray(np.asarray(scan.data)[:, right]))
    corrections = corrected_part.with_data(layers[:, left], labels=card0.labels)
    known_scan, known_layers = real_bscan_with_layers(data_dir, "exampleOCTimage0001.tif")
    phantoms, phantom_truth = synthetic_bscans(range(1000, 1002))
    phantoms = [mv.Volume((im[0] * 255).astype(np.float32), spacing=(1, 1), modality="OCT") for im in phantoms]

    before = mean_dice(mv.segment(unseen_part, model=OCT_MODEL, device="cpu").data, layers[:, right])
    known_before = mean_dice(mv.segment(known_scan, model=OCT_MODEL, device="cpu").data, known_layers)
    other_before = np.mean([mean_dice(mv.segment(p, model=OCT_MODEL, device="cpu").data, t)
                            for p, t in zip(phantoms, phantom_truth)])
    card = mv.finetune(OCT_MODEL, images=[corrected_part], labels=[corrections], steps=OCT_STEPS, device="cpu",
                       seed=0, new_id="oct-layers-corrected", method="network")
    after = mean_dice(mv.segment(unseen_part, model=card.id, device="cpu").data, layers[:, right])
    known_after = mean_dice(mv.segment(known_scan, model=card.id, device="cpu").data, known_layers)
    other_after = np.mean([mean_dice(mv.segment(p, model=card.id, device="cpu").data, t)
                           for p, t in zip(phantoms, phantom_truth)])

    print(f"OCT unseen A-scans: {before:.3f} -> {after:.3f}; other real B-scan: {known_before:.3f} -> "
          f"{known_after:.3f}; synthetic: {other_before:.3f} -> {other_after:.3f}; "
          f"fine-tuning {card.training['wall_time_s']} s")
    assert card.parent == OCT_MODEL and card.training["steps"] <= OCT_STEPS
    assert after >= before + OCT_GAIN
    assert known_after >= known_before - FORGETTING
    assert other_after >= other_before - OCT_SYNTHETIC_DROP


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
