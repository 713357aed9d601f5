"""Fit the brain MR contrast models (``mr-contrast-<source>-to-<target>``) on the three real brains.

Data: ``mri_brain_multicontrast`` (BrainLesion tutorials: a BraTS 2023 glioma example and two
TCIA TCGA-LGG/GBM cases; co-registered, skull-stripped T1/T1c/T2/FLAIR, 240x240x155, 1 mm;
research use under the BraTS/TCIA terms). Evaluation is leave-one-subject-out: for each brain a
model is fitted on the other two and scored on it; the shipped weights are then fitted on all three.
Baselines get the same data: identity (the input), histogram matching onto the two training
brains' target, and the grey-level intensity map fitted on them (MVG's prior).

SSIM is reported two ways, each image first brought to its own 0.5-99.5 percentiles (so a global
linear rescaling changes no method's score): ``ssim_brain``, the SSIM map averaged over brain
voxels only (the strict measure), and ``ssim_slice``, the mean SSIM of whole axial slices that
hold brain (background included, as ``recipes/mvg_evaluation.py`` scores); ``psnr_brain`` over brain
voxels with each brain's 99th percentile at 1.

    OMP_NUM_THREADS=1 python -m napari_medvision.recipes.mr_contrast --out weights
    python -m napari_medvision.recipes.mr_contrast --evaluate-only --tasks t1-to-t2
"""

from __future__ import annotations

import argparse
import functools
import json
from datetime import date
from pathlib import Path

import numpy as np

from .. import io
from ..engine.synthesis import unit_scale
from ..models.card import ModelCard
from ..tasks.mr_contrast import (MODEL_TASK, N_FEATURES, OUTPUT_SCALE, brain_mask, fit_contrast_model, model_id,
                                 predict, voxel_features)
from ..tasks.synthesis_baselines import intensity_map
from .common import data_dir, save_shipped
from .mvg_evaluation import _picture

FOLDER = "mri_brain_multicontrast"
FILES = {  # subject -> contrast -> file inside FOLDER
    "aurora_example": {"T1": "t1", "T2": "t2", "FLAIR": "flair"},
    "TCGA-DU-7294": {c: f"TCGA-DU-7294_{s}_bet" for c, s in (("T1", "t1"), ("T2", "t2"), ("FLAIR", "fla"))},
    "OtherEXampleFromTCIA": {c: f"OtherEXampleFromTCIA_{s}_bet"
                             for c, s in (("T1", "t1"), ("T2", "t2"), ("FLAIR", "fla"))},
}
PAIRS = (("T1", "T2"), ("T2", "T1"), ("T1", "FLAIR"), ("FLAIR", "T1"), ("T2", "FLAIR"), ("FLAIR", "T2"))
DATA_NOTE = ("three real brains from BrainLesion tutorials (BraTS 2023 GLI example 'aurora_example', TCIA "
             "TCGA-DU-7294, TCIA 'OtherEXampleFromTCIA'), co-registered skull-stripped T1/T2/FLAIR, 240x240x155, "
             "1 mm; images under their sources' terms (BraTS, TCIA: research use, cite them); not shipped")


def load_contrast(subject: str, contrast: str, root: Path | None = None):
    """(z, y, x) float32 array and spacing of one contrast of one real brain."""
    root = root or data_dir() / FOLDER
    volume = io.load(root / subject / f"{FILES[subject][contrast]}.nii.gz")
    return np.asarray(volume.data, np.float32), tuple(volume.spacing)


def own_unit(values: np.ndarray) -> np.ndarray:
    """``values`` with their 0.5 and 99.5 percentiles at 0 and 1 (``engine.synthesis.unit_scale``)."""
    return unit_scale(values, "MR").to_unit(values)


def ssim_scores(output: np.ndarray, truth: np.ndarray, brain: np.ndarray) -> dict:
    """``ssim_brain`` (SSIM map over brain voxels), ``ssim_slice`` (whole slices with brain), ``psnr_brain``."""
    from skimage.metrics import structural_similarity

    out, ref = own_unit(output), own_unit(truth)
    in_brain, slices = [0.0, 0], []
    for k in range(len(ref)):
        if brain[k].sum() < 100:
            continue
        whole, ssim_map = structural_similarity(ref[k], out[k], data_range=1.0, full=True)
        in_brain[0] += float(ssim_map[brain[k]].sum())
        in_brain[1] += int(brain[k].sum())
        slices.append(whole)
    # PSNR over the brain with each image's brain at its own 99th percentile = 1 (the background,
    # most of the volume, would otherwise set the scale)
    out_brain, ref_brain = output[brain], truth[brain]
    mse = float(np.mean((out_brain / np.percentile(out_brain, 99) - ref_brain / np.percentile(ref_brain, 99)) ** 2))
    return {"ssim_brain": round(in_brain[0] / in_brain[1], 4), "ssim_slice": round(float(np.mean(slices)), 4),
            "psnr_brain": round(float(10 * np.log10(1.0 / max(mse, 1e-12))), 2)}


def histogram_matched(query: np.ndarray, targets: list[np.ndarray], brains: list[np.ndarray]) -> np.ndarray:
    """The query's brain voxels given the grey-level distribution of the training targets' brains."""
    from skimage.exposure import match_histograms

    brain = brain_mask(query)
    reference = np.concatenate([(t / np.percentile(t[b], 99))[b] for t, b in zip(targets, brains)])
    out = np.zeros_like(query)
    out[brain] = match_histograms(query[brain], reference)
    return out


def baselines(query, train_sources, train_targets) -> dict[str, np.ndarray]:
    brains = [brain_mask(s) for s in train_sources]
    brain = brain_mask(query)
    prompt_image = np.concatenate([s[b] for s, b in zip(train_sources, brains)])
    prompt_target = np.concatenate([t[b] / np.percentile(t[b], 99) for t, b in zip(train_targets, brains)])
    mapped = np.zeros_like(query)
    mapped[brain] = intensity_map(query[brain], prompt_image, prompt_target, "MR")
    return {"identity": query, "histogram matching": histogram_matched(query, train_targets, brains),
            "intensity map": mapped}


@functools.lru_cache(maxsize=None)
def _features(subject: str, contrast: str):
    """``voxel_features`` of one real brain's contrast, computed once per recipe run."""
    return voxel_features(*load_contrast(subject, contrast))


def leave_one_out(source: str, target: str, subjects=tuple(FILES), steps: int = 3000, log=print,
                  pictures: Path | None = None) -> dict:
    """Per held-out subject: the fitted model's and the baselines' scores on it (and with ``pictures``, a PNG
    of its slice 80: input, fitted model, truth, histogram matching, intensity map)."""
    volumes = {s: (load_contrast(s, source), load_contrast(s, target)[0]) for s in subjects}
    results = {}
    for held in subjects:
        train = [s for s in subjects if s != held]
        network, _ = fit_contrast_model([(volumes[s][0][0], volumes[s][1], volumes[s][0][1]) for s in train],
                                        steps=steps, features=[_features(s, source) for s in train])
        (query, spacing), truth = volumes[held]
        brain = brain_mask(query)
        outputs = {"fitted model": predict(network, query, spacing, features=_features(held, source)) * OUTPUT_SCALE,
                   **baselines(query, [volumes[s][0][0] for s in train], [volumes[s][1] for s in train])}
        results[held] = {name: ssim_scores(out, truth, brain) for name, out in outputs.items()}
        if pictures is not None:
            pictures.mkdir(parents=True, exist_ok=True)
            _picture(pictures / f"mr_real_{source}_to_{target}_{held}.png",
                     [a[80] for a in (query, outputs["fitted model"], truth, outputs["histogram matching"],
                                      outputs["intensity map"])])
        log(json.dumps({"task": f"{source}->{target}", "held_out": held, **results[held]}))
    return results


def summary(results: dict) -> dict:
    """Mean over held-out subjects of each method's scores."""
    methods = next(iter(results.values()))
    return {m: {k: round(float(np.mean([r[m][k] for r in results.values()])), 4) for k in methods[m]}
            for m in methods}


def fit_and_card(source: str, target: str, loso: dict, steps: int):
    """The model fitted on all three brains and its card (metrics: the leave-one-subject-out scores)."""
    volumes = []
    for subject in FILES:
        image, spacing = load_contrast(subject, source)
        volumes.append((image, load_contrast(subject, target)[0], spacing))
    network, log = fit_contrast_model(volumes, steps=steps, features=[_features(s, source) for s in FILES])
    card = ModelCard(
        id=model_id(source, target), task=MODEL_TASK,
        architecture={"name": "contrast-mlp", "config": {"n_features": N_FEATURES, "hidden": 64, "layers": 2}},
        modality="MR",
        input={"source": source, "target": target, "spacing": "any (features in millimetres)",
               "normalisation": "brain voxels (above a skull-stripped scan's background, else all) scaled so "
                                "their 99th percentile is 1", "features": "tasks.mr_contrast.voxel_features",
               "output": f"{OUTPUT_SCALE:g} = the synthesized brain's 99th percentile; 0 outside the brain"},
        sha256="",
        training={"data": DATA_NOTE, "synthetic_share": 0.0, **log, "device": "CPU, 1 thread",
                  "recipe": f"napari_medvision.recipes.mr_contrast --tasks {source.lower()}-to-{target.lower()}",
                  "date": date.today().isoformat()},
        metrics={f"leave-one-subject-out over the three real brains (fitted on two, scored on the third), "
                 f"{source}->{target}": {"mean": summary(loso), "per held-out subject": loso},
                 "how scored": "SSIM with each image at its own 0.5-99.5 percentiles; ssim_brain: SSIM map "
                               "averaged over brain voxels; ssim_slice: mean SSIM of whole axial slices holding "
                               "brain; psnr_brain: PSNR over brain voxels, each brain's 99th percentile at 1"},
        license=("weights Apache-2.0; fitted on images under BraTS/TCIA terms (research use): cite BraTS 2023 "
                 "and TCIA TCGA-LGG/GBM when using them"),
        description=f"Brain MR {source} -> {target} from a per-voxel network on multi-scale features, fitted on "
                    "three real co-registered brains (glioma patients); not validated on other pathology or "
                    "on heads that are not skull-stripped",
    )
    return network, card


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="*", default=[f"{s.lower()}-to-{t.lower()}" for s, t in PAIRS])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=None, help="write weights + cards here (e.g. weights)")
    parser.add_argument("--evaluate-only", action="store_true", help="leave-one-subject-out scores, no weights")
    parser.add_argument("--pictures", type=Path, default=None, help="write a PNG per held-out brain here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    names = {f"{s.lower()}-to-{t.lower()}": (s, t) for s, t in PAIRS}
    for task in args.tasks:
        if task not in names:
            raise SystemExit(f"unknown task {task}; known: {', '.join(names)}")
        source, target = names[task]
        loso = leave_one_out(source, target, steps=args.steps, pictures=args.pictures)
        print(json.dumps({"task": task, "mean": summary(loso)}), flush=True)
        if args.evaluate_only or args.out is None:
            continue
        network, card = fit_and_card(source, target, loso, args.steps)
        save_shipped(network, card, args.out)


if __name__ == "__main__":
    main()
