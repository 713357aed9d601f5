"""mv.segment and `medvision segment`: a new label map on the input's grid, the input untouched."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import napari_medvision as mv  # noqa: E402
from napari_medvision.cli import main as cli  # noqa: E402
from napari_medvision.models.card import ModelCard  # noqa: E402
from napari_medvision.models.transunet import PRESETS_2D, PRESETS_3D  # noqa: E402


def tiny_ct_model(model_id: str = "tiny-ct") -> ModelCard:
    torch.manual_seed(0)
    architecture = {"name": "transunet3d", "config": dict(PRESETS_3D["tiny"], n_classes=3)}
    card = ModelCard(id=model_id, task="segmentation", architecture=architecture, modality="CT",
                     input={"spacing": [3.0, 3.0, 3.0], "normalisation": {"kind": "ct_window", "low": -200, "high": 300},
                            "patch_size": [32, 32, 32], "channels": 1, "dims": 3},
                     labels={1: "liver", 2: "spleen"}, sha256="", metrics={"note": "untrained test model"})
    return mv.models.save_model(mv.models.build_model(architecture), card)


def tiny_fundus_model() -> ModelCard:
    architecture = {"name": "transunet2d", "config": dict(PRESETS_2D["tiny"], in_channels=3, n_classes=2)}
    card = ModelCard(id="tiny-fundus", task="segmentation", architecture=architecture, modality="fundus",
                     input={"spacing": None, "normalisation": {"kind": "rgb_unit"}, "patch_size": [64, 64],
                            "channels": 3, "dims": 2}, labels={1: "vessel"}, sha256="")
    return mv.models.save_model(mv.models.build_model(architecture), card)


def small_ct():
    from napari_medvision.synthetic import ct_abdomen

    image, labels = ct_abdomen(seed=0, shape=(20, 48, 40), spacing=(2.5, 2.0, 2.0))
    return image


def test_segment_returns_named_labels_on_the_input_grid():
    tiny_ct_model()
    image = small_ct()
    before = np.array(image.data, copy=True)
    seg = mv.segment(image, model="tiny-ct", device="cpu")
    assert seg.is_labels and seg.labels == {1: "liver", 2: "spleen"}
    assert seg.same_grid(image, tol=1e-9) and seg.data.shape == image.data.shape
    assert set(np.unique(seg.data)) <= {0, 1, 2}
    assert seg.meta["model"] == "tiny-ct"
    np.testing.assert_array_equal(image.data, before)


def test_colour_photo_with_a_2d_model():
    tiny_fundus_model()
    from napari_medvision.synthetic import fundus_photo

    photo, _ = fundus_photo(seed=0, size=(96, 80))
    seg = mv.segment(photo, model="tiny-fundus", device="cpu")
    assert seg.data.shape == (96, 80) and seg.labels == {1: "vessel"}


def test_mismatched_inputs_are_refused_with_the_reason():
    tiny_ct_model()
    from napari_medvision.synthetic import fundus_photo

    photo, _ = fundus_photo(seed=0, size=(64, 64))
    with pytest.raises(ValueError, match="expects greyscale images"):
        mv.segment(photo, model="tiny-ct")
    flat = mv.Volume(np.zeros((32, 32), np.int16), spacing=(1, 1), modality="CT")
    with pytest.raises(ValueError, match="segments 3D volumes"):
        mv.segment(flat, model="tiny-ct")
    with pytest.raises(ValueError, match="no model with this id"):
        mv.segment(small_ct(), model="no-such-model")


def test_progress_reports_reach_the_caller():
    tiny_ct_model()
    seen = []
    mv.segment(small_ct(), model="tiny-ct", device="cpu", progress=lambda d, t, m: seen.append((d, t, m)))
    assert seen[0][2] == "loading model tiny-ct"  # the first stage is named before the weights load
    assert seen[-1][0] == seen[-1][1]


def test_command_line_segment_and_models(tmp_path, capsys):
    tiny_ct_model()
    scan = mv.save(small_ct(), tmp_path / "ct.nii.gz")
    out = tmp_path / "organs.nrrd"
    assert cli(["segment", str(scan), "-o", str(out), "--model", "tiny-ct", "--device", "cpu"]) == 0
    labels = mv.load(out)
    assert labels.labels == {1: "liver", 2: "spleen"} and labels.data.shape == (20, 48, 40)
    assert cli(["models"]) == 0
    assert "tiny-ct" in capsys.readouterr().out
    assert cli(["segment", str(tmp_path / "missing.nii.gz"), "-o", str(out), "--model", "tiny-ct"]) == 2
