"""Fine-tuning benchmark: time to a +0.10 Dice gain from a few corrected slices of a real CT.

Starts from the shipped ``ct-abdomen-organs-3d`` model, gives ``mv.finetune`` the reference
labels of a few axial slices of the real TotalSegmentator example CT (the held-out slab the
model never trained on; labels mapped as in ``recipes/ct_organs.real_ct``), and records after
every validation the seconds spent and the Dice on the validation split of those slices. Then
segments the CT with the parent and the new model and measures Dice on slices given to neither.
Prints one JSON line per measurement with the device and date.

    python bench/finetune.py --device cuda --steps 400          # the GPU machine
    python bench/finetune.py --device cpu --steps 60 --threads 2  # a CPU check
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


def mean_dice(prediction: np.ndarray, truth: np.ndarray, slices: list[int]) -> float:
    """Mean Dice over the structures present in ``truth[slices]`` (pooled over those slices)."""
    p, t = prediction[slices], truth[slices]
    scores = [2 * ((p == c) & (t == c)).sum() / ((p == c).sum() + (t == c).sum()) for c in np.unique(t) if c]
    return float(np.mean(scores))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ct-abdomen-organs-3d")
    parser.add_argument("--device", default=None)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--time-budget", type=float, default=None)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--freeze-encoder", action="store_true")
    args = parser.parse_args(argv)

    import torch

    import napari_medvision as mv
    from napari_medvision.engine.device import resolve_device
    from napari_medvision.recipes.ct_organs import real_ct

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    os.environ.setdefault("MEDVISION_HOME", tempfile.mkdtemp(prefix="medvision-bench-"))
    image, truth = real_ct()
    corrected = image.with_data(truth.astype(np.uint8), labels=dict(mv.models.get_card(args.model).labels or {}))
    where = (f"GPU {torch.cuda.get_device_name(0)}" if device.startswith("cuda")
             else f"CPU {platform.machine()}, {torch.get_num_threads()} threads")
    common = {"date": date.today().isoformat(), "device": where, "model": args.model,
              "corrected_slices": CORRECTED, "unseen_slices": UNSEEN}

    parent = np.asarray(mv.segment(image, model=args.model, device=device).data)
    curve: list[dict] = []
    start = time.perf_counter()
    card = mv.finetune(args.model, images=[image], labels=[corrected], slices=[CORRECTED], steps=args.steps,
                       time_budget_s=args.time_budget, device=device, freeze_encoder=args.freeze_encoder,
                       validate_every=max(5, args.steps // 12), patience=None, on_validation=curve.append,
                       new_id=f"bench-ft-{int(time.time())}")
    seconds = time.perf_counter() - start
    before = list(card.metrics.values())[0]["before fine-tuning"]
    reached = next((h for h in curve if h["score"] >= before + 0.10), None)
    print(json.dumps({**common, "measure": "time to +0.10 Dice (validation split of the corrected slices)",
                      "seconds": None if reached is None else reached["seconds"],
                      "steps": None if reached is None else reached["step"], "dice_before": round(before, 4),
                      "curve": [(h["step"], h["seconds"], round(h["score"], 4)) for h in curve]}))
    tuned = np.asarray(mv.segment(image, model=card.id, device=device).data)
    print(json.dumps({**common, "measure": "Dice on unseen slices, parent -> fine-tuned",
                      "dice_parent": round(mean_dice(parent, truth, UNSEEN), 4),
                      "dice_finetuned": round(mean_dice(tuned, truth, UNSEEN), 4),
                      "finetune_seconds": round(seconds, 1), "steps": card.training["steps"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
