"""Synthetic phantoms: deterministic from a seed, with plausible intensities and labels.

Small grids keep every test well under a second; comparisons with real scans use the shared
data folder and skip where it is absent.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_medvision.synthetic import brain_mr, ct_abdomen, fundus_photo, oct_volume, sample

CT_SMALL = dict(shape=(32, 96, 96), spacing=(5.0, 2.5, 2.5))
MR_SMALL = dict(shape=(48, 56, 48), spacing=(3.0, 3.0, 3.0))
OCT_SMALL = dict(shape=(6, 192, 160), spacing=(0.24, 0.0039, 0.0188))


def _median_in(image, labels, name):
    ids = {v: k for k, v in labels.labels.items()}
    return float(np.median(image.data[labels.data == ids[name]]))


# --- CT --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct():
    return ct_abdomen(seed=0, **CT_SMALL)


def test_ct_same_seed_same_scan_other_seed_other_anatomy(ct):
    again = ct_abdomen(seed=0, **CT_SMALL)
    other = ct_abdomen(seed=1, **CT_SMALL)
    assert np.array_equal(ct[0].data, again[0].data) and np.array_equal(ct[1].data, again[1].data)
    changed = np.mean(ct[1].data != other[1].data)
    assert changed > 0.05  # a different body, not just different noise


def test_ct_grid_types_and_every_organ_present(ct):
    image, labels = ct
    assert image.data.shape == labels.data.shape == (32, 96, 96)
    assert image.data.dtype == np.int16 and labels.data.dtype == np.uint8
    assert image.spacing == labels.spacing == (5.0, 2.5, 2.5) and image.modality == "CT"
    assert labels.labels[1] == "liver" and labels.labels[2] == "spleen"
    present = set(np.unique(labels.data)) - {0}
    assert present == set(labels.labels)


def test_ct_hounsfield_units_per_tissue(ct):
    image, labels = ct
    assert 40 <= _median_in(image, labels, "liver") <= 80
    assert 30 <= _median_in(image, labels, "spleen") <= 65
    assert 5 <= _median_in(image, labels, "kidney_left") <= 50
    assert 20 <= _median_in(image, labels, "aorta") <= 60
    assert _median_in(image, labels, "vertebrae") > 200
    assert _median_in(image, labels, "lung_right") < -700
    assert image.data[0, 0, 0] < -900  # air outside the body
    # Subcutaneous and visceral fat: a clear peak around -100 HU.
    assert np.mean((image.data > -130) & (image.data < -70)) > 0.05


def test_ct_contrast_phase_brightens_blood_and_liver():
    image, labels = ct_abdomen(seed=0, contrast="venous", **CT_SMALL)
    assert _median_in(image, labels, "aorta") > 140
    assert 90 <= _median_in(image, labels, "liver") <= 130


def test_ct_liver_close_to_a_real_scan(ct, data_dir):
    nib = pytest.importorskip("nibabel")
    folder = data_dir / "ct_mr_totalseg"
    real = np.asarray(nib.load(folder / "example_ct_sm.nii.gz").dataobj)
    seg = np.asarray(nib.load(folder / "example_seg.nii.gz").dataobj)
    names = json.loads((folder / "class_map_total_and_total_mr.json").read_text())["total"]
    liver_id = int(next(k for k, v in names.items() if v == "liver"))
    real_liver = float(np.median(real[seg == liver_id]))
    assert abs(_median_in(*ct, "liver") - real_liver) < 25


# --- brain MR --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def mr():
    return brain_mr(seed=0, **MR_SMALL)


def test_mr_contrasts_share_one_anatomy_and_seed(mr):
    images, labels = mr
    assert set(images) == {"T1", "T2", "PD"}
    for contrast, vol in images.items():
        assert vol.data.shape == labels.data.shape == (48, 56, 48)
        assert vol.same_grid(labels) and vol.modality == "MR" and vol.meta["contrast"] == contrast
    assert labels.labels == {1: "CSF", 2: "grey matter", 3: "white matter"}
    again, _ = brain_mr(seed=0, **MR_SMALL)
    other, other_labels = brain_mr(seed=5, **MR_SMALL)
    assert np.array_equal(images["T2"].data, again["T2"].data)
    assert not np.array_equal(labels.data, other_labels.data)


def test_mr_tissue_contrast_follows_the_signal_equation(mr):
    images, labels = mr
    csf, gm, wm = (_median_in(images["T1"], labels, n) for n in ("CSF", "grey matter", "white matter"))
    assert wm > gm > csf
    csf, gm, wm = (_median_in(images["T2"], labels, n) for n in ("CSF", "grey matter", "white matter"))
    assert csf > gm > wm
    # Rician noise: magnitudes are never negative and air is dark but not zero.
    air = images["T1"].data[0, :4, :4]
    assert images["T1"].data.min() >= 0 and 0 < air.mean() < 0.1 * wm


def test_mr_partial_volume_fractions_sum_to_one(mr):
    _, labels = mr
    total = sum(labels.meta["fractions"].values())
    assert np.allclose(total, 1.0, atol=1e-3)
    counts = np.bincount(labels.data.ravel(), minlength=4)
    assert 0.5 < counts[2] / counts[3] < 2.0  # grey and white matter of similar volume, as in adults


def test_mr_random_contrast_keeps_the_tissues_apart_and_varies_their_order(mr):
    """SynthSeg-style images: one anatomy, a different tissue order per seed, same image for a seed."""
    from napari_medvision.synthetic.brain import random_contrast

    _, labels = mr
    label_ids, fractions = np.asarray(labels.data), labels.meta["fractions"]
    orders = set()
    for seed in range(8):
        image = random_contrast(fractions, seed)
        assert image.shape == label_ids.shape and image.dtype == np.float32 and image.min() >= 0
        means = [float(np.median(image[label_ids == k])) for k in (1, 2, 3)]  # CSF, GM, WM
        orders.add(tuple(np.argsort(means)))
    assert len(orders) >= 3  # white matter is not always the brightest, nor CSF the darkest
    np.testing.assert_array_equal(random_contrast(fractions, 3), random_contrast(fractions, 3))


def test_mr_from_the_mni152_template(data_dir):
    images, labels = brain_mr(seed=0, template=data_dir / "mri_brain_mni152", contrasts=("T1",), **MR_SMALL)
    counts = np.bincount(labels.data.ravel(), minlength=4)
    assert counts[2] > 0 and counts[3] > 0
    assert _median_in(images["T1"], labels, "white matter") > _median_in(images["T1"], labels, "grey matter")


# --- OCT -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def octv():
    return oct_volume(seed=0, **OCT_SMALL)


def test_oct_layers_are_ordered_and_match_the_label_map(octv):
    image, labels = octv
    assert image.data.dtype == np.uint8 and image.data.shape == (6, 192, 160)
    bounds = labels.meta["boundaries"]
    order = labels.meta["boundary_order_top_to_bottom"]
    assert order[:7] == ["ilm", "nflgcl", "iplinl", "inlopl", "oplonl", "isos", "rpe"]
    for upper, lower in zip(order[:-1], order[1:]):
        assert bounds[upper].shape == (6, 160)
        assert np.all(bounds[upper] <= bounds[lower] + 1e-3)
    # The label just below the ILM at a column is the nerve fibre layer, above it vitreous.
    b, x = 2, 10
    row = int(np.ceil(bounds["ilm"][b, x]))
    assert labels.data[b, row - 2, x] == 0
    assert labels.data[b, int(bounds["isos"][b, x]) + 2, x] == 6


def test_oct_foveal_pit_and_reflectivity(octv):
    image, labels = octv
    bounds = labels.meta["boundaries"]
    thickness = bounds["rpe"] - bounds["ilm"]
    assert thickness.min() < 0.85 * np.median(thickness)  # the pit thins the retina
    mean = {n: image.data[labels.data == k].mean() for k, n in labels.labels.items()}
    assert mean["OS+RPE"] > mean["RNFL"] > mean["ONL+IS"]
    assert mean["OPL"] > mean["INL"]
    vitreous = image.data[:, : int(bounds["ilm"].min()) - 3]
    assert vitreous.mean() < 25


def test_oct_looks_like_real_bscans(octv, data_dir):
    tifffile = pytest.importorskip("tifffile")
    folder = data_dir / "oct_bscans_layers"
    real = tifffile.imread(folder / "exampleOCTimage0001.tif").astype(float)
    rows = json.loads((folder / "boundaries_row_per_column.json").read_text())["exampleOCTimage0001.tif"]
    cols = range(100, 900, 4)
    rpe_band = np.concatenate([real[int(rows["isos"][c]):int(rows["rpe"][c]), c] for c in cols])
    onl = np.concatenate([real[int(rows["oplonl"][c]):int(rows["isos"][c]), c] for c in cols])
    image, labels = octv
    ours_rpe = image.data[labels.data == 6].mean()
    ours_onl = image.data[labels.data == 5].mean()
    # Same brightness of the RPE band and the outer nuclear layer within 40 grey levels.
    assert abs(ours_rpe - rpe_band.mean()) < 40 and abs(ours_onl - onl.mean()) < 40
    real_fraction = np.nanmedian(np.asarray(rows["rpe"], float) - np.asarray(rows["ilm"], float)) / real.shape[0]
    bounds = labels.meta["boundaries"]
    ours_fraction = np.median(bounds["rpe"] - bounds["ilm"]) / image.data.shape[1]
    assert 0.5 * real_fraction < ours_fraction < 2 * real_fraction


def test_oct_drusen_lift_the_rpe_off_bruchs_membrane():
    """AMD eyes: drusen raise the RPE and every layer above it; the space beneath counts as OS+RPE
    (as in the graph-search references) and the "rpe" boundary stays on Bruch's membrane."""
    healthy_image, healthy = oct_volume(seed=3, **OCT_SMALL)
    image, labels = oct_volume(seed=3, drusen=3, **OCT_SMALL)
    same_image, _ = oct_volume(seed=3, drusen=0, **OCT_SMALL)
    assert np.array_equal(same_image.data, healthy_image.data)  # drusen=0 is the healthy eye
    before, after = healthy.meta["boundaries"], labels.meta["boundaries"]
    np.testing.assert_allclose(after["rpe"], before["rpe"])
    lift = before["isos"] - after["isos"]
    assert lift.max() > 10 and lift.min() >= -1e-3          # rows: the photoreceptors ride up
    np.testing.assert_allclose(before["ilm"] - after["ilm"], lift, atol=1e-3)
    order = labels.meta["boundary_order_top_to_bottom"]
    assert all(np.all(after[u] <= after[v] + 1e-3) for u, v in zip(order[:-1], order[1:]))
    assert (labels.data == 6).sum() > (healthy.data == 6).sum()
    assert labels.meta["drusen"] == 3 and image.data.dtype == np.uint8


# --- fundus ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fundus():
    return fundus_photo(seed=0, size=(512, 512))


def test_fundus_rgb_with_field_of_view(fundus):
    image, labels = fundus
    assert image.data.shape == (512, 512, 3) and image.data.dtype == np.uint8 and image.rgb
    assert len(image.spacing) == 2 and 0.01 < image.spacing[0] < 0.04
    fov = labels.meta["fov"]
    assert fov.dtype == bool and not fov[0, 0] and fov[256, 256]
    well_outside = ~ndi.binary_dilation(fov, iterations=2)
    assert image.data[well_outside].max() <= 10  # black outside the field of view
    background = np.median(image.data[fov & (labels.data == 0)], axis=0)
    assert background[0] > background[1] > background[2]  # orange-red
    vessel = np.median(image.data[labels.data == 1], axis=0)
    assert vessel[1] < background[1]  # vessels darker in green, where they show best


def test_fundus_vessel_density_like_drive(fundus):
    _, labels = fundus
    fov = labels.meta["fov"]
    assert labels.labels == {1: "vessel"}
    fraction = labels.data[fov].mean()
    assert 0.08 <= fraction <= 0.14
    other = fundus_photo(seed=1, size=(512, 512))[1]
    assert not np.array_equal(other.data, labels.data)
    assert np.array_equal(fundus_photo(seed=0, size=(512, 512))[1].data, labels.data)


def test_fundus_vessel_fraction_near_drive_manual_masks(fundus, data_dir):
    from PIL import Image

    folder = data_dir / "fundus_drive_train"
    fractions = []
    for manual in sorted((folder / "1st_manual").glob("*_manual1.gif"))[:5]:
        number = manual.name.split("_")[0]
        vessels = np.asarray(Image.open(manual)) > 0
        fov = np.asarray(Image.open(folder / "mask" / f"{number}_training_mask.gif")) > 0
        fractions.append(vessels[fov].mean())
    _, labels = fundus
    assert abs(labels.data[labels.meta["fov"]].mean() - np.mean(fractions)) < 0.05


# --- napari sample data ----------------------------------------------------------------------
def test_sample_names_and_unknown_name():
    image, labels = sample("oct", seed=2)
    assert image.modality == "OCT" and labels.labels[1] == "RNFL"
    with pytest.raises(ValueError, match="no synthetic sample named 'xray'"):
        sample("xray")
