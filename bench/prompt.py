"""Prompt benchmark: DINO slice embedding (cache miss), cache read, and ``mv.prompt`` cold and warm.

One synthetic CT of ``--slices x --size x --size`` voxels, the liver painted on two slices, one
DINO backbone (``--model``; default a random ViT-S/14: speed does not depend on training).
Measures, one JSON line each (best of ``--repeat``; device and date in every line):

- ``content_hash``: SHA-256 of every voxel (the cache key);
- ``embed``: ``slice_features`` with an empty cache (compute; the zarr store is written by a
  background thread while the caller goes on);
- ``embed_stored``: the same until the store is on disk (``flush_cache_writes``);
- ``cache_read``: ``slice_features`` again (verify + read);
- ``prompt_cold``: ``mv.prompt(vol, annotations=<2 slices>)`` with an empty prompt cache (demons
  fields, DINO PCA and heads computed and stored; the DINO embeddings themselves are
  warm, as measured by ``embed``), for ``features`` "intensity" (``model=None``) and "intensity+dino";
- ``prompt_preview``: the Prompt panel's first answer to one more painted slice,
  ``prompt(..., previous=<the cold result>)``: only the slabs next to the new slice are redone,
  with the earlier head and choice from the cache, inside a window around the organ (``windows``);
- ``prompt_warm``: the next prompt of the same volume, one more slice painted: what depends on
  the pixels only is read from the cache, and the head fitted on the two slices serves as one
  leave-one-out fold (the Prompt panel's "annotate one more slice" case);
- ``registration_baseline``: ``prompt_baselines.affine_registration`` of another synthetic CT;
- ``prompt_preview_profile`` (``--profile``): the preview once more under cProfile, the project's
  functions that took longest (cumulative seconds; on a GPU a function that waits for the
  device is charged for what the device did before).

``demons`` in each line says who computed the fields between slices: SimpleITK on a CPU, torch on
a GPU (``tasks.prompting.demons``, the same fields); without SimpleITK installed the prompts run on torch
and ``--no-baseline`` skips the one part that still needs it.

Aims: embed <= 1 s and prompt <= 0.3 s for 300 slices on an H100; <= 100 ms per 256x256 slice
for the prompt from cache on a CPU.

    python bench/prompt.py --device cuda                              # 300x512x512 on the GPU machine
    python bench/prompt.py --device cpu --slices 12 --size 256        # a reduced CPU check
    python bench/prompt.py --device cpu --slices 300 --size 256 --no-dino --repeat 1   # the CPU aim
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads, {os.cpu_count()} cores)"


def timed(fn, repeat: int, sync: bool) -> tuple[float, object]:
    best, result = float("inf"), None
    for _ in range(repeat):
        if sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def profiled(fn, sync: bool, top: int = 15) -> tuple[float, dict[str, float]]:
    """``(seconds, {function: cumulative seconds})`` of one call of ``fn``: the project's slowest functions."""
    import cProfile
    import pstats

    profile = cProfile.Profile()
    start = time.perf_counter()
    profile.enable()
    fn()
    if sync:
        torch.cuda.synchronize()
    profile.disable()
    seconds = time.perf_counter() - start
    stats = pstats.Stats(profile).stats  # {(file, line, name): (calls, primitive, own, cumulative, callers)}
    ours = [(f"{Path(file).name}:{name}", value[3]) for (file, _, name), value in stats.items()
            if "napari_medvision" in file]
    ours.sort(key=lambda item: -item[1])
    return seconds, {name: round(cumulative, 4) for name, cumulative in ours[:top]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--model", default="random-vits14")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-baseline", action="store_true", help="skip the registration baseline")
    parser.add_argument("--no-dino", action="store_true",
                        help="intensity features only: skip the DINO embedding (minutes for 300 slices on a CPU)")
    parser.add_argument("--embed-only", action="store_true",
                        help="time the DINO embedding and cache read only (no prompting)")
    parser.add_argument("--profile", action="store_true", help="also profile the preview (where its time goes)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["MEDVISION_HOME"] = tempfile.mkdtemp(prefix="medvision-bench-")  # an empty cache

    from napari_medvision.engine.device import resolve_device
    from napari_medvision.engine.cache import content_hash, flush_cache_writes
    from napari_medvision.engine.embeddings import EmbeddingConfig, slice_features
    from napari_medvision.models.dino import load_backbone
    from napari_medvision.synthetic import ct_abdomen
    from napari_medvision.tasks.prompting import prompt

    device = resolve_device(args.device)
    sync = device.startswith("cuda")
    shape = (args.slices, args.size, args.size)
    image, labels = ct_abdomen(seed=0, shape=shape)
    liver = next(k for k, v in labels.labels.items() if v == "liver")
    present = np.flatnonzero((np.asarray(labels.data) == liver).reshape(shape[0], -1).any(1))
    chosen = [int(present[len(present) // 3]), int(present[2 * len(present) // 3])]
    painted = np.zeros(shape, dtype=np.uint8)
    painted[chosen] = (np.asarray(labels.data)[chosen] == liver).astype(np.uint8)
    annotations = labels.with_data(painted, labels={1: "liver"})
    backbone = load_backbone(args.model).to(device)
    from napari_medvision.tasks.prompting.propagate import demons_backend

    common = {"device": device_name(device), "date": date.today().isoformat(), "volume": list(shape),
              "model": backbone.name, "short_side": EmbeddingConfig().short_side,
              "demons": demons_backend(device)}

    def emit(measure: str, seconds: float, **extra) -> None:
        print(json.dumps({"bench": "prompt", "measure": measure, "seconds": round(seconds, 4),
                          "per_slice_ms": round(1000 * seconds / shape[0], 2), **common, **extra}), flush=True)

    seconds, _ = timed(lambda: content_hash(image.data), args.repeat, False)
    emit("content_hash", seconds, megabytes=round(image.data.nbytes / 2**20, 1))

    feats = None
    if not args.no_dino:
        # A warm-up on two slices (kernels, allocator), then the full volume into an empty cache.
        slice_features(image.data[:2], backbone, device=device, cache=False)
        start = time.perf_counter()
        seconds, feats = timed(lambda: slice_features(image, backbone, device=device, batch_size=args.batch_size),
                               1, sync)
        flush_cache_writes()
        stored = time.perf_counter() - start
        emit("embed", seconds, grid=list(feats.patch_grid), cache_megabytes=round(feats.features.nbytes / 2**20, 1))
        emit("embed_stored", stored)
        seconds, feats = timed(lambda: slice_features(image, backbone, device=device), args.repeat, sync)
        assert feats.from_cache
        emit("cache_read", seconds)
    if args.embed_only:
        return 0

    truth = np.asarray(labels.data) == liver
    more = sorted(set(chosen) | {int(present[len(present) // 2])})
    painted_more = np.zeros(shape, dtype=np.uint8)
    painted_more[more] = (np.asarray(labels.data)[more] == liver).astype(np.uint8)
    annotations_more = labels.with_data(painted_more, labels={1: "liver"})
    embeddings = Path(os.environ["MEDVISION_HOME"]) / "cache" / "embeddings"

    def empty_cache() -> None:
        """A fresh cache folder holding the DINO embeddings only (measured above as ``embed``)."""
        home = Path(tempfile.mkdtemp(prefix="medvision-bench-"))
        if feats is not None:
            shutil.copytree(embeddings / f"{feats.key}.zarr", home / "cache" / "embeddings" / f"{feats.key}.zarr")
        os.environ["MEDVISION_HOME"] = str(home)

    def dice_of(result) -> float:
        found = np.asarray(result.data) == 1
        return round(float(2 * (found & truth).sum() / max(found.sum() + truth.sum(), 1)), 3)

    empty_cache()
    runs = [("intensity", None)] + ([] if args.no_dino else [("intensity+dino", backbone)])
    prompt(image, annotations=annotations, model=runs[-1][1], device=device)  # warm-up (imports, kernels)
    for name, model in runs:
        cold = warm = preview = (float("inf"), None)
        for _ in range(args.repeat):  # each time: an empty cache, then the first prompt with one more slice
            empty_cache()
            first = timed(lambda: prompt(image, annotations=annotations, model=model, device=device), 1, sync)
            cold = min(cold, first, key=lambda t: t[0])
            preview = min(preview, timed(lambda: prompt(image, annotations=annotations_more, model=model,
                                                        device=device, previous=first[1]), 1, sync),
                          key=lambda t: t[0])
            warm = min(warm, timed(lambda: prompt(image, annotations=annotations_more, model=model, device=device),
                                   1, sync), key=lambda t: t[0])
        emit("prompt_cold", cold[0], features=name, dice_liver=dice_of(cold[1]), annotated=chosen,
             cached=cold[1].meta.get("cached"))
        emit("prompt_preview", preview[0], features=name, dice_liver=dice_of(preview[1]), annotated=more,
             redone=preview[1].meta.get("redone"), windows=preview[1].meta.get("windows"),
             cached=sorted(set(preview[1].meta.get("cached"))))
        emit("prompt_warm", warm[0], features=name, dice_liver=dice_of(warm[1]), annotated=more,
             cached=sorted(set(warm[1].meta.get("cached"))))
        if args.profile:
            seconds, stages = profiled(lambda: prompt(image, annotations=annotations_more, model=model,
                                                      device=device, previous=first[1]), sync)
            emit("prompt_preview_profile", seconds, features=name, stages=stages)

    if args.no_baseline:
        return 0
    try:
        from napari_medvision.tasks.prompting.baselines import affine_registration
    except ImportError:
        return 0
    other, other_labels = ct_abdomen(seed=1, shape=shape)
    mask = other_labels.with_data((np.asarray(other_labels.data) == liver).astype(np.uint8), labels={1: "liver"})
    seconds, result = timed(lambda: affine_registration(image, other, mask), args.repeat, False)
    found = np.asarray(result.data) == 1
    dice = 2 * (found & truth).sum() / max(found.sum() + truth.sum(), 1)
    emit("registration_baseline", seconds, dice_liver=round(float(dice), 3))
    return 0


if __name__ == "__main__":
    sys.exit(main())
