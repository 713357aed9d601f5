"""Recipe: 3D TransUNet for brain tissue (CSF, grey matter, white matter) on MR.

No real brain MR with manual tissue labels exists in the shared data, so training images are
simulated (``synthetic.brain_mr``): the MNI152 grey/white-matter maps, randomly deformed, turned
into T1-, T2- and PD-weighted spin-echo images with bias fields and Rician noise. Held out: the
real MNI152 T1 template image itself (never trained on; reference = its own GM/WM probability
maps > 50 %) and unseen phantom seeds.

    python -m napari_medvision.recipes.brain_tissue --steps 1200 --time-budget 1200
"""

from __future__ import annotations

import sys

import numpy as np

from .. import io
from ..engine.sampling import PatchSampler
from ..engine.training import TrainConfig, dice_per_class, train_segmentation
from ..models.card import ModelCard
from ..synthetic.brain import LABELS
from .common import window_probabilities, new_network, prepare_run, print_every, data_dir, recipe_arguments, save_shipped, training_summary

MODEL_ID = "mr-brain-tissue-3d"
SPACING = (1.5, 1.5, 1.5)
PATCH = (48, 64, 64)  # inference window
TRAIN_PATCH = (32, 64, 64)  # training crops: cheaper on a CPU
NORMALISATION = {"kind": "percentile", "low": 0.5, "high": 99.5}
CONTRAST_CYCLE = ("T1", "T1", "T2", "T1", "PD")


def phantoms(seeds, template, stretch: bool = False):
    from ..engine.normalise import normalise
    from ..synthetic import brain_mr

    images, labels = [], []
    for seed in seeds:
        contrast = CONTRAST_CYCLE[seed % len(CONTRAST_CYCLE)]
        contrasts, label = brain_mr(seed=seed, shape=(96, 112, 96), spacing=SPACING, contrasts=(contrast,),
                                    template=template)
        image = normalise(np.asarray(contrasts[contrast].data), NORMALISATION).numpy()[None]
        images.append(image)
        labels.append(np.asarray(label.data).astype(np.int64))
        if stretch:
            # Spin-echo phantoms put brain tissue low in the percentile range (bright scalp fat on
            # top); in gradient-echo T1 scans and templates white matter is the brightest tissue. A
            # per-volume gain and a gamma below one move the tissues up the range, so the model
            # learns the order of tissues, not their place in the range.
            rng = np.random.default_rng(seed)
            gain, gamma = float(rng.uniform(1.4, 2.6)), float(rng.uniform(0.5, 1.0))
            images.append(np.clip(np.clip(image, 0, None) * gain, 0, 1.2) ** gamma)
            labels.append(labels[-1])
    return images, labels


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

    parser = recipe_arguments(__doc__.splitlines()[0], steps=1200, batch_size=2, preset="cpu")
    parser.add_argument("--phantoms", type=int, default=12, help="synthetic training volumes")
    args = parser.parse_args(argv)
    device = prepare_run(args)
    template = data_dir() / "mri_brain_mni152"

    syn_images, syn_labels = phantoms(range(100, 100 + args.phantoms), template, stretch=True)
    val_images, val_labels = phantoms(range(1000, 1002), template)
    sampler = PatchSampler(syn_images, syn_labels, TRAIN_PATCH, foreground_fraction=0.7)
    t1, reference = mni_reference()
    ids = {name: i for i, name in LABELS.items()}

    network, architecture = new_network(3, args.preset, in_channels=1, n_classes=len(LABELS) + 1,
                                        seed=args.seed)
    card = ModelCard(
        id=MODEL_ID, task="segmentation", architecture=architecture, modality="MR",
        input={"spacing": list(SPACING), "normalisation": NORMALISATION, "patch_size": list(PATCH), "channels": 1,
               "dims": 3},
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
        return float(np.mean(list(mni_dice(net).values()) + list(synthetic_dice(net).values())))

    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=2e-3, val_every=150,
                               time_budget_s=args.time_budget, seed=args.seed)
    result = train_segmentation(network, sampler.sample, train_config, validate=validate, device=device,
                                progress=print_every(25), on_validation=print)
    real, synthetic = mni_dice(network), synthetic_dice(network)
    card.training = training_summary(
        device, result, train_config,
        f"{args.phantoms} simulated spin-echo MR volumes (T1/T2/PD) built from the MNI152 2009a GM/WM maps, "
        "randomly deformed; no real labelled brain MR is available", 1.0, "napari_medvision.recipes.brain_tissue")
    card.metrics = {
        "dice, real MNI152 2009a T1 template image (never trained on; reference = its GM/WM maps > 50 %, "
        "whose anatomy the phantoms were deformed from)": real,
        "dice, synthetic phantoms seeds 1000-1001 (held out)": synthetic,
    }
    save_shipped(network, card, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
