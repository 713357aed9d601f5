"""Recipe: 3D TransUNet for glioma regions (BraTS) on MR from whichever of FLAIR and T1c a user has.

Data: the four real BraTS 2013 patients of ``mri_brain_tumour_brats2013`` (FLAIR and T1c, manual
labels; CC BY-NC-SA 3.0 CH, non-commercial). Labels become the BraTS regions: 1 necrotic /
non-enhancing core (BraTS 1 + 3), 2 oedema, 3 enhancing tumour. Images go through the same
preparation as ``mv.segment`` (``tasks.contrasts``: z-score inside the brain, 2 mm grid), crops
are drawn around the tumour and anywhere in the brain, with heavy intensity and contrast
augmentation and random contrast drop-out (FLAIR + T1c, FLAIR alone, T1c alone), so a missing
contrast is an expected input. Figures: leave-one-patient-out (fold k trains on the other three
patients, for a fixed time, no checkpoint choice, and is tested on patient k at its 1 mm grid
as ``mv.segment`` runs it); the shipped model trains on all four.

    python -m napari_medvision.recipes.brain_tumour --folds 0 1 --time-budget 1560 --threads 1 --results folds
    python -m napari_medvision.recipes.brain_tumour --folds 2 3 --time-budget 1560 --threads 1 --results folds
    python -m napari_medvision.recipes.brain_tumour --folds --final --final-init folds/fold0.safetensors \
        --final-budget 2280 --threads 1 --results folds      # the shipped model

The shipped model is fold 0's model continued on all four patients (two runs at a time fitted
the shared 2-core CPU; a GPU run can train it from scratch with ``--final`` alone).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .. import io
from ..engine.sampling import PatchSampler
from ..engine.training import TrainConfig, train_segmentation
from ..models.card import ModelCard
from ..tasks.contrasts import brain_box, brain_mask, model_input, region_masks, segment_contrasts
from .common import data_dir, init_summary, prepare_run, print_every, recipe_arguments, save_shipped, training_summary

MODEL_ID = "mr-brain-tumour-3d"
SPACING = (2.0, 2.0, 2.0)
PATCH = (48, 64, 64)  # inference window
TRAIN_PATCH = (32, 48, 48)  # training crops: cheaper on a CPU
CONTRASTS = ("flair", "t1c")
LABELS = {1: "necrotic / non-enhancing tumour core", 2: "oedema", 3: "enhancing tumour"}
REGIONS = {"whole tumour": [1, 2, 3], "tumour core": [1, 3], "enhancing tumour": [3]}
BRATS_TO_OURS = np.array([0, 1, 2, 1, 3], dtype=np.uint8)  # BraTS 2013 ids 0-4 -> ours
PATIENTS = ("brats_2013_pat0001_1", "brats_2013_pat0002_1", "brats_2013_pat0003_1", "brats_2013_pat0004_1")
FILES = {"flair": "Flair_subtrMeanDivStd.nii.gz", "t1c": "T1c_subtrMeanDivStd.nii.gz"}
SUBSETS = (("flair", "t1c"), ("flair",), ("t1c",))
# Drop-out: the chance of each contrast subset in a training crop.
SUBSET_CHANCES = ((("flair", "t1c"), 0.5), (("flair",), 0.3), (("t1c",), 0.2))
LICENSE = ("CC BY-NC-SA 3.0 CH (training data: BraTS 2013 via the DeepMedic examples; non-commercial use only)")
DATA = ("the four real BraTS 2013 glioma patients of the DeepMedic examples (BraTS 2015 training set; FLAIR and "
        "T1c, z-scored in the brain, manual OTMultiClass labels; Menze et al., IEEE TMI 2015; licence "
        "CC BY-NC-SA 3.0 CH, non-commercial)")


def patient(name: str) -> tuple[dict, np.ndarray]:
    """``({contrast: Volume}, BraTS 2013 label ids)`` of one patient as stored (1 mm, LPS)."""
    root = data_dir() / "mri_brain_tumour_brats2013" / name
    contrasts = {c: io.load(root / f) for c, f in FILES.items()}
    labels = np.asarray(io.load(root / "OTMultiClass.nii.gz").data).round().astype(np.uint8)
    return contrasts, labels


def prepared(name: str) -> tuple[np.ndarray, np.ndarray]:
    """One patient as the model sees it: ``(2, *grid)`` channels and our label ids at 2 mm,
    cropped to the brain box (prepared exactly as ``tasks.contrasts.segment_contrasts`` does)."""
    import torch

    from ..engine.resample import grid_shape, resample_linear

    contrasts, labels = patient(name)
    arrays = {c: np.asarray(v.data, dtype=np.float32) for c, v in contrasts.items()}
    first = contrasts[CONTRASTS[0]]
    mask, _ = brain_mask(arrays, first.spacing, skull_model=None)
    shape = grid_shape(first.spatial_shape, first.spacing, SPACING)
    image, brain = model_input(arrays, mask, list(CONTRASTS), shape)
    ours = BRATS_TO_OURS[labels]
    onehot = np.stack([ours == k for k in range(len(LABELS) + 1)]).astype(np.float32)
    target = resample_linear(onehot, shape).argmax(0).to(torch.uint8)
    box = brain_box(brain, margin=4, minimum=TRAIN_PATCH)
    return image[(slice(None), *box)].numpy(), target[box].numpy()


def augment_intensity(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """Per contrast: gamma, scale, shift, a smooth multiplicative bias field, blur and noise.

    Per channel by hand: MONAI's random intensity transforms draw one value for all channels, and
    each contrast of a real scan varies on its own (scanner, sequence, bias field).
    """
    from scipy import ndimage as ndi

    out = np.empty_like(x)
    for c in range(x.shape[0]):
        ch = x[c]
        if rng.random() < 0.5:  # gamma on the channel's own range
            lo, hi = float(ch.min()), float(ch.max())
            if hi > lo:
                ch = ((ch - lo) / (hi - lo)) ** rng.uniform(0.6, 1.6) * (hi - lo) + lo
        ch = ch * rng.uniform(0.7, 1.35) + rng.uniform(-0.4, 0.4)
        if rng.random() < 0.4:  # bias field: a low-order smooth multiplier
            coarse = rng.normal(0.0, 0.12, size=(2, 3, 3))
            field = ndi.zoom(coarse, np.array(ch.shape) / np.array(coarse.shape), order=1)
            ch = ch * np.exp(field[tuple(slice(0, n) for n in ch.shape)])
        if rng.random() < 0.2:
            ch = ndi.gaussian_filter(ch, rng.uniform(0.3, 1.0))
        if rng.random() < 0.3:
            ch = ch + rng.normal(0.0, rng.uniform(0.02, 0.15), size=ch.shape)
        out[c] = ch
    return out.astype(np.float32)


def contrast_dropout(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """``x`` with the contrasts of a random subset kept and the others zero (a missing contrast)."""
    subsets, chances = zip(*SUBSET_CHANCES)
    keep = subsets[int(rng.choice(len(subsets), p=np.array(chances) / sum(chances)))]
    for k, name in enumerate(CONTRASTS):
        if name not in keep:
            x[k] = 0.0
    return x


def training_batches(images, labels):
    """``sample(rng, batch)`` for ``train_segmentation``: crops (70 % centred on a tumour class,
    the rest anywhere in the brain box), flipped and turned, then intensity-augmented and with
    contrasts dropped at random."""
    sampler = PatchSampler(images, labels, TRAIN_PATCH, foreground_fraction=0.7, augment=True, flip_axes=(2,))

    def sample(rng, batch_size):
        x, y = sampler.sample(rng, batch_size)
        for b in range(x.shape[0]):
            x[b] = contrast_dropout(rng, augment_intensity(rng, x[b]))
        return x, y

    return sample


def new_card(architecture: dict) -> ModelCard:
    return ModelCard(
        id=MODEL_ID, task="segmentation", architecture=architecture, modality="MR",
        input={"spacing": list(SPACING), "normalisation": {"kind": "brain_zscore", "outside": -3.0,
                                                           "clip": [-5.0, 10.0]},
               "patch_size": list(PATCH), "channels": len(CONTRASTS), "contrasts": list(CONTRASTS),
               "dims": 3, "orientation": "LPS", "regions": REGIONS},
        labels=dict(LABELS), sha256="", license=LICENSE,
        description=("Glioma regions (BraTS: necrotic/non-enhancing core, oedema, enhancing tumour) on brain MR "
                     "from FLAIR and/or T1c (3D TransUNet); the result's meta gives whole tumour, tumour core and "
                     "enhancing tumour volumes in mL."),
    )


def region_dice(prediction: np.ndarray, truth_ours: np.ndarray) -> dict[str, float]:
    """Dice of each nested BraTS region (NaN where a region is absent from both)."""
    out = {}
    pred, true = region_masks(prediction, REGIONS), region_masks(truth_ours, REGIONS)
    for region in REGIONS:
        denom = pred[region].sum() + true[region].sum()
        out[region] = round(float(2 * (pred[region] & true[region]).sum() / denom), 4) if denom else float("nan")
    return out


def held_out_scores(network, card, name: str, device: str) -> dict:
    """Region Dice and seconds on patient ``name`` at 1 mm, per contrast subset, as mv.segment runs."""
    contrasts, labels = patient(name)
    truth = BRATS_TO_OURS[labels]
    out = {}
    for subset in SUBSETS:
        start = time.perf_counter()
        result = segment_contrasts(network, card, {c: contrasts[c] for c in subset}, device=device)
        seconds = time.perf_counter() - start
        pred = np.asarray(result.data)
        out[" + ".join(subset)] = {**region_dice(pred, truth), "seconds": round(seconds, 1),
                                   "volume_ml": result.meta["volumes_ml"]}
    return out


def train_one(train_names, args, device: str, seed: int, init: Path | None = None, time_budget=None):
    """A network trained on ``train_names`` for the time budget (from ``init``'s weights if given), its
    card, and the training result."""
    import torch

    from ..models.registry import build_model
    from .common import architecture_preset

    images, labels = zip(*(prepared(n) for n in train_names))
    config = dict(architecture_preset(3, args.preset), in_channels=len(CONTRASTS), n_classes=len(LABELS) + 1,
                  strides=[[2, 2, 2]] * 3, img_size=list(TRAIN_PATCH))
    architecture = {"name": "transunet3d", "config": config}
    torch.manual_seed(seed)
    network = build_model(architecture)
    if init is not None:
        from safetensors.torch import load_file

        network.load_state_dict(load_file(str(init)))
    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=2e-3 if init is None else 1e-3,
                               val_every=100, time_budget_s=time_budget or args.time_budget, seed=seed)
    result = train_segmentation(network, training_batches(list(images), list(labels)), train_config,
                                validate=None, device=device, progress=print_every(25), on_validation=print)
    return network, new_card(architecture), result, train_config


def main(argv: list[str] | None = None) -> int:
    parser = recipe_arguments(__doc__.splitlines()[0], steps=4000, batch_size=2, preset="cpu")
    parser.add_argument("--folds", type=int, nargs="*", default=[0, 1, 2, 3],
                        help="leave-one-patient-out folds to run (patient index held out)")
    parser.add_argument("--final", action="store_true", help="train the shipped model on all four patients")
    parser.add_argument("--final-init", type=Path, default=None,
                        help="start the shipped model from these weights (a fold's), trained further on all four")
    parser.add_argument("--final-budget", type=float, default=None, help="its time budget (default --time-budget)")
    parser.add_argument("--results", type=Path, default=Path("brain_tumour_folds"),
                        help="folder for each fold's held-out scores (JSON); the card gathers them")
    args = parser.parse_args(argv)
    from safetensors.torch import save_file

    device = prepare_run(args)
    args.results.mkdir(parents=True, exist_ok=True)
    for fold in args.folds:
        held_out = PATIENTS[fold]
        train_names = [p for p in PATIENTS if p != held_out]
        network, card, result, _ = train_one(train_names, args, device, seed=args.seed + fold)
        scores = {"held_out": held_out, "trained_on": train_names, "steps": result.steps_done,
                  "wall_time_s": round(result.seconds, 1), "scores": held_out_scores(network, card, held_out, device)}
        (args.results / f"fold{fold}.json").write_text(json.dumps(scores, indent=1))
        state = {k: v.contiguous() for k, v in network.state_dict().items()}
        save_file(state, str(args.results / f"fold{fold}.safetensors"))
        print(json.dumps(scores), flush=True)
    if args.final:
        network, card, result, train_config = train_one(list(PATIENTS), args, device, seed=args.seed,
                                                        init=args.final_init, time_budget=args.final_budget)
        card.training = training_summary(device, result, train_config, DATA, 0.0,
                                         "napari_medvision.recipes.brain_tumour")
        if args.final_init is not None:
            card.training["continued_from"] = init_summary(args.final_init)
        card.metrics = lopo_metrics(args.results)
        save_shipped(network, card, args.out)
    return 0


def lopo_metrics(results: Path) -> dict:
    """The card's metrics from the fold files: the mean over folds and each held-out patient, per
    contrast subset and region."""
    folds = [json.loads(p.read_text()) for p in sorted(Path(results).glob("fold*.json"))]
    if not folds:
        return {}
    subsets = [" + ".join(s) for s in SUBSETS]
    key = (f"dice, leave-one-patient-out on the {len(folds)} real BraTS 2013 patients, mean of {len(folds)} folds "
           "(each fold's model trained on the other three for 1560 s and never saw the patient it is scored on; "
           "whole 1 mm scans, as mv.segment runs; per contrast subset)")
    return {
        key: {s: {r: round(float(np.mean([f["scores"][s][r] for f in folds])), 4) for r in REGIONS} for s in subsets},
        "per_image": {f["held_out"]: {s: {r: f["scores"][s][r] for r in REGIONS} for s in subsets} for f in folds},
        "note": ("the shipped model itself trained on all four patients, so no patient is left to score it on; the "
                 "leave-one-patient-out folds estimate what it does on an unseen patient"),
    }


if __name__ == "__main__":
    sys.exit(main())
