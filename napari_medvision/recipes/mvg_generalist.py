"""Recipe: the MVG in-context generalist (synthesis, denoising, inpainting, segmentation as generation).

Data: ``recipes.mvg_data`` (simulated MR contrasts from the MNI152 tissue maps, CT phantoms and the
real TotalSegmentator CT with simulated low-dose noise, DRIVE 21-35, OCT B-scan 0001 + simulated
B-scans). Objective: the paper's hybrid of masked image modelling and autoregressive target
prediction (``models.mvg.hybrid_target_mask``), L1 on the hidden target pixels. Evaluation on
data never trained on: ``recipes.mvg_evaluation``.

    python -m napari_medvision.recipes.mvg_generalist --preset small --time-budget 1500   # GPU
    python -m napari_medvision.recipes.mvg_generalist --preset cpu --time-budget 3000 --threads 2
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np

from ..models.card import ModelCard
from ..models.registry import build_model
from ..recipes.oct_layers import real_bscan, synthetic_bscans
from .common import data_dir, device_summary, init_summary, prepare_run, recipe_arguments, save_shipped
from .ct_organs import real_ct
from .mvg_data import (Family, PairSampler, add_fundus, add_oct, ct_families, ct_volumes, load_families, mr_family,
                       save_families)
from .mvg_evaluation import evaluate

MODEL_ID = "mvg-generalist"
MR_TRAIN_SEEDS = range(100, 110)   # evaluation uses seeds from 1000 on
CT_PHANTOM_SEEDS = range(100, 106)
REAL_CT_TRAIN = slice(0, 20)       # the evaluation uses slices 20-29 of the same CT
OCT_SYNTHETIC_SEEDS = range(100, 104)


def build_families(seed: int, log=print):
    from ..recipes.fundus_vessels import TRAIN_IDS, load_drive
    root = data_dir()
    rng = np.random.default_rng(seed)
    mr = mr_family(MR_TRAIN_SEEDS, root / "mri_brain_mni152", log)
    image, labels = real_ct()
    real = (image.with_data(np.asarray(image.data)[REAL_CT_TRAIN]), labels[REAL_CT_TRAIN])
    denoise, segmentation = ct_families(ct_volumes(CT_PHANTOM_SEEDS, real), rng, log)
    photos, vessels, _ = load_drive(root / "fundus_drive_train", TRAIN_IDS, {"kind": "rgb_unit"})
    add_fundus(segmentation, photos, vessels)
    oct_image, oct_labels = real_bscan("exampleOCTimage0001.tif")
    syn_images, syn_labels = synthetic_bscans(OCT_SYNTHETIC_SEEDS)
    oct_family = Family("oct", 0.0)
    add_oct(oct_family, [oct_image] * 3 + syn_images, [oct_labels] * 3 + syn_labels)
    segmentation.variants.update(oct_family.variants)
    log("training bank ready")
    return [mr, denoise, segmentation]


def train(network, sampler, device: str, steps: int, batch_size: int, time_budget: float | None,
          lr: float = 8e-4, checkpoint: Path | None = None, log=print) -> dict:
    """Hybrid MIM + autoregressive training; returns a summary (steps, seconds, loss curve)."""
    import torch

    from ..models.mvg import hybrid_target_mask, make_canvas

    network.to(device).train()
    optimiser = torch.optim.AdamW(network.parameters(), lr=lr, weight_decay=0.05, betas=(0.9, 0.95))
    warmup = min(200, steps // 10 + 1)

    def rate(step, elapsed):
        # Cosine over whichever ends first, the steps or the time budget, so that a run stopped by
        # the clock still ends at a low learning rate.
        progress = min(max(step / steps, elapsed / time_budget if time_budget else 0.0), 1.0)
        return min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    patch, t = network.patch, network.tile_tokens
    curve, running, start = [], None, time.perf_counter()
    use_amp = device.startswith("cuda")
    step = 0
    for step in range(1, steps + 1):
        for group in optimiser.param_groups:
            group["lr"] = lr * rate(step - 1, time.perf_counter() - start)
        pi, pt, qi, qt = (x.to(device, non_blocking=True) for x in sampler.batch(batch_size))
        mask = hybrid_target_mask(len(pi), t)
        canvas = make_canvas(pi, pt, qi, qt)
        pixel_mask = mask.reshape(-1, 1, t, 1, t, 1).expand(-1, 1, t, patch, t, patch).reshape(qt.shape).to(device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            prediction = network(canvas, mask)
        loss = ((prediction.float() - qt).abs() * pixel_mask).sum() / pixel_mask.sum().clamp(min=1)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimiser.step()
        value = float(loss.detach())
        running = value if running is None else 0.98 * running + 0.02 * value
        elapsed = time.perf_counter() - start
        if step % 50 == 0:
            curve.append({"step": step, "loss": round(running, 5), "seconds": round(elapsed, 1)})
            log(f"step {step}/{steps} loss {running:.4f} {elapsed:.0f}s")
        if checkpoint is not None and step % 500 == 0:
            _save_checkpoint(network, checkpoint)
        if time_budget is not None and elapsed > time_budget:
            break
    network.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - start, 1), "loss_curve": curve}


def _save_checkpoint(network, path: Path) -> None:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".partial")
    save_file({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, str(tmp))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = recipe_arguments(__doc__.splitlines()[0], steps=20000, batch_size=16, preset="cpu")
    parser.add_argument("--bank", type=Path, default=None, help="cache of the training bank (.npz)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="save weights here every 500 steps")
    parser.add_argument("--init", type=Path, default=None, help="start from these weights (safetensors)")
    parser.add_argument("--pictures", type=Path, default=None, help="write evaluation pictures here")
    args = parser.parse_args(argv)
    device = prepare_run(args)
    if args.bank is not None and args.bank.exists():
        families = load_families(args.bank)
    else:
        families = build_families(args.seed)
        if args.bank is not None:
            save_families(families, args.bank)
    from ..models.mvg import resolved_config

    architecture = {"name": "mvg", "config": resolved_config({"preset": args.preset})}
    torch.manual_seed(args.seed)
    network = build_model(architecture)
    if args.init is not None:
        from safetensors.torch import load_file

        network.load_state_dict(load_file(str(args.init)))
    sampler = PairSampler(families, network.tile, seed=args.seed)
    summary = train(network, sampler, device, args.steps, args.batch_size, args.time_budget,
                    checkpoint=args.checkpoint)
    metrics = evaluate(network, device, pictures=args.pictures)
    card = ModelCard(
        id=MODEL_ID, task="synthesis", architecture=architecture, modality="MR, CT, fundus, OCT",
        input={"dims": 2, "channels": 1, "tile": network.tile, "normalisation": "per image: CT by the HU window "
               "[-1000, 1000], others by the 0.5-99.5 percentiles; labels as grey levels id / max id"},
        sha256="", license="Apache-2.0",
        description="In-context image-to-image generalist after MVG (Ren et al. 2024): give a prompt pair "
                    "(image, target) and a query image; it generates the query's target.",
        training={
            "data": "simulated brain MR (T1/T2/PD spin echo from the MNI152 ICBM 2009a tissue maps, seeds 100-109); "
                    "CT phantoms (seeds 100-105) and TotalSegmentator example_ct_sm slices 0-19 with "
                    "projection-domain low-dose noise and their organ labels; DRIVE training images 21-35 "
                    "(vessels); OCT B-scan exampleOCTimage0001 + simulated B-scans (layers); inpainting holes "
                    "on all of them",
            "synthetic_share": 0.6, "objective": "hybrid masked image modelling + autoregressive target "
                                                 "prediction, L1 on hidden target pixels",
            "steps": summary["steps"], "batch_size": args.batch_size, "device": device_summary(device),
            "wall_time_s": summary["seconds"], "loss_curve": summary["loss_curve"],
            "recipe": "napari_medvision.recipes.mvg_generalist "
                      + " ".join(argv if argv is not None else sys.argv[1:]),
            "continued_from": init_summary(args.init),
            "scale": (f"GPU run, '{args.preset}' preset, {args.time_budget} s budget" if device.startswith("cuda") else
                      "trained on a CPU with the 'cpu' preset (64-pixel tiles) "
                      "for the time budget; a GPU run should redo it with --preset small and ~25 min"),
        },
        metrics=metrics,
    )
    save_shipped(network, card, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
