"""Brain tumour segmentation from whichever MR contrasts a user has (``mr-brain-tumour-3d``).

Real BraTS 2013 crops (the ``data_dir`` fixture skips where the shared data is absent), halved in
resolution so each call runs in about a second on a CPU.
"""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import napari_medvision as mv  # noqa: E402
from napari_medvision.cli import main as cli  # noqa: E402
from napari_medvision.models.card import ModelCard  # noqa: E402
from napari_medvision.models.transunet import PRESETS_3D  # noqa: E402
from napari_medvision.recipes import brain_tumour, brain_tumour_training  # noqa: E402
from napari_medvision.tasks.contrasts import ContrastError, contrast_name  # noqa: E402
from napari_medvision.volume import Volume  # noqa: E402

PATIENT = "brats_2013_pat0004_1"


def tiny_tumour_model(model_id: str = "tiny-tumour") -> ModelCard:
    """An untrained two-contrast model with the shipped model's input recipe (for wiring tests)."""
    torch.manual_seed(0)
    architecture = {"name": "transunet3d", "config": dict(PRESETS_3D["tiny"], in_channels=2, n_classes=4)}
    spec = dict(brain_tumour.new_card(architecture).input, patch_size=[32, 32, 32])
    card = ModelCard(id=model_id, task="segmentation", architecture=architecture, modality="MR", input=spec,
                     labels=dict(brain_tumour.LABELS), sha256="", metrics={"note": "untrained test model"})
    return mv.models.save_model(mv.models.build_model(architecture), card)


def tumour_crop(data_dir, step: int = 2):
    """FLAIR, T1c (Volumes) and our region labels of a box around one patient's tumour, every
    ``step``-th voxel (spacing ``step`` mm)."""
    return _tumour_crop(step)


@functools.lru_cache(maxsize=2)
def _tumour_crop(step: int):
    contrasts, labels = brain_tumour.patient(PATIENT)
    where = np.argwhere(labels > 0)
    centre = (where.min(0) + where.max(0)) // 2
    box = tuple(slice(max(0, c - h), c + h, step) for c, h in zip(centre, (32, 56, 56)))  # brain and background
    flair, t1c = (Volume(np.asarray(contrasts[c].data)[box].copy(), spacing=(float(step),) * 3, modality="MR",
                         meta={"source": f"{PATIENT} {c}"}) for c in ("flair", "t1c"))
    return flair, t1c, brain_tumour.BRATS_TO_OURS[labels[box]]


def whole_tumour_dice(prediction, truth) -> float:
    p, t = np.asarray(prediction) > 0, np.asarray(truth) > 0
    return float(2 * (p & t).sum() / (p.sum() + t.sum()))


def test_contrast_names_users_write_map_to_the_model_names():
    assert [contrast_name(n) for n in ("FLAIR", "T1ce", "t1_gd", "T2w", "t1")] == ["flair", "t1c", "t1c", "t2", "t1"]
    with pytest.raises(ContrastError, match="'dwi' is not one"):
        contrast_name("dwi")


def test_any_subset_of_contrasts_gives_named_regions_and_volumes(data_dir):
    tiny_tumour_model()
    flair, t1c, _ = tumour_crop(data_dir)
    for given in ({"flair": flair, "t1c": t1c}, {"FLAIR": flair}, {"t1c": t1c}, flair):
        seg = mv.segment(given, model="tiny-tumour", device="cpu")
        assert seg.same_grid(flair) and seg.labels == brain_tumour.LABELS
        counts = np.bincount(np.asarray(seg.data).ravel(), minlength=4)
        assert seg.meta["volumes_ml"]["whole tumour"] == pytest.approx(counts[1:].sum() * 8 / 1000, abs=0.01)
        assert seg.meta["volumes_ml"]["tumour core"] == pytest.approx((counts[1] + counts[3]) * 8 / 1000, abs=0.01)
    assert seg.meta["contrasts"] == ["flair"]


def test_contrasts_on_another_grid_are_resampled_with_a_note(data_dir):
    tiny_tumour_model()
    flair, t1c, _ = tumour_crop(data_dir)
    coarse = Volume(np.asarray(t1c.data)[::2, ::2, ::2].copy(), spacing=(4.0, 4.0, 4.0),
                    origin=tuple(o + 1.0 for o in t1c.origin), modality="MR")
    with pytest.warns(UserWarning, match="co-registered"):
        seg = mv.segment({"flair": flair, "t1c": coarse}, model="tiny-tumour", device="cpu")
    assert seg.same_grid(flair) and "t1c lay on a different grid" in seg.meta["notes"][0]


def test_bad_contrast_input_is_refused_with_the_reason(data_dir):
    tiny_tumour_model()
    flair, t1c, _ = tumour_crop(data_dir)
    with pytest.raises(ContrastError, match="at least one contrast"):
        mv.segment({}, model="tiny-tumour")
    with pytest.raises(ContrastError, match="'pd' is not one"):
        mv.segment({"flair": flair, "pd": t1c}, model="tiny-tumour")
    with pytest.raises(ContrastError, match="no geometry"):
        mv.segment({"flair": flair, "t1c": np.zeros((10, 12, 14), np.float32)}, model="tiny-tumour")
    with pytest.raises(ContrastError, match="needs at least one of flair, t1c"):
        mv.segment({"t2": flair}, model="tiny-tumour")
    from test_segment import tiny_ct_model

    tiny_ct_model()
    with pytest.raises(ContrastError, match="takes one image"):
        mv.segment({"flair": flair}, model="tiny-ct")


def test_command_line_takes_contrasts_by_name(data_dir, tmp_path, capsys):
    tiny_tumour_model()
    flair, t1c, _ = tumour_crop(data_dir)
    mv.save(flair, tmp_path / "flair.nii.gz")
    mv.save(t1c, tmp_path / "t1c.nii.gz")
    out = tmp_path / "tumour.nii.gz"
    assert cli(["segment", "--flair", str(tmp_path / "flair.nii.gz"), "--t1c", str(tmp_path / "t1c.nii.gz"),
                "-o", str(out), "--model", "tiny-tumour", "--device", "cpu"]) == 0
    assert "whole tumour:" in capsys.readouterr().out
    assert mv.load(out).data.shape == flair.data.shape
    assert cli(["segment", str(tmp_path / "flair.nii.gz"), "--t1c", str(tmp_path / "t1c.nii.gz"), "-o", str(out),
                "--model", "tiny-tumour"]) == 2
    assert "not both" in capsys.readouterr().err


def test_shipped_model_outlines_the_tumour_from_flair_and_t1c(data_dir):
    """The shipped model on a 2 mm crop of a patient it was trained on: checks the wiring and the
    input recipe; its accuracy on unseen patients is in the card (leave-one-patient-out)."""
    flair, t1c, truth = tumour_crop(data_dir)
    seg = mv.segment({"flair": flair, "t1c": t1c}, model="mr-brain-tumour-3d", device="cpu")
    assert whole_tumour_dice(seg.data, truth) > 0.6
    alone = mv.segment(flair, model="mr-brain-tumour-3d", device="cpu")
    assert whole_tumour_dice(alone.data, truth) > 0.5


def test_painted_tumour_slices_propagate_with_prompt(data_dir):
    flair, _, truth = tumour_crop(data_dir)
    whole = (truth > 0).astype(np.uint8)
    rows = np.flatnonzero(whole.any(axis=(1, 2)))
    painted = rows[[len(rows) // 4, len(rows) // 2, 3 * len(rows) // 4]]
    annotations = np.zeros_like(whole)
    annotations[painted] = whole[painted]
    result = mv.prompt(flair, annotations=flair.with_data(annotations, labels={1: "whole tumour"}), cache=False)
    between = np.zeros(len(whole), bool)
    between[rows.min():rows.max() + 1] = True
    between[painted] = False
    assert whole_tumour_dice(np.asarray(result.data)[between], whole[between]) > 0.6


def test_corrections_fine_tune_the_tumour_model(data_dir, tmp_path):
    tiny_tumour_model()
    flair, _, truth = tumour_crop(data_dir)
    rows = np.flatnonzero((truth > 0).any(axis=(1, 2)))
    card = mv.finetune("tiny-tumour", images=[flair], labels=[flair.with_data(truth, labels=brain_tumour.LABELS)],
                       slices=[rows[::6].tolist()], steps=3, device="cpu", guard=False)
    assert card.parent == "tiny-tumour" and card.input["contrasts"] == ["flair", "t1c"]
    seg = mv.segment({"flair": flair}, model=card.id, device="cpu")
    assert seg.same_grid(flair) and "whole tumour" in seg.meta["volumes_ml"]


@pytest.mark.napari
def test_segment_panel_offers_a_layer_per_contrast(make_napari_viewer, qtbot, data_dir):
    pytest.importorskip("napari")
    from napari.layers import Layer

    from napari_medvision._napari.layers import volume_to_layer
    from napari_medvision._napari.widgets.segment import SegmentWidget

    tiny_tumour_model()
    flair, t1c, _ = tumour_crop(data_dir)
    viewer = make_napari_viewer()
    for volume, name in ((flair, "pat4 flair"), (t1c, "pat4_t1c")):
        data, kwargs, kind = volume_to_layer(volume, name=name)
        viewer.add_layer(Layer.create(data, kwargs, kind))
    panel = SegmentWidget(viewer)
    panel.model_box.setCurrentIndex(panel.model_box.findData("tiny-tumour"))
    assert panel.contrasts.isVisibleTo(panel)
    assert {c: box.currentText() for c, box in panel.contrasts.boxes.items()} == {"flair": "pat4 flair",
                                                                                 "t1c": "pat4_t1c"}
    panel.device_box.setCurrentText("cpu")
    panel.run()
    qtbot.waitUntil(lambda: len(viewer.layers) == 3, timeout=120_000)
    assert viewer.layers[-1].data.shape == flair.data.shape
    qtbot.waitUntil(lambda: panel.runner.run_button.isEnabled(), timeout=10_000)
    assert panel.runner.status.text() == "done"


def test_training_drops_contrasts_and_the_card_averages_the_folds(tmp_path):
    rng = np.random.default_rng(0)
    kept = [tuple(np.flatnonzero(brain_tumour_training.contrast_dropout(rng, np.ones((2, 4, 4, 4), np.float32)).any((1, 2, 3))))
            for _ in range(200)]
    assert set(kept) == {(0, 1), (0,), (1,)}  # never both contrasts missing
    for k, dice in enumerate((0.6, 0.8)):
        regions = {"whole tumour": dice, "tumour core": dice / 2, "enhancing tumour": dice / 4}
        fold = {"held_out": f"patient{k}", "scores": {s: regions for s in ("flair + t1c", "flair", "t1c")}}
        (tmp_path / f"fold{k}.json").write_text(json.dumps(fold))
    metrics = brain_tumour.lopo_metrics(tmp_path)
    mean = next(v for k, v in metrics.items() if k.startswith("dice, leave-one-patient-out"))
    assert mean["flair + t1c"]["whole tumour"] == pytest.approx(0.7, abs=1e-4)
    assert set(metrics["per_image"]) == {"patient0", "patient1"}


def test_training_runs_from_prepared_arrays_alone(tmp_path):
    """A GPU machine trains from the arrays ``--save-prepared`` wrote, without the scans or readers."""
    rng = np.random.default_rng(0)
    for name in brain_tumour_training.PATIENTS:
        target = np.zeros((40, 40, 40), np.uint8)
        target[14:26, 14:26, 14:26] = 2
        target[17:23, 17:23, 17:23] = 3
        image = rng.normal(size=(2, 40, 40, 40)).astype(np.float32) + (target > 0)
        brain_tumour_training.save_prepared(tmp_path / "prepared", name, image, target)
    results = tmp_path / "runs"
    brain_tumour_training.main(["--prepared", str(tmp_path / "prepared"), "--folds", "1", "--final", "--steps", "2",
                                "--preset", "tiny", "--workers", "2", "--device", "cpu", "--results", str(results)])
    fold = json.loads((results / "fold1.train.json").read_text())
    assert fold["steps"] == 2 and brain_tumour_training.PATIENTS[1] not in fold["trained_on"]
    assert json.loads((results / "final.train.json").read_text())["trained_on"] == list(brain_tumour_training.PATIENTS)
    assert (results / "final.safetensors").stat().st_size > 0


def test_voxels_inside_the_enhancing_rim_become_tumour_core():
    """A necrotic centre the network calls oedema is core where an enhancing rim encloses it."""
    from napari_medvision.tasks.contrasts import fill_enclosed

    labels = np.zeros((30, 30, 30), np.uint8)
    labels[5:25, 5:25, 5:25] = 2  # oedema
    zz, yy, xx = np.ogrid[:30, :30, :30]
    r = np.sqrt((zz - 15) ** 2 + (yy - 15) ** 2 + (xx - 15) ** 2)
    labels[(r >= 5) & (r < 7)] = 3  # enhancing rim
    labels[0, 0, 0] = 3  # a stray enhancing voxel encloses nothing
    out = fill_enclosed(labels, (1.0, 1.0, 1.0), rim=3, becomes=1, closing_mm=2.0)
    assert (out[r < 5] == 1).all()  # the centre is core now
    assert (out[r >= 7] == labels[r >= 7]).all()  # outside the rim nothing changes
    assert (out == 3).sum() == (labels == 3).sum()
    assert fill_enclosed(np.where(labels == 3, 2, labels).astype(np.uint8), (1, 1, 1), 3, 1).max() == 2
