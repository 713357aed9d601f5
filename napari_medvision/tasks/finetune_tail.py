"""Fine-tuning that learns only what the corrections say: the network's tail on cached windows,
every uncorrected voxel and untouched label held to the parent, and a guard against the parent.

The parent's trunk runs once over the windows (as inference tiles the scan) that hold corrected
slices (``engine.tail``); its outputs are cached. Only the head rows of the labels the user
touched are trained, on four terms:

- on corrected voxels, cross-entropy + Dice to the user's labels;
- on the slices next to a corrected slice (same scan), the same toward the mask that in-volume
  prompting propagates from the corrected slices (``tasks.prompting``, variant "propagation"),
  at a lower weight: on the same scan the corrections are also prompts;
- on every other voxel, Kullback-Leibler divergence to the parent's probabilities (distillation);
- on every cached voxel where an untouched label and the touched labels (or background) compete
  closely, a hinge that keeps the winning side as far ahead as the parent had it (anchoring).

The untouched labels' logits are the parent's exactly, so they can change only where a touched
label takes a voxel from them or gives one up to them. After training, the whole cached scan is
predicted as inference blends it, for the parent and the new head; if any untouched label's Dice
against the parent falls below ``1 - max_loss / 2``, the head's change is scaled down until none
does (down to no change at all).

Guard: the corrected slices are split into folds (leave-one-slice-out for 2 or 3 slices, two
halves of the slice for a single one, a fifth held out from 4 on); a tail trained without a
fold's slices (and without masks propagated from them) is scored on them against the parent, per
label. The final tail (trained on every corrected slice) is kept only when the touched labels
gain, no label loses on the held-out slices, and no untouched label differs from the parent by
more than ``max_loss`` Dice over every cached voxel of the scan.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from ..engine.progress import check, report
from ..models.card import ModelCard
from .corrections import VAL_FRACTION, display_name

PROPAGATION_REACH = 4     # slices each side of a corrected slice that take the propagated mask as a target
                          # (on the example CT it keeps 0.95-0.99 Dice that far from 3 corrected slices)
PROPAGATED_WEIGHT = 0.5   # a propagated voxel's weight against one the user corrected
KEEP_WEIGHT = 10.0        # weight of the hinge that holds the untouched labels' borders
KEEP_MARGIN = 1.0         # logits: the winning side keeps min(this, the parent's lead) over the other
AT_RISK = 6.0             # logits: voxels whose two sides lie closer than this are held by the hinge
HELD_VOXELS = 60_000      # at most this many voxels per term (a fixed draw per run)
SCALES = (1.0, 0.7, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05, 0.0)  # tried in turn until untouched labels hold


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
    item: int = 0             # which corrected volume (``corrected_items``) the window lies in
    source: tuple = ()        # the window's slices into that volume's model grid
    target: tuple = ()        # and into the tile
    propagated: dict = field(default_factory=dict)  # run (None: all folds; k: without fold k) ->
                                                    # (*roi) int16 target from propagation, -1 elsewhere


@dataclass
class TailRun:
    state: dict
    history: list = field(default_factory=list)
    delta: tuple = ()         # (rows, weight change, bias change) before scaling
    scale: float = 1.0        # share of the trained change kept so that untouched labels hold
    untouched: dict = field(default_factory=dict)  # name -> Dice against the parent over the cached scan


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


# --- the corrections as prompts: masks propagated to the neighbouring slices ----------------------

def propagated_targets(card: ModelCard, images, labels, slices: list[list[int]], items, folds, n_units: int,
                       touched: list[int], runs: list, device: str, cancel=None) -> list[dict]:
    """Per item ``{run: (*grid) int16}``: the touched labels (0: none) that in-volume prompting's
    propagation (``prompting.propagate``: demons fields from slice to slice, the same as
    ``mv.prompt(..., variant="propagation")``) carries from the run's corrected slices to the
    ``PROPAGATION_REACH`` slices each side, -1 elsewhere (corrected slices included: they speak for
    themselves, or are held out). The fields are computed once per scan, between the first and the
    last slice that can take a target.

    A run ``k`` propagates without fold ``k``'s slices; with one corrected slice (folds: its two
    halves) the held-out half's columns get no propagated target. Only 3D models on 3D scans.
    """
    from ..engine.orientation import in_model_layout, model_layout
    from ..engine.resample import resample_nearest
    from .prompting.features import normalised
    from .prompting.propagate import propagate, slice_displacements
    from .prompting.runs import onehot

    out = [dict() for _ in items]
    if int(card.input.get("dims", 3)) != 3:
        return out
    halves = n_units == 1
    item, unit_base = -1, 0
    for image, label, picked in zip(images, labels, slices):
        if not picked:
            continue
        item += 1
        if image.ndim != 3:
            unit_base += 1
            continue
        units = {int(s): unit_base + j for j, s in enumerate(picked)}
        unit_base += len(picked)
        unit_map, fold = items[item][2], folds[item]
        fold_of = {u: set(np.unique(fold[unit_map == u]).astype(int).tolist()) - {-1} for u in units.values()}
        painted = np.asarray(label.data)
        keep = np.isin(painted, touched)
        if image.rgb or not keep[list(units)].any():
            continue
        turned, ornt = model_layout(image, card.input)
        grid = items[item][0].shape[1:]
        depth = painted.shape[0]
        first = max(min(units) - PROPAGATION_REACH, 0)
        last = min(max(units) + PROPAGATION_REACH, depth - 1)
        fields = slice_displacements(normalised(image, np.arange(first, last + 1)), cancel=cancel, device=device)
        ids = np.asarray([0] + sorted(touched))
        for run in runs:
            check(cancel)
            given = [s for s, u in units.items() if halves or run is None or run not in fold_of[u]]
            if not given or not keep[given].any():
                continue
            classes = np.zeros((last - first + 1,) + painted.shape[1:], dtype=np.int64)
            for s in given:
                classes[s - first] = np.searchsorted(ids, np.where(keep[s], painted[s], 0))
            prior, _ = propagate(onehot(classes, len(ids)), [s - first for s in given], fields)
            carried = ids[prior.argmax(0)]
            distance = np.min(np.abs(np.arange(depth)[:, None] - np.asarray(given)[None, :]), axis=1)
            near = (distance >= 1) & (distance <= PROPAGATION_REACH)
            near[list(units)] = False  # every corrected slice, held out or not
            target = np.full(painted.shape, -1, dtype=np.int16)
            rows = np.flatnonzero(near)
            target[rows] = carried[rows - first].astype(np.int16)
            target = in_model_layout(target, ornt)
            if target.shape != grid:
                target = resample_nearest(target, grid)
            if halves and run is not None:  # fold 0 is the first half of the columns, fold 1 the rest
                half = target.shape[-1] // 2
                if run == 0:
                    target[..., :half] = -1
                else:
                    target[..., half:] = -1
            out[item][run] = target
    return out


# --- caching the trunk -----------------------------------------------------------------------------

def cache_windows(network, card: ModelCard, items, folds, touched: list[int], device: str,
                  progress=None, cancel=None, propagated: Optional[list[dict]] = None) -> list[Window]:
    """The windows (as inference tiles them) that hold a corrected voxel, with the trunk's outputs,
    the parent's logits, the user's targets and the propagated ones.

    User targets: a corrected voxel painted with a label counts as that label; a corrected voxel
    left at 0 counts as background where the parent saw background or a touched label there (the
    user erased it), and is left to the parent where the parent saw an untouched label. Propagated
    targets follow the same rule, on uncorrected voxels only.
    """
    import torch

    from ..engine.inference import window_regions
    from ..engine.tail import tail, trunk
    from .segment import SEGMENT_OVERLAP

    dims = int(card.input.get("dims", 3))
    roi = tuple(int(p) for p in card.input["patch_size"])[-dims:]
    jobs = []
    for i, (image, lab, unit) in enumerate(items):
        for source, target in window_regions(unit.shape, roi, SEGMENT_OVERLAP):
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
            free = np.isin(parent_pred, touched_arr)  # the parent saw background or a touched label
            speaks = corrected & ((painted > 0) | free)
            user[speaks] = np.where(np.isin(painted[speaks], touched_arr), painted[speaks], 0)
            spread = {}
            for run, volume_target in (propagated[i] if propagated else {}).items():
                got = np.full(roi, -1, dtype=np.int16)
                got[target] = volume_target[source]
                got[corrected | ((got == 0) & ~free)] = -1
                spread[run] = got
            windows.append(Window(features[0].half().cpu(), logits.half().cpu(), user, fold, valid, i,
                                  tuple(source), tuple(target), spread))
            report(progress, done + 1, len(jobs), f"caching the parent's features {done + 1}/{len(jobs)}")
    return windows


# --- training the tail ---------------------------------------------------------------------------

def _draw(mask: np.ndarray, share: float, rng) -> np.ndarray:
    """Indices of ``mask``'s voxels, each kept with probability ``share``."""
    idx = np.flatnonzero(mask)
    return idx if share >= 1 else idx[rng.random(idx.size) < share]


def train_tail(network, windows: list[Window], held_out: Optional[int], steps: int, lr: float,
               distill: float, seed: int, device: str, cancel=None,
               on_step: Optional[Callable[[int, float], None]] = None, distilled_voxels: int = HELD_VOXELS,
               touched: Sequence[int] = (), propagated: float = PROPAGATED_WEIGHT, keep: float = KEEP_WEIGHT) -> TailRun:
    """The head's change after ``steps`` full-batch Adam steps, trained without fold ``held_out``
    (None: every corrected slice), starting from the parent's head; only the rows of ``touched``.

    Every training correction counts; the propagated, distilled and held voxels are drawn at
    random (at most ``HELD_VOXELS`` each, ``distilled_voxels`` for distillation; a fixed draw per
    ``seed``). Held-out corrected voxels take part in nothing.
    """
    import torch
    import torch.nn.functional as F

    from ..engine.tail import head_weights

    rng = np.random.default_rng(seed)
    weight0, bias0 = (t.detach().float().clone().to(device) for t in head_weights(network))
    n_classes = weight0.shape[0]
    rows = sorted(c for c in set(touched) if 0 < c < n_classes)
    side = np.zeros(n_classes, dtype=bool)  # the "free" side: background and the touched labels
    side[[0, *rows]] = True
    side_t = torch.from_numpy(side).to(device)

    def logits0(x):
        return x @ weight0.T + bias0

    masks = []
    for w in windows:
        held = (w.fold == held_out) if held_out is not None else np.zeros(w.fold.shape, bool)
        user = (w.user >= 0) & ~held
        spread = w.propagated.get(held_out)
        prop = (spread >= 0) & ~held if spread is not None else np.zeros(user.shape, bool)
        flat = w.features.reshape(w.features.shape[0], -1).float()
        z = (weight0 @ flat.to(device) + bias0[:, None]).T
        free_max = z[:, side_t].max(1).values
        other_max = z[:, ~side_t].max(1).values if (~side).any() else torch.full_like(free_max, -1e9)
        close = (free_max - other_max).abs().cpu().numpy() < AT_RISK
        rest = w.valid.reshape(-1) & ~(user | prop | held).reshape(-1)
        masks.append((user.reshape(-1), prop.reshape(-1), rest, rest & close, spread))
    counts = np.array([[m[k].sum() for k in range(4)] for m in masks]).sum(0)
    shares = [1.0, HELD_VOXELS / max(counts[1], 1), distilled_voxels / max(counts[2], 1), HELD_VOXELS / max(counts[3], 1)]
    parts: dict[str, list] = {k: [] for k in ("xu", "yu", "xp", "yp", "xd", "xk")}
    for w, (user, prop, rest, close, spread) in zip(windows, masks):
        flat = w.features.reshape(w.features.shape[0], -1)
        for name, mask, share in (("u", user, shares[0]), ("p", prop, shares[1]), ("d", rest, shares[2]),
                                  ("k", close, shares[3])):
            idx = torch.from_numpy(_draw(mask, share, rng))
            if not len(idx):
                continue
            parts["x" + name].append(flat[:, idx].T)
            if name == "u":
                parts["yu"].append(torch.from_numpy(w.user.reshape(-1)[idx.numpy()]))
            elif name == "p":
                parts["yp"].append(torch.from_numpy(spread.reshape(-1)[idx.numpy()].astype(np.int64)))

    def stack(name):
        return torch.cat(parts[name]).float().to(device) if parts[name] else None

    x_u, x_p, x_d, x_k = stack("xu"), stack("xp"), stack("xd"), stack("xk")
    if x_u is not None and x_p is not None:
        x_s = torch.cat([x_u, x_p])
    else:
        x_s = x_u if x_u is not None else x_p
    y_s = torch.cat([torch.cat(parts[k]) for k in ("yu", "yp") if parts[k]]).to(device) if x_s is not None else None
    w_s = (torch.cat([torch.ones(len(x_u) if x_u is not None else 0),
                      torch.full((len(x_p) if x_p is not None else 0,), float(propagated))]).to(device)
           if x_s is not None else None)
    # Only the touched rows change: every other logit, and what depends on them alone, is fixed and
    # computed once; a step then costs a product with the touched rows per voxel.
    rows_t = torch.tensor(rows, dtype=torch.long, device=device)
    fixed_t = torch.from_numpy(~np.isin(np.arange(n_classes), rows)).to(device)

    def frozen(x):
        z0 = logits0(x)
        return {"x": x, "zt0": z0[:, rows_t], "lse": torch.logsumexp(z0[:, fixed_t], 1), "z0": z0}

    sets = {name: frozen(x) for name, x in (("s", x_s), ("d", x_d), ("k", x_k)) if x is not None}
    if "d" in sets:  # KL(p0 || q) = sum p0 log p0 - sum_fixed p0 z0 - sum_rows p0 z + logsumexp(z)
        z0 = sets["d"]["z0"]
        p0 = F.softmax(z0, 1)
        sets["d"]["const"] = (p0 * torch.log(p0.clamp_min(1e-8))).sum(1) - (p0 * z0)[:, fixed_t].sum(1)
        sets["d"]["p_rows"] = p0[:, rows_t]
    if "s" in sets:  # a target that is a touched row reads that row; background reads its fixed logit
        at = {c: i for i, c in enumerate(rows)}
        row_of = torch.tensor([at.get(int(c), -1) for c in range(n_classes)], device=device)[y_s]
        sets["s"]["row_of"] = row_of
        sets["s"]["z_target0"] = sets["s"]["z0"].gather(1, y_s[:, None])[:, 0]
        present = [c for c in sorted(set(y_s.unique().tolist())) if c in at]
        sets["s"]["dice"] = [(at[c], y_s == c) for c in present]
    if "k" in sets:  # the hinge: which side won at each held voxel, and by how much the parent led
        z0 = sets["k"]["z0"]
        free_k = z0[:, side_t].max(1).values
        other_k = z0[:, ~side_t].max(1).values
        sets["k"].update(background=z0[:, 0], other=other_k, free_won=free_k >= other_k,
                         lead=(free_k - other_k).abs().clamp(max=KEEP_MARGIN))
    for entry in sets.values():
        entry.pop("z0")
    delta_w = torch.zeros((len(rows), weight0.shape[1]), device=device, requires_grad=True)
    delta_b = torch.zeros(len(rows), device=device, requires_grad=True)
    optimiser = torch.optim.Adam([delta_w, delta_b], lr=lr)

    def touched_logits(entry):
        """(the touched rows' logits, logsumexp over every class) of a set of voxels."""
        z = entry["zt0"] + entry["x"] @ delta_w.T + delta_b
        return z, torch.logsumexp(torch.cat([entry["lse"][:, None], z], 1), 1)

    history = []
    for step in range(1, steps + 1):
        check(cancel)
        loss = torch.zeros((), device=device)
        if "d" in sets and distill and rows:
            d = sets["d"]
            z, lse = touched_logits(d)
            loss = loss + distill * (d["const"] - (d["p_rows"] * z).sum(1) + lse).mean()
        if "s" in sets and rows:
            e = sets["s"]
            z, lse = touched_logits(e)
            rows_of = e["row_of"]
            picked = torch.where(rows_of >= 0, z.gather(1, rows_of.clamp(min=0)[:, None])[:, 0], e["z_target0"])
            loss = loss + (-(picked - lse) * w_s).sum() / w_s.sum()
            scores = []
            for i, is_c in e["dice"]:
                prob = torch.exp(z[:, i] - lse) * w_s
                truth = is_c.float() * w_s
                scores.append(2 * (prob * is_c).sum() / (prob.sum() + truth.sum()).clamp(min=1e-6))
            if scores:
                loss = loss + 1 - torch.stack(scores).mean()
        if "k" in sets and keep and rows:
            k = sets["k"]
            z, _ = touched_logits(k)
            free = torch.maximum(k["background"], z.max(1).values)
            now = torch.where(k["free_won"], free - k["other"], k["other"] - free)
            loss = loss + keep * F.relu(k["lead"] - now).mean()
        optimiser.zero_grad(set_to_none=True)
        if loss.requires_grad:
            loss.backward()
            optimiser.step()
        history.append(float(loss.detach()))
        if on_step is not None:
            on_step(step, history[-1])
    delta = (rows, delta_w.detach().cpu(), delta_b.detach().cpu())
    return TailRun(head_state(network, delta, 1.0), history, delta, 1.0)


def head_state(network, delta: tuple, scale: float) -> dict:
    """The head's state dict with ``scale`` times the trained change on the touched rows."""
    from ..engine.tail import head_weights

    rows, delta_w, delta_b = delta
    weight0, bias0 = (t.detach().float().cpu().clone() for t in head_weights(network))
    if rows:
        weight0[rows] += scale * delta_w
        bias0[rows] += scale * delta_b
    conv = network.head.conv.conv if hasattr(network.head.conv, "conv") else network.head.conv
    prefix = "head.conv.conv." if hasattr(network.head.conv, "conv") else "head.conv."
    return {prefix + "weight": weight0.reshape(conv.weight.shape).clone(), prefix + "bias": bias0.clone()}


# --- the whole cached scan, as inference blends it --------------------------------------------------

def scan_labels(windows: list[Window], state: dict, items) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per corrected volume ``(labels, covered)`` on the model grid: the argmax of the head
    ``state``'s softmax blended over the cached windows with inference's Gaussian weights, and
    which voxels a cached window covers."""
    import torch

    from ..engine.inference import blend_weights

    weight, bias = (t.detach().float() for t in state.values())
    weight = weight.reshape(weight.shape[0], -1)
    out = []
    for i, (_, _, unit) in enumerate(items):
        mine = [w for w in windows if w.item == i]
        if not mine:
            out.append((np.zeros(unit.shape, np.int64), np.zeros(unit.shape, bool)))
            continue
        gauss = blend_weights(mine[0].valid.shape)
        acc = torch.zeros((weight.shape[0], *unit.shape))
        total = torch.zeros(unit.shape)
        for w in mine:
            flat = w.features.float().reshape(w.features.shape[0], -1)
            probs = torch.softmax(weight @ flat + bias[:, None], 0).reshape(-1, *w.valid.shape)
            acc[(slice(None), *w.source)] += (probs * gauss)[(slice(None), *w.target)]
            total[w.source] += gauss[w.target]
        covered = (total > 0).numpy()
        out.append((acc.argmax(0).numpy(), covered))
    return out


def untouched_agreement(parent_scan, new_scan, touched: Sequence[int], names: dict, items=None) -> dict:
    """``{name: Dice of the new head's label against the parent's}`` for every untouched label the
    parent predicts on the cached scan; with ``items``, the corrected voxels do not count (there
    the user's labels overrule the parent's, and the guard's folds judge them)."""
    inter: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for i, ((before, covered), (after, _)) in enumerate(zip(parent_scan, new_scan)):
        if items is not None:
            covered = covered & (items[i][2] < 0)
        b, a = before[covered], after[covered]
        for c in np.union1d(np.unique(b), np.unique(a)).astype(int).tolist():
            if c == 0 or c in touched:
                continue
            pb, pa = b == c, a == c
            inter[c] = inter.get(c, 0) + int((pb & pa).sum())
            sizes[c] = sizes.get(c, 0) + int(pb.sum() + pa.sum())
    return {str(names.get(c, f"label {c}")): round(2 * inter[c] / sizes[c], 4) for c in sorted(sizes) if sizes[c]}


def hold_untouched(network, run: TailRun, windows, items, parent_scan, touched, names, max_loss: float) -> TailRun:
    """``run`` with its change scaled down until every untouched label's Dice against the parent
    over the cached scan (corrected voxels aside) is at least ``1 - max_loss / 2``: the largest of ``SCALES`` that holds,
    found by bisection (agreement falls as the change grows); scale 0 is the parent itself."""
    def agreement(scale):
        state = head_state(network, run.delta, scale)
        return state, untouched_agreement(parent_scan, scan_labels(windows, state, items), touched, names, items)

    def holds(found):
        return not found or min(found.values()) >= 1 - max_loss / 2

    state, found = agreement(SCALES[0])
    scale = SCALES[0]
    if not holds(found):
        lo, hi = 0, len(SCALES) - 1  # SCALES[lo] fails, SCALES[hi] (0) holds
        best = head_state(network, run.delta, 0.0), {}
        while hi - lo > 1:
            mid = (lo + hi) // 2
            got = agreement(SCALES[mid])
            if holds(got[1]):
                hi, best = mid, got
            else:
                lo = mid
        scale, (state, found) = SCALES[hi], best
        if hi == len(SCALES) - 1:
            found = {name: 1.0 for name in untouched_agreement(parent_scan, parent_scan, touched, names, items)}
    return TailRun(state, run.history, run.delta, scale, found)


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
                  max_loss: float, untouched: Optional[dict] = None) -> tuple[bool, dict, str]:
    """Whether the new tail beats the parent on the held-out corrected voxels, the figures, and why.

    Touched labels are scored against the user's labels; labels left to the parent against the
    parent's own prediction (the parent scores 1 there by construction). ``untouched``: the final
    tail's Dice against the parent per untouched label over the whole cached scan. Accepted when
    the touched labels' mean Dice rises by ``min_gain`` or more, no label falls by more than
    ``max_loss`` on the held-out slices, and no untouched label's agreement with the parent over
    the scan is below ``1 - max_loss``.
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
    if untouched:
        figures["untouched labels, whole scan, dice against the parent"] = dict(untouched)
    if not gains:
        return False, figures, "the held-out corrected slices hold none of the corrected labels"
    gain = float(np.mean(gains))
    figures["mean gain, corrected labels"] = round(gain, 4)
    fall, who = min(worst)
    if fall < -max_loss:
        return False, figures, f"{who} falls from the parent's by {-fall:.3f} Dice on held-out corrected slices"
    if untouched and min(untouched.values()) < 1 - max_loss:
        who = min(untouched, key=untouched.get)
        return False, figures, (f"{who} would change: its Dice against the parent over the scan is "
                                f"{untouched[who]:.3f} (at least {1 - max_loss:.3f} needed)")
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
    runs_wanted = [None] + (list(range(n_folds)) if options.guard else [])
    propagated = None
    if getattr(options, "propagate", True):
        report(progress, 0, 1, "propagating the corrections to their neighbouring slices")
        propagated = propagated_targets(parent, images, labels, slices, items, folds, n_units, touched,
                                        runs_wanted, device, cancel)
    propagated_s = seconds_since(started)
    network, parent = load_model(parent, device=device)
    windows = cache_windows(network, parent, items, folds, touched, device, progress, cancel, propagated)
    parent_state = head_state(network, ((), None, None), 0.0)
    parent_scan = scan_labels(windows, parent_state, items)
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

    def trained(held_out, seed, phase):
        run = train_tail(network, windows, held_out, steps, lr, options.distill, seed, device, cancel,
                         stepper(phase), touched=touched)
        return hold_untouched(network, run, windows, items, parent_scan, touched, names, options.max_loss)

    guard = {"folds": how, "n_folds": n_folds, "touched_labels": [names.get(c, str(c)) for c in touched]}
    parent_counts: dict = {}
    new_counts: dict = {}
    if options.guard:
        scales = []
        for k in range(n_folds):
            run = trained(k, options.seed + k, f"fold {k + 1}/{n_folds}")
            scales.append(run.scale)
            p = held_out_counts(network, windows, k, None, device)
            n = held_out_counts(network, windows, k, run.state, device)
            _merge(parent_counts, p)
            _merge(new_counts, n)
            score = _mean_touched(n, touched)
            entry = {**curve[-1], "score": score, "parent_score": _mean_touched(p, touched)}
            curve[-1] = entry
            if options.on_validation is not None:
                options.on_validation(dict(entry))
        guard["fold_scales"] = scales
    final = trained(None, options.seed, "final")
    guard["scale"] = final.scale
    if options.guard:
        accepted, figures, why = guard_verdict(parent_counts, new_counts, names, options.min_gain, options.max_loss,
                                               final.untouched)
        guard.update(figures=figures, accepted=accepted, reason=why)
        if not accepted:
            raise FinetuneRefused(f"the fine-tuned model was not saved and {parent.id} stays: {why}. "
                                  f"Figures (Dice on held-out corrected slices, parent -> new): "
                                  f"{_figures_line(figures)}", guard)
    else:
        guard["untouched labels, whole scan, dice against the parent"] = final.untouched
    network.load_state_dict(final.state, strict=False)
    check(cancel)
    n_propagated = int(sum(int((w.propagated.get(None, np.zeros(1)) >= 0).sum()) for w in windows))
    card = ModelCard(
        id=new_id, task=parent.task, architecture=parent.architecture, modality=parent.modality,
        input=dict(parent.input), sha256="", labels=parent.labels, license=parent.license, parent=parent.id,
        description=f"{parent.id} fine-tuned on user-corrected slices (its tail; all else held to the "
                    f"parent). {parent.description}".strip(),
        training={
            "kind": "fine-tuning", "method": "tail: touched labels' head rows, distillation and a hinge to the parent",
            "parent": parent.id, "parent_sha256": parent.sha256,
            "data": {"volumes": [{"name": name, "shape": list(im.spatial_shape),
                                  "image_sha256": _array_sha256(im.data), "labels_sha256": _array_sha256(lab.data),
                                  "corrected_slices": list(picked)}
                                 for name, im, lab, picked in zip(volume_names(images), images, labels, slices)],
                     "corrected_slices": n_units, "windows": len(windows),
                     "propagated": {"reach_slices": PROPAGATION_REACH, "weight": PROPAGATED_WEIGHT,
                                    "voxels": n_propagated} if propagated else None},
            "steps": steps, "learning_rate": lr, "distill": options.distill, "seed": options.seed,
            "device": device, "wall_time_s": seconds_since(started), "caching_s": cached_s,
            "propagation_s": propagated_s,
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
