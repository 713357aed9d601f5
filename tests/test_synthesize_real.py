"""Brain MR contrast synthesis learned from real pairs: tissue order on real brains, and honest task names.

Real data (``mri_brain_multicontrast``, ``mri_brain_aseg_voxelmorph``) is read where present; the
tests skip with a reason where it is absent. Fits here run at 2 mm on two brains with few steps
(seconds); the shipped models' own leave-one-subject-out scores are in their cards.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import napari_medvision as mv  # noqa: E402
from napari_medvision.recipes.mr_contrast import FILES, FOLDER, baselines, load_contrast, ssim_scores  # noqa: E402
from napari_medvision.tasks.mr_contrast import (  # noqa: E402
    N_FEATURES, brain_mask, fit_contrast_model, model_id, predict, voxel_features)
from napari_medvision.tasks.synthesis_tasks import TASKS, simulated_task_names  # noqa: E402

torch.set_num_threads(1)
HELD_OUT = "TCGA-DU-7294"


def at_2mm(volume: np.ndarray) -> np.ndarray:
    """A 1 mm volume averaged over 2x2x2 blocks (the fits below take seconds at this size)."""
    z, y, x = (s - s % 2 for s in volume.shape)
    return volume[:z, :y, :x].reshape(z // 2, 2, y // 2, 2, x // 2, 2).mean(axis=(1, 3, 5))


def tissue_classes(t1: np.ndarray) -> dict[str, np.ndarray]:
    """CSF, grey and white matter of a real T1 by three-class Otsu thresholds inside the eroded brain."""
    from scipy import ndimage as ndi
    from skimage.filters import threshold_multiotsu

    brain = ndi.binary_erosion(brain_mask(t1), iterations=2)
    low, high = threshold_multiotsu(t1[brain], classes=3)
    return {"CSF": brain & (t1 < low), "grey": brain & (t1 >= low) & (t1 < high), "white": brain & (t1 >= high)}


@pytest.fixture(scope="module")
def brains():
    from conftest import shared_data_dir

    root = shared_data_dir() / FOLDER
    if not root.is_dir():
        pytest.skip(f"real multi-contrast brains absent at {root}")
    return {s: {c: at_2mm(load_contrast(s, c, root)[0]) for c in ("T1", "T2", "FLAIR")} for s in FILES}


def held_out_output(brains, source: str, target: str) -> np.ndarray:
    train = [s for s in FILES if s != HELD_OUT]
    network, _ = fit_contrast_model([(brains[s][source], brains[s][target], (2.0, 2.0, 2.0)) for s in train],
                                    samples=20_000, steps=400)
    return predict(network, brains[HELD_OUT][source], (2.0, 2.0, 2.0))


def medians(image: np.ndarray, classes: dict[str, np.ndarray]) -> dict[str, float]:
    return {name: float(np.median(image[where])) for name, where in classes.items()}


# --- fitted on two real brains, checked on the third -------------------------------------------

@pytest.mark.slow
def test_t1_to_t2_fitted_on_two_real_brains_orders_tissues_on_the_third_and_beats_baselines(brains):
    out = held_out_output(brains, "T1", "T2")
    t1, truth = brains[HELD_OUT]["T1"], brains[HELD_OUT]["T2"]
    level = medians(out, tissue_classes(t1))
    assert level["CSF"] > level["grey"] > level["white"]
    train = [s for s in FILES if s != HELD_OUT]
    others = baselines(t1, [brains[s]["T1"] for s in train], [brains[s]["T2"] for s in train])
    brain = brain_mask(t1)
    ours = ssim_scores(out, truth, brain)["ssim_brain"]
    best_baseline = max(ssim_scores(others[k], truth, brain)["ssim_brain"] for k in ("identity", "histogram matching"))
    assert ours >= best_baseline + 0.03


@pytest.mark.slow
def test_t2_to_t1_fitted_on_two_real_brains_puts_white_matter_brightest(brains):
    level = medians(held_out_output(brains, "T2", "T1"), tissue_classes(brains[HELD_OUT]["T1"]))
    assert level["white"] > level["grey"] > level["CSF"]


@pytest.mark.slow
def test_t1_to_flair_fitted_on_two_real_brains_keeps_csf_dark(brains):
    level = medians(held_out_output(brains, "T1", "FLAIR"), tissue_classes(brains[HELD_OUT]["T1"]))
    assert level["CSF"] < level["grey"] and level["CSF"] < level["white"]


# --- the shipped models on a real brain they never saw --------------------------------------------

@pytest.fixture(scope="module")
def aseg_brain():
    """A real skull-stripped T1 with FreeSurfer aseg labels, never used to fit: the whole brain (a slab's
    cut faces look like the brain's surface to the model's 4-8 mm features)."""
    from conftest import shared_data_dir

    path = shared_data_dir() / "mri_brain_aseg_voxelmorph" / "test_scan.npz"
    if not path.exists():
        pytest.skip(f"real aseg brain absent at {path}")
    scan = np.load(path)
    t1 = mv.Volume(scan["vol"].astype(np.float32), spacing=(1.0, 1.0, 1.0), modality="MR")
    seg = scan["seg"]
    classes = {"CSF": np.isin(seg, (4, 43)), "grey": np.isin(seg, (3, 42)), "white": np.isin(seg, (2, 41))}
    return t1, classes


def shipped(task: str) -> bool:
    return any(card.id == TASKS[task].model for card in mv.models.available())


@pytest.mark.slow
@pytest.mark.parametrize("task", ["t1-to-t2", "t1-to-flair"])
def test_the_shipped_model_orders_tissues_on_an_unseen_real_brain(aseg_brain, task):
    if not shipped(task):
        pytest.skip(f"{TASKS[task].model} is not installed")
    t1, classes = aseg_brain
    out = mv.synthesize(t1, task=task)
    assert out.meta["model"] == model_id("T1", task.split("-")[-1])
    assert out.data.shape == t1.data.shape and out.data.dtype == np.float32
    level = medians(np.asarray(out.data), classes)
    if task == "t1-to-t2":
        assert level["CSF"] > level["grey"] > level["white"]
    else:
        assert level["CSF"] < level["grey"] and level["CSF"] < level["white"]


def test_every_shipped_contrast_model_is_no_worse_than_the_baselines_leave_one_subject_out():
    """The cards' headline: each fitted model against the unchanged input and histogram matching
    (T1 -> T2 by the margin issue 23 asks for; T1 -> FLAIR is only level with histogram matching)."""
    cards = {card.id: card for card in mv.models.available(task="mr-contrast")}
    if not cards:
        pytest.skip("no mr-contrast model installed")
    for card in cards.values():
        scores = next(v["mean"] for k, v in card.metrics.items() if k.startswith("leave-one-subject-out"))
        best = max(scores["identity"]["ssim_brain"], scores["histogram matching"]["ssim_brain"])
        margin = 0.03 if card.id == "mr-contrast-t1-to-t2" else 0.0
        assert scores["fitted model"]["ssim_brain"] >= best + margin, card.id
    assert set(cards) == {TASKS[name].model for name in TASKS if TASKS[name].model}


# --- names, features and bad input -----------------------------------------------------------------

def test_pd_tasks_are_marked_simulated_and_real_pair_tasks_name_their_model():
    assert set(simulated_task_names()) == {n for n in TASKS if "pd" in n.split("-")}
    assert all("simulated" in TASKS[n].description for n in simulated_task_names())
    assert TASKS["t1-to-flair"].model == "mr-contrast-t1-to-flair" and not TASKS["t1-to-flair"].simulated
    assert {"t1-to-t2", "t2-to-t1", "t1-to-flair", "flair-to-t1"} <= set(mv.synthesis_tasks())


def test_features_are_finite_per_brain_voxel_and_a_single_slice_works():
    rng = np.random.default_rng(0)
    volume = np.zeros((12, 40, 36), np.float32)
    volume[2:10, 6:34, 5:31] = rng.uniform(50, 500, (8, 28, 26))
    features, brain = voxel_features(volume, (1.5, 1.0, 1.0))
    assert features.shape == (brain.sum(), N_FEATURES) and np.isfinite(features).all()
    flat, flat_brain = voxel_features(volume[5:6], (1.5, 1.0, 1.0))
    assert flat.shape == (flat_brain.sum(), N_FEATURES) and np.isfinite(flat).all()


def test_a_named_real_pair_task_refuses_another_modality():
    ct = mv.Volume(np.zeros((4, 16, 16), np.float32), spacing=(1.0, 1.0, 1.0), modality="CT")
    with pytest.raises(ValueError, match="works on MR images"):
        mv.synthesize(ct, task="t1-to-t2")


def test_a_contrast_model_named_directly_runs_on_a_2d_slice_and_keeps_the_geometry():
    if not shipped("t2-to-t1"):
        pytest.skip("mr-contrast-t2-to-t1 is not installed")
    rng = np.random.default_rng(1)
    image = np.zeros((40, 36), np.float32)
    image[5:35, 4:32] = rng.uniform(100, 900, (30, 28))
    t2 = mv.Volume(image, spacing=(0.9, 1.1), origin=(3.0, -7.0), modality="MR")
    out = mv.synthesize(t2, model="mr-contrast-t2-to-t1")
    assert out.data.shape == (40, 36) and out.spacing == t2.spacing and out.origin == t2.origin
    assert out.meta["model"] == "mr-contrast-t2-to-t1" and np.isfinite(out.data).all()
    assert (np.asarray(out.data)[image == 0] == 0).all()  # the background stays background
