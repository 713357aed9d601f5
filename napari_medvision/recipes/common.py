"""What every recipe shares: finding the data, held-out metrics, and writing weights with a card."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np

from ..engine.device import resolve_device
from ..models.registry import build_model, save_model

REPO = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    path = Path(os.environ.get("MEDVISION_DATA", REPO.parent / "shared" / "data"))
    if not path.is_dir():
        raise SystemExit(f"recipe: the real data folder {path} is absent; set MEDVISION_DATA")
    return path


def recipe_arguments(description: str, steps: int, batch_size: int, preset: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=steps, help="optimiser steps at most")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--preset", default=preset, help="architecture size: tiny, cpu, small or base")
    parser.add_argument("--time-budget", type=float, default=None, help="stop training after this many seconds")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: best available)")
    parser.add_argument("--out", type=Path, default=REPO / "weights", help="folder for <id>.safetensors + card")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    return parser


def architecture_preset(dims: int, preset: str) -> dict:
    """The TransUNet config of a named size; "cpu" is the small config thinned to train on 2 CPU cores."""
    from ..models.transunet import PRESETS_2D, PRESETS_3D

    presets = PRESETS_2D if dims == 2 else PRESETS_3D
    if preset != "cpu":
        return dict(presets[preset])
    if dims == 2:
        return dict(presets["small"], blocks_per_stage=1, vit_depth=2)
    return dict(presets["small"], features=[8, 16, 32, 64], vit_dim=64, vit_depth=2)


def prepare_run(args) -> str:
    """Apply ``--threads`` and return the device to train on (``--device`` or the best available)."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    return resolve_device(args.device)


def new_network(dims: int, preset: str, in_channels: int, n_classes: int, seed: int):
    """A freshly initialised (seeded) TransUNet of ``dims`` dimensions and its card architecture entry."""
    import torch

    config = dict(architecture_preset(dims, preset), in_channels=in_channels, n_classes=n_classes)
    architecture = {"name": f"transunet{dims}d", "config": config}
    torch.manual_seed(seed)
    return build_model(architecture), architecture


def window_probabilities(network, image: np.ndarray, roi_size, device: str, batch_size: int = 4,
                         overlap: float = 0.25) -> np.ndarray:
    """Class probabilities ``(n_classes, *spatial)`` of a prepared ``(C, *spatial)`` image, by the engine's
    sliding window; by default at the overlap the recipes validate with (``mv.segment`` uses 0.5)."""
    import torch

    from ..engine.inference import sliding_window

    probs = sliding_window(network, torch.from_numpy(image), roi_size=tuple(roi_size), overlap=overlap,
                           batch_size=batch_size, device=device)
    return probs.float().numpy()


def device_summary(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return f"GPU {torch.cuda.get_device_name(0)}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def roc_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve via MONAI's implementation."""
    import torch
    from monai.metrics import compute_roc_auc

    return float(compute_roc_auc(torch.from_numpy(scores.astype(np.float32).ravel()),
                                 torch.from_numpy(truth.astype(np.float32).ravel())))


def binary_metrics(probability: np.ndarray, truth: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """Dice, sensitivity, specificity and AUC of a foreground probability map, inside ``mask``."""
    if mask is None:
        mask = np.ones(truth.shape, dtype=bool)
    p, t = probability[mask], truth[mask].astype(bool)
    pred = p >= 0.5
    tp, fp, fn = (pred & t).sum(), (pred & ~t).sum(), (~pred & t).sum()
    tn = (~pred & ~t).sum()
    return {"dice": float(2 * tp / max(2 * tp + fp + fn, 1)), "sensitivity": float(tp / max(tp + fn, 1)),
            "specificity": float(tn / max(tn + fp, 1)), "auc": roc_auc(p, t)}


CPU_NOTE = ("trained on a CPU at a reduced scale: the thinned 'cpu' "
            "architecture preset and a short time budget; a GPU run should redo it with --preset small or base "
            "and several times more steps")


def training_summary(device: str, result, config, data: str, synthetic_share: float, recipe: str) -> dict:
    return {
        "data": data,
        "synthetic_share": synthetic_share,
        "steps": result.steps_done,
        "batch_size": config.batch_size,
        "seed": config.seed,
        "device": device_summary(device),
        "wall_time_s": round(result.seconds, 1),
        "stopped_because": result.stopped_because,
        "recipe": recipe,
        "date": date.today().isoformat(),
        "validation_curve": result.history,
        "scale": CPU_NOTE if not device.startswith("cuda") else "GPU run",
    }


def save_shipped(network, card, out: Path) -> None:
    """Write weights + card into ``out`` (the recipes are the only writers of ``weights/``)."""
    card.source = "shipped-recipe"
    save_model(network, card, folder=out)
    print(f"wrote {out / (card.id + '.safetensors')} and its card")
    print(json.dumps(card.metrics))


def print_every(steps: int):
    """A progress callback printing one line every ``steps`` optimiser steps (recipes run in logs)."""

    def show(done: int, total: int, message: str) -> None:
        if done % steps == 0:
            print(f"step {done}/{total} {message}", flush=True)

    return show


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def init_summary(init: Path | None) -> dict | None:
    """What a continued run started from: the weights' sha256 and their card's steps and data."""
    if init is None:
        return None
    card = init.with_suffix(".json")
    earlier = json.loads(card.read_text()).get("training", {}) if card.exists() else {}
    return {"weights": init.name, "sha256": hashlib.sha256(init.read_bytes()).hexdigest(),
            "steps": earlier.get("steps"), "wall_time_s": earlier.get("wall_time_s"),
            "continued_from": earlier.get("continued_from")}
