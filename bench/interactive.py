"""Interactive prompts with a simulated user on real labelled scans: Dice after 1, 3, 5, 10 clicks and
after one box, and the time of each interaction. Prints one JSON line per object and per timing.

The simulated user clicks first at the centre of the object (the voxel farthest from its border),
then at the centre of the largest error region, positive where that region is object, negative
where it is not. Data (``/work/shared/data`` or ``$MEDVISION_DATA``), with the part used to tune
the method (``split: tune``) and the part reported (``split: report``):

- tune: TotalSegmentator's abdominal MR (spleen, kidneys, liver), BraTS 2013 patient 1, and in
  TotalSegmentator's abdominal CT ten structures other than the target organs (``CT_TUNE``:
  gallbladder, stomach, colon, both autochthon muscles, L1, IVC, aorta, duodenum, right lower lung
  lobe) and the liver (the liver test showed the leak rule stopping early in it);
- report: TotalSegmentator's abdominal CT spleen and kidneys, BraTS 2013 patients 2-4
  (whole tumour, labels > 0, FLAIR), NSCLC LUNG1-001 (left and right lung).

    python bench/interactive.py [--only ct|ct-tune|mr|brats|brats-tune|lungs|timing] [--clicks 10]
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
from napari_medvision.tasks.interactive import InteractiveSession  # noqa: E402

DATA = Path(os.environ.get("MEDVISION_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
ORGANS = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 5: "liver"}
CT_TUNE = {4: "gallbladder", 6: "stomach", 20: "colon", 86: "autochthon_left", 87: "autochthon_right",
           31: "vertebrae_L1", 63: "inferior_vena_cava", 52: "aorta", 19: "duodenum", 14: "lung_lower_lobe_right"}
TUNED_CT_ORGANS = {"liver"}  # target organs the method's constants were chosen on
CHECKPOINTS = (1, 3, 5, 10)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return float(2 * (a & b).sum() / total) if total else 1.0


def centre_of(region: np.ndarray, spacing) -> tuple[int, int, int]:
    """The voxel of ``region`` farthest from its border (distance transform in mm, on its bounding box)."""
    box = ndi.find_objects(region.astype(np.uint8))[0]
    crop = np.pad(region[box], 1)
    distance = ndi.distance_transform_edt(crop, sampling=spacing)
    at = np.unravel_index(int(np.argmax(distance)), crop.shape)
    return tuple(int(i) - 1 + s.start for i, s in zip(at, box))


def next_click(truth: np.ndarray, mask: np.ndarray, spacing):
    """The simulated user's next click: centre of the largest error region, and its sign."""
    error = truth ^ mask
    labels, n = ndi.label(error)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    largest = labels == (int(np.argmax(sizes)) + 1)
    point = centre_of(largest, spacing)
    return point, bool(truth[point])


def clicks_run(session: InteractiveSession, truth: np.ndarray, clicks: int) -> tuple[dict, list]:
    """Dice after each checkpoint of simulated clicks, and each interaction's seconds."""
    spacing = session.spacing
    out, times = {}, []
    mask = np.zeros_like(truth)
    for k in range(1, clicks + 1):
        click = (centre_of(truth, spacing), True) if k == 1 else next_click(truth, mask, spacing)
        if click is None:
            break
        start = time.perf_counter()
        mask = session.add_point(click[0], positive=click[1])
        times.append(time.perf_counter() - start)
        if k in CHECKPOINTS:
            out[f"dice_{k}"] = round(dice(mask, truth), 4)
    for k in CHECKPOINTS:  # a perfect mask before the last checkpoint keeps its Dice
        if k <= clicks and f"dice_{k}" not in out:
            out[f"dice_{k}"] = round(dice(mask, truth), 4)
    session.reset()
    return out, times


def box_runs(session: InteractiveSession, truth: np.ndarray) -> dict:
    """Dice after one 3D box (the object's bounding box) and after one box on its largest slice."""
    out = {}
    box = ndi.find_objects(truth.astype(np.uint8))[0]
    start = time.perf_counter()
    mask = session.add_box([s.start for s in box], [s.stop - 1 for s in box])
    out["box3d_seconds"] = round(time.perf_counter() - start, 3)
    out["box3d_dice"] = round(dice(mask, truth), 4)
    session.reset()
    z = int(np.argmax(truth.sum((1, 2))))
    plane = ndi.find_objects(truth[z].astype(np.uint8))[0]
    mask = session.add_box([z, plane[0].start, plane[1].start], [z, plane[0].stop - 1, plane[1].stop - 1])
    out["box2d_dice"] = round(dice(mask, truth), 4)
    session.reset()
    return out


def evaluate(name: str, split, image, objects: dict, clicks: int) -> None:
    """split: "tune", "report", or a function of the object's name giving one of them."""
    session = InteractiveSession(image)
    for label, truth in objects.items():
        row, times = clicks_run(session, truth, clicks)
        row.update(box_runs(session, truth))
        part = split(label) if callable(split) else split
        print(json.dumps({"bench": "interactive", "data": name, "split": part, "object": label,
                          "shape": list(truth.shape), "voxels": int(truth.sum()), **row,
                          "seconds_mean": round(float(np.mean(times)), 3),
                          "seconds_max": round(float(np.max(times)), 3),
                          "device": device_name(), "date": date.today().isoformat()}), flush=True)


def device_name() -> str:
    return f"{os.cpu_count()}-core {platform.machine()} CPU"


def totalseg(kind: str, clicks: int, structures: dict = ORGANS) -> None:
    folder = DATA / "ct_mr_totalseg"
    image = mv.load(folder / f"example_{kind}_sm.nii.gz")
    seg = np.asarray(mv.load(folder / ("example_seg.nii.gz" if kind == "ct" else "example_seg_mr.nii.gz")).data)
    objects = {name: seg == value for value, name in structures.items() if (seg == value).any()}
    if kind == "ct" and structures is ORGANS:
        split = lambda name: "tune" if name in TUNED_CT_ORGANS else "report"  # noqa: E731
    else:
        split = "tune"
    evaluate(f"totalseg-{kind}", split, image, objects, clicks)


def brats(patients, split: str, clicks: int) -> None:
    for p in patients:
        folder = DATA / "mri_brain_tumour_brats2013" / f"brats_2013_pat000{p}_1"
        image = mv.load(folder / "Flair_subtrMeanDivStd.nii.gz")
        truth = np.asarray(mv.load(folder / "OTMultiClass.nii.gz").data) > 0
        evaluate(f"brats2013-pat{p}-flair", split, image, {"whole tumour": truth}, clicks)


def lungs(clicks: int) -> None:
    folder = DATA / "ct_chest_nsclc"
    image = mv.load(folder / "LUNG1-001_ct.nii.gz")
    seg = np.asarray(mv.load(folder / "LUNG1-001_labels.nii.gz").data)
    evaluate("nsclc-lung1-001", "report", image, {"lung left": seg == 1, "lung right": seg == 2}, clicks)


def timing() -> None:
    """Seconds per interaction at 256^3, from a warm cache: BraTS patient 2's FLAIR padded to 256^3
    (MR), and the abdominal CT resampled to 256^3 (linear; CT soft tissue, where the growth is
    watched for leaks) clicked on its liver. "Prepare" builds the working grid without the cache."""
    folder = DATA / "mri_brain_tumour_brats2013" / "brats_2013_pat0002_1"
    image = mv.load(folder / "Flair_subtrMeanDivStd.nii.gz")
    truth = np.asarray(mv.load(folder / "OTMultiClass.nii.gz").data) > 0
    pad = [(0, 256 - n) for n in image.data.shape]
    mr = (image.with_data(np.pad(np.asarray(image.data, dtype=np.float32), pad)), np.pad(truth, pad))
    folder = DATA / "ct_mr_totalseg"
    image = mv.load(folder / "example_ct_sm.nii.gz")
    liver = np.asarray(mv.load(folder / "example_seg.nii.gz").data) == 5
    zoom = [256 / n for n in image.data.shape]
    spacing = tuple(float(s) / z for s, z in zip(image.spacing, zoom))
    ct_image = image.with_data(ndi.zoom(np.asarray(image.data, dtype=np.float32), zoom, order=1), spacing=spacing)
    ct = (ct_image, ndi.zoom(liver.astype(np.uint8), zoom, order=0).astype(bool))
    for name, (image, truth) in (("mr-brats2-flair", mr), ("ct-abdomen-liver", ct)):
        start = time.perf_counter()
        InteractiveSession(image, use_cache=False)
        cold = time.perf_counter() - start
        InteractiveSession(image)  # fills the cache if this scan was never seen
        start = time.perf_counter()
        session = InteractiveSession(image)
        warm = time.perf_counter() - start
        _, times = clicks_run(session, truth, 5)
        z = centre_of(truth, session.spacing)[0]
        session.add_point(centre_of(truth, session.spacing))
        previews = []
        for _ in range(5):
            start = time.perf_counter()
            session.preview_slice(z)
            previews.append(time.perf_counter() - start)
        print(json.dumps({"bench": "interactive-timing", "data": name, "shape": list(image.data.shape),
                          "prepare_s": round(cold, 3), "session_warm_s": round(warm, 3),
                          "click_s_mean": round(float(np.mean(times)), 3),
                          "click_s_max": round(float(np.max(times)), 3),
                          "preview_s_max": round(float(np.max(previews)), 3), "load_average": os.getloadavg()[0],
                          "device": device_name(), "date": date.today().isoformat()}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["ct", "ct-tune", "mr", "brats", "brats-tune", "lungs", "timing"])
    parser.add_argument("--clicks", type=int, default=10)
    args = parser.parse_args()
    runs = {"mr": lambda: totalseg("mr", args.clicks), "brats-tune": lambda: brats([1], "tune", args.clicks),
            "ct-tune": lambda: totalseg("ct", args.clicks, CT_TUNE),
            "ct": lambda: totalseg("ct", args.clicks), "brats": lambda: brats([2, 3, 4], "report", args.clicks),
            "lungs": lambda: lungs(args.clicks), "timing": timing}
    for name, run in runs.items():
        if args.only in (None, name):
            run()


if __name__ == "__main__":
    main()
