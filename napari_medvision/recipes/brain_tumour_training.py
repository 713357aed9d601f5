"""Training side of the brain-tumour recipe: crops, augmentation, contrast drop-out and the loop.

Kept apart from ``brain_tumour`` (which reads the scans and scores held-out patients) so that a
GPU machine trains from small prepared arrays and never needs the scans:

    python -m napari_medvision.recipes.brain_tumour --save-prepared prepared          # reads the scans
    python -m napari_medvision.recipes.brain_tumour_training --prepared prepared \\
        --folds 0 1 2 3 --final --device cuda --preset small --batch-size 8 --workers 3 --time-budget 390 --results runs

Each run writes ``<run>.safetensors`` and ``<run>.train.json`` (architecture, patients, steps,
seconds, loss curve) into ``--results``; ``brain_tumour --score-runs`` then scores the folds on
their held-out patients and ``--ship`` writes the shipped model with those figures.
"""

from __future__ import annotations

import json
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

TRAIN_PATCH_CPU = (32, 48, 48)  # the thinned CPU preset's crops
TRAIN_PATCH = (48, 64, 64)  # a GPU run trains on the inference window
CONTRASTS = ("flair", "t1c")
LABELS = {1: "necrotic / non-enhancing tumour core", 2: "oedema", 3: "enhancing tumour"}
PATIENTS = ("brats_2013_pat0001_1", "brats_2013_pat0002_1", "brats_2013_pat0003_1", "brats_2013_pat0004_1")
# Drop-out: the chance of each contrast subset in a training crop.
SUBSET_CHANCES = ((("flair", "t1c"), 0.5), (("flair",), 0.3), (("t1c",), 0.2))


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


def training_batches(images, labels, patch=TRAIN_PATCH_CPU, workers: int = 0):
    """``sample(rng, batch)`` for ``train_segmentation``: crops (70 % centred on a tumour class,
    the rest anywhere in the brain box), flipped and turned, then intensity-augmented and with
    contrasts dropped at random.

    ``workers`` > 0 prepares the next batches on that many threads while the GPU trains (each
    thread has its own sampler: MONAI's random transforms keep state); seeds come from ``rng``.
    """
    from ..engine.sampling import PatchSampler

    def new_sampler():
        return PatchSampler(list(images), list(labels), patch, foreground_fraction=0.7, augment=True,
                            flip_axes=(2,))

    local = threading.local()

    def one_batch(seed: int, batch_size: int):
        if not hasattr(local, "sampler"):
            local.sampler = new_sampler()
        rng = np.random.default_rng(seed)
        x, y = local.sampler.sample(rng, batch_size)
        for b in range(x.shape[0]):
            x[b] = contrast_dropout(rng, augment_intensity(rng, x[b]))
        return x, y

    if workers <= 0:
        return lambda rng, batch_size: one_batch(int(rng.integers(2**63)), batch_size)

    pool = ThreadPoolExecutor(workers)
    queue: list = []

    def sample(rng, batch_size):
        while len(queue) < 2 * workers:
            queue.append(pool.submit(one_batch, int(rng.integers(2**63)), batch_size))
        return queue.pop(0).result()

    return sample


def architecture(preset: str, patch) -> dict:
    """The card's architecture entry: a TransUNet3D of ``preset`` size, 2 mm isotropic strides."""
    from .common import architecture_preset

    config = dict(architecture_preset(3, preset), in_channels=len(CONTRASTS), n_classes=len(LABELS) + 1,
                  strides=[[2, 2, 2]] * 3, img_size=list(patch))
    return {"name": "transunet3d", "config": config}


def train_network(images, labels, args, device: str, seed: int, init: Path | None = None, time_budget=None):
    """A network trained on the arrays for the time budget (from ``init``'s weights if given), its
    architecture entry, the training result and its config."""
    import torch

    from ..engine.training import TrainConfig, train_segmentation
    from ..models.registry import build_model
    from .common import print_every

    patch = TRAIN_PATCH if args.preset != "cpu" else TRAIN_PATCH_CPU
    arch = architecture(args.preset, patch)
    torch.manual_seed(seed)
    network = build_model(arch)
    if init is not None:
        from safetensors.torch import load_file

        network.load_state_dict(load_file(str(init)))
    train_config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=2e-3 if init is None else 1e-3,
                               val_every=100, time_budget_s=time_budget or args.time_budget, seed=seed)
    batches = training_batches(images, labels, patch, workers=args.workers)
    result = train_segmentation(network, batches, train_config, validate=None, device=device,
                                progress=print_every(100), on_validation=None)
    return network, arch, result, train_config


def save_prepared(folder: Path, name: str, image: np.ndarray, target: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / f"{name}.npz", image=image.astype(np.float32), target=target.astype(np.uint8))


def load_prepared(folder: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(folder / f"{name}.npz") as data:
        return data["image"], data["target"]


def save_run(results: Path, run: str, network, arch: dict, result, train_config, trained_on, device: str) -> None:
    """``<run>.safetensors`` + ``<run>.train.json``: what ``brain_tumour`` needs to score and ship it."""
    from safetensors.torch import save_file

    from .common import device_summary

    results.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}
    save_file(state, str(results / f"{run}.safetensors"))
    summary = {"architecture": arch, "trained_on": list(trained_on), "steps": result.steps_done,
               "batch_size": train_config.batch_size, "seed": train_config.seed, "lr": train_config.lr,
               "wall_time_s": round(result.seconds, 1), "stopped_because": result.stopped_because,
               "device": device_summary(device), "validation_curve": result.history}
    (results / f"{run}.train.json").write_text(json.dumps(summary, indent=1, default=float))


def main(argv: list[str] | None = None) -> int:
    from .common import prepare_run, recipe_arguments

    parser = recipe_arguments(__doc__.splitlines()[0], steps=100_000, batch_size=2, preset="cpu")
    parser.add_argument("--prepared", type=Path, required=True, help="folder of <patient>.npz from --save-prepared")
    parser.add_argument("--folds", type=int, nargs="*", default=[], help="held-out patient of each fold to train")
    parser.add_argument("--final", action="store_true", help="also train on all four patients (the shipped model)")
    parser.add_argument("--workers", type=int, default=0, help="threads preparing batches ahead of the GPU")
    parser.add_argument("--results", type=Path, default=Path("brain_tumour_runs"))
    args = parser.parse_args(argv)
    device = prepare_run(args)
    runs = [(f"fold{k}", [p for i, p in enumerate(PATIENTS) if i != k], args.seed + k) for k in args.folds]
    if args.final:
        runs.append(("final", list(PATIENTS), args.seed))
    for run, names, seed in runs:
        images, labels = zip(*(load_prepared(args.prepared, n) for n in names))
        network, arch, result, train_config = train_network(images, labels, args, device, seed)
        save_run(args.results, run, network, arch, result, train_config, names, device)
        print(f"{run}: {result.steps_done} steps in {result.seconds:.0f} s, stopped by {result.stopped_because}",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
