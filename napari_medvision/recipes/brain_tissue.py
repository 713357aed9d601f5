"""Recipe: 3D TransUNet for brain tissue (CSF, grey matter, white matter) on MR.

No real brain MR with manual tissue labels exists in the shared data, so training images are
simulated (``synthetic.brain_mr``): the MNI152 grey/white-matter maps, randomly deformed, turned
into T1-, T2- and PD-weighted spin-echo images with bias fields and Rician noise, and into images
of random tissue intensities (``synthetic.brain.random_contrast``) so the model does not learn one
contrast, and one of each anatomy's images again skull-stripped (brain-extraction output is a
common input). Checkpoints are chosen on unseen phantom seeds only. Test: the real MNI152 T1
template image itself (never trained on; reference = its own GM/WM probability maps > 50 %).

    python -m napari_medvision.recipes.brain_tissue --steps 1800 --time-budget 2100
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .. import io
from ..engine.sampling import PatchSampler
from ..engine.training import TrainConfig, dice_per_class, train_segmentation
from ..models.card import ModelCard
from ..synthetic import brain_mr
from ..synthetic.brain import LABELS, random_contrast
from .common import (data_dir, init_summary, new_network, prepare_run, print_every, recipe_arguments, save_shipped,
                     training_summary, window_probabilities)

MODEL_ID = "mr-brain-tissue-3d"
SPACING = (1.5, 1.5, 1.5)
PATCH = (48, 64, 64)  # inference window
TRAIN_PATCH = (32, 64, 64)  # training crops: cheaper on a CPU
NORMALISATION = {"kind": "percentile", "low": 0.5, "high": 99.5}
ORIENTATION = "LPS"  # the phantoms' head frame (x left, y posterior, z superior); scans are turned to it
CONTRAST_CYCLE = ("T1", "T1", "T2", "T1", "PD")
# 180 x 216 x 180 mm: a whole adult brain at its real size. A smaller field of view shrinks the
# phantom head to fit (96 x 112 x 96 voxels shrank it to 77 %), and the model then expects brains
# a quarter smaller than real ones.
PHANTOM_SHAPE = (120, 144, 120)


def phantoms(seeds, template, random_contrasts: int = 0, shape=PHANTOM_SHAPE, skull_stripped: bool = True):
    """Per seed: one spin-echo image (T1/T2/PD in turn), ``random_contrasts`` images of random
    tissue intensities (``synthetic.brain.random_contrast``) and, with ``skull_stripped``, one of
    them again with everything outside the brain set to 0; all of one deformed anatomy."""
    from ..engine.normalise import normalise
    images, labels = [], []
    for seed in seeds:
        contrast = CONTRAST_CYCLE[seed % len(CONTRAST_CYCLE)]
        contrasts, label = brain_mr(seed=seed, shape=tuple(shape), spacing=SPACING, contrasts=(contrast,),
                                    template=template)
        label_ids = np.asarray(label.data).astype(np.int64)
        raw = [np.asarray(contrasts[contrast].data)]
        # Spin-echo phantoms alone teach the model where tissues sit in the intensity range
        # (white matter dim, below bright scalp fat), which fails on a T1 template where white
        # matter is brightest; random contrasts remove that cue. Ordered as T1 or T2/PD scans
        # order the brain tissues (everything else random): with fully random orders a CPU-sized
        # model learns white and grey matter on the template far worse.
        raw += [random_contrast(label.meta["fractions"], seed * 100 + k, order=("T1", "T2")[(seed + k) % 2])
                for k in range(random_contrasts)]
        pairs = [(image, label_ids) for image in raw]
        if skull_stripped:
            pairs.append(skull_strip(raw[seed % len(raw)], label_ids, np.random.default_rng(seed)))
        for image, ids in pairs:
            images.append(normalise(image, NORMALISATION).numpy()[None])
            labels.append(ids)
    return images, labels


def skull_strip(image: np.ndarray, label_ids: np.ndarray, rng) -> tuple[np.ndarray, np.ndarray]:
    """The image with everything outside the brain mask at 0, as brain-extraction tools leave it.

    Why: many brain MRs reach a tissue classifier already skull-stripped (the MNI152 template in
    the shared data is: 78 % of its voxels are 0). Trained on whole heads only, a model takes the
    cortex next to a black background for background. The mask is the
    CSF/GM/WM label, holes filled, eroded by 0-2 voxels so that the CSF rim left varies.
    """
    from scipy import ndimage as ndi

    mask = ndi.binary_fill_holes(label_ids > 0)
    erosion = int(rng.integers(0, 3))
    if erosion:
        mask = ndi.binary_erosion(mask, iterations=erosion)
    return np.where(mask, image, 0).astype(image.dtype), np.where(mask, label_ids, 0)


def mni_reference():
    """The real MNI152 T1 template and a GM/WM reference from its probability maps (0 elsewhere)."""
    root = data_dir() / "mri_brain_mni152"
    t1 = io.load(root / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    gm = np.asarray(io.load(root / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz").data, dtype=np.float32)
    wm = np.asarray(io.load(root / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz").data, dtype=np.float32)
    ids = {name: i for i, name in LABELS.items()}
    reference = np.zeros(gm.shape, dtype=np.uint8)
    reference[(gm > 127) & (gm >= wm)] = ids["grey matter"]
    reference[(wm > 127) & (wm > gm)] = ids["white matter"]
    return t1, reference


def main(argv: list[str] | None = None) -> int:

    from ..engine.inference import predict_labels

    parser = recipe_arguments(__doc__.splitlines()[0], steps=1800, batch_size=2, preset="cpu")
    parser.add_argument("--phantoms", type=int, default=12, help="synthetic training anatomies")
    parser.add_argument("--random-contrasts", type=int, default=2,
                        help="random-contrast images per anatomy, beside its spin-echo image")
    parser.add_argument("--init", type=Path, default=None, help="start from these weights (safetensors)")
    parser.add_argument("--phantom-shape", type=int, nargs=3, default=PHANTOM_SHAPE,
                        help="phantom grid in voxels of 1.5 mm (the shipped model's first run used 96 112 96)")
    args = parser.parse_args(argv)
    device = prepare_run(args)
    template = data_dir() / "mri_brain_mni152"

    syn_images, syn_labels = phantoms(range(100, 100 + args.phantoms), template, args.random_contrasts,
                                      args.phantom_shape)
    val_images, val_labels = phantoms(range(1000, 1002), template, 1, args.phantom_shape)
    sampler = PatchSampler(syn_images, syn_labels, TRAIN_PATCH, foreground_fraction=0.7)
    t1, reference = mni_reference()
    ids = {name: i for i, name in LABELS.items()}

    network, architecture = new_network(3, args.preset, in_channels=1, n_classes=len(LABELS) + 1,
                                        seed=args.seed)
    if args.init is not None:
        from safetensors.torch import load_file

        network.load_state_dict(load_file(str(args.init)))
    card = ModelCard(
        id=MODEL_ID, task="segmentation", architecture=architecture, modality="MR",
        input={"spacing": list(SPACING), "normalisation": NORMALISATION, "patch_size": list(PATCH), "channels": 1,
               "dims": 3, "orientation": ORIENTATION},
        labels=dict(LABELS), sha256="",
        description="Brain tissue classes (CSF, grey matter, white matter) on T1/T2/PD MR (3D TransUNet).",
    )

    def synthetic_dice(net) -> dict[str, float]:
        scores = []
        for image, label in zip(val_images, val_labels):
            pred = window_probabilities(net, image, PATCH, device, batch_size=2).argmax(0)
            scores.append(dice_per_class(pred, label, list(LABELS)))
        return {LABELS[k]: round(float(np.nanmean([s[k] for s in scores])), 4) for k in LABELS}

    def mni_dice(net) -> dict[str, float]:
        pred = np.asarray(predict_labels(net, card, t1, device=device, overlap=0.25).data)
        scores = dice_per_class(pred, reference, [ids["grey matter"], ids["white matter"]])
        return {LABELS[k]: round(v, 4) for k, v in scores.items()}

    def validate(net) -> float:
        # Held-out phantoms only: the MNI template is the test and must not pick the checkpoint.
        return float(np.mean(list(synthetic_dice(net).values())))

    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=2e-3, val_every=150,
                               time_budget_s=args.time_budget, seed=args.seed)
    result = train_segmentation(network, sampler.sample, train_config, validate=validate, device=device,
                                progress=print_every(25), on_validation=print)
    real, synthetic = mni_dice(network), synthetic_dice(network)
    card.training = training_summary(
        device, result, train_config,
        f"{args.phantoms} anatomies deformed from the MNI152 2009a GM/WM maps, each as one simulated "
        f"spin-echo MR (T1/T2/PD), {args.random_contrasts} random-contrast images (SynthSeg-style) and one "
        "of them again skull-stripped; "
        "no real labelled brain MR is available", 1.0, "napari_medvision.recipes.brain_tissue")
    if args.init is not None:
        card.training["continued_from"] = init_summary(args.init)
    card.metrics = {
        "dice, real MNI152 2009a T1 template image (never trained on; reference = its GM/WM maps > 50 %, "
        "whose anatomy the phantoms were deformed from)": real,
        "dice, synthetic phantoms seeds 1000-1001, spin-echo and random contrast (held out)": synthetic,
    }
    save_shipped(network, card, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
