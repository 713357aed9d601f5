"""Fine-tuning benchmark on real scans: correct 1, 3 or 5 slices, score the rest, and a poisoned run.

Scenarios (real data in ../shared/data, never a phantom):

- ``ct-slab``: the shipped ``ct-abdomen-organs-3d`` on TotalSegmentator's example abdominal CT.
  Its card says it trained on that scan's image and labels of axial slices 0-16; slices 17-29 were
  never trained on (their image only shared windows). The liver of 1, 3 or 5 slices in 17-29 is
  corrected to the reference; Dice of every label is reported on the scan's other slices and on
  the untrained slab's other slices. There is no second abdominal CT in the data.
- ``chest``: the same model on NSCLC-Radiomics LUNG1-001, a chest CT no model here ever saw. The
  left lung of 1, 3 or 5 axial slices is corrected to the clinical contour; Dice of both lungs is
  reported on the other slices (the right lung is the label nobody touched).
- ``--poison``: the corrected labels shifted by 20 voxels along x; the guard should keep the parent.

Dice comes from the networks alone (``predict_labels``): ``mv.segment`` adds atlas fusion for the
shipped model, whose atlas is this very example CT. Prints one JSON line per run.

    python bench/finetune.py --scenario ct-slab --slices 1,3,5
    python bench/finetune.py --scenario ct-slab --slices 3 --poison

Each run also reports what ``mv.prompt`` makes of the same corrections on the same slices (the
fine-tuned model should not fall below it there), and the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

DATA = Path(os.environ.get("MEDVISION_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
MODEL = "ct-abdomen-organs-3d"
SLAB_SLICES = {1: [23], 3: [19, 23, 27], 5: [18, 20, 23, 26, 28]}
CHEST_SLICES = {1: [70], 3: [50, 70, 90], 5: [45, 57, 70, 82, 95]}


def ct_slab():
    """(image, reference labels in the model's ids, corrected label id, slices by count, slices to score)."""
    from napari_medvision.recipes.ct_organs import real_ct

    image, truth = real_ct()
    return image, truth.astype(np.uint8), [1], SLAB_SLICES, {"other slices": range(30), "slab 17-29": range(17, 30)}


def chest():
    """The chest CT with its clinical lungs mapped to the model's ids (13 lung_left, 12 lung_right)."""
    import napari_medvision as mv

    image = mv.load(DATA / "ct_chest_nsclc" / "LUNG1-001_ct.nii.gz")
    theirs = np.asarray(mv.load(DATA / "ct_chest_nsclc" / "LUNG1-001_labels.nii.gz").data)
    truth = np.zeros(theirs.shape, np.uint8)
    truth[theirs == 1], truth[theirs == 2] = 13, 12
    z = np.flatnonzero(truth.reshape(truth.shape[0], -1).any(1))
    return image, truth, [13], CHEST_SLICES, {"other lung slices": range(int(z[0]), int(z[-1]) + 1)}


def network_labels(model, image, device: str) -> np.ndarray:
    """The network's own label map (no atlas fusion)."""
    from napari_medvision.engine.inference import predict_labels
    from napari_medvision.models.registry import load_model

    network, card = load_model(model, device=device)
    return np.asarray(predict_labels(network, card, image, device=device).data)


def dice(pred: np.ndarray, truth: np.ndarray, label: int) -> float | None:
    p, t = pred == label, truth == label
    total = p.sum() + t.sum()
    return None if not t.any() else round(float(2 * (p & t).sum() / total), 4)


def prompted(image, corrected: np.ndarray, slices, names: dict) -> np.ndarray:
    """What in-volume prompting makes of the same corrections (its own leave-one-out choice)."""
    import napari_medvision as mv

    present = {int(c): names[int(c)] for c in np.unique(corrected[slices]) if c}
    return np.asarray(mv.prompt(image, annotations=image.with_data(corrected, labels=present),
                                annotated_slices=slices).data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("ct-slab", "chest"), default="ct-slab")
    parser.add_argument("--slices", default="3", help="corrected slice counts to run, e.g. 1,3,5")
    parser.add_argument("--poison", action="store_true", help="shift the corrections by 20 voxels along x")
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    counts = [int(c) for c in str(args.slices).split(",")]
    if any(c not in (1, 3, 5) for c in counts):
        parser.error(f"--slices takes 1, 3 and/or 5, got {args.slices}")

    import torch

    from napari_medvision.engine.device import resolve_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    os.environ.setdefault("MEDVISION_HOME", tempfile.mkdtemp(prefix="medvision-bench-"))
    for count in counts:
        run_one(args, count, device)
    return 0


def run_one(args, count: int, device: str) -> None:
    import torch

    import napari_medvision as mv
    from napari_medvision.tasks.finetune import FinetuneOptions, FinetuneRefused

    image, truth, corrected_ids, by_count, scored = ct_slab() if args.scenario == "ct-slab" else chest()
    slices = by_count[count]
    corrected = np.zeros_like(truth)
    for s in slices:
        keep = np.isin(truth[s], corrected_ids)
        corrected[s][keep] = truth[s][keep]
    if args.poison:
        corrected = np.roll(corrected, 20, axis=-1)
    card = mv.models.get_card(MODEL)
    names = {int(k): v for k, v in (card.labels or {}).items()}
    where = (f"GPU {torch.cuda.get_device_name(0)}" if device.startswith("cuda")
             else f"CPU {platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    run = {"date": date.today().isoformat(), "device": where, "load_average_1min": round(os.getloadavg()[0], 1),
           "model": MODEL, "scenario": args.scenario, "corrected_slices": slices,
           "corrected_labels": [names[c] for c in corrected_ids], "poisoned": args.poison,
           "second_scan": None if args.scenario == "ct-slab" else "none",
           "second_scan_note": "no second scan of this kind in ../shared/data (its README)"}
    start = time.perf_counter()
    try:
        new = mv.finetune(MODEL, [image], [image.with_data(corrected, labels=names)], [slices],
                          FinetuneOptions(device=device, steps=args.steps, new_id=f"bench-ft-{int(time.time())}"))
        result, guard, model_id = "saved", new.training["guard"], new.id
    except FinetuneRefused as exc:
        result, guard, model_id = f"refused, parent kept: {str(exc).split('. Figures')[0]}", exc.guard, MODEL
    seconds = round(time.perf_counter() - start, 1)
    run.update(load_average_after=round(os.getloadavg()[0], 1))
    parent_pred = network_labels(MODEL, image, device)
    new_pred = network_labels(model_id, image, device) if model_id != MODEL else parent_pred
    prompt_pred = None if args.poison else prompted(image, corrected, slices, names)
    scores = {}
    for title, zs in scored.items():
        zs = [z for z in zs if z not in slices]
        labels = sorted(int(c) for c in np.unique(truth[zs]) if c)
        scores[title] = {}
        for c in labels:
            entry = {"parent": dice(parent_pred[zs], truth[zs], c), "new": dice(new_pred[zs], truth[zs], c)}
            if prompt_pred is not None and c in corrected_ids:
                entry["prompting"] = dice(prompt_pred[zs], truth[zs], c)
            scores[title][names[c]] = entry
        others = [v["new"] - v["parent"] for n, v in scores[title].items()
                  if names and n not in run["corrected_labels"] and v["new"] is not None]
        scores[title]["worst other label change"] = round(min(others), 4) if others else None
    print(json.dumps({**run, "result": result, "finetune_seconds": seconds, "scale": guard.get("scale"),
                      "fold_scales": guard.get("fold_scales"), "guard": guard.get("figures"),
                      "dice": scores}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
