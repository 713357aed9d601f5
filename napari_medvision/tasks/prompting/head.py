"""Fine-tuning the prompting head on corrected slices, and segmenting with the stored head.

The head ``mv.prompt`` fits per call (``_refine.AppearanceHead``) learns what each label looks
like from the pixels it is shown. Trained instead on the slices a user corrected and saved as a
user model, it becomes a fast pixel classifier for scans of the same kind (ilastik's pixel
classification, with the prompt's features): ``mv.segment(vol, model=card.id)``, and again
fine-tunable on the next corrections. ``mv.finetune`` comes here for the model name
``"prompt-head"`` (a new head) or any model whose architecture is ``appearance-head``.

    card = mv.finetune("prompt-head", images=[ct], labels=[corrected], slices=[[12, 20, 31]])
    seg = mv.segment(other_ct, model=card.id)
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Optional

import numpy as np

from ...engine.device import resolve_device
from ...engine.progress import check, report
from ...engine.training import dice_per_class
from ...models.card import ModelCard
from ...models.registry import build_model, load_model, save_model
from ...volume import Volume
from ..corrections import check_corrections, destination, split_slices
from ..finetune_tail import FinetuneRefused
from .features import INTENSITY_VERSION, PER_CHANNEL, as_slices, intensity_features, normalised
from .refine import AppearanceHead, balanced_sample, class_weights, clean_up

NEW_HEAD = "prompt-head"  # the model name that asks for a new head
HIDDEN = 32
DEFAULT_STEPS = 300
SAMPLES = 40_000          # class-balanced training pixels per run
LEARNING_RATE = {True: 1e-2, False: 3e-3}  # a new head / one continued from its parent


def is_head(model) -> bool:
    """True for the name of a new head or a card of a stored one."""
    if isinstance(model, ModelCard):
        return model.architecture.get("name") == "appearance-head"
    return str(model) == NEW_HEAD


def pixel_features(volume: Volume, slices=None) -> np.ndarray:
    """``(n, y, x, F)`` prompt intensity features of ``slices`` (axis 0; all by default; a 2D image: one)."""
    stack = as_slices(normalised(volume), volume.rgb)
    return intensity_features(stack if slices is None else stack[list(slices)])


def finetune_head(model, images, labels, slices=None, steps: Optional[int] = None, device: Optional[str] = None,
                  progress=None, cancel=None, seed: int = 0, new_id: Optional[str] = None, folder=None,
                  on_validation=None, guard: bool = False) -> ModelCard:
    """The card of a head trained on the corrected slices (``mv.finetune`` with a head as ``model``).

    model: ``"prompt-head"`` for a new head (labels named by the label maps), or the card of a
        stored head, whose weights and feature standardisation are the starting point.
    The corrected slices are split as ``mv.finetune`` splits them; Dice on the held-out ones is
    measured before (a stored parent only) and after, and recorded on the card. ``on_validation``
    gets the loss every 25 steps (and the held-out Dice where slices were held out), so a panel
    plots a curve even with fewer than 3 corrected slices. ``guard`` (a stored parent): raise
    ``FinetuneRefused`` instead of saving when the held-out Dice does not rise.
    """
    import torch

    started = time.perf_counter()
    images, labels = list(images), list(labels)
    fresh = not isinstance(model, ModelCard)
    parent = _new_head_card(images, labels) if fresh else model
    slices = check_corrections(parent, images, labels, slices)
    device = resolve_device(device)
    new_id, folder = destination(parent, NEW_HEAD if fresh else parent.id, new_id, folder)

    report(progress, 0, 1, "computing features of the corrected slices")
    train_slices, val_slices = split_slices(slices)
    train = [_corrected_pixels(im, lab, s, cancel) for im, lab, s in zip(images, labels, train_slices) if s]
    train_x = np.concatenate([f.reshape(-1, f.shape[-1]) for f, _ in train])
    train_y = np.concatenate([c.reshape(-1) for _, c in train]).astype(np.int64)
    val = [_corrected_pixels(im, lab, s, cancel) for im, lab, s in zip(images, labels, val_slices) if s]
    torch.manual_seed(seed)  # the new head's initial weights, then the training: same seed, same head
    if fresh:
        network = _new_network(parent, train_x)
    else:
        network, parent = load_model(parent, device="cpu")
    network = network.to(device)
    before = None if fresh or not val else _dice(network, val, parent)

    steps = int(steps or DEFAULT_STEPS)
    rng = np.random.default_rng(seed)
    picked = balanced_sample(train_y, SAMPLES, rng)
    x = torch.from_numpy(train_x[picked].astype(np.float32)).to(device)
    y = torch.from_numpy(train_y[picked].astype(np.int64)).to(device)
    n_classes = int(parent.architecture["config"]["n_classes"])
    weight = class_weights(train_y, train_y[picked], n_classes).to(device)  # as the per-prompt head weighs
    optimiser = torch.optim.Adam(network.mlp.parameters(), lr=LEARNING_RATE[fresh], weight_decay=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    history = []
    for step in range(1, steps + 1):
        check(cancel)
        optimiser.zero_grad()
        loss = loss_fn(network(x), y)
        loss.backward()
        optimiser.step()
        if step % 25 == 0 or step == steps:
            entry = {"step": step, "loss": round(float(loss.detach()), 5), "seconds": round(time.perf_counter() - started, 2)}
            if val:
                entry["score"] = round(_dice(network, val, parent), 4)
                if before is not None:
                    entry["parent_score"] = round(before, 4)
            if on_validation is not None:
                on_validation(dict(entry))
            history.append(entry)
            report(progress, step, steps, f"loss {entry['loss']:.3f}")
    after = _dice(network, val, parent) if val else None
    if guard and before is not None and not after > before:
        raise FinetuneRefused(f"the fine-tuned head was not saved and {parent.id} stays: its Dice on the "
                              f"held-out corrected slices went {before:.3f} -> {after:.3f}",
                              {"figures": {"mean dice": {"parent": round(before, 4), "new": round(after, 4)}}})

    compact = sorted(set(parent.input.get("one_piece_labels", [])) | set(_one_piece_labels(images, labels, slices)))
    card = ModelCard(
        id=new_id, task="segmentation", architecture=parent.architecture, modality=parent.modality,
        input={**parent.input, "one_piece_labels": compact}, sha256="", labels=dict(parent.labels or {}), license=parent.license,
        parent=None if fresh else parent.id,
        description=("Prompting appearance head (per-pixel MLP on intensity features) trained on "
                     "user-corrected slices; segments slice by slice."),
        training={"kind": "prompting head" if fresh else "fine-tuning", "parent": None if fresh else parent.id,
                  "data": {"volumes": [{"shape": list(im.spatial_shape), "training_slices": list(t),
                                        "validation_slices": list(v)}
                                       for im, t, v in zip(images, train_slices, val_slices)],
                           "training_pixels": int(len(train_y)), "sampled_pixels": int(len(picked))},
                  "steps": steps, "learning_rate": LEARNING_RATE[fresh], "seed": seed,
                  "device": device, "wall_time_s": round(time.perf_counter() - started, 2),
                  "date": datetime.now().date().isoformat(), "validation_curve": history},
        metrics=_metrics(before, after, sum(len(v) for v in val_slices)),
    )
    card.source = "user"
    save_model(network.cpu(), card, folder)
    report(progress, 1, 1, f"saved model {new_id}")
    return card


def segment_with_head(volume: Volume, network, card: ModelCard, device: str = "cpu", progress=None,
                      cancel=None, batch: int = 8) -> Volume:
    """Labels Volume on ``volume``'s grid: the head's most likely class at every pixel, slice by slice."""
    n = volume.spatial_shape[0] if volume.ndim == 3 else 1
    out = np.zeros((n,) + tuple(volume.spatial_shape[-2:]), dtype=np.uint8 if len(card.labels or {}) < 255
                   else np.uint16)
    head = AppearanceHead.from_stored(network.to(device).eval())
    for start in range(0, n, batch):
        check(cancel)
        chunk = list(range(start, min(n, start + batch)))
        out[chunk] = head.predict(pixel_features(volume, chunk if volume.ndim == 3 else None)).argmax(0)
        report(progress, chunk[-1] + 1, n, "segmenting slices")
    # The head judges pixels alone and paints look-alike tissue elsewhere: one-piece labels keep
    # their largest component only, holes filled (the prompt's own clean-up, with no anchor).
    out = clean_up(out, set(card.input.get("one_piece_labels", [])))
    result = volume.with_data(out if volume.ndim == 3 else out[0], labels=dict(card.labels or {}), rgb=False)
    result.meta["model"] = card.id
    return result


# --- helpers -------------------------------------------------------------------------------------------

def _new_head_card(images, labels) -> ModelCard:
    """A card for a head not trained yet: labels from the label maps, modality and colour from the images."""
    names: dict[int, str] = {}
    for label in labels:
        names.update({int(k): str(v) for k, v in (label.labels or {}).items() if int(k) != 0})
        for k in np.unique(np.asarray(label.data)).astype(int).tolist():
            if k != 0:
                names.setdefault(k, f"label {k}")
    n_features = None
    if images:
        n_features = PER_CHANNEL * (3 if images[0].rgb else 1)
    modality = images[0].modality if images else "unknown"
    config = {"n_features": n_features, "n_classes": max(names, default=0) + 1, "hidden": HIDDEN}
    return ModelCard(id=NEW_HEAD, task="segmentation", architecture={"name": "appearance-head", "config": config},
                     modality=modality, sha256="", labels=dict(sorted(names.items())),
                     input={"dims": 2, "channels": 3 if images and images[0].rgb else 1,
                            "features": INTENSITY_VERSION,
                            "normalisation": "prompt features: CT soft-tissue window, else 0.5-99.5 percentiles"})


def _one_piece_labels(images, labels, slices, share: float = 0.8) -> list[int]:
    """Labels drawn as one piece per corrected slice (organs, not vessels or cortex): on average
    ``share`` of each slice's pixels of the label lie in its largest connected component."""
    from scipy import ndimage as ndi

    shares: dict[int, list[float]] = {}
    for image, label, picked in zip(images, labels, slices):
        lab = np.asarray(label.data)
        for plane in (lab[picked] if image.ndim == 3 else lab[None]):
            for k in np.unique(plane[plane > 0]).astype(int).tolist():
                pieces, n = ndi.label(plane == k)
                sizes = np.bincount(pieces.ravel())[1:]
                shares.setdefault(k, []).append(float(sizes.max() / sizes.sum()))
    return [k for k, v in sorted(shares.items()) if np.mean(v) >= share]


def _corrected_pixels(image: Volume, label: Volume, picked, cancel) -> tuple[np.ndarray, np.ndarray]:
    """Features ``(..., F)`` and label ids of the corrected slices (3D) or rows (a 2D image)."""
    check(cancel)
    lab = np.asarray(label.data)
    if image.ndim == 3:
        return pixel_features(image, picked), lab[picked]
    return pixel_features(image)[0][picked], lab[picked]


def _new_network(card: ModelCard, features: np.ndarray):
    import torch

    network = build_model(card.architecture)
    sample = features[:: max(1, len(features) // 200_000)].astype(np.float32)
    network.mean.copy_(torch.from_numpy(sample.mean(0)))
    network.std.copy_(torch.from_numpy(sample.std(0)).clamp_min(1e-4))
    return network


def _dice(network, val, card: ModelCard) -> float:
    """Mean Dice over the labels present in the held-out slices, pooled over them."""
    head = AppearanceHead.from_stored(network)
    pred = np.concatenate([head.predict(feats).argmax(0).ravel() for feats, _ in val])
    truth = np.concatenate([labels.ravel() for _, labels in val])
    present = [k for k in (card.labels or {}) if (truth == k).any()]
    return float(np.mean(list(dice_per_class(pred, truth, present).values()))) if present else float("nan")


def _metrics(before, after, n_val: int) -> dict:
    if after is None:
        return {"note": "fewer than 3 corrected slices: no validation split, no held-out metric"}
    key = f"mean dice, held-out corrected slices ({n_val} slices, validation split)"
    values = {"after fine-tuning": round(after, 4)}
    if before is not None:
        values = {"before fine-tuning": round(before, 4), **values}
    return {key: values}
