"""``mv.synthesize``: a new image (or label map) generated from a prompt pair by the MVG generalist.

The prompt pair says what to do: ``examples=[(t1, t2)]`` turns the input into a T2-like image,
``[(low_dose, normal_dose)]`` denoises, ``[(ct, organ_labels)]`` segments. Named ``task=`` values
bring their own simulated pair (``synthesis_tasks.TASKS``), except brain MR between T1, T2 and
FLAIR, which runs a model fitted on real pairs (``tasks.mr_contrast``). 3D volumes run slice by
slice, in batches, with a short filter along z so that slices do not flicker.
"""

from __future__ import annotations

import functools
import os
from typing import Optional, Sequence

import numpy as np

from ..engine.device import resolve_device
from ..engine.progress import CancelToken, ProgressFn, report
from ..engine.synthesis import UnitScale, generate_slices, greyscale, resize_slice, smooth_along_slices, unit_scale
from ..models.card import ModelCard
from ..models.registry import get_card, load_model
from ..volume import Volume
from .mr_contrast import MODEL_TASK as MR_CONTRAST_TASK
from .mr_contrast import synthesize_contrast
from .synthesis_tasks import TASKS, inpainting_holes

DEFAULT_MODEL = "mvg-generalist"
Example = tuple["Volume | np.ndarray", "Volume | np.ndarray"]


def synthesize(
    volume: Volume,
    model: str | os.PathLike | ModelCard = DEFAULT_MODEL,
    task: Optional[str] = None,
    examples: Optional[Sequence[Example]] = None,
    mask: "Volume | np.ndarray | None" = None,
    device: Optional[str] = None,
    steps: int = 1,
    overlap: float = 0.5,
    batch_size: int = 32,
    consistency: float = 0.7,
    seed: int = 0,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
) -> Volume:
    """A new Volume on ``volume``'s grid: an image, or a label map where the example targets are labels.

    task: a named task (``mv.synthesis_tasks()``); ignored when ``examples`` are given. Brain MR
        between T1, T2 and FLAIR runs the model fitted on real pairs (``meta["model"]`` names it;
        ``model=`` then only matters for ``examples=``); PD tasks are simulated pairs for MVG.
    examples: prompt pairs ``(image, target)`` (Volumes or arrays, 2D or 3D); with several, the
        outputs are averaged (prompt ensembling). The query is brought to the example's pixel
        spacing (the example sets the task's scale) unless the pair is in one unit space
        (denoising, inpainting): then it keeps its own pixels.
    mask: for inpainting, non-zero where the input should be filled in; the rest is kept as it was.
    steps: 1 fills the target in one pass; more generates it autoregressively in that many chunks.
    consistency: sigma, in slices, of the filter along z for 3D volumes (0 turns it off).
    A label map's grey levels are cut where Dice is best on the mirrored prompt pair
    (``meta["decoding"]`` and ``meta["decision_levels"]``; see ``_calibrated_bounds``).
    """
    source = volume.meta.get("source", "the image")
    if volume.is_labels:
        raise ValueError(f"{source}: is a label map; synthesize from the image it was drawn on")
    if volume.ndim not in (2, 3) or volume.n_leading:
        # a 4D series has 3 spatial axes and a leading one (n_leading): check both
        raise ValueError(f"{source}: synthesis takes a 2D image or a 3D volume, this one is "
                         f"{volume.ndim + volume.n_leading}D; pick one time point or channel first")
    card = get_card(model)
    if card.task == MR_CONTRAST_TASK:
        return synthesize_contrast(volume, card, progress, cancel)
    fitted = _fitted_task_model(volume, task, examples, source)
    if fitted is not None:
        return synthesize_contrast(volume, get_card(fitted), progress, cancel)
    if card.task != "synthesis":
        raise ValueError(f"model {card.id} is a {card.task} model; synthesis needs an MVG model "
                         f"(e.g. {DEFAULT_MODEL})")
    hole = _hole_mask(mask, volume, source)
    pairs = _prompt_pairs(volume, task, examples, hole, seed, source)
    device = resolve_device(device)
    network, card = load_model(card, device=device)
    return _run(network, volume, pairs, hole, device, steps, overlap, batch_size, consistency, progress, cancel)


def _run(network, volume, pairs, hole, device, steps, overlap, batch_size, consistency, progress, cancel) -> Volume:
    query = _stack(greyscale(np.asarray(volume.data), volume.rgb))
    query_scale = unit_scale(query, volume.modality or "")
    unit_query = query_scale.to_unit(query)
    if hole is not None:
        unit_query[hole] = 0.0  # HOLE_VALUE: the prompt pairs show the model what to do with it
    examples, target_scale = _prepared_examples(pairs, volume.modality)
    # Where the pair changes units (contrast, labels) the example sets the scale: anatomy must meet
    # anatomy of its size. Where it keeps them (denoising, inpainting) the operation is local and
    # the query keeps its own pixels: brought to a coarser example grid a small object loses the
    # detail to be kept, and a coarse scan brought to a finer one shows interpolated noise
    # (on the held-out CT denoising, keeping the query's grid gains up to 3 dB;
    # docs/evaluation/synthesis-mvg.md).
    same_units = target_scale.same_units_as(examples[0][3])
    outputs = []
    for k, (prompt_images, prompt_targets, image_spacing, _) in enumerate(examples):
        def prompt_for(i, n=len(query), images=prompt_images, targets=prompt_targets):
            # the example slice at the same relative height; a single query slice takes the
            # example's middle one (its first is usually the edge of the anatomy)
            m = len(images)
            j = int(round(i * (m - 1) / (n - 1))) if n > 1 else (m - 1) // 2
            return images[j], targets[j]

        def scaled(done, total, message, k=k):
            report(progress, k * total + done, len(examples) * total, message)

        work_shape = _working_shape(volume, None if same_units else image_spacing)
        slices = [resize_slice(s, work_shape) for s in unit_query]
        generated = generate_slices(network, slices, prompt_for, device=device, overlap=overlap,
                                    batch_size=batch_size, steps=steps, progress=scaled, cancel=cancel)
        outputs.append(np.stack([resize_slice(g, query.shape[1:]) for g in generated]))
    unit = np.mean(outputs, axis=0)
    if len(unit) > 1 and consistency > 0:
        unit = smooth_along_slices(unit, consistency)
    if target_scale.levels is not None:
        levels = target_scale.levels
        dtype = np.uint8 if levels[-1] < 256 else np.uint16
        names = _label_names(pairs[0][1], levels)
        bounds, how = _calibrated_bounds(network, examples[0], target_scale, device, overlap, batch_size, cancel)
        result = np.asarray(levels)[np.searchsorted(bounds, unit)].astype(dtype)
        out = volume.with_data(result[0] if volume.ndim == 2 else result, labels=names, rgb=False)
        out.meta.update(decoding=how, decision_levels=[round(float(b), 4) for b in bounds])
        return out
    out_scale = query_scale if same_units else target_scale
    data = out_scale.from_unit(unit)
    if hole is not None:
        data = np.where(hole, data, query)  # inpainting changes the holes only
    return volume.with_data(data[0] if volume.ndim == 2 else data, rgb=False, labels=None)


LEVELS = np.linspace(0.02, 0.5, 25)  # decision levels tried for a one-structure label map


def _calibrated_bounds(network, example, scale, device, overlap, batch_size, cancel) -> tuple[np.ndarray, str]:
    """Unit-space bounds between the label levels (``np.searchsorted`` decodes), fitted on the prompt pair.

    The generator draws thin structures faintly and layers with shifted grey levels: DRIVE vessels
    decoded at the midway level score a Dice near 0.1 on held-out photos. So up to four slices of
    the prompt image, mirrored left to right so that the pair cannot simply be copied back, are
    generated with the pair as prompt, and the decoding that scores the best mean Dice against the
    mirrored target is used: for one structure the level of ``LEVELS``; for several, the midway
    bounds or bounds at the quantiles that give each label its share of the target's pixels.
    """
    images, targets = example[0], example[1]
    units = scale.to_unit(np.asarray(scale.levels, dtype=np.float32))
    midway = (units[1:] + units[:-1]) / 2
    picks = np.unique(np.linspace(0, len(images) - 1, min(len(images), 4)).round().astype(int))
    queries = [np.ascontiguousarray(images[j][:, ::-1]) for j in picks]
    outputs = generate_slices(network, queries, lambda i: (images[picks[i]], targets[picks[i]]), device=device,
                              overlap=overlap, batch_size=batch_size, cancel=cancel)
    generated = np.concatenate([o.ravel() for o in outputs])
    truth = np.searchsorted(midway, np.concatenate([targets[j][:, ::-1].ravel() for j in picks]))

    def score(bounds):
        found = np.searchsorted(bounds, generated)
        dice = [2 * np.count_nonzero((found == k) & (truth == k)) / max(np.count_nonzero(found == k)
                                                                         + np.count_nonzero(truth == k), 1)
                for k in range(1, len(units)) if (truth == k).any()]
        return float(np.mean(dice)) if dice else 0.0

    if len(units) == 2:
        candidates = {f"level {t:.2f}": np.array([t]) for t in LEVELS}
    else:
        shares = np.cumsum(np.bincount(truth, minlength=len(units)))[:-1] / truth.size
        candidates = {"midway": midway, "quantiles": np.quantile(generated, shares)}
    how = max(candidates, key=lambda name: score(candidates[name]))
    return candidates[how], how


def _prepared_examples(pairs, modality):
    """Each pair as (unit images, unit targets, in-plane spacing, image scale), and the targets' scale.

    Label-map targets share one scale over all examples (grey level = id / largest id of any
    example), so that averaging their outputs compares like with like; image targets keep the
    first example's scale for the output's units.
    """
    raw = []
    for k, (image, target) in enumerate(pairs):
        image_data, image_spacing, image_modality, _ = _example_arrays(image, modality)
        target_data, _, _, target_is_labels = _example_arrays(target, modality)
        if image_data.shape != target_data.shape:
            raise ValueError(f"example {k + 1}: the image has shape {image_data.shape}"
                             f" but its target {target_data.shape}: a prompt pair must lie on one grid")
        raw.append((image_data, target_data, image_spacing, image_modality, target_is_labels))
    kinds = {is_labels for *_, is_labels in raw}
    if len(kinds) > 1:
        raise ValueError("the examples mix label-map and image targets: give one kind of target")
    if kinds == {True}:
        levels = sorted(set().union(*(unit_scale(t, is_labels=True).levels for _, t, *_ in raw)))
        target_scale = UnitScale(0.0, float(max(levels[-1], 1)), "labels", tuple(levels))
        target_scales = [target_scale] * len(raw)
    else:
        # a target in the image's modality: CT stays in HU, others take their own percentiles
        target_scales = [unit_scale(target, image_modality) for _, target, _, image_modality, _ in raw]
        target_scale = target_scales[0]
    examples = []
    for (image, target, spacing, image_modality, _), t_scale in zip(raw, target_scales):
        i_scale = unit_scale(image, image_modality)
        examples.append((i_scale.to_unit(image), t_scale.to_unit(target), spacing, i_scale))
    return examples, target_scale


def _stack(data: np.ndarray) -> np.ndarray:
    return data[None] if data.ndim == 2 else data


def _example_arrays(item, modality):
    """(z, y, x) greyscale array, in-plane spacing or None, modality, is-labels of one example item."""
    if isinstance(item, Volume):
        data = greyscale(np.asarray(item.data), item.rgb) if not item.is_labels else np.asarray(item.data)
        return _stack(data), tuple(item.spacing[-2:]), item.modality or modality or "", item.is_labels
    data = np.asarray(item)
    is_labels = data.dtype.kind in "iub" and data.ndim in (2, 3) and len(np.unique(data)) <= 32
    if data.ndim == 3 and data.shape[-1] == 3 and not is_labels:
        data = greyscale(data, True)
    return _stack(data), None, modality or "", is_labels


def _working_shape(volume: Volume, example_spacing) -> tuple[int, int]:
    """The query slice's shape at the example's pixel spacing: the example sets the scale of the task."""
    shape = volume.spatial_shape[-2:]
    if example_spacing is None:
        return tuple(shape)
    # An example of another scale by more than these factors is of another kind of image (e.g. a
    # fundus photo in micrometre pixels for an MR in millimetres): keep the query near its own size.
    factors = [float(np.clip(s / e, 1 / 8, 4)) for s, e in zip(volume.spacing[-2:], example_spacing)]
    return tuple(max(8, int(round(n * f))) for n, f in zip(shape, factors))


def _label_names(target, levels) -> dict[int, str]:
    names = dict(target.labels or {}) if isinstance(target, Volume) else {}
    return {int(v): names.get(int(v), f"label {int(v)}") for v in levels if v != 0}


def _hole_mask(mask, volume: Volume, source: str) -> np.ndarray | None:
    if mask is None:
        return None
    data = np.asarray(mask.data if isinstance(mask, Volume) else mask) != 0
    if data.shape != tuple(volume.spatial_shape):
        raise ValueError(f"{source}: the inpainting mask has shape {data.shape}, the image {tuple(volume.spatial_shape)}")
    if not data.any():
        raise ValueError(f"{source}: the inpainting mask is empty; paint the region to fill")
    return _stack(data)


def _fitted_task_model(volume: Volume, task, examples, source: str) -> str | None:
    """The id of the model fitted on real pairs that runs named ``task``, or None (MVG runs it)."""
    if examples or task not in TASKS or not TASKS[task].model:
        return None
    _check_task_modality(volume, task, source)
    return TASKS[task].model


def _check_task_modality(volume: Volume, task: str, source: str) -> None:
    wanted = TASKS[task].modality
    if wanted and volume.modality and volume.modality.upper() != wanted.upper():
        raise ValueError(f"{source}: task {task!r} works on {wanted} images, this one is {volume.modality}")


def _prompt_pairs(volume: Volume, task, examples, hole, seed: int, source: str) -> list[Example]:
    if examples:
        pairs = [tuple(pair) for pair in examples]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError("each example is a pair (image, target)")
        return pairs
    if task is None:
        raise ValueError(f"{source}: say what to synthesize: task= one of {', '.join(sorted(TASKS))}, "
                         "or examples=[(image, target)]")
    if task not in TASKS:
        raise ValueError(f"unknown synthesis task {task!r}; known: {', '.join(sorted(TASKS))}")
    _check_task_modality(volume, task, source)
    if task == "inpaint":
        if hole is None:
            raise ValueError(f"{source}: inpainting needs mask= marking the region to fill")
        return _self_inpainting_pairs(volume, hole, seed)
    return _named_task_examples(task, seed)


@functools.lru_cache(maxsize=4)
def _named_task_examples(task: str, seed: int) -> list[Example]:
    """A named task's simulated pairs, kept for reruns: simulating them takes seconds (never modified)."""
    return TASKS[task].make_examples(seed)


def _self_inpainting_pairs(volume: Volume, hole: np.ndarray, seed: int) -> list[Example]:
    """A prompt pair cut from the input itself: its mirror image with new holes, and the mirror image.

    Mirrored left to right, so that the prompt tile paired with each query tile never shows the
    content under the user's own mask at the same place (the model would copy it back).
    """
    rng = np.random.default_rng(seed)
    query = _stack(greyscale(np.asarray(volume.data), volume.rgb))
    mirrored, mirrored_hole = query[..., ::-1].copy(), hole[..., ::-1]
    fill = unit_scale(query, volume.modality or "").from_unit(np.zeros(1))[0]
    holed = mirrored.copy()
    for z in range(len(query)):
        holed[z][inpainting_holes(query.shape[1:], rng) & ~mirrored_hole[z]] = fill

    def as_volume(data):
        return volume.with_data(data if volume.ndim == 3 else data[0], rgb=False)

    return [(as_volume(holed), as_volume(mirrored))]
