"""Recipe: 2D TransUNet for retinal vessels in colour fundus photos (DRIVE).

Trains on 13 of DRIVE's 20 training images (21-33) plus synthetic fundus photos, chooses the
checkpoint on 34-35, keeps 36-40 out of both, and reports Dice, sensitivity, specificity and AUC
inside the field of view on those.

    python -m napari_medvision.recipes.fundus_vessels --steps 3500 --time-budget 2700 --threads 1
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .. import io
from ..engine.normalise import normalise
from ..engine.sampling import PatchSampler
from ..engine.training import TrainConfig, train_segmentation
from ..models.card import ModelCard
from ..synthetic import fundus_photo
from .common import window_probabilities, new_network, prepare_run, print_every, binary_metrics, data_dir, recipe_arguments, save_shipped, training_summary

MODEL_ID = "fundus-vessels-2d"
TRAIN_IDS = list(range(21, 36))       # every image the test leaves (the MVG recipe trains on all)
VALIDATION_IDS = [34, 35]             # this recipe picks its checkpoint on these, never trains on them
FIT_IDS = [i for i in TRAIN_IDS if i not in VALIDATION_IDS]
HELD_OUT_IDS = list(range(36, 41))    # the test
PATCH = (128, 128)
NORMALISATION = {"kind": "channel_zscore", "mask_above": 20}  # per photo, inside the field of view


def prepared(photo, normalisation=NORMALISATION) -> np.ndarray:
    """A colour photo Volume as a network sees it: ``(3, H, W)`` float32, normalised from the
    stored 8-bit values as inference normalises them (this model's card entry by default)."""
    return normalise(np.moveaxis(np.asarray(photo.data), -1, 0), normalisation).numpy()


def load_drive(root: Path, ids: list[int], normalisation=NORMALISATION):
    """(prepared images (3, H, W), vessel masks, field-of-view masks) for DRIVE training ids;
    ``normalisation`` another card's entry (MVG takes ``{"kind": "rgb_unit"}``: [0, 1])."""
    images, vessels, fovs = [], [], []
    for i in ids:
        images.append(prepared(io.load(root / "images" / f"{i}_training.tif"), normalisation))
        vessels.append((np.asarray(io.load(root / "1st_manual" / f"{i}_manual1.gif").data) > 0).astype(np.int64))
        fovs.append(np.asarray(io.load(root / "mask" / f"{i}_training_mask.gif").data) > 0)
    return images, vessels, fovs


def synthetic_fundus(n: int, seed: int):
    images, vessels = [], []
    for k in range(n):
        photo, labels = fundus_photo(seed=seed + k, size=(584, 565))
        images.append(prepared(photo))
        vessels.append((np.asarray(labels.data) > 0).astype(np.int64))
    return images, vessels


def vessel_probability(network, image: np.ndarray, device: str) -> np.ndarray:
    return window_probabilities(network, image, (256, 256), device)[1]


def main(argv: list[str] | None = None) -> int:


    parser = recipe_arguments(__doc__.splitlines()[0], steps=3500, batch_size=8, preset="cpu")
    parser.add_argument("--synthetic", type=int, default=6, help="synthetic photos added to training")
    args = parser.parse_args(argv)
    device = prepare_run(args)
    root = data_dir() / "fundus_drive_train"
    train_images, train_vessels, _ = load_drive(root, FIT_IDS)
    val_images, val_vessels, val_fovs = load_drive(root, VALIDATION_IDS)
    test_images, test_vessels, test_fovs = load_drive(root, HELD_OUT_IDS)
    syn_images, syn_vessels = synthetic_fundus(args.synthetic, seed=1000) if args.synthetic else ([], [])
    sampler = PatchSampler(train_images + syn_images, train_vessels + syn_vessels, PATCH, foreground_fraction=0.5)

    network, architecture = new_network(2, args.preset, in_channels=3, n_classes=2,
                                        seed=args.seed)

    def validate(net) -> float:
        dices = [binary_metrics(vessel_probability(net, im, device), v, f)["dice"]
                 for im, v, f in zip(val_images, val_vessels, val_fovs)]
        return float(np.mean(dices))

    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=2e-3, val_every=250,
                               time_budget_s=args.time_budget, seed=args.seed)
    result = train_segmentation(network, sampler.sample, train_config, validate=validate, device=device,
                                progress=print_every(50), on_validation=print)
    per_image = [binary_metrics(vessel_probability(network, im, device), v, f)
                 for im, v, f in zip(test_images, test_vessels, test_fovs)]
    metrics = {key: round(float(np.mean([m[key] for m in per_image])), 4) for key in per_image[0]}
    card = ModelCard(
        id=MODEL_ID, task="segmentation", architecture=architecture, modality="fundus",
        input={"spacing": None, "normalisation": NORMALISATION, "patch_size": [256, 256], "channels": 3, "dims": 2},
        labels={1: "vessel"}, sha256="",
        description="Retinal vessels in colour fundus photos (2D TransUNet).",
        training=training_summary(device, result, train_config,
                                  f"DRIVE training images {FIT_IDS[0]}-{FIT_IDS[-1]} (Staal et al. 2004) "
                                  f"+ {args.synthetic} synthetic photos; checkpoint chosen on DRIVE "
                                  f"{VALIDATION_IDS[0]}-{VALIDATION_IDS[-1]}",
                                  len(syn_images) / (len(syn_images) + len(FIT_IDS)),
                                  "napari_medvision.recipes.fundus_vessels"),
        metrics={"DRIVE training images 36-40 (held out), inside the field of view": metrics,
                 "per_image": [{k: round(v, 4) for k, v in m.items()} for m in per_image]},
        license="research use (DRIVE terms); code Apache-2.0",
    )
    save_shipped(network, card, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
