"""Fine-tuning that learns only what the corrections say: the network's tail on cached windows,
every uncorrected voxel and untouched label held to the parent, and a guard against the parent.

The parent's trunk runs once over the windows that hold corrected slices (``engine.tail``); its
outputs and the parent's own logits are cached. The tail then trains on two terms:

- on corrected voxels of the labels the user touched, cross-entropy + Dice to the user's labels;
- on every other voxel (other slices, and labels nobody touched on the corrected slices),
  Kullback-Leibler divergence to the parent's probabilities (distillation), so an untouched
  organ cannot drift.

Guard: the corrected slices are split into folds (leave-one-slice-out for 2 or 3 slices, two
halves of the slice for a single one, a fifth held out from 4 on); a tail trained without a
fold's slices is scored on them against the parent, per label. Only when the touched labels gain
and no label loses is the final tail (trained on every corrected slice) kept.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from ..engine.progress import check, report
from ..models.card import ModelCard
from .corrections import VAL_FRACTION, display_name


class FinetuneRefused(ValueError):
    """The fine-tuned model did not beat its parent on held-out corrected slices; nothing was saved.

    ``guard`` holds the figures (per label, parent and new Dice on the held-out slices).
    """

    def __init__(self, message: str, guard: dict):
        super().__init__(message)
        self.guard = guard


@dataclass
class Window:
    """One sliding window over a corrected volume on the model grid, with the trunk's outputs cached."""

    features: "object"        # torch tensor (F, *roi) float16: the head's input
    parent: "object"          # torch tensor (n_classes, *roi) float16 logits of the parent
    user: np.ndarray          # (*roi) int64: the user's label where it supervises, -1 elsewhere
    fold: np.ndarray          # (*roi) int16: fold of a corrected voxel, -1 elsewhere
    valid: np.ndarray         # (*roi) bool: inside the volume (not padding)


@dataclass
class TailRun:
    state: dict
    history: list = field(default_factory=list)


# --- the corrections on the model grid -------------------------------------------------------------

def corrected_items(card: ModelCard, images, labels, slices: list[list[int]]):
    """``[(image (C, *grid) float32, labels (*grid) int64, unit (*grid) int32)]`` on the model grid.

    ``unit`` numbers each corrected slice (a 2D picture is one unit); -1 marks voxels nobody
    corrected. A 2D model on a 3D volume gets one item per corrected slice.
    """
    from ..engine.inference import prepare_image
    from ..engine.orientation import in_model_layout, model_layout
    from ..engine.resample import resample_nearest

    dims = int(card.input.get("dims", 3))
    items, next_unit = [], 0
    for image, label, picked in zip(images, labels, slices):
        if not picked:
            continue
        turned, ornt = model_layout(image, card.input)
        prepared = prepare_image(turned, card.input, "cpu").numpy()
        grid = prepared.shape[1:]
        lab = np.asarray(label.data).astype(np.int64)
        unit = np.full(lab.shape, -1, dtype=np.int32)
        if image.ndim == 2:
            unit[list(picked)] = next_unit
            next_unit += 1
        else:
            for s in picked:
                unit[s] = next_unit
                next_unit += 1
        lab, unit = in_model_layout(lab, ornt), in_model_layout(unit, ornt)
        if grid != lab.shape:
            lab, unit = resample_nearest(lab, grid), resample_nearest(unit, grid)
        if dims == 2 and prepared.ndim == 4:
            for z in np.flatnonzero((unit >= 0).any(axis=(1, 2))):
                items.append((np.ascontiguousarray(prepared[:, z]), lab[z], unit[z]))
        else:
            items.append((prepared, lab, unit))
    return items, next_unit


def fold_maps(items, n_units: int) -> tuple[list[np.ndarray], int, str]:
    """Per item a map of each corrected voxel's validation fold (-1: never held out), the number
    of folds and how they were made."""
    if n_units == 1:
        # one corrected slice: its two halves along the last axis validate each other
        maps = []
        for _, _, unit in items:
            fold = np.full(unit.shape, -1, dtype=np.int16)
            half = unit.shape[-1] // 2
            fold[..., :half][unit[..., :half] >= 0] = 0
            fold[..., half:][unit[..., half:] >= 0] = 1
            maps.append(fold)
        return maps, 2, "two halves of the one corrected slice"
    if n_units <= 3:
        return [np.where(unit >= 0, unit, -1).astype(np.int16) for _, _, unit in items], n_units, \
            "leave one corrected slice out"
    n_val = max(1, int(round(n_units * VAL_FRACTION)))
    held = set(np.linspace(0, n_units - 1, n_val + 2)[1:-1].round().astype(int).tolist())
    maps = []
    for _, _, unit in items:
        fold = np.full(unit.shape, -1, dtype=np.int16)
        fold[np.isin(unit, list(held))] = 0
        maps.append(fold)
    return maps, 1, f"{n_val} of {n_units} corrected slices held out"


def touched_labels(items, override=None, names: Optional[dict] = None) -> list[int]:
    """The labels the corrections speak for: ``override`` (ids or names), else every label painted."""
    if override:
        by_name = {str(v): int(k) for k, v in (names or {}).items()}
        out = []
        for entry in override:
            key = by_name.get(str(entry), entry)
            try:
                out.append(int(key))
            except (TypeError, ValueError):
                raise ValueError(f"label {entry!r} is not one of the model's labels "
                                 f"({', '.join(by_name) or 'none named'})") from None
        return sorted(set(out))
    found: set[int] = set()
    for _, lab, unit in items:
        found.update(np.unique(lab[unit >= 0]).astype(int).tolist())
    return sorted(found - {0})


# --- caching the trunk -----------------------------------------------------------------------------

def cache_windows(network, card: ModelCard, items, folds, touched: list[int], device: str,
                  progress=None, cancel=None) -> list[Window]:
    """The windows (as inference tiles them) that hold a corrected voxel, with the trunk's outputs,
    the parent's logits and the user's targets.

    User targets: a corrected voxel painted with a label counts as that label; a corrected voxel
    left at 0 counts as background where the parent saw background or a touched label there (the
    user erased it), and is left to the parent where the parent saw an untouched label.
    """
    import torch

    from ..engine.inference import window_regions
    from ..engine.tail import tail, trunk

    dims = int(card.input.get("dims", 3))
    roi = tuple(int(p) for p in card.input["patch_size"])[-dims:]
    jobs = []
    for i, (image, lab, unit) in enumerate(items):
        for source, target in window_regions(unit.shape, roi, 0.25):
            if (unit[source] >= 0).any():
                jobs.append((i, source, target))
    windows = []
    touched_arr = np.asarray(touched + [0], dtype=np.int64)
    network.to(device).eval()
    with torch.no_grad():
        for done, (i, source, target) in enumerate(jobs):
            check(cancel)
            image, lab, unit = items[i]
            tile = torch.zeros((1, image.shape[0], *roi), dtype=torch.float32)
            tile[(0, slice(None), *target)] = torch.from_numpy(image[(slice(None), *source)])
            features = trunk(network, tile.to(device))
            logits = tail(network, features)[0]
            parent_pred = logits.argmax(0).cpu().numpy()
            user = np.full(roi, -1, dtype=np.int64)
            fold = np.full(roi, -1, dtype=np.int16)
            valid = np.zeros(roi, dtype=bool)
            valid[target] = True
            corrected = np.zeros(roi, dtype=bool)
            corrected[target] = unit[source] >= 0
            fold[target] = folds[i][source]
            painted = np.zeros(roi, dtype=np.int64)
            painted[target] = lab[source]
            speaks = corrected & ((painted > 0) | np.isin(parent_pred, touched_arr))
            user[speaks] = np.where(np.isin(painted[speaks], touched_arr), painted[speaks], 0)
            windows.append(Window(features[0].half().cpu(), logits.half().cpu(), user, fold, valid))
            report(progress, done + 1, len(jobs), f"caching the parent's features {done + 1}/{len(jobs)}")
    return windows


# --- training the tail ---------------------------------------------------------------------------

def train_tail(network, windows: list[Window], held_out: Optional[int], steps: int, lr: float,
               distill: float, seed: int, device: str, cancel=None,
               on_step: Optional[Callable[[int, float], None]] = None, distilled_voxels: int = 100_000,
               touched: Sequence[int] = ()) -> TailRun:
    """The head's weights after ``steps`` full-batch steps, trained without fold ``held_out``
    (None: every corrected slice), starting from the parent's head.

    Every training correction counts; the distillation term uses up to ``distilled_voxels``
    voxels drawn at random from the rest (a fixed draw per run, so runs repeat).
    """
    import torch
    import torch.nn.functional as F

    from ..engine.tail import head_weights

    rng = np.random.default_rng(seed)
    feats_u, target_u, feats_d, parent_d = [], [], [], []
    n_rest = sum(int(w.valid.sum()) for w in windows)
    keep = min(1.0, distilled_voxels / max(n_rest, 1))
    for w in windows:
        flat = w.features.reshape(w.features.shape[0], -1)
        user = w.user.reshape(-1) >= 0
        if held_out is not None:
            user &= w.fold.reshape(-1) != held_out
        rest = w.valid.reshape(-1) & ~user
        rest &= rng.random(rest.shape) < keep
        if user.any():
            idx = torch.from_numpy(np.flatnonzero(user))
            feats_u.append(flat[:, idx].T)
            target_u.append(torch.from_numpy(w.user.reshape(-1)[user]))
        idx = torch.from_numpy(np.flatnonzero(rest))
        feats_d.append(flat[:, idx].T)
        parent_d.append(w.parent.reshape(w.parent.shape[0], -1)[:, idx].T)
    x_d = torch.cat(feats_d).float().to(device)
    p_d = F.softmax(torch.cat(parent_d).float().to(device), 1)
    x_u = torch.cat(feats_u).float().to(device) if feats_u else None
    y_u = torch.cat(target_u).to(device) if target_u else None
    weight0, bias0 = (t.detach().clone().to(device) for t in head_weights(network))
    # only the rows of the labels the corrections speak for learn: every other label's logit stays
    # the parent's exactly, so an untouched organ can lose voxels only to a corrected one
    rows = torch.zeros(weight0.shape[0], 1, device=device)
    rows[[c for c in touched if c < weight0.shape[0]]] = 1.0
    delta_w = torch.zeros_like(weight0, requires_grad=True)
    delta_b = torch.zeros_like(bias0, requires_grad=True)
    optimiser = torch.optim.Adam([delta_w, delta_b], lr=lr)
    history = []
    for step in range(1, steps + 1):
        check(cancel)
        weight, bias = weight0 + rows * delta_w, bias0 + rows[:, 0] * delta_b
        loss = distill * (p_d * (torch.log(p_d.clamp_min(1e-8)) - F.log_softmax(x_d @ weight.T + bias, 1))).sum(1).mean()
        if x_u is not None:
            log_p = F.log_softmax(x_u @ weight.T + bias, 1)
            loss = loss + F.nll_loss(log_p, y_u) + _soft_dice(log_p.exp(), y_u)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        history.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, history[-1])
    weight, bias = weight0 + rows * delta_w, bias0 + rows[:, 0] * delta_b
    conv = network.head.conv.conv if hasattr(network.head.conv, "conv") else network.head.conv
    state = {"head.conv.conv.weight" if hasattr(network.head.conv, "conv") else "head.conv.weight":
             weight.detach().cpu().reshape(conv.weight.shape).clone(),
             "head.conv.conv.bias" if hasattr(network.head.conv, "conv") else "head.conv.bias": bias.detach().cpu().clone()}
    return TailRun(state, history)


def _soft_dice(probs, target):
    """1 - mean soft Dice over the foreground classes present in ``target`` (voxels along axis 0)."""
    import torch

    classes = [int(c) for c in torch.unique(target).tolist() if c > 0]
    if not classes:
        return torch.zeros((), device=probs.device)
    scores = []
    for c in classes:
        p, t = probs[:, c], (target == c).float()
        scores.append(2 * (p * t).sum() / (p.sum() + t.sum()).clamp(min=1e-6))
    return 1 - torch.stack(scores).mean()


# --- scoring against the parent ------------------------------------------------------------------

def held_out_counts(network, windows: list[Window], fold: int, state: Optional[dict], device: str) -> dict:
    """Per label ``{id: [intersection, size sum, target size]}`` on fold ``fold``'s corrected voxels
    for the head ``state`` (None: the parent's), against the user's targets (``"touched"``) and,
    for voxels left to the parent, against the parent's own prediction (``"kept"``)."""
    counts: dict[str, dict[int, list[int]]] = {"touched": {}, "kept": {}}
    for w in windows:
        held = w.fold == fold
        if not held.any():
            continue
        parent = w.parent.float().argmax(0).numpy()
        if state is None:
            pred = parent
        else:
            weight, bias = list(state.values())
            flat = w.features.float().reshape(w.features.shape[0], -1)
            logits = weight.reshape(weight.shape[0], -1) @ flat + bias[:, None]
            pred = logits.argmax(0).reshape(parent.shape).numpy()
        speaks = held & (w.user >= 0)
        _add(counts["touched"], pred[speaks], w.user[speaks])
        kept = held & (w.user < 0)
        _add(counts["kept"], pred[kept], parent[kept])
    return counts


def _add(counts: dict, pred: np.ndarray, truth: np.ndarray) -> None:
    for c in np.union1d(np.unique(pred), np.unique(truth)).astype(int).tolist():
        if c == 0:
            continue
        p, t = pred == c, truth == c
        entry = counts.setdefault(c, [0, 0, 0])
        entry[0] += int((p & t).sum())
        entry[1] += int(p.sum() + t.sum())
        entry[2] += int(t.sum())


def _merge(into: dict, more: dict) -> None:
    for part, labels in more.items():
        for c, (i, s, n) in labels.items():
            entry = into.setdefault(part, {}).setdefault(c, [0, 0, 0])
            entry[0] += i
            entry[1] += s
            entry[2] += n


def guard_verdict(parent_counts: dict, new_counts: dict, names: dict, min_gain: float,
                  max_loss: float) -> tuple[bool, dict, str]:
    """Whether the new tail beats the parent on the held-out corrected voxels, the figures, and why.

    Touched labels are scored against the user's labels; labels left to the parent against the
    parent's own prediction (the parent scores 1 there by construction). Accepted when the touched
    labels' mean Dice rises by ``min_gain`` or more and no label falls by more than ``max_loss``.
    """
    def dice(counts, part, c):
        i, s, _ = counts.get(part, {}).get(c, [0, 0, 0])
        return 2 * i / s if s else float("nan")

    figures: dict[str, dict] = {"corrected labels": {}, "labels left to the parent": {}}
    gains, worst = [], []
    for part, title in (("touched", "corrected labels"), ("kept", "labels left to the parent")):
        for c in sorted(set(parent_counts.get(part, {})) | set(new_counts.get(part, {}))):
            present = parent_counts.get(part, {}).get(c, [0, 0, 0])[2]
            if not present:
                continue  # a label only predicted there, never in the target, has no Dice to keep
            before, after = dice(parent_counts, part, c), dice(new_counts, part, c)
            name = str(names.get(c, f"label {c}"))
            figures[title][name] = {"parent": round(before, 4), "new": round(after, 4),
                                    "voxels": int(present)}
            if part == "touched":
                gains.append(after - before)
            worst.append((after - before, name))
    if not gains:
        return False, figures, "the held-out corrected slices hold none of the corrected labels"
    gain = float(np.mean(gains))
    figures["mean gain, corrected labels"] = round(gain, 4)
    fall, who = min(worst)
    if fall < -max_loss:
        return False, figures, f"{who} falls from the parent's by {-fall:.3f} Dice on held-out corrected slices"
    if gain < min_gain:
        return False, figures, (f"the corrected labels gain {gain:+.3f} Dice over the parent on held-out "
                                f"corrected slices (needs {min_gain:+.3f})")
    return True, figures, f"the corrected labels gain {gain:+.3f} Dice over the parent on held-out corrected slices"


def volume_names(images) -> list[str]:
    return [display_name(im, "image", i) for i, im in enumerate(images)]


def seconds_since(started: float) -> float:
    return round(time.perf_counter() - started, 1)


# --- the whole run ---------------------------------------------------------------------------------

def finetune_tail(parent: ModelCard, images, labels, slices: list[list[int]], options, new_id: str, folder,
                  device: str, progress=None, cancel=None) -> ModelCard:
    """The card of the saved model (tail fine-tuned, guarded); raises ``FinetuneRefused`` when the
    guard keeps the parent. ``options`` is a ``FinetuneOptions``."""
    from ..models.registry import load_model, save_model

    started = time.perf_counter()
    names = dict(parent.labels or {})
    report(progress, 0, 1, "preparing the corrected slices")
    items, n_units = corrected_items(parent, images, labels, slices)
    touched = touched_labels(items, options.corrected_labels, names)
    folds, n_folds, how = fold_maps(items, n_units)
    network, parent = load_model(parent, device=device)
    windows = cache_windows(network, parent, items, folds, touched, device, progress, cancel)
    cached_s = seconds_since(started)
    steps = int(options.steps or 150)
    lr = float(options.learning_rate or 1e-2)
    runs = n_folds + 1 if options.guard else 1
    total = runs * steps
    curve: list[dict] = []
    done = {"steps": 0}

    def stepper(phase: str):
        def on_step(step: int, loss: float) -> None:
            done["steps"] += 1
            report(progress, done["steps"], total, f"{phase}: step {step}/{steps}, loss {loss:.3f}")
            if step % max(1, steps // 6) == 0 or step == steps:
                entry = {"step": done["steps"], "loss": round(loss, 4), "score": None, "phase": phase,
                         "seconds": seconds_since(started)}
                curve.append(entry)
                if options.on_validation is not None:
                    options.on_validation(dict(entry))
        return on_step

    guard = {"folds": how, "n_folds": n_folds, "touched_labels": [names.get(c, str(c)) for c in touched]}
    if options.guard:
        parent_counts: dict = {}
        new_counts: dict = {}
        for k in range(n_folds):
            run = train_tail(network, windows, k, steps, lr, options.distill, options.seed + k, device, cancel,
                             stepper(f"fold {k + 1}/{n_folds}"), touched=touched)
            p = held_out_counts(network, windows, k, None, device)
            n = held_out_counts(network, windows, k, run.state, device)
            _merge(parent_counts, p)
            _merge(new_counts, n)
            score = _mean_touched(n, touched)
            entry = {**curve[-1], "score": score, "parent_score": _mean_touched(p, touched)}
            curve[-1] = entry
            if options.on_validation is not None:
                options.on_validation(dict(entry))
        accepted, figures, why = guard_verdict(parent_counts, new_counts, names, options.min_gain, options.max_loss)
        guard.update(figures=figures, accepted=accepted, reason=why)
        if not accepted:
            raise FinetuneRefused(f"the fine-tuned model was not saved and {parent.id} stays: {why}. "
                                  f"Figures (Dice on held-out corrected slices, parent -> new): "
                                  f"{_figures_line(figures)}", guard)
    final = train_tail(network, windows, None, steps, lr, options.distill, options.seed, device, cancel,
                       stepper("final"), touched=touched)
    network.load_state_dict(final.state, strict=False)
    check(cancel)
    card = ModelCard(
        id=new_id, task=parent.task, architecture=parent.architecture, modality=parent.modality,
        input=dict(parent.input), sha256="", labels=parent.labels, license=parent.license, parent=parent.id,
        description=f"{parent.id} fine-tuned on user-corrected slices (its tail; all else held to the "
                    f"parent). {parent.description}".strip(),
        training={
            "kind": "fine-tuning", "method": "tail with distillation to the parent",
            "parent": parent.id, "parent_sha256": parent.sha256,
            "data": {"volumes": [{"name": name, "shape": list(im.spatial_shape),
                                  "image_sha256": _array_sha256(im.data), "labels_sha256": _array_sha256(lab.data),
                                  "corrected_slices": list(picked)}
                                 for name, im, lab, picked in zip(volume_names(images), images, labels, slices)],
                     "corrected_slices": n_units, "windows": len(windows)},
            "steps": steps, "learning_rate": lr, "distill": options.distill, "seed": options.seed,
            "device": device, "wall_time_s": seconds_since(started), "caching_s": cached_s,
            "date": __import__("datetime").date.today().isoformat(), "guard": guard, "curve": curve,
        },
        metrics=_card_metrics(guard),
    )
    card.source = "user"
    save_model(network.cpu(), card, folder)
    report(progress, total, total, f"saved model {new_id}")
    return card


def _mean_touched(counts: dict, touched: list[int]) -> Optional[float]:
    scores = [2 * i / s for c, (i, s, n) in counts.get("touched", {}).items() if c in touched and n and s]
    return round(float(np.mean(scores)), 4) if scores else None


def _figures_line(figures: dict) -> str:
    parts = []
    for title in ("corrected labels", "labels left to the parent"):
        for name, f in figures.get(title, {}).items():
            parts.append(f"{name} {f['parent']:.3f} -> {f['new']:.3f}")
    return "; ".join(parts) or "none"


def _card_metrics(guard: dict) -> dict:
    if not guard.get("figures"):
        return {"note": "saved without the guard: no held-out comparison with the parent"}
    key = f"dice on held-out corrected slices ({guard['folds']}), parent -> fine-tuned"
    return {key: guard["figures"]}


def _array_sha256(data) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(np.asarray(data)).tobytes()).hexdigest()
