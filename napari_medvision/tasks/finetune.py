"""``mv.finetune``: a new model trained on the slices a user corrected, saved apart, never worse.

The default (``FinetuneOptions.method="tail"``, ``tasks.finetune_tail``) trains only the output
head on the parent's cached features: the corrected labels learn from the user's slices (and from
the masks prompting propagates from them to their neighbours), every other voxel and label is held
to the parent, and a guard saves the result only if it beats the parent on held-out corrected
slices and no untouched label moves over the scan (``FinetuneRefused`` otherwise). ``method="network"``
trains the whole network on the corrected slices (L2-SP toward the parent, validation on a
held-out fifth, resumable checkpoints). Either way the images are prepared exactly as inference
prepares them, and the model goes into the user folder with a card naming its parent. Shipped
weights are never written.

    card = mv.finetune("ct-abdomen-organs-3d", [ct], [corrected], slices=[[12, 20, 31]])
    seg = mv.segment(ct, model=card.id)
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ..engine.progress import CancelToken, Cancelled, ProgressFn, check, report
from ..models.card import CardError, ModelCard
from ..volume import Volume
from .corrections import check_corrections, destination, display_name, split_slices
from .finetune_tail import FinetuneRefused  # noqa: F401  (raised by mv.finetune; importable from here)

DEFAULT_STEPS = 200
LEARNING_RATE = 1e-3      # half the recipes' peak, with a short warm-up: a few corrections, few steps
ANCHOR = 0.3              # L2-SP strength toward the parent's weights: on the OCT scenario it halves the
                          # forgetting for an eighth of the gain (docs/evaluation/finetuning.md, 0.01 to 3 measured)


@dataclass
class Corrections:
    """Training items on the model's grid: images ``(C, *spatial)``, labels, and where they count.

    ``train`` / ``val`` are boolean masks over each item's voxels: the corrected slices used for
    training and those held out for validation. A 2D model on 3D volumes gets one item per slice.
    """

    images: list[np.ndarray]
    labels: list[np.ndarray]
    train: list[np.ndarray]
    val: list[np.ndarray]
    summary: dict


@dataclass
class FinetuneOptions:
    """Everything about a fine-tune a user rarely changes; ``mv.finetune(..., options=FinetuneOptions(...))``.

    method: ``"tail"`` (default) trains the output head's rows of the corrected labels on the
        trunk's cached outputs, every uncorrected voxel and untouched label held to the parent;
        ``"network"`` trains the whole network (L2-SP toward the parent; slower, forgets more).
    steps: optimiser steps per training run (tail default 150, per fold and once more at the end;
        network default 200). time_budget_s: wall-clock limit (network method).
    corrected_labels: the labels the corrections speak for (ids or names); default: every label
        painted on the corrected slices. Every other label stays the parent's.
    guard: train on all but a fold of the corrected slices and keep the new model only if it beats
        the parent on the held-out ones (per label; ``min_gain`` for the corrected labels, no label
        down by more than ``max_loss``); otherwise ``FinetuneRefused`` with the figures.
    distill: weight of the distillation to the parent's probabilities (tail method).
    propagate: (tail method, 3D) also learn, at half weight, the mask that in-volume prompting
        propagates from the corrected slices to the 4 slices each side of them.
    anchor, freeze_encoder, batch_size, validate_every, patience: network method only.
    new_id: id of the new model (default ``<parent>-ft-<date-time>``); folder: where it goes
        (default the user model folder, never the shipped ``weights/``).
    on_validation: called with ``{step, loss, score, ...}`` as the curve grows (live plots).
    """

    method: str = "tail"
    steps: Optional[int] = None
    time_budget_s: Optional[float] = None
    device: Optional[str] = None
    corrected_labels: Optional[Sequence] = None
    guard: bool = True
    min_gain: float = 0.01
    max_loss: float = 0.01
    distill: float = 1.0
    propagate: bool = True
    learning_rate: Optional[float] = None
    seed: int = 0
    new_id: Optional[str] = None
    folder: Optional[os.PathLike] = None
    on_validation: Optional[Callable[[dict], None]] = None
    freeze_encoder: bool = False
    anchor: float = ANCHOR
    batch_size: Optional[int] = None
    validate_every: Optional[int] = None
    patience: Optional[int] = 4


def finetune(
    model: str | os.PathLike | ModelCard,
    images: Sequence[Volume],
    labels: Sequence[Volume],
    slices: Optional[Sequence[Optional[Sequence[int]]]] = None,
    options: Optional[FinetuneOptions] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    **option_fields,
) -> ModelCard:
    """The card of a new model: ``model`` fine-tuned on corrected slices, saved in the user folder.

    model: a segmentation model (id, path or card), or ``"prompt-head"`` for a new prompting
        appearance head (``tasks.prompting.head``: a per-pixel classifier on the prompt's features).
    images / labels: one image and its corrected label map per volume, on the same grid.
    slices: per volume, the indices along axis 0 (axial slices of a 3D scan) the user corrected;
        ``None`` (for all volumes or one) takes every slice holding a label (a 2D image: all of it).
    options: a ``FinetuneOptions``; its fields may also be given as keywords (``steps=30``).

    Learns only what the corrections say (see ``FinetuneOptions.method``) and, with the guard on,
    saves the model only if it beats the parent on held-out corrected slices.
    Raises ``FinetuneRefused`` (a ValueError, with ``.guard`` figures) when it does not; ValueError
    naming the volume and the problem for empty corrections, labels on another grid, or label ids
    the model does not have (a new class is refused: fine-tuning keeps the parent's outputs);
    ``Cancelled`` (network method: with ``.checkpoint``) on a cancel; ``CardError`` when the
    folder cannot be written.
    """
    if options is None:
        options = FinetuneOptions()
    if option_fields:
        known = set(FinetuneOptions.__dataclass_fields__)
        unknown = sorted(set(option_fields) - known)
        if unknown:
            raise TypeError(f"finetune() got unknown options {unknown}; FinetuneOptions has {sorted(known)}")
        options = replace(options, **option_fields)
    from .prompting.head import finetune_head, is_head

    if options.method not in ("tail", "network"):
        raise ValueError(f"method must be 'tail' or 'network', got {options.method!r}")
    head_args = dict(steps=options.steps, device=options.device, progress=progress, cancel=cancel,
                     seed=options.seed, new_id=options.new_id, folder=options.folder,
                     on_validation=options.on_validation)
    if is_head(model):  # a new prompting head
        return finetune_head(model, images, labels, slices, **head_args)
    from ..models.registry import get_card

    parent = get_card(model)
    if is_head(parent):  # a stored prompting head, trained further
        return finetune_head(parent, images, labels, slices, guard=options.guard, **head_args)
    if options.method == "tail":
        from ..engine.device import resolve_device
        from ..models.registry import build_model
        from ..engine.tail import tail_supported
        from .finetune_tail import finetune_tail

        # multi-contrast inputs are stacked by tasks.contrasts: those models train as a whole network
        if not parent.input.get("contrasts") and tail_supported(build_model(parent.architecture)):
            slices = check_corrections(parent, images, labels, slices)
            new_id, folder = destination(parent, parent.id, options.new_id, options.folder)
            return finetune_tail(parent, images, labels, slices, options, new_id, folder,
                                 resolve_device(options.device), progress, cancel)
    return _finetune_network(parent, images, labels, slices, options, progress, cancel)


def _finetune_network(parent: ModelCard, images, labels, slices, options: FinetuneOptions, progress, cancel) -> ModelCard:
    """The whole network trained on the corrected slices (L2-SP toward the parent)."""
    steps, time_budget_s, device = options.steps, options.time_budget_s, options.device
    freeze_encoder, seed, new_id = options.freeze_encoder, options.seed, options.new_id
    batch_size, learning_rate, anchor = options.batch_size, options.learning_rate or LEARNING_RATE, options.anchor
    validate_every, patience, folder = options.validate_every, options.patience, options.folder
    on_validation = options.on_validation
    import torch

    from ..engine.device import resolve_device
    from ..engine.training import TrainConfig, train_segmentation
    from ..models.registry import load_model, save_model

    started = time.perf_counter()
    if not anchor >= 0:
        raise ValueError(f"anchor must be 0 (off) or positive, got {anchor}")
    slices = check_corrections(parent, images, labels, slices)
    device = resolve_device(device)
    new_id, folder = destination(parent, parent.id, new_id, folder)

    report(progress, 0, 1, "preparing the corrected slices")
    data = prepare_corrections(parent, images, labels, slices)
    check(cancel)
    network, parent = load_model(parent, device=device)
    dims = int(parent.input.get("dims", 3))
    patch = training_patch(parent, network, data.images)
    if batch_size is None:
        # 3D patches of one corrected scan overlap heavily: on a CPU one per step learns as much
        gpu = device.startswith("cuda")
        batch_size = (8 if gpu else 4) if dims == 2 else (2 if gpu else 1)
    if steps is None:
        steps = DEFAULT_STEPS if time_budget_s is None else 100_000
    every = validate_every or max(5, min(50, steps // 10))
    config = TrainConfig(steps=int(steps), batch_size=int(batch_size), lr=learning_rate, warmup_steps=min(10, steps),
                         val_every=every, patience=patience if data.summary["validation_slices"] else None,
                         time_budget_s=time_budget_s, freeze_encoder=freeze_encoder, anchor=float(anchor),
                         seed=seed)
    torch.manual_seed(seed)
    sampler = correction_sampler(data, patch, parent)
    validate = validation_dice(data, parent, device) if data.summary["validation_slices"] else None
    before = _score(network, validate)
    checkpoint = _checkpoint_prefix(folder, new_id, parent, data, config)

    def step_progress(done: int, total: int, message: str) -> None:
        if time_budget_s is not None and total >= 100_000:  # no step limit: show the time used
            elapsed = time.perf_counter() - started
            report(progress, int(min(elapsed, time_budget_s)), int(time_budget_s), f"step {done}, {message}")
        else:
            report(progress, done, total, message)

    try:
        result = train_segmentation(network, sampler, config, validate=validate, device=device,
                                    progress=step_progress, cancel=cancel, checkpoint=checkpoint,
                                    on_validation=on_validation)
    except Cancelled as exc:
        exc.checkpoint = checkpoint
        raise
    except OSError as exc:
        raise CardError(checkpoint.parent, f"could not write a training checkpoint ({exc.strerror or exc})") from exc

    card = ModelCard(
        id=new_id, task=parent.task, architecture=parent.architecture, modality=parent.modality,
        input=dict(parent.input), sha256="", labels=parent.labels, license=parent.license, parent=parent.id,
        description=f"{parent.id} fine-tuned on user-corrected label maps. {parent.description}".strip(),
        training={
            "kind": "fine-tuning", "parent": parent.id, "parent_sha256": parent.sha256, "data": data.summary,
            "steps": result.steps_done, "batch_size": config.batch_size, "patch_size": list(patch),
            "learning_rate": config.lr, "freeze_encoder": freeze_encoder, "anchor": config.anchor, "seed": seed,
            "device": _device_summary(device), "wall_time_s": round(time.perf_counter() - started, 1),
            "stopped_because": result.stopped_because, "date": datetime.now().date().isoformat(),
            "validation_curve": result.history,
        },
        metrics=_metrics(before, result.best_score if validate else None, data.summary),
    )
    card.source = "user"
    save_model(network, card, folder)
    _remove_checkpoint(checkpoint)
    report(progress, 1, 1, f"saved model {new_id}")
    return card


# --- from Volumes to training items on the model grid ---------------------------------------------

def _slice_mask(shape: tuple[int, ...], picked: list[int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[list(picked)] = True
    return mask


def prepare_corrections(card: ModelCard, images, labels, slices: list[list[int]]) -> Corrections:
    """Images prepared as inference prepares them, labels and slice masks on the same model grid."""
    from ..engine.inference import prepare_image
    from ..engine.orientation import in_model_layout, model_layout
    from ..engine.resample import resample_nearest

    train_slices, val_slices = split_slices(slices)
    dims = int(card.input.get("dims", 3))
    out = Corrections([], [], [], [], {})
    counts: dict[int, int] = {}
    for image, label, train, val in zip(images, labels, train_slices, val_slices):
        if not train and not val:
            continue
        turned, ornt = model_layout(image, card.input)
        if card.input.get("contrasts"):  # a multi-contrast model: the image is its first contrast
            from .contrasts import prepare_first_contrast

            prepared = prepare_first_contrast(turned, card.input).numpy()
        else:
            prepared = prepare_image(turned, card.input, "cpu").numpy()
        grid = prepared.shape[1:]
        lab = np.asarray(label.data).astype(np.int64)
        masks = [in_model_layout(_slice_mask(lab.shape, picked), ornt) for picked in (train, val)]
        lab = in_model_layout(lab, ornt)
        if grid != lab.shape:
            lab = resample_nearest(lab, grid)
            masks = [resample_nearest(m, grid) for m in masks]
        for value, count in zip(*np.unique(lab[masks[0] | masks[1]], return_counts=True)):
            counts[int(value)] = counts.get(int(value), 0) + int(count)
        if dims == 2 and prepared.ndim == 4:  # a 2D model on a 3D volume learns from its slices
            for z in np.flatnonzero(masks[0].any(axis=(1, 2)) | masks[1].any(axis=(1, 2))):
                out.images.append(np.ascontiguousarray(prepared[:, z]))
                out.labels.append(lab[z])
                out.train.append(masks[0][z])
                out.val.append(masks[1][z])
        else:
            out.images.append(prepared)
            out.labels.append(lab)
            out.train.append(masks[0])
            out.val.append(masks[1])
    names = card.labels or {}
    out.summary = {
        "volumes": [{"name": display_name(im, "image", i), "shape": list(im.spatial_shape),
                     "spacing_mm": [round(s, 4) for s in im.spacing], "corrected_slices": list(picked),
                     "training_slices": list(t), "validation_slices": list(v)}
                    for i, (im, picked, t, v) in enumerate(zip(images, slices, train_slices, val_slices))],
        "training_slices": sum(len(t) for t in train_slices),
        "validation_slices": sum(len(v) for v in val_slices),
        "voxels_per_label": {names.get(k, "background" if k == 0 else str(k)): c for k, c in sorted(counts.items())},
    }
    return out


def training_patch(card: ModelCard, network, images: list[np.ndarray]) -> tuple[int, ...]:
    """The card's patch size, shrunk to the data (rounded up to what the network divides by)."""
    dims = int(card.input.get("dims", 3))
    patch = [int(p) for p in card.input["patch_size"]][-dims:]
    divisor = list(getattr(network, "size_divisor", (1,) * dims))[-dims:]
    extent = np.max([im.shape[1:] for im in images], axis=0)
    return tuple(int(min(p, -(-int(e) // d) * d)) for p, e, d in zip(patch, extent, divisor))


def correction_sampler(data: Corrections, patch: tuple[int, ...], card: ModelCard):
    """``sample(rng, batch)`` -> images, labels, mask: patches centred on corrected voxels.

    The labels are shifted by one for the sampler (0 = not corrected), so the sampler's padding
    and its class-balanced centres fall on corrected voxels only; the shift is undone per batch.
    """
    from ..engine.sampling import PatchSampler

    shifted = [np.where(t, lab + 1, 0) for lab, t in zip(data.labels, data.train)]
    keep = [i for i, t in enumerate(data.train) if t.any()]
    if not keep:
        raise ValueError("every corrected slice went to validation; correct at least one more slice")
    names = " ".join((card.labels or {}).values()).lower()
    # flipping left and right would swap "kidney_left" and "kidney_right": only unsided structures flip
    flips = () if ("left" in names or "right" in names) else (len(patch) - 1,)
    sampler = PatchSampler([data.images[i] for i in keep], [shifted[i] for i in keep], patch,
                           foreground_fraction=0.5, weights=[data.train[i].astype(np.float32) for i in keep],
                           flip_axes=flips)

    def sample(rng: np.random.Generator, batch_size: int):
        x, y = sampler.sample(rng, batch_size)
        return x, np.maximum(y - 1, 0), y > 0

    return sample


def validation_dice(data: Corrections, card: ModelCard, device: str):
    """``score(network)``: mean Dice over the classes present in the held-out corrected slices.

    Where those slices hold background only (the user erased false detections), the score is the
    share of their voxels left as background.
    """
    import torch

    from ..engine.inference import sliding_window

    dims = int(card.input.get("dims", 3))
    roi = tuple(int(p) for p in card.input["patch_size"])[-dims:]
    held = [i for i, v in enumerate(data.val) if v.any()]

    def score(network) -> float:
        inter: dict[int, int] = {}
        total: dict[int, int] = {}
        present: set[int] = set()
        false_foreground = voxels = 0
        for i in held:
            probs = sliding_window(network, torch.from_numpy(data.images[i]), roi, overlap=0.25, batch_size=4,
                                   device=device, out_device="cpu")
            pred = probs.float().argmax(0).numpy()[data.val[i]]
            truth = data.labels[i][data.val[i]]
            false_foreground += int(((pred > 0) & (truth == 0)).sum())
            voxels += truth.size
            for c in np.union1d(np.unique(pred), np.unique(truth)):
                if c == 0:
                    continue
                p, t = pred == c, truth == c
                inter[c] = inter.get(c, 0) + int((p & t).sum())
                total[c] = total.get(c, 0) + int(p.sum() + t.sum())
                if t.any():
                    present.add(int(c))
        if not present:  # the held-out corrections only erase: score how little foreground is left
            return 1.0 - false_foreground / max(voxels, 1)
        return float(np.mean([2 * inter[c] / total[c] for c in present]))

    return score


def _score(network, validate) -> Optional[float]:
    if validate is None:
        return None
    import torch

    with torch.no_grad():
        return float(validate(network.eval()))


def _metrics(before, after, summary) -> dict:
    if before is None:
        return {"note": "fewer than 3 corrected slices: no validation split, no held-out metric"}
    key = f"mean dice, held-out corrected slices ({summary['validation_slices']} slices, validation split)"
    return {key: {"before fine-tuning": round(before, 4), "after fine-tuning": round(after, 4)}}


# --- checkpoints -----------------------------------------------------------------------------------

def _checkpoint_prefix(folder: Path, new_id: str, parent: ModelCard, data: Corrections, config) -> Path:
    """Where the run checkpoints; an old checkpoint for other data or settings is discarded."""
    root = folder / ".checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    prefix = root / new_id
    digest = hashlib.sha256()
    digest.update(f"{parent.id}:{parent.sha256}:{config}".encode())
    for arrays in (data.images, data.labels, data.train, data.val):
        for a in arrays:
            digest.update(np.ascontiguousarray(a).tobytes())
    stamp = prefix.with_name(new_id + ".run.json")
    fingerprint = digest.hexdigest()
    previous = json.loads(stamp.read_text()).get("fingerprint") if stamp.exists() else None
    if previous != fingerprint:
        _remove_checkpoint(prefix)
        stamp.write_text(json.dumps({"fingerprint": fingerprint, "parent": parent.id}))
    return prefix


def checkpoint_files(prefix: Path) -> list[Path]:
    from ..engine.training import _checkpoint_files

    return [*_checkpoint_files(prefix), Path(prefix).with_name(Path(prefix).name + ".run.json")]


def _remove_checkpoint(prefix: Path) -> None:
    for path in checkpoint_files(prefix):
        path.unlink(missing_ok=True)


def _device_summary(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return f"GPU {torch.cuda.get_device_name(0)}"
    return f"{device.upper()} ({platform.machine()}, {torch.get_num_threads()} threads)"
