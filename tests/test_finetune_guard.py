"""The default fine-tune: the output head learns the corrected labels only, everything else stays
the parent's, and a guard keeps the parent unless the new model beats it on held-out slices."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import napari_medvision as mv  # noqa: E402
from napari_medvision.tasks.finetune import FinetuneOptions, FinetuneRefused  # noqa: E402
from napari_medvision.tasks.finetune_tail import (  # noqa: E402
    TailRun, Window, fold_maps, guard_verdict, hold_untouched, propagated_targets, scan_labels, train_tail)

from test_finetune import corrected_ct  # noqa: E402
from test_segment import tiny_ct_model  # noqa: E402


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test of this file runs torch on one thread (conftest)."""


def liver_only(corrected, slices):
    """The user corrected the liver (label 1) on ``slices`` and painted nothing else."""
    data = np.zeros_like(np.asarray(corrected.data))
    for s in slices:
        data[s][np.asarray(corrected.data)[s] == 1] = 1
    return corrected.with_data(data)


def test_only_the_head_rows_of_the_corrected_labels_change_and_the_card_records_the_run():
    from safetensors.torch import load_file

    parent = tiny_ct_model()
    image, corrected = corrected_ct()
    events = []
    stop = mv.models.on_change(lambda event, model_id: events.append((event, model_id)))
    try:
        # an untrained model's labels are noise that any change moves: max_loss=1 lets the change
        # through, to see which rows it touches
        card = mv.finetune("tiny-ct", [image], [liver_only(corrected, [4, 10, 16])], [[4, 10, 16]],
                           FinetuneOptions(steps=20, device="cpu", new_id="tiny-ct-liver", guard=False, max_loss=1.0))
    finally:
        stop()
    assert events == [("saved", "tiny-ct-liver")]            # every open panel hears of it at once
    before, after = load_file(str(parent.weights_path)), load_file(str(card.weights_path))
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith("head.") for k in changed)
    weight = [k for k in changed if k.endswith("weight")][0]
    rows = [r for r in range(before[weight].shape[0]) if not torch.equal(before[weight][r], after[weight][r])]
    assert rows == [1]                                         # liver's row only: spleen's logit is the parent's
    volume = card.training["data"]["volumes"][0]
    assert card.parent == "tiny-ct" and volume["corrected_slices"] == [4, 10, 16]
    assert len(volume["image_sha256"]) == 64 and len(volume["labels_sha256"]) == 64
    assert card.training["guard"]["touched_labels"] == ["liver"]


def test_the_guard_refuses_a_model_that_does_not_beat_its_parent_and_saves_nothing():
    tiny_ct_model()
    image, corrected = corrected_ct()
    curve = []
    with pytest.raises(FinetuneRefused, match="tiny-ct stays") as info:
        mv.finetune("tiny-ct", [image], [liver_only(corrected, [4, 10, 16])], [[4, 10, 16]],
                    FinetuneOptions(steps=5, device="cpu", new_id="tiny-ct-refused", min_gain=1.0,
                                    on_validation=curve.append))
    figures = info.value.guard["figures"]["corrected labels"]["liver"]
    assert set(figures) == {"parent", "new", "voxels"}
    assert info.value.guard["folds"] == "leave one corrected slice out"
    assert "tiny-ct-refused" not in [c.id for c in mv.models.available()]
    scored = [e for e in curve if e["score"] is not None]
    assert scored and all(np.isfinite(e["score"]) and np.isfinite(e["parent_score"]) for e in scored)


def test_folds_one_slice_halves_up_to_three_leave_one_out_more_hold_a_fifth():
    def items(n):
        unit = np.full((10, 4, 6), -1, np.int32)
        for u in range(n):
            unit[u * 2] = u
        return [(None, None, unit)]

    maps, n, how = fold_maps(items(1), 1)
    assert n == 2 and set(np.unique(maps[0][0, :, :3])) == {0} and set(np.unique(maps[0][0, :, 3:])) == {1}
    maps, n, how = fold_maps(items(3), 3)
    assert n == 3 and how == "leave one corrected slice out"
    maps, n, how = fold_maps(items(5), 5)
    assert n == 1 and (maps[0] == 0).any(axis=(1, 2)).sum() == 1


def test_the_verdict_needs_a_gain_and_no_label_falling():
    parent = {"touched": {1: [40, 100, 50]}, "kept": {2: [50, 100, 50]}}
    better = {"touched": {1: [45, 100, 50]}, "kept": {2: [50, 100, 50]}}
    spleen_lost = {"touched": {1: [45, 100, 50]}, "kept": {2: [45, 100, 50]}}
    names = {1: "liver", 2: "spleen"}
    assert guard_verdict(parent, better, names, 0.01, 0.01)[0]
    ok, figures, why = guard_verdict(parent, spleen_lost, names, 0.01, 0.01)
    assert not ok and "spleen falls" in why and figures["labels left to the parent"]["spleen"]["new"] == 0.9
    assert not guard_verdict(parent, parent, names, 0.01, 0.01)[0]


def test_a_label_the_model_does_not_have_is_refused_with_the_reason():
    tiny_ct_model()
    image, corrected = corrected_ct()
    stranger = corrected.with_data(np.where(np.asarray(corrected.data) == 1, 7, 0).astype(np.uint8))
    with pytest.raises(ValueError, match="label ids \\[7\\] that model tiny-ct does not have"):
        mv.finetune("tiny-ct", [image], [stranger])
    with pytest.raises(ValueError, match="not one of the model's labels"):
        mv.finetune("tiny-ct", [image], [liver_only(corrected, [4])], [[4]], corrected_labels=["pancreas"])


def test_versions_roll_back_and_are_announced():
    tiny_ct_model()
    image, corrected = corrected_ct()
    card = mv.finetune("tiny-ct", [image], [liver_only(corrected, [4, 10])], [[4, 10]],
                       FinetuneOptions(steps=3, device="cpu", new_id="tiny-ct-v1", guard=False))
    line = mv.models.versions(card.id)
    assert [v["id"] for v in line] == ["tiny-ct", "tiny-ct-v1"] and line[0]["current"]
    events = []
    stop = mv.models.on_change(lambda *e: events.append(e))
    try:
        assert mv.models.rollback("tiny-ct-v1") == "tiny-ct-v1"
        assert mv.models.current("tiny-ct") == "tiny-ct-v1"
        mv.models.rollback("tiny-ct")
        mv.models.remove_model("tiny-ct-v1")
    finally:
        stop()
    assert events == [("current", "tiny-ct-v1"), ("current", "tiny-ct"), ("removed", "tiny-ct-v1")]
    assert mv.models.current("tiny-ct") == "tiny-ct"


# --- untouched labels held over the whole cached scan ---------------------------------------------

ROI = (4, 8, 8)
NAMES = {1: "liver", 2: "spleen"}


def toy_head():
    """A head on two features of a 4x8x8 window: feature 0 runs 0..1 along x, feature 1 is 1.
    The parent calls x < 0.3 background, 0.3-0.9 liver, the last column spleen (liver 7, spleen 8)."""
    from types import SimpleNamespace

    conv = torch.nn.Conv3d(2, 3, 1)
    with torch.no_grad():
        conv.weight[:] = torch.tensor([[0.0, 0.0], [10.0, -3.0], [20.0, -12.0]]).reshape(3, 2, 1, 1, 1)
        conv.bias.zero_()
    network = SimpleNamespace(head=SimpleNamespace(conv=conv))
    x = torch.linspace(0, 1, ROI[-1]).expand(ROI)
    features = torch.stack([x, torch.ones(ROI)])
    with torch.no_grad():
        parent = conv(features[None])[0]
    whole = tuple(slice(0, n) for n in ROI)
    window = Window(features.half(), parent.half(), np.full(ROI, -1, np.int64), np.full(ROI, -1, np.int16),
                    np.ones(ROI, bool), 0, whole, whole)
    items = [(None, None, np.full(ROI, -1, np.int32))]
    return network, window, items


def test_a_change_that_would_take_an_untouched_label_is_scaled_down_until_it_holds():
    network, window, items = toy_head()
    parent_scan = scan_labels([window], {"w": network.head.conv.weight, "b": network.head.conv.bias}, items)
    assert (parent_scan[0][0][..., -1] == 2).all() and (parent_scan[0][0][..., 3:7] == 1).all()
    # raising the liver's bias by 2.2 would give it the spleen's column (7 + 2.2 > 8)
    run = TailRun({}, [], ([1], torch.zeros(1, 2), torch.tensor([2.2])))
    held = hold_untouched(network, run, [window], items, parent_scan, [1], NAMES, max_loss=0.01)
    assert held.scale == 0.35 and held.untouched == {"spleen": 1.0}   # 7 + 0.77 < 8 < 7 + 1.1
    labels = scan_labels([window], held.state, items)[0][0]
    assert (labels[..., -1] == 2).all()


def test_training_moves_the_touched_label_where_the_user_says_and_holds_the_untouched_one():
    network, window, items = toy_head()
    window.user[..., 2] = 1                  # the user says the third column (x = 0.29) is liver
    parent_scan = scan_labels([window], {"w": network.head.conv.weight, "b": network.head.conv.bias}, items)
    run = train_tail(network, [window], None, steps=80, lr=2e-2, distill=1.0, seed=0, device="cpu", touched=[1])
    held = hold_untouched(network, run, [window], items, parent_scan, [1], NAMES, max_loss=0.01)
    labels = scan_labels([window], held.state, items)[0][0]
    assert held.scale == 1.0 and held.untouched == {"spleen": 1.0}
    assert (labels[..., 2] == 1).all() and (labels[..., -1] == 2).all() and (labels[..., :2] == 0).all()
    assert torch.equal(held.state["head.conv.weight"][2], network.head.conv.weight[2])  # spleen's row as it was


def test_the_verdict_refuses_when_an_untouched_label_moves_over_the_scan():
    parent = {"touched": {1: [40, 100, 50]}, "kept": {2: [50, 100, 50]}}
    better = {"touched": {1: [45, 100, 50]}, "kept": {2: [50, 100, 50]}}
    names = {1: "liver", 2: "spleen"}
    assert guard_verdict(parent, better, names, 0.01, 0.01, {"spleen": 0.995})[0]
    ok, figures, why = guard_verdict(parent, better, names, 0.01, 0.01, {"spleen": 0.97})
    assert not ok and "spleen would change" in why
    assert figures["untouched labels, whole scan, dice against the parent"] == {"spleen": 0.97}


def test_corrections_propagate_to_their_neighbours_but_never_from_a_held_out_slice():
    from napari_medvision.tasks.finetune_tail import corrected_items

    card = tiny_ct_model()
    image, corrected = corrected_ct()
    slices = [[4, 10, 16]]
    labels = [liver_only(corrected, slices[0])]
    items, n_units = corrected_items(card, [image], labels, slices)
    folds, n_folds, _ = fold_maps(items, n_units)
    got = propagated_targets(card, [image], labels, slices, items, folds, n_units, [1], [None, 0, 1, 2], "cpu")[0]
    unit = items[0][2]
    for run, target in got.items():
        assert not (target[unit >= 0] >= 0).any()                       # corrected slices speak for themselves
        assert set(np.unique(target)) <= {-1, 0, 1}
    after_middle = int(np.flatnonzero((unit == 1).any(axis=(1, 2)))[0]) + 1
    assert (got[None][after_middle] == 1).any()                          # liver carried next to slice 10
    assert (got[1][after_middle] == -1).all()                            # not when slice 10 is held out
    assert (got[1] >= 0).sum() < (got[None] >= 0).sum()


def test_the_card_records_that_untouched_labels_held_over_the_scan():
    tiny_ct_model()
    image, corrected = corrected_ct()
    card = mv.finetune("tiny-ct", [image], [liver_only(corrected, [4, 10, 16])], [[4, 10, 16]],
                       FinetuneOptions(steps=10, device="cpu", new_id="tiny-ct-held", guard=False))
    guard = card.training["guard"]
    held = guard["untouched labels, whole scan, dice against the parent"]
    assert set(held) <= {"spleen"} and all(v >= 0.995 for v in held.values())
    assert 0.0 <= guard["scale"] <= 1.0 and card.training["data"]["propagated"]["voxels"] > 0


def test_voxels_the_user_corrected_do_not_count_against_the_untouched_labels():
    network, window, items = toy_head()
    parent_scan = scan_labels([window], {"w": network.head.conv.weight, "b": network.head.conv.bias}, items)
    items[0][2][..., -1] = 0          # the user corrected the spleen's column (to liver): the parent is overruled there
    run = TailRun({}, [], ([1], torch.zeros(1, 2), torch.tensor([2.2])))
    held = hold_untouched(network, run, [window], items, parent_scan, [1], NAMES, max_loss=0.01)
    assert held.scale == 1.0
