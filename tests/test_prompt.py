"""In-context prompting: a whole volume from a few painted slices or from example scans."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

import napari_medvision as mv
from napari_medvision.engine.progress import Cancelled, CancelToken
from napari_medvision.synthetic import ct_abdomen
from napari_medvision.tasks.prompting.baselines import affine_registration, slice_copy

torch.set_num_threads(1)

SHAPE, SPACING = (24, 64, 64), (6.0, 4.0, 4.0)  # small phantoms: ~1 s to build, a few s to prompt
LIVER, SPLEEN = 1, 2


def dice(pred, truth, k):
    p, t = np.asarray(pred) == k, np.asarray(truth) == k
    return 2 * (p & t).sum() / (p.sum() + t.sum())


@pytest.fixture(scope="module")
def phantom():
    image, labels = ct_abdomen(seed=1, shape=SHAPE, spacing=SPACING)
    organs = np.where(np.isin(labels.data, [LIVER, SPLEEN]), labels.data, 0).astype(np.uint8)
    return image, labels.with_data(organs)


def painted(labels, slices):
    data = np.zeros_like(labels.data)
    data[slices] = labels.data[slices]
    return labels.with_data(data)


def test_prompt_from_three_slices_segments_liver_and_spleen(phantom):
    image, truth = phantom
    annotations = painted(truth, [8, 12, 16])
    result = mv.prompt(image, annotations=annotations, device="cpu")

    assert result.same_grid(image) and result.labels == {LIVER: "liver", SPLEEN: "spleen"}
    np.testing.assert_array_equal(result.data[12], truth.data[12])  # painted slices are kept as drawn
    copied = slice_copy(annotations).data
    ours = [dice(result.data, truth.data, k) for k in (LIVER, SPLEEN)]
    baseline = [dice(copied, truth.data, k) for k in (LIVER, SPLEEN)]
    assert ours[0] > 0.85 and ours[1] > 0.6, ours
    assert np.mean(ours) > np.mean(baseline) + 0.05, (ours, baseline)
    # Leave-one-out over the three slices: an estimate per label, and the variant it picked.
    expected = result.meta["expected_dice"]
    assert set(expected) == {"liver", "spleen"} and 0.3 < expected["liver"] <= 1.0
    assert result.meta["choice"] in result.meta["leave_one_out"]


def test_a_slice_named_as_annotated_but_empty_keeps_the_organ_out(phantom):
    image, truth = phantom
    assert not (truth.data[4] == LIVER).any()  # the liver starts lower down in this phantom
    annotations = painted(truth, [10, 14])
    result = mv.prompt(image, annotations=annotations, annotated_slices=[4, 10, 14], device="cpu")
    assert result.meta["annotated_slices"] == [4, 10, 14]
    assert not (result.data[4] != 0).any()


def test_painting_one_more_slice_previews_only_the_slabs_it_changes(phantom):
    image, truth = phantom
    first = mv.prompt(image, annotations=painted(truth, [8, 16]), device="cpu")
    more = painted(truth, [8, 12, 16])

    preview = mv.prompt(image, annotations=more, previous=first, device="cpu")
    assert preview.meta["preview"] and preview.meta["redone"] == [(8, 16)]
    assert preview.meta["choice"] == first.meta["choice"] and "prompt-head" in preview.meta["cached"]
    assert np.array_equal(preview.data[:8], first.data[:8]) and np.array_equal(preview.data[17:], first.data[17:])
    assert np.array_equal(preview.data[12], more.data[12])  # the new slice as painted
    checked = mv.prompt(image, annotations=more, device="cpu")
    assert not checked.meta["preview"] and checked.meta["expected_dice"]["liver"] is not None
    assert dice(preview.data, truth.data, LIVER) > 0.8
    assert abs(dice(preview.data, truth.data, LIVER) - dice(checked.data, truth.data, LIVER)) < 0.05


@pytest.mark.parametrize("margin, model", [(24, None), (8, None),  # 8: too tight at first, widened until it fits
                                           (24, "medical-dino-vitt8")])  # DINO features are cut to the window too
def test_a_preview_of_an_organ_predicts_around_it_and_equals_the_whole_slice_answer(monkeypatch, margin, model):
    prompt_module = importlib.import_module("napari_medvision.tasks.prompting.prompt")  # the package exports the function

    image, labels = ct_abdomen(seed=3, shape=(20, 128, 128), spacing=(6.0, 3.0, 3.0))
    truth = labels.with_data((np.asarray(labels.data) == LIVER).astype(np.uint8), labels={1: "liver"})
    first = mv.prompt(image, annotations=painted(truth, [6, 14]), model=model, device="cpu")
    more = painted(truth, [6, 10, 14])

    monkeypatch.setattr(prompt_module, "PREVIEW_MARGIN", margin)
    around = mv.prompt(image, annotations=more, previous=first, model=model, device="cpu")
    (y0, y1, x0, x1), = around.meta["windows"]
    assert (y1 - y0) * (x1 - x0) < 0.8 * 128 * 128  # a part of each slice, not all of it
    monkeypatch.setattr(prompt_module, "PREVIEW_MARGIN", 1000)  # a window as large as the slice: none
    whole = mv.prompt(image, annotations=more, previous=first, model=model, device="cpu")
    assert whole.meta["windows"] == [None]
    np.testing.assert_array_equal(around.data, whole.data)
    assert dice(around.data, truth.data, 1) > 0.8


def test_a_preview_is_refused_when_an_earlier_slice_was_changed(phantom):
    image, truth = phantom
    first = mv.prompt(image, annotations=painted(truth, [8, 16]), device="cpu")
    moved = mv.prompt(image, annotations=painted(truth, [10, 12, 16]), previous=first, device="cpu")
    assert not moved.meta["preview"]  # slice 8 is gone: the full, checked prompt ran


def test_prompt_from_an_example_scan_beats_affine_registration(phantom):
    image, truth = phantom
    example = ct_abdomen(seed=2, shape=SHAPE, spacing=SPACING)
    result = mv.prompt(image, examples=[example], labels=["liver", "spleen"], device="cpu")

    assert result.labels == {LIVER: "liver", SPLEEN: "spleen"}
    registered = affine_registration(image, *example).data
    ours, baseline = dice(result.data, truth.data, LIVER), dice(registered, truth.data, LIVER)
    assert ours > 0.8 and ours > baseline, (ours, baseline)
    assert result.meta["expected_dice"] == {"liver": None, "spleen": None}  # one example: nothing to hold out


def test_one_painted_slice_uses_the_head_only_where_it_agrees_with_the_carried_mask(data_dir):
    folder = data_dir / "ct_mr_totalseg"
    organs = {5: "liver", 1: "spleen", 2: "kidney_right", 3: "kidney_left"}  # TotalSegmentator ids
    for image, seg, expected in (("example_ct_sm.nii.gz", "example_seg.nii.gz", "combined:2"),
                                 ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz", "propagation")):
        scan, labels = mv.load(folder / image), mv.load(folder / seg)
        truth = np.where(np.isin(labels.data, list(organs)), labels.data, 0).astype(np.uint8)
        z = int(np.mean(np.flatnonzero(truth.reshape(len(truth), -1).any(1))))  # one slice mid-way
        one = np.zeros_like(truth)
        one[z] = truth[z]
        result = mv.prompt(scan, annotations=labels.with_data(one, labels=organs), device="cpu")
        # MR organs share intensities: the head disagrees with the carried mask next to the slice
        assert result.meta["choice"] == expected, (image, result.meta["head_agreement"])
        assert np.mean([dice(result.data, truth, k) for k in organs if (truth == k).any()]) > 0.7


def test_registration_of_an_example_is_the_same_every_time(phantom):
    image, _ = phantom
    example = ct_abdomen(seed=2, shape=SHAPE, spacing=SPACING)
    first, second = affine_registration(image, *example), affine_registration(image, *example)
    assert np.array_equal(first.data, second.data)


@pytest.mark.parametrize("example, target, margin", [("CT", "MR", 0.02), ("MR", "CT", 0.0)])
def test_an_example_of_another_modality_lends_its_layout_and_the_target_its_look(data_dir, example, target, margin):
    folder = data_dir / "ct_mr_totalseg"
    organs = {5: "liver", 1: "spleen", 2: "kidney_right", 3: "kidney_left"}  # TotalSegmentator ids
    files = {"CT": ("example_ct_sm.nii.gz", "example_seg.nii.gz"),
             "MR": ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz")}

    def scan(kind):
        image, seg = files[kind]
        labels = mv.load(folder / seg)
        kept = np.where(np.isin(labels.data, list(organs)), labels.data, 0).astype(np.uint8)
        return mv.load(folder / image), labels.with_data(kept, labels=organs)

    given, (image, truth) = scan(example), scan(target)
    result = mv.prompt(image, examples=[given], device="cpu")  # one labelled scan of someone else
    assert result.meta["choice"] == "adapted"
    by_name = {v: k for k, v in result.labels.items()}
    ours = np.mean([dice(result.data == by_name[n], truth.data == k, True) for k, n in organs.items()])
    registered = affine_registration(image, *given).data
    baseline = np.mean([dice(registered, truth.data, k) for k in organs])
    assert ours > baseline + margin, (ours, baseline)


def test_the_registrations_of_one_example_run_side_by_side_as_they_would_alone(phantom):
    from napari_medvision.tasks.prompting.features import normalised
    from napari_medvision.tasks.prompting.register import register_affine, register_affines

    image, _ = phantom
    example, _ = ct_abdomen(seed=2, shape=SHAPE, spacing=SPACING)
    together = register_affines(image, normalised(image), example, normalised(example), count=2)
    alone = [register_affine(image, normalised(image), example, normalised(example), seed=s) for s in (0, 1)]
    assert [t.GetParameters() for t in together] == [t.GetParameters() for t in alone]
    assert together[0].GetParameters() != together[1].GetParameters()  # each seed samples other voxels


def test_cancel_stops_the_registrations_within_a_few_iterations(phantom):
    from napari_medvision.tasks.prompting.features import normalised
    from napari_medvision.tasks.prompting.register import register_affines

    class CancelledAfterThreeLooks(CancelToken):
        looks = 0

        @property
        def cancelled(self):  # read once per optimiser iteration
            self.looks += 1
            return self.looks > 3

        def raise_if_cancelled(self):
            if self.cancelled:
                raise Cancelled("cancelled by the user")

    image, _ = phantom
    example, _ = ct_abdomen(seed=2, shape=SHAPE, spacing=SPACING)
    token = CancelledAfterThreeLooks()
    with pytest.raises(Cancelled):
        register_affines(image, normalised(image), example, normalised(example), count=1, cancel=token)
    assert token.looks < 20  # a whole registration of this pair runs ~300 iterations


def test_registration_samples_a_fifth_of_a_small_scan_and_at_most_1e5_voxels_of_a_large_one():
    from napari_medvision.tasks.prompting.register import MAX_SAMPLES, sampling_shares

    assert sampling_shares((30, 101, 122)) == [0.2, 0.2, 0.2]  # the real CT of docs/evaluation/prompting.md
    shares = sampling_shares((300, 512, 512))  # coarse to fine: 1/4, 1/2, full resolution
    assert shares[0] < 0.2 and shares[-1] * 300 * 512 * 512 == pytest.approx(MAX_SAMPLES)


def test_adapting_may_move_a_registered_label_but_not_discard_most_of_it():
    from napari_medvision.tasks.prompting.runs import keep_registration_where_dropped

    registered = np.zeros((1, 10, 10), np.int32)
    registered[0, 1:5, 1:5] = 1  # 16 pixels of label 1
    registered[0, 6:9, 6:9] = 2  # 9 pixels of label 2
    adapted = np.zeros_like(registered)
    adapted[0, 1:5, 1:4] = 1  # label 1 keeps 12 of 16 (75 %): the adapted edge stands
    adapted[0, 6:8, 8:10] = 2  # label 2 shrank to 4 pixels, one of them outside its registered place
    out = keep_registration_where_dropped(adapted, registered, 3)
    np.testing.assert_array_equal(out == 1, adapted == 1)
    np.testing.assert_array_equal(out == 2, registered == 2)


def test_registrations_are_reused_when_one_more_example_is_added(phantom):
    image, _ = phantom
    first = ct_abdomen(seed=2, shape=SHAPE, spacing=SPACING)
    one = mv.prompt(image, examples=[first], labels=["liver"], device="cpu")
    assert "prompt-affine" not in one.meta["cached"]
    two = mv.prompt(image, examples=[first, ct_abdomen(seed=3, shape=SHAPE, spacing=SPACING)], labels=["liver"],
                    device="cpu")
    assert two.meta["cached"].count("prompt-affine") == 1  # the first example onto the target, read back
    again = mv.prompt(image, examples=[first], labels=["liver"], device="cpu")
    uncached = mv.prompt(image, examples=[first], labels=["liver"], device="cpu", cache=False)
    assert np.array_equal(again.data, one.data) and np.array_equal(uncached.data, one.data)


def test_two_examples_give_a_leave_one_out_estimate():
    shape, spacing = (12, 40, 40), (12.0, 6.4, 6.4)
    target, truth = ct_abdomen(seed=1, shape=shape, spacing=spacing)
    examples = [ct_abdomen(seed=s, shape=shape, spacing=spacing) for s in (2, 3)]
    result = mv.prompt(target, examples=examples, labels=["liver"], device="cpu")
    estimate = result.meta["expected_dice"]["liver"]
    assert 0.5 < estimate <= 1.0
    assert abs(estimate - dice(result.data, truth.data, LIVER)) < 0.25  # the estimate is about right


def test_one_drive_photo_as_example_finds_the_vessels_of_another(data_dir):
    drive = data_dir / "fundus_drive_train"

    def half(i):  # half resolution keeps the test at a few seconds on a 2-core CPU
        image, vessels = mv.load(drive / f"images/{i}_training.tif"), mv.load(drive / f"1st_manual/{i}_manual1.gif")
        image = mv.Volume(np.asarray(image.data)[::2, ::2], spacing=(2, 2), rgb=True, modality="fundus")
        return image, mv.Volume((np.asarray(vessels.data)[::2, ::2] > 0).astype(np.uint8), (2, 2), labels={1: "vessel"})

    target, truth = half(21)
    example = half(22)
    result = mv.prompt(target, examples=[example], device="cpu")
    assert result.data.shape == truth.data.shape and not result.rgb and result.labels == {1: "vessel"}
    ours, registered = dice(result.data, truth.data, 1), dice(affine_registration(target, *example).data, truth.data, 1)
    assert ours > 0.7 and ours > registered + 0.3, (ours, registered)


def test_slice_copy_copies_the_nearest_annotated_slice():
    data = np.zeros((6, 3, 3), dtype=np.uint8)
    data[1, 0, 0], data[4, 2, 2] = 1, 2
    copied = slice_copy(mv.Volume(data, spacing=(1, 1, 1), labels={1: "a", 2: "b"})).data
    assert [int(copied[z].max()) for z in range(6)] == [1, 1, 1, 2, 2, 2]
    assert copied[0, 0, 0] == 1 and copied[5, 2, 2] == 2


def test_affine_registration_of_a_scan_onto_itself_returns_its_mask(phantom):
    image, truth = phantom
    moved = affine_registration(image, image, truth)
    assert dice(moved.data, truth.data, LIVER) > 0.95


def test_bad_prompts_are_refused_with_a_reason(phantom):
    image, truth = phantom
    with pytest.raises(ValueError, match="no annotated slice"):
        mv.prompt(image, annotations=truth.with_data(np.zeros_like(truth.data)))
    with pytest.raises(ValueError, match="differ"):
        mv.prompt(image, examples=[(image, truth.with_data(truth.data[:, :32]))])
    with pytest.raises(ValueError, match="either annotations"):
        mv.prompt(image)
    with pytest.raises(ValueError, match="none of the labels"):
        mv.prompt(image, annotations=painted(truth, [12]), labels=["pancreas"])


def test_cancel_stops_and_progress_only_goes_up(phantom):
    image, truth = phantom
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        mv.prompt(image, annotations=painted(truth, [10, 14]), cancel=token, device="cpu")

    seen = []
    mv.prompt(image, annotations=painted(truth, [10, 14]), device="cpu",
              progress=lambda done, total, message: seen.append((done, total)))
    done = [d for d, _ in seen]
    assert done == sorted(done) and seen[-1][0] == seen[-1][1] and len(seen) > 5


def test_cli_prompt_writes_a_label_map(phantom, tmp_path):
    from napari_medvision.cli import main

    image, truth = phantom
    mv.save(image, tmp_path / "ct.nii.gz")
    mv.save(painted(truth, [8, 12, 16]), tmp_path / "painted.nii.gz")
    code = main(["prompt", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "out.nii.gz"),
                 "--annotations", str(tmp_path / "painted.nii.gz"), "--device", "cpu"])
    assert code == 0
    written = mv.load(tmp_path / "out.nii.gz")
    assert dice(written.data, truth.data, LIVER) > 0.85
    assert main(["prompt", str(tmp_path / "ct.nii.gz"), "-o", str(tmp_path / "x.nii.gz"),
                 "--annotations", str(tmp_path / "ct.nii.gz")]) == 2  # an image is no annotation


@pytest.mark.slow
def test_dino_features_join_the_head_when_a_backbone_is_named():
    from napari_medvision.synthetic import fundus_photo

    target, _ = fundus_photo(seed=1, size=(96, 96))
    result = mv.prompt(target, examples=[fundus_photo(seed=2, size=(96, 96))], model="random-vits14", device="cpu")
    assert result.data.shape == (96, 96) and result.labels == {1: "vessel"}


def test_intensity_features_in_parallel_blocks_equal_one_pass():
    from napari_medvision.tasks.prompting.features import _filter_responses, intensity_features

    slices = np.random.default_rng(0).random((19, 40, 48, 3)).astype(np.float32)  # 3 blocks, colour

    one_pass = _filter_responses(slices)

    assert intensity_features(slices).shape == (19, 40, 48, 30)
    np.testing.assert_array_equal(intensity_features(slices, workers=3), one_pass)
    np.testing.assert_array_equal(intensity_features(slices, workers=1), one_pass)


def test_the_gpu_filters_equal_scipys_to_float32_rounding():
    from napari_medvision.tasks.prompting.features import _filter_responses, _torch_filters

    rng = np.random.default_rng(0)
    for shape in ((5, 40, 48, 1), (3, 9, 7, 3)):  # the second narrower than the widest kernel (33 px)
        slices = rng.random(shape).astype(np.float32)
        np.testing.assert_allclose(_torch_filters(slices, "cpu", block=2), _filter_responses(slices), atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_intensity_features_on_a_gpu_equal_the_cpus():
    from napari_medvision.tasks.prompting.features import intensity_features

    slices = np.random.default_rng(0).random((19, 40, 48, 3)).astype(np.float32)
    np.testing.assert_allclose(intensity_features(slices, device="cuda"), intensity_features(slices), atol=1e-5)
