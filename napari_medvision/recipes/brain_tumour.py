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

On a CPU (each fold trains, then is scored on its held-out patient; the shipped model last):

    python -m napari_medvision.recipes.brain_tumour --folds 0 1 --time-budget 1200 --threads 1 --results folds
    python -m napari_medvision.recipes.brain_tumour --folds 2 3 --time-budget 1200 --threads 1 --results folds
    python -m napari_medvision.recipes.brain_tumour --folds --final --time-budget 2280 --threads 1 --results folds

On a GPU machine, train from prepared arrays (``brain_tumour_training``: 6 MB instead of the scans),
then score and ship here:

    python -m napari_medvision.recipes.brain_tumour --save-prepared prepared
    python -m napari_medvision.recipes.brain_tumour_training --prepared prepared --folds 0 1 2 3 --final \
        --device cuda --preset small --batch-size 8 --workers 3 --time-budget 390 --results runs
    python -m napari_medvision.recipes.brain_tumour --score-runs --ship --results runs

Voxels enclosed by the predicted enhancing rim become tumour core (``ENCLOSED``; see
``tasks.contrasts.fill_enclosed``), as BraTS annotators label a necrotic centre.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from ..models.card import ModelCard
from ..tasks.contrasts import brain_box, brain_mask, model_input, region_masks, segment_contrasts
from .brain_tumour_training import CONTRASTS, LABELS, PATIENTS, SUBSET_CHANCES, save_prepared, save_run, train_network
from .common import data_dir, init_summary, prepare_run, recipe_arguments, save_shipped

MODEL_ID = "mr-brain-tumour-3d"
SPACING = (2.0, 2.0, 2.0)
PATCH = (48, 64, 64)  # inference window
REGIONS = {"whole tumour": [1, 2, 3], "tumour core": [1, 3], "enhancing tumour": [3]}
# Everything the enhancing rim encloses is tumour core (tasks.contrasts.fill_enclosed).
ENCLOSED = {"rim": 3, "becomes": 1, "closing_mm": 4.0}
BRATS_TO_OURS = np.array([0, 1, 2, 1, 3], dtype=np.uint8)  # BraTS 2013 ids 0-4 -> ours
FILES = {"flair": "Flair_subtrMeanDivStd.nii.gz", "t1c": "T1c_subtrMeanDivStd.nii.gz"}
SUBSETS = (("flair", "t1c"), ("flair",), ("t1c",))
LICENSE = ("CC BY-NC-SA 3.0 CH (training data: BraTS 2013 via the DeepMedic examples; non-commercial use only)")
DATA = ("the four real BraTS 2013 glioma patients of the DeepMedic examples (BraTS 2015 training set; FLAIR and "
        "T1c, z-scored in the brain, manual OTMultiClass labels; Menze et al., IEEE TMI 2015; licence "
        "CC BY-NC-SA 3.0 CH, non-commercial)")


def patient(name: str) -> tuple[dict, np.ndarray]:
    """``({contrast: Volume}, BraTS 2013 label ids)`` of one patient as stored (1 mm, LPS)."""
    from .. import io

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
    box = brain_box(brain, margin=4, minimum=PATCH)
    return image[(slice(None), *box)].numpy(), target[box].numpy()


def new_card(architecture: dict) -> ModelCard:
    return ModelCard(
        id=MODEL_ID, task="segmentation", architecture=architecture, modality="MR",
        input={"spacing": list(SPACING), "normalisation": {"kind": "brain_zscore", "outside": -3.0,
                                                           "clip": [-5.0, 10.0]},
               "patch_size": list(PATCH), "channels": len(CONTRASTS), "contrasts": list(CONTRASTS),
               "dims": 3, "orientation": "LPS", "regions": REGIONS, "enclosed": ENCLOSED},
        labels=dict(LABELS), sha256="", license=LICENSE,
        description=("Glioma regions (BraTS: necrotic/non-enhancing core, oedema, enhancing tumour) on skull-stripped "
                     "or raw brain MR "
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


def held_out_runs(results: Path) -> list[tuple[int, Path]]:
    """``(fold, weights)`` of every fold run saved in ``results``."""
    return [(int(p.name[4:].split(".")[0]), p) for p in sorted(results.glob("fold*.safetensors"))]


def load_run(results: Path, run: str):
    """``(network, summary)`` of a run ``brain_tumour_training.save_run`` wrote into ``results``."""
    from safetensors.torch import load_file

    from ..models.registry import build_model

    summary = json.loads((results / f"{run}.train.json").read_text())
    network = build_model(summary["architecture"])
    network.load_state_dict(load_file(str(results / f"{run}.safetensors")))
    return network, summary


def score_run(results: Path, fold: int, device: str) -> dict:
    """Score fold ``fold``'s saved run on the patient it never saw; writes and returns ``fold<k>.json``."""
    network, summary = load_run(results, f"fold{fold}")
    network.to(device).eval()
    held_out = PATIENTS[fold]
    scores = {"held_out": held_out, "trained_on": summary["trained_on"], "steps": summary["steps"],
              "wall_time_s": summary["wall_time_s"], "device": summary.get("device"),
              "scores": held_out_scores(network, new_card(summary["architecture"]), held_out, device)}
    (results / f"fold{fold}.json").write_text(json.dumps(scores, indent=1))
    print(json.dumps(scores), flush=True)
    return scores


def ship(results: Path, out: Path) -> None:
    """Write the shipped model from ``final.safetensors`` with the folds' held-out figures on its card."""
    network, summary = load_run(results, "final")
    card = new_card(summary["architecture"])
    card.training = {"summary": f"{len(PATIENTS)} real BraTS 2013 glioma patients (manual labels)", "data": DATA,
                     "synthetic_share": 0.0, "recipe": "napari_medvision.recipes.brain_tumour",
                     "date": __import__("datetime").date.today().isoformat(),
                     "contrast_dropout": {" + ".join(s): p for s, p in SUBSET_CHANCES},
                     "training_patch": summary["architecture"]["config"]["img_size"],
                     **{k: summary[k] for k in ("steps", "batch_size", "seed", "device", "wall_time_s",
                                                "stopped_because", "validation_curve")},
                     "folds": [{k: f[k] for k in ("held_out", "trained_on", "steps", "wall_time_s")}
                               for f in fold_scores(results)]}
    card.training["scale"] = ("a GPU run" if "cuda" in str(summary["device"]).lower() else
                              f"the project's CPU, {summary['batch_size']} crops of "
                              f"{'x'.join(map(str, card.training['training_patch']))} voxels a step")
    card.metrics = lopo_metrics(results)
    mean = next((v for k, v in card.metrics.items() if k.startswith("dice")), None)
    if mean:
        both = mean["flair + t1c"]
        card.metrics["headline"] = (f"whole-tumour Dice {both['whole tumour']:.3f} (core {both['tumour core']:.3f}, "
                                    f"enhancing {both['enhancing tumour']:.3f}) from FLAIR + T1c, "
                                    f"{mean['flair']['whole tumour']:.3f} from FLAIR alone; leave-one-patient-out "
                                    f"on {len(PATIENTS)} real BraTS 2013 patients")
    save_shipped(network, card, out)


def main(argv: list[str] | None = None) -> int:
    parser = recipe_arguments(__doc__.splitlines()[0], steps=4000, batch_size=2, preset="cpu")
    parser.add_argument("--folds", type=int, nargs="*", default=[0, 1, 2, 3],
                        help="leave-one-patient-out folds to train and score (patient index held out)")
    parser.add_argument("--final", action="store_true", help="train the shipped model on all four patients")
    parser.add_argument("--final-init", type=Path, default=None,
                        help="start the shipped model from these weights (a fold's), trained further on all four")
    parser.add_argument("--final-budget", type=float, default=None, help="its time budget (default --time-budget)")
    parser.add_argument("--results", type=Path, default=Path("brain_tumour_folds"),
                        help="folder for each run's weights and each fold's held-out scores (JSON)")
    parser.add_argument("--workers", type=int, default=0, help="threads preparing batches ahead of the GPU")
    parser.add_argument("--save-prepared", type=Path, default=None,
                        help="only write each patient as the model sees it (npz) for brain_tumour_training")
    parser.add_argument("--score-runs", action="store_true",
                        help="only score the fold runs already in --results on their held-out patients")
    parser.add_argument("--ship", action="store_true",
                        help="only write the shipped model from --results/final.safetensors and the fold scores")
    args = parser.parse_args(argv)
    device = prepare_run(args)
    if args.save_prepared is not None:
        for name in PATIENTS:
            save_prepared(args.save_prepared, name, *prepared(name))
        return 0
    if args.score_runs or args.ship:
        if args.score_runs:
            for fold, _ in held_out_runs(args.results):
                score_run(args.results, fold, device)
        if args.ship:
            ship(args.results, args.out)
        return 0
    prepared_arrays = {name: prepared(name) for name in PATIENTS}
    for fold in args.folds:
        names = [p for i, p in enumerate(PATIENTS) if i != fold]
        images, labels = zip(*(prepared_arrays[n] for n in names))
        network, arch, result, config = train_network(images, labels, args, device, seed=args.seed + fold)
        save_run(args.results, f"fold{fold}", network, arch, result, config, names, device)
        score_run(args.results, fold, device)
    if args.final:
        images, labels = zip(*prepared_arrays.values())
        network, arch, result, config = train_network(images, labels, args, device, seed=args.seed,
                                                      init=args.final_init, time_budget=args.final_budget)
        save_run(args.results, "final", network, arch, result, config, PATIENTS, device)
        ship(args.results, args.out)
        if args.final_init is not None:
            card_path = args.out / f"{MODEL_ID}.json"
            card = json.loads(card_path.read_text())
            card["training"]["continued_from"] = init_summary(args.final_init)
            card_path.write_text(json.dumps(card, indent=1))
    return 0


def fold_scores(results: Path) -> list[dict]:
    """Each scored fold's ``fold<k>.json`` (not the runs' ``fold<k>.train.json``), in fold order."""
    return [json.loads(p.read_text()) for p in sorted(Path(results).glob("fold[0-9].json"))]


def lopo_metrics(results: Path) -> dict:
    """The card's metrics from the fold files: the mean over folds and each held-out patient, per
    contrast subset and region."""
    folds = fold_scores(results)
    if not folds:
        return {}
    subsets = [" + ".join(s) for s in SUBSETS]
    seconds = [round(float(f.get("wall_time_s") or 0)) for f in folds]
    span = f"{min(seconds)}" if min(seconds) == max(seconds) else f"{min(seconds)}-{max(seconds)}"
    key = (f"dice, leave-one-patient-out on the {len(folds)} real BraTS 2013 patients, mean of {len(folds)} folds "
           f"(each fold's model trained on the other three for {span} s and never saw the patient it is scored "
           "on; whole 1 mm scans, as mv.segment runs; per contrast subset)")
    return {
        key: {s: {r: round(float(np.mean([f["scores"][s][r] for f in folds])), 4) for r in REGIONS} for s in subsets},
        "per_image": {f["held_out"]: {s: {r: f["scores"][s][r] for r in REGIONS} for s in subsets} for f in folds},
        "note": ("the shipped model itself trained on all four patients, so no patient is left to score it on; the "
                 "leave-one-patient-out folds estimate what it does on an unseen patient"),
    }


if __name__ == "__main__":
    sys.exit(main())
