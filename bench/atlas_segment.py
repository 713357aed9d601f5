"""Atlas-backed segmentation on real scans kept apart from the atlas: Dice, air/table voxels, seconds.

Cases (one JSON line each, per method: the network alone, the atlas alone, atlas + network):

- ``ct-deformed``: the shipped CT atlas against a copy of its own scan, deformed by a random smooth
  field (fixed seed, up to ~9 mm), its soft tissue re-contrasted and noised, resampled to
  2 x 0.98 x 0.98 mm and cut to a 20-slice slab off the scan's middle (the shape of the issue's unseen CT). A
  registration test: the reference is the warped atlas labels. The network trained on slices
  0-16 of this scan.
- ``ct-from-mr-atlas``: the real CT segmented with the shipped MR atlas of another patient
  (cross-modality, affine only), with and without the CT network; Dice on the CT's slices 20-29,
  which the network never trained on.
- ``mr-from-ct-atlas``: the real MR segmented with the CT atlas of another patient (atlas alone).
- ``chest-ct``: NSCLC LUNG1-001 (134 x 512 x 512, clinical lung contours): lungs' Dice over the whole
  scan (the abdominal atlas reaches only the lung bases), the share of voxels labelled lung that lie
  in that lung (precision), of organ voxels below -500 HU and outside the body, seconds.
- ``brain-head``: ``mr-brain-tissue-3d`` on ITK's real head T1 (skull and face in view; never seen by the
  network or the brain atlas): the share of labelled voxels outside its skull-stripped brain, and
  the brain's Dice.
- ``--large``: a 300 x 512 x 512 scan (the chest CT resampled along z, its lung contours with it):
  seconds and the same lung figures as ``chest-ct``.

Each row has ``seconds`` (wall), ``cpu_seconds`` (this process's CPU time: what a shared machine's
load inflates least), the one-minute load average when the row ended, and ``timings`` (the atlas
path's stages, wall seconds).

    python bench/atlas_segment.py            # ~5 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import napari_medvision as mv  # noqa: E402
from napari_medvision import atlases  # noqa: E402
from napari_medvision.engine.inference import predict_labels  # noqa: E402
from napari_medvision.engine.resample import to_model_grid  # noqa: E402
from napari_medvision.models.registry import load_model  # noqa: E402
from napari_medvision.tasks.atlas_segment import AIR_HU, AtlasOptions, body_mask, segment_with_atlases  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FIVE = ("liver", "spleen", "stomach", "pancreas", "aorta")
ORGANS = FIVE + ("kidney_left", "kidney_right")
AIR_OK = ("lung_left", "lung_right", "colon", "small_bowel")


def dice_by_name(seg, ref, names, where=None) -> dict:
    out = {}
    seg_ids = {v: k for k, v in (seg.labels or {}).items()}
    ref_ids = {v: k for k, v in (ref.labels or {}).items()}
    s_data, r_data = np.asarray(seg.data), np.asarray(ref.data)
    if where is not None:
        s_data, r_data = s_data[where], r_data[where]
    for name in names:
        if name not in ref_ids:
            continue
        b = r_data == ref_ids[name]
        if not b.any():
            continue
        a = s_data == seg_ids[name] if name in seg_ids else np.zeros_like(b)
        out[name] = round(float(2 * (a & b).sum() / (a.sum() + b.sum())), 4)
    return out


def air_shares(seg, image) -> dict:
    """Shares of the labelled voxels (lungs and bowel excluded) below -500 HU and outside the body."""
    labels, hu = np.asarray(seg.data), np.asarray(image.data)
    allowed = [k for k, v in seg.labels.items() if v in AIR_OK]
    organ = (labels > 0) & ~np.isin(labels, allowed)
    n = max(int(organ.sum()), 1)
    body = body_mask(hu.astype(np.float32), "CT")
    return {"organ_voxels_below_-500HU": round(float((organ & (hu < AIR_HU)).sum() / n), 4),
            "labelled_voxels_outside_body": round(float(((labels > 0) & ~body).sum() / max((labels > 0).sum(), 1)), 4)}


def lung_precision(seg, ref) -> dict:
    """Of the voxels labelled lung_left / lung_right, the share inside that lung's clinical contour."""
    out = {}
    seg_ids = {v: k for k, v in seg.labels.items()}
    for name, k in (("lung_left", 1), ("lung_right", 2)):
        labelled = np.asarray(seg.data) == seg_ids[name]
        out[f"{name}_precision"] = round(float((labelled & (np.asarray(ref.data) == k)).sum() / max(labelled.sum(), 1)), 4)
    return out


def deformed_copy(image, labels, seed=0):
    """The scan and labels through a random smooth deformation, re-contrasted, at 2 x 0.98 x 0.98 mm, 20 slices."""
    rng = np.random.default_rng(seed)
    shape = image.spatial_shape
    field = [ndi.gaussian_filter(rng.standard_normal(shape), 6.0) for _ in range(3)]
    scale = 3.0 / max(float(np.abs(f).max()) for f in field)  # up to 3 voxels = 9 mm
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
    coords = [g + scale * f for g, f in zip(grid, field)]
    hu = ndi.map_coordinates(np.asarray(image.data, np.float32), coords, order=1, mode="nearest")
    lab = ndi.map_coordinates(np.asarray(labels.data), coords, order=0, mode="nearest")
    soft = (hu > -150) & (hu < 400)  # another contrast phase: soft tissue brighter and wider, noise
    hu = np.where(soft, 1.25 * hu + 35.0, hu) + rng.normal(0, 12.0, shape)
    img = to_model_grid(image.with_data(hu.astype(np.float32)), (2.0, 0.98, 0.98))
    lab = to_model_grid(labels.with_data(lab), (2.0, 0.98, 0.98))
    z0 = img.spatial_shape[0] - 20 - 4  # a slab off the middle, toward the upper abdomen
    cut = lambda v: v.with_data(np.ascontiguousarray(np.asarray(v.data)[z0:z0 + 20]),  # noqa: E731
                                origin=tuple(np.asarray(v.origin) + v.direction @ np.array([z0 * v.spacing[0], 0, 0])))
    return cut(img), cut(lab)


METHODS = ("network", "atlas", "atlas+network")


def run(volume, method, network, card, sets):
    """``(labels, (wall seconds, CPU seconds))`` of one method on one scan."""
    start, cpu = time.perf_counter(), time.process_time()
    if method == "network":
        seg = predict_labels(network, card, volume)
    elif method == "atlas":
        seg = segment_with_atlases(volume, sets, options=AtlasOptions())
    else:
        seg = segment_with_atlases(volume, sets, network=network, card=card)
    return seg, (round(time.perf_counter() - start, 2), round(time.process_time() - cpu, 2))


def emit(case, method, seg, seconds, scores, extra=None):
    five = [scores[n] for n in FIVE if n in scores]
    wall, cpu = seconds
    row = {"bench": "atlas_segment", "case": case, "method": method, "dice": scores,
           "mean_dice_five": round(float(np.mean(five)), 4) if five else None, "seconds": wall, "cpu_seconds": cpu,
           "load_average_1min": round(os.getloadavg()[0], 2), "timings": seg.meta.get("timings"),
           "atlases": [(e["atlas"], e.get("registration"), e.get("deformable")) for e in seg.meta.get("atlases", [])],
           "fallback": seg.meta.get("fallback"), "device": "CPU " + platform.machine() + f" ({os.cpu_count()} cores)",
           "date": date.today().isoformat()}
    row.update(extra or {})
    print(json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cases", default="ct-deformed,ct-from-mr-atlas,mr-from-ct-atlas,chest-ct,brain-head")
    parser.add_argument("--large", action="store_true", help="also time a 300x512x512 scan")
    parser.add_argument("--methods", default="network,atlas,atlas+network", help="which of the three to run")
    parser.add_argument("--seed", type=int, default=1, help="of the deformed copy (seed 0 chose network_weight)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    network, card = load_model("ct-abdomen-organs-3d")
    ct_atlas, mr_atlas = atlases.get("totalseg-ct-abdomen"), atlases.get("totalseg-mr-abdomen")
    cases = args.cases.split(",")
    if "ct-deformed" in cases:
        image, labels = deformed_copy(*ct_atlas.member(0), seed=args.seed)
        for method in [m for m in METHODS if m in args.methods.split(",")]:
            seg, seconds = run(image, method, network, card, [ct_atlas])
            emit(f"ct-deformed-seed{args.seed}", method, seg, seconds, dice_by_name(seg, labels, ORGANS), air_shares(seg, image))
    if "ct-from-mr-atlas" in cases:
        image, ct_labels = ct_atlas.member(0)
        held_out = (slice(20, 30),)
        for method in [m for m in METHODS if m in args.methods.split(",")]:
            sets = [mr_atlas]
            seg, seconds = run(image, method, network, card, sets)
            emit("ct-from-mr-atlas", method, seg, seconds, dice_by_name(seg, ct_labels, ORGANS, held_out),
                 air_shares(seg, image))
    if "mr-from-ct-atlas" in cases:
        image, mr_labels = mr_atlas.member(0)
        seg, seconds = run(image, "atlas", None, None, [ct_atlas])
        emit("mr-from-ct-atlas", "atlas", seg, seconds, dice_by_name(seg, mr_labels, ORGANS))
    if "chest-ct" in cases or args.large:
        chest = mv.load(DATA / "ct_chest_nsclc" / "LUNG1-001_ct.nii.gz")
        chest.modality = "CT"
        ref = mv.load(DATA / "ct_chest_nsclc" / "LUNG1-001_labels.nii.gz")
        ref = ref.with_data(ref.data, labels={1: "lung_left", 2: "lung_right", 3: "spinal_cord", 4: "tumour"})
    if "chest-ct" in cases:
        for method in [m for m in ("network", "atlas+network") if m in args.methods.split(",")]:
            seg, seconds = run(chest, method, network, card, [ct_atlas])
            emit("chest-ct", method, seg, seconds, dice_by_name(seg, ref, ("lung_left", "lung_right")),
                 {"shape": list(chest.spatial_shape), **air_shares(seg, chest), **lung_precision(seg, ref),
                  "atlas_coverage_of_body": seg.meta.get("atlas_coverage_of_body")})
    if "brain-head" in cases:
        brain_network, brain_card = load_model("mr-brain-tissue-3d")
        root = DATA / "mri_brain_t1_itk"
        head = mv.load(root / "KmeansTest_T1UCharRaw.nii.gz")
        head.modality = "MR"
        brain = np.asarray(mv.load(root / "KmeansTest_T1RawSkullStrip.nii.gz").data) > 0
        for method in [m for m in ("network", "atlas+network") if m in args.methods.split(",")]:
            seg, seconds = run(head, method, brain_network, brain_card, atlases.for_model("mr-brain-tissue-3d"))
            labelled = np.asarray(seg.data) > 0
            emit("brain-head", method, seg, seconds, {}, {
                "shape": list(head.spatial_shape),
                "labelled_share_outside_brain": round(float((labelled & ~brain).sum() / max(labelled.sum(), 1)), 4),
                "brain_dice": round(float(2 * (labelled & brain).sum() / (labelled.sum() + brain.sum())), 4)})
    if args.large:
        spacing = (134 * 3.0 / 300, chest.spacing[1], chest.spacing[2])
        big = to_model_grid(chest, spacing)
        big = big.with_data(np.asarray(big.data)[:300])
        big_ref = to_model_grid(ref, spacing)
        big_ref = big_ref.with_data(np.asarray(big_ref.data)[:300])
        seg, seconds = run(big, "atlas+network", network, card, [ct_atlas])
        emit("large-300x512x512", "atlas+network", seg, seconds,
             dice_by_name(seg, big_ref, ("lung_left", "lung_right")),
             {"shape": list(big.spatial_shape), **air_shares(seg, big), **lung_precision(seg, big_ref),
              "atlas_coverage_of_body": seg.meta.get("atlas_coverage_of_body")})


if __name__ == "__main__":
    main()
