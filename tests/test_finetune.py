"""mv.finetune and `medvision finetune`: a new model from corrected slices, saved apart, safely."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import napari_medvision as mv  # noqa: E402
from napari_medvision.cli import main as cli  # noqa: E402
from napari_medvision.engine.progress import CancelToken, Cancelled  # noqa: E402
from napari_medvision.models.card import CardError, ModelCard  # noqa: E402
from napari_medvision.models.transunet import PRESETS_2D  # noqa: E402
from napari_medvision.tasks.finetune import (ANCHOR, check_corrections, correction_sampler,  # noqa: E402
                                             prepare_corrections, split_slices)
from napari_medvision.volume import Volume  # noqa: E402

from test_segment import tiny_ct_model  # noqa: E402

KNOWN = {1: "liver", 2: "spleen"}


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Every test of this file runs torch on one thread (conftest)."""


def corrected_ct():
    """A synthetic CT and its reference labels restricted to the tiny model's two organs."""
    from napari_medvision.synthetic import ct_abdomen

    image, labels = ct_abdomen(seed=0, shape=(20, 48, 40), spacing=(2.5, 2.0, 2.0))
    data = np.where(np.isin(labels.data, list(KNOWN)), labels.data, 0).astype(np.uint8)
    return image, labels.with_data(data, labels=dict(KNOWN))


def tiny_slice_model() -> ModelCard:
    """A 2D model for greyscale CT slices (runs slice by slice on 3D volumes)."""
    torch.manual_seed(0)
    architecture = {"name": "transunet2d", "config": dict(PRESETS_2D["tiny"], in_channels=1, n_classes=3)}
    card = ModelCard(id="tiny-ct-2d", task="segmentation", architecture=architecture, modality="CT",
                     input={"spacing": [2.0, 2.0], "normalisation": {"kind": "ct_window", "low": -200, "high": 300},
                            "patch_size": [32, 32], "channels": 1, "dims": 2},
                     labels=dict(KNOWN), sha256="")
    return mv.models.save_model(mv.models.build_model(architecture), card)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_finetune_saves_a_new_model_apart_with_its_card(tmp_path, monkeypatch):
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setenv("MEDVISION_WEIGHTS", str(shipped))
    parent = tiny_ct_model()
    parent_bytes = parent.weights_path.read_bytes()
    image, corrected = corrected_ct()
    mv.finetune("tiny-ct", images=[image], labels=[corrected], slices=[[4, 8, 12, 16]], steps=6,
                device="cpu", new_id="tiny-ct-mine", validate_every=3, method="network")

    folder = mv.models.user_dir()
    saved = json.loads((folder / "tiny-ct-mine.json").read_text())
    assert saved["parent"] == "tiny-ct" and saved["training"]["parent_sha256"] == parent.sha256
    assert saved["sha256"] == sha256(folder / "tiny-ct-mine.safetensors")
    data = saved["training"]["data"]
    assert data["volumes"][0]["corrected_slices"] == [4, 8, 12, 16]
    assert data["training_slices"] == 3 and data["validation_slices"] == 1
    assert saved["training"]["anchor"] == ANCHOR                  # weights held toward the parent's by default
    assert saved["training"]["steps"] == 6 and [h["step"] for h in saved["training"]["validation_curve"]] == [3, 6]
    assert list(saved["metrics"].values())[0].keys() == {"before fine-tuning", "after fine-tuning"}
    assert list(shipped.iterdir()) == []                          # nothing went to the shipped folder
    assert parent.weights_path.read_bytes() == parent_bytes       # the parent is untouched
    assert not list((folder / ".checkpoints").iterdir())          # the run's checkpoint is cleaned up
    assert [c.id for c in mv.models.available() if c.parent == "tiny-ct"] == ["tiny-ct-mine"]
    seg = mv.segment(image, model="tiny-ct-mine", device="cpu")
    assert seg.data.shape == image.data.shape and seg.labels == KNOWN


def test_only_the_corrected_slices_supervise_training():
    tiny_ct_model()
    image, corrected = corrected_ct()
    card = mv.models.get_card("tiny-ct")
    # Corrected slices hold liver only; unedited ones hold the "model's output": spleen everywhere.
    # Spleen must therefore never be a training target.
    data = np.where(np.asarray(corrected.data) == 2, 0, corrected.data).astype(np.uint8)
    data[np.arange(20) % 4 != 0] = 2
    edited = corrected.with_data(data)
    slices = check_corrections(card, [image], [edited], [[0, 4, 8, 12, 16]])
    prepared = prepare_corrections(card, [image], [edited], slices)
    sample = correction_sampler(prepared, (16, 32, 32), card)
    x, y, mask = sample(np.random.default_rng(0), 16)
    assert x.shape == (16, 1, 16, 32, 32) and mask.shape == y.shape and mask.dtype == bool
    assert 0 < mask.mean() < 0.5                                    # corrected voxels only
    assert (y[mask] == 1).any() and (y[mask] == 0).any()
    assert not (y[mask] == 2).any()
    # the held-out slice is never trained on
    train, val = split_slices(slices)
    assert val == [[8]] and train == [[0, 4, 12, 16]]
    assert not (prepared.train[0] & prepared.val[0]).any()


def test_corrections_are_turned_to_the_models_layout_with_their_scan():
    tiny_ct_model()
    image, corrected = corrected_ct()
    card = mv.models.get_card("tiny-ct")
    card.input["orientation"] = "LPS"
    # the same scan and corrections as a NIfTI often stores them: y toward anterior, x toward the right
    flipped = Volume(np.ascontiguousarray(np.asarray(image.data)[:, ::-1, ::-1]), spacing=image.spacing,
                     origin=(0.0, 94.0, 78.0), direction=np.diag([1.0, -1.0, -1.0]), modality="CT")
    flipped_labels = corrected.with_data(np.ascontiguousarray(np.asarray(corrected.data)[:, ::-1, ::-1]))
    as_stored = prepare_corrections(card, [image], [corrected], [[0, 4, 8, 12, 16]])
    as_nifti = prepare_corrections(card, [flipped], [flipped_labels], [[0, 4, 8, 12, 16]])
    np.testing.assert_allclose(as_nifti.images[0], as_stored.images[0], atol=1e-5)
    np.testing.assert_array_equal(as_nifti.labels[0], as_stored.labels[0])
    np.testing.assert_array_equal(as_nifti.train[0], as_stored.train[0])


def test_every_labelled_slice_is_taken_when_slices_are_not_given():
    tiny_ct_model()
    image, corrected = corrected_ct()
    expected = [z for z in range(20) if np.asarray(corrected.data[z]).any()]
    assert check_corrections(mv.models.get_card("tiny-ct"), [image], [corrected], None) == [expected]


def test_a_2d_model_fine_tunes_on_the_slices_of_a_3d_volume():
    tiny_slice_model()
    image, corrected = corrected_ct()
    card = mv.finetune("tiny-ct-2d", images=[image], labels=[corrected], slices=[[5, 9, 13]], steps=4, method="network",
                       device="cpu", new_id="tiny-2d-mine")
    assert card.training["patch_size"] == [32, 32]
    assert card.training["data"]["validation_slices"] == 1
    seg = mv.segment(image, model="tiny-2d-mine", device="cpu")
    assert seg.data.shape == image.data.shape


def test_bad_corrections_are_refused_with_the_reason():
    tiny_ct_model()
    image, corrected = corrected_ct()
    empty = corrected.with_data(np.zeros_like(corrected.data))
    with pytest.raises(ValueError, match="no corrections to learn from"):
        mv.finetune("tiny-ct", images=[image], labels=[empty])
    small = corrected.with_data(np.zeros((20, 40, 40), np.uint8))
    small.meta["name"] = "my-labels.nii.gz"
    with pytest.raises(ValueError, match=r"my-labels.nii.gz: has shape \(20, 40, 40\) but image .* \(20, 48, 40\)"):
        mv.finetune("tiny-ct", images=[image], labels=[small])
    stranger = corrected.with_data(np.where(corrected.data > 0, 7, 0).astype(np.uint8))
    with pytest.raises(ValueError, match=r"label ids \[7\] that model tiny-ct does not have \(its labels: 1=liver"):
        mv.finetune("tiny-ct", images=[image], labels=[stranger])
    with pytest.raises(ValueError, match=r"spacing \(3.0, 2.0, 2.0\) mm differs"):
        mv.finetune("tiny-ct", images=[image], labels=[corrected.with_data(corrected.data, spacing=(3.0, 2.0, 2.0))])
    with pytest.raises(ValueError, match="1 images but 2 label maps"):
        mv.finetune("tiny-ct", images=[image], labels=[corrected, corrected])
    with pytest.raises(ValueError, match=r"corrected slices \[25\] lie outside its 20 slices"):
        mv.finetune("tiny-ct", images=[image], labels=[corrected], slices=[[3, 25]])
    flat = mv.Volume(np.zeros((48, 40), np.int16), spacing=(2, 2), modality="CT")
    with pytest.raises(ValueError, match="is a 3D model, this image is 2D"):
        mv.finetune("tiny-ct", images=[flat], labels=[flat.with_data(np.ones((48, 40), np.uint8))])
    assert not list(mv.models.user_dir().glob("tiny-ct-ft-*"))


def test_cancel_keeps_a_loadable_checkpoint_and_a_rerun_resumes(monkeypatch):
    from safetensors.torch import load_file

    tiny_ct_model()
    image, corrected = corrected_ct()
    token = CancelToken()

    def cancel_at_step_7(done, total, message):
        if done == 7:
            token.cancel()

    run = dict(images=[image], labels=[corrected], slices=[[4, 8, 12, 16]], steps=10, device="cpu",
               new_id="tiny-ct-resumed", validate_every=5, method="network")
    with pytest.raises(Cancelled) as info:
        mv.finetune("tiny-ct", progress=cancel_at_step_7, cancel=token, **run)
    prefix = info.value.checkpoint
    folder = prefix.parent
    assert not (mv.models.user_dir() / "tiny-ct-resumed.json").exists()     # no model from a cancelled run
    assert not list(folder.glob("*.partial"))
    state = json.loads(prefix.with_name(prefix.name + ".state.json").read_text())
    assert state["step"] == 5                                   # the last validated step, intact
    best = load_file(str(prefix.with_name(prefix.name + ".best.safetensors")))
    network = mv.models.build_model(mv.models.get_card("tiny-ct").architecture)
    network.load_state_dict(best, strict=True)                  # loadable as the model's weights

    card = mv.finetune("tiny-ct", **run)
    assert card.training["steps"] == 10
    assert [h["step"] for h in card.training["validation_curve"]] == [5, 10]  # step 5 came from the checkpoint


def test_freezing_the_encoder_trains_only_the_decoder():
    from safetensors.torch import load_file

    parent = tiny_ct_model()
    image, corrected = corrected_ct()
    card = mv.finetune("tiny-ct", images=[image], labels=[corrected], slices=[[4, 8, 12]], steps=3, device="cpu",
                       freeze_encoder=True, new_id="tiny-ct-frozen", method="network")
    before, after = load_file(str(parent.weights_path)), load_file(str(card.weights_path))
    encoder = [k for k in before if k.startswith(("encoder", "vit"))]
    decoder = [k for k in before if k.startswith(("decoder", "head")) and before[k].is_floating_point()]
    assert encoder and decoder
    assert all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in decoder)


def test_a_full_disk_leaves_nothing_half_written(monkeypatch):
    tiny_ct_model()
    image, corrected = corrected_ct()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("napari_medvision.models.registry.write_card", disk_full)
    with pytest.raises(CardError, match="could not write the model .No space left on device"):
        mv.finetune("tiny-ct", images=[image], labels=[corrected], slices=[[4, 8]], steps=2, device="cpu",
                    new_id="tiny-ct-full", guard=False)
    folder = mv.models.user_dir()
    assert not list(folder.glob("tiny-ct-full*")) and not list(folder.glob("*.partial"))
    assert "tiny-ct-full" not in [c.id for c in mv.models.available()]


def test_a_read_only_model_folder_fails_before_training(tmp_path, monkeypatch):
    tiny_ct_model()
    image, corrected = corrected_ct()
    folder = tmp_path / "models"
    folder.mkdir()
    folder.chmod(0o555)

    real_write = type(folder).write_bytes

    def read_only(path, data):  # root ignores chmod: refuse writes into the folder the same way
        if path.parent == folder:
            raise PermissionError(13, "Permission denied")
        return real_write(path, data)

    monkeypatch.setattr(type(folder), "write_bytes", read_only)
    steps = []
    try:
        with pytest.raises(CardError, match=r"models: cannot write to the model folder \(Permission denied\)"):
            mv.finetune("tiny-ct", images=[image], labels=[corrected], steps=2, device="cpu", folder=folder,
                        progress=lambda d, t, m: steps.append(d))
    finally:
        folder.chmod(0o755)
    assert steps == [] and list(folder.iterdir()) == []


def test_the_shipped_weights_folder_is_refused(tmp_path, monkeypatch):
    tiny_ct_model()
    monkeypatch.setenv("MEDVISION_WEIGHTS", str(tmp_path))
    image, corrected = corrected_ct()
    with pytest.raises(CardError, match="not written into the shipped weights folder"):
        mv.finetune("tiny-ct", images=[image], labels=[corrected], steps=2, device="cpu", folder=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_command_line_finetune(tmp_path, capsys):
    tiny_ct_model()
    image, corrected = corrected_ct()
    scan = mv.save(image, tmp_path / "ct.nii.gz")
    labels = mv.save(corrected, tmp_path / "corrected.nii.gz")
    assert cli(["finetune", "tiny-ct", "--image", str(scan), "--labels", str(labels), "--slices", "3,7,12",
                "--steps", "3", "--device", "cpu", "--id", "tiny-ct-cli", "--anchor", "0.5",
                "--method", "network"]) == 0
    out = capsys.readouterr().out
    assert "saved model tiny-ct-cli" in out
    card = mv.models.get_card("tiny-ct-cli")
    assert card.training["data"]["volumes"][0]["corrected_slices"] == [3, 7, 12]
    assert card.training["data"]["volumes"][0]["name"] == "ct.nii.gz"
    assert card.training["anchor"] == 0.5
    assert cli(["finetune", "tiny-ct", "--image", str(scan), "--labels", str(labels), "--slices", "3,x"]) == 2
    assert "--slices takes comma-separated" in capsys.readouterr().err
    assert cli(["finetune", "tiny-ct", "--image", str(scan), "--labels", str(labels), "--id", "tiny-ct-cli"]) == 2
    assert "exists; choose a new id" in capsys.readouterr().err


def test_a_2d_colour_photo_counts_as_one_corrected_picture():
    from napari_medvision.synthetic import fundus_photo

    from test_segment import tiny_fundus_model

    tiny_fundus_model()
    photo, vessels = fundus_photo(seed=0, size=(64, 64))
    mask = vessels.with_data((np.asarray(vessels.data) > 0).astype(np.uint8), labels={1: "vessel"})
    card = mv.finetune("tiny-fundus", images=[photo], labels=[mask], steps=2, device="cpu", new_id="fundus-mine",
                       method="network")
    data = card.training["data"]
    assert data["training_slices"] + data["validation_slices"] == 64   # every row, background rows too
    assert data["voxels_per_label"]["background"] + data["voxels_per_label"]["vessel"] == 64 * 64
