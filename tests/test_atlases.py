"""Atlas sets: the user's labelled scans stored, checked, listed and used by ``mv.segment`` without training."""

from __future__ import annotations

import json

import numpy as np
import pytest

import napari_medvision as mv
from napari_medvision import atlases
from napari_medvision.atlases import AtlasError
from napari_medvision.cli import main
from napari_medvision.synthetic import ct_abdomen
from napari_medvision.tasks.atlas_segment import AtlasOptions, anatomy_checks, segment_with_atlases

SHAPE, SPACING = (16, 48, 40), (2.5, 2.0, 2.0)


def phantom(seed):
    return ct_abdomen(seed=seed, shape=SHAPE, spacing=SPACING)


def dice(a, b):
    return 2 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def test_a_users_labelled_scans_segment_a_new_scan_without_training():
    atlases.add("my-organs", [phantom(1), phantom(2)])
    assert "my-organs" in atlases.names()
    target, truth = phantom(3)
    seg = mv.segment(target, model="my-organs")
    assert seg.spatial_shape == target.spatial_shape and seg.spacing == target.spacing
    liver = next(k for k, v in seg.labels.items() if v == "liver")
    truth_liver = next(k for k, v in truth.labels.items() if v == "liver")
    assert dice(np.asarray(seg.data) == liver, np.asarray(truth.data) == truth_liver) > 0.75
    assert [e["atlas"] for e in seg.meta["atlases"]] == ["my-organs", "my-organs"]
    assert seg.meta["fallback"] is None and seg.meta["network"] is None


def test_the_set_is_stored_with_a_card_and_can_be_removed():
    atlas = atlases.add("tiny", [phantom(1)], description="two phantoms")
    card = json.loads((atlas.folder / "atlas.json").read_text())
    assert card["name"] == "tiny" and card["modality"] == "CT" and card["members"][0]["labels_sha256"]
    assert "liver" in card["labels"].values()
    assert atlas.folder.parent == atlases.user_atlas_dir()
    atlases.remove("tiny")
    assert "tiny" not in atlases.names()


def test_a_changed_atlas_file_is_refused():
    atlas = atlases.add("tampered", [phantom(1)])
    image, labels = phantom(2)
    mv.save(image, atlas.folder / "0_image.nii.gz")
    with pytest.raises(AtlasError, match="sha256"):
        atlases.get("tampered").member(0)


def test_labels_off_the_image_grid_are_refused_with_the_member_named():
    image, labels = phantom(1)
    shifted = labels.with_data(labels.data, origin=tuple(np.asarray(labels.origin) + 5.0))
    with pytest.raises(AtlasError, match="member 1: the labels' geometry"):
        atlases.add("bad", [(image, shifted)])
    cropped = labels.with_data(np.asarray(labels.data)[:-1])
    with pytest.raises(AtlasError, match="do not fit the image grid"):
        atlases.add("bad", [(image, cropped)])
    assert "bad" not in atlases.names()


def test_empty_sets_and_clashing_names_are_refused():
    with pytest.raises(AtlasError, match="at least one"):
        atlases.add("empty", [])
    with pytest.raises(AtlasError, match="model id"):
        atlases.add("ct-abdomen-organs-3d", [phantom(1)])
    with pytest.raises(AtlasError, match="shipped atlas set"):
        atlases.add("totalseg-ct-abdomen", [phantom(1)])
    with pytest.raises(AtlasError, match="is shipped"):
        atlases.remove("totalseg-ct-abdomen")


def test_the_shipped_ct_atlas_backs_the_ct_model_with_its_licence():
    (atlas,) = atlases.for_model("ct-abdomen-organs-3d")
    assert atlas.source == "shipped" and "Apache-2.0" in atlas.card["license"]
    assert (atlas.folder / "LICENSE").exists()
    image, labels = atlas.member(0)
    assert image.same_grid(labels) and {"liver", "spleen", "pancreas"} <= set(labels.labels.values())


def test_cli_lists_adds_and_removes_sets(tmp_path, capsys):
    image, labels = phantom(1)
    mv.save(image, tmp_path / "img.nii.gz")
    mv.save(labels, tmp_path / "lab.nii.gz")
    assert main(["atlases", "add", "cli-set", "--image", str(tmp_path / "img.nii.gz"),
                 "--labels", str(tmp_path / "lab.nii.gz")]) == 0
    assert main(["atlases", "list"]) == 0
    out = capsys.readouterr().out
    assert "cli-set" in out and "totalseg-ct-abdomen" in out and "backs ct-abdomen-organs-3d" in out
    assert main(["atlases", "remove", "cli-set"]) == 0
    assert main(["atlases", "add", "x", "--image", str(tmp_path / "img.nii.gz")]) == 2
    assert "one --labels per --image" in capsys.readouterr().err


def test_a_poor_registration_is_said_in_meta():
    atlases.add("poor", [phantom(1)])
    target, _ = phantom(3)
    seg = segment_with_atlases(target, [atlases.get("poor")], options=AtlasOptions(min_body_overlap=1.1))
    assert "overlapped the body poorly" in seg.meta["fallback"]
    assert seg.meta["atlases"][0]["registration"].startswith("dropped")


def test_anatomy_checks_keep_one_piece_on_the_named_side_inside_the_body():
    labels = np.zeros((4, 20, 20), np.int64)
    body = np.zeros_like(labels, bool)
    body[:, 2:18, 2:18] = True
    labels[:, 5:9, 13:17] = 1   # kidney_left on the patient's left (LPS: high x)
    labels[:, 5:8, 3:6] = 1     # ... and a stray piece on the right
    labels[:, 12:16, 4:8] = 2   # liver, big piece
    labels[:, 16:17, 14:16] = 2  # liver, small piece
    labels[:, 0:2, 0:2] = 2     # liver outside the body
    out, removed = anatomy_checks(labels, body, {1: "kidney_left", 2: "liver"}, [1, 2], {"liver", "kidney_left"})
    assert (out[:, 5:9, 13:17] == 1).all() and not (out[:, 5:8, 3:6] == 1).any()
    assert (out[:, 12:16, 4:8] == 2).all() and not (out[:, 16:17, 14:16] == 2).any() and not out[:, :2, :2].any()
    assert removed == {"kidney_left": 36, "liver": 8}


def test_folder_of_images_and_labels_becomes_a_set(tmp_path):
    for i in (1, 2):
        image, labels = phantom(i)
        (tmp_path / "images").mkdir(exist_ok=True)
        (tmp_path / "labels").mkdir(exist_ok=True)
        mv.save(image, tmp_path / "images" / f"case{i}.nii.gz")
        mv.save(labels, tmp_path / "labels" / f"case{i}.nii.gz")
    atlas = atlases.add("from-folder", tmp_path)
    assert len(atlas) == 2 and atlas.modality == "CT"


@pytest.mark.slow
def test_the_ct_model_with_its_atlas_keeps_organs_off_air_on_a_real_ct(data_dir):
    """The real CT, re-gridded: the network + shipped atlas label no organ in air and nothing outside the body."""
    image = mv.load(data_dir / "ct_mr_totalseg" / "example_ct_sm.nii.gz")
    image = image.with_data(np.asarray(image.data)[10:22], origin=tuple(np.asarray(image.origin) +
                                                                      image.direction @ np.array([30.0, 0, 0])))
    seg = mv.segment(image, model="ct-abdomen-organs-3d")
    assert [e["atlas"] for e in seg.meta["atlases"]] == ["totalseg-ct-abdomen"]
    assert seg.meta["network"] == "ct-abdomen-organs-3d" and seg.meta["fallback"] is None
    labels, hu = np.asarray(seg.data), np.asarray(image.data)
    air_ok = [k for k, v in seg.labels.items() if v in ("lung_left", "lung_right", "colon", "small_bowel")]
    assert not ((labels > 0) & ~np.isin(labels, air_ok) & (hu < -500)).any()
    names = {v: k for k, v in seg.labels.items()}
    assert (labels == names["liver"]).sum() > 1000 and (labels == names["spleen"]).sum() > 100


def test_when_every_registration_fails_the_network_runs_alone_and_says_so():
    from test_segment import tiny_ct_model

    from napari_medvision.models.registry import load_model

    network, card = load_model(tiny_ct_model())
    target, _ = phantom(3)
    seg = segment_with_atlases(target, [atlases.add("fails", [phantom(1)])], network=network, card=card,
                               options=AtlasOptions(min_body_overlap=1.1))
    assert seg.meta["fallback"] == "every atlas registration failed: the network alone"
    assert seg.meta["network"] == "tiny-ct" and seg.labels == {1: "liver", 2: "spleen"}
    assert seg.spatial_shape == target.spatial_shape
