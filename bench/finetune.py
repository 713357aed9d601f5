"""Fine-tuning benchmark: time to a +0.10 Dice gain from corrections on part of a real scan.

``--scenario oct`` (default): the shipped ``oct-retinal-layers-2d`` model, corrections = the
reference layers over the left 40 % of the real held-out B-scan ``exampleOCTimage0002.tif``;
unseen = its right 40 %. ``--scenario ct``: the shipped ``ct-abdomen-organs-3d`` model,
corrections = the mapped reference labels of axial slices 20, 23, 26, 29 of the real
TotalSegmentator example CT (the slab the model never trained on); unseen = slices 21-28 between.

Records after every validation the seconds spent and the Dice on the validation split of the
corrections (time to +0.10), then the Dice on the unseen part with the parent and the new
model. On OCT also the forgetting: the Dice on the other real B-scan (``exampleOCTimage0001.tif``,
which the parent trained on) and on the parent's synthetic validation B-scans (seeds 1000-1001).
``--anchor 0,0.01,0.1`` runs once per L2-SP strength (the parent is scored once). Prints one
JSON line per measurement with the device and date.

    python bench/finetune.py --device cuda --steps 400 --scenario ct   # the GPU machine
    python bench/finetune.py --device cpu --steps 30 --threads 1 --anchor 0,0.1   # a CPU check
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

CORRECTED = [20, 23, 26, 29]
UNSEEN = [21, 22, 24, 25, 27, 28]
DATA = Path(os.environ.get("MEDVISION_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def mean_dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    """Mean Dice over the structures present in ``truth``."""
    p, t = np.asarray(prediction), np.asarray(truth)
    scores = [2 * ((p == c) & (t == c)).sum() / ((p == c).sum() + (t == c).sum()) for c in np.unique(t) if c]
    return float(np.mean(scores))


def ct_scenario(labels):
    """(corrected image, corrected labels, slices, unseen image, unseen truth) on the real CT."""
    from napari_medvision.recipes.ct_organs import real_ct

    image, truth = real_ct()
    return image, image.with_data(truth.astype(np.uint8), labels=labels), [CORRECTED], image, truth, UNSEEN


def oct_scenario(labels):
    """The same for the real held-out OCT B-scan: left 40 % corrected, right 40 % unseen."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_finetune_scenario import real_bscan_with_layers

    scan, layers = real_bscan_with_layers(DATA)
    width = scan.data.shape[1]
    left, right = slice(0, int(0.4 * width)), slice(int(0.6 * width), width)
    part = scan.with_data(np.ascontiguousarray(np.asarray(scan.data)[:, left]))
    unseen = scan.with_data(np.ascontiguousarray(np.asarray(scan.data)[:, right]))
    return part, part.with_data(layers[:, left], labels=labels), None, unseen, layers[:, right], None


def oct_other_data():
    """(images, truths) the parent knows: the other real B-scan and two synthetic validation B-scans."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import napari_medvision as mv
    from napari_medvision.recipes.oct_layers import synthetic_bscans
    from test_finetune_scenario import real_bscan_with_layers

    known = real_bscan_with_layers(DATA, "exampleOCTimage0001.tif")
    phantoms, truths = synthetic_bscans(range(1000, 1002))
    phantoms = [mv.Volume((im[0] * 255).astype(np.float32), spacing=(1, 1), modality="OCT") for im in phantoms]
    return {"other real B-scan": ([known[0]], [known[1]]), "synthetic B-scans": (phantoms, list(truths))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=("oct", "ct"), default="oct")
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--time-budget", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--freeze-encoder", action="store_true")
    parser.add_argument("--anchor", default=None,
                        help="L2-SP strength(s), comma-separated (default: mv.finetune's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: mv.finetune's)")
    args = parser.parse_args(argv)

    import torch

    import napari_medvision as mv
    from napari_medvision.engine.device import resolve_device
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    os.environ.setdefault("MEDVISION_HOME", tempfile.mkdtemp(prefix="medvision-bench-"))
    model = {"oct": "oct-retinal-layers-2d", "ct": "ct-abdomen-organs-3d"}[args.scenario]
    labels = dict(mv.models.get_card(model).labels or {})
    image, corrected, slices, unseen, truth, unseen_slices = (oct_scenario if args.scenario == "oct"
                                                              else ct_scenario)(labels)
    if unseen_slices is not None:
        truth = truth[unseen_slices]
    where = (f"GPU {torch.cuda.get_device_name(0)}" if device.startswith("cuda")
             else f"CPU {platform.machine()}, {torch.get_num_threads()} threads")
    common = {"date": date.today().isoformat(), "device": where, "model": model, "scenario": args.scenario}

    def unseen_dice(model_id: str) -> float:
        prediction = np.asarray(mv.segment(unseen, model=model_id, device=device).data)
        return mean_dice(prediction if unseen_slices is None else prediction[unseen_slices], truth)

    other = oct_other_data() if args.scenario == "oct" else {}

    def forgetting(model_id: str) -> dict:
        return {name: round(float(np.mean([mean_dice(np.asarray(mv.segment(im, model=model_id, device=device).data),
                                                         t) for im, t in zip(ims, truths)])), 4)
                for name, (ims, truths) in other.items()}

    parent, parent_other = unseen_dice(model), forgetting(model)
    anchors = [None] if args.anchor is None else [float(a) for a in args.anchor.split(",")]
    for i, anchor in enumerate(anchors):
        options = {} if anchor is None else {"anchor": anchor}
        if args.lr is not None:
            options["learning_rate"] = args.lr
        curve: list[dict] = []
        start = time.perf_counter()
        card = mv.finetune(model, images=[image], labels=[corrected], slices=slices, steps=args.steps,
                           time_budget_s=args.time_budget, device=device, freeze_encoder=args.freeze_encoder,
                           validate_every=max(5, args.steps // 12), patience=None, on_validation=curve.append,
                           seed=args.seed, new_id=f"bench-ft-{int(time.time())}-{i}", **options)
        seconds = time.perf_counter() - start
        run = {**common, "seed": args.seed, "anchor": card.training["anchor"],
               "learning_rate": card.training["learning_rate"]}
        before = list(card.metrics.values())[0]["before fine-tuning"]
        reached = next((h for h in curve if h["score"] >= before + 0.10), None)
        print(json.dumps({**run, "measure": "time to +0.10 Dice (validation split of the corrected slices)",
                          "seconds": None if reached is None else reached["seconds"],
                          "steps": None if reached is None else reached["step"], "dice_before": round(before, 4),
                          "curve": [(h["step"], h["seconds"], round(h["score"], 4)) for h in curve]}))
        print(json.dumps({**run, "measure": "Dice on the unseen part, parent -> fine-tuned",
                          "dice_parent": round(parent, 4), "dice_finetuned": round(unseen_dice(card.id), 4),
                          "finetune_seconds": round(seconds, 1), "steps": card.training["steps"]}), flush=True)
        if other:
            print(json.dumps({**run, "measure": "forgetting: Dice on data the parent knew, parent -> fine-tuned",
                              "dice_parent": parent_other, "dice_finetuned": forgetting(card.id)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
