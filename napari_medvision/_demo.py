"""The quick-start job: the sample CT, segmented by the shipped CT model, saved and pictured.

Makes the synthetic sample CT, saves it, reads it back (checking the round trip), segments it
with the shipped abdominal CT model, saves the label map, scores it against the phantom's
truth, and pictures the result: a napari screenshot of the files opened through the plugin
when a display is available, else a PNG of the middle slice with the organ outlines.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from PIL import Image

from . import io, synthetic
from ._napari.demo import screenshot_files

DEMO_MODEL = "ct-abdomen-organs-3d"


def run_demo(output: Path, headless: bool = True, model: str = DEMO_MODEL) -> dict:
    """Write the sample CT, its segmentation and a picture into ``output``; return a summary."""
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    image, truth = synthetic.sample("ct", seed=0)
    image_path = io.save(image, output / "sample_ct.nii.gz")
    reread = io.load(image_path)
    if not (np.array_equal(np.asarray(reread.data), np.asarray(image.data)) and reread.same_grid(image, tol=1e-6)):
        raise RuntimeError(f"{image_path}: the saved sample does not read back identically")
    summary: dict = {"image": str(image_path), "shape": list(image.data.shape), "spacing_mm": list(image.spacing)}
    shown = [image_path]
    labels = truth
    segmentation = _segment(reread, model)
    if segmentation is not None:
        seg_path = io.save(segmentation, output / "sample_ct_segmentation.nii.gz")
        shown.append(seg_path)
        labels = segmentation
        summary.update(segmentation=str(seg_path), model=model,
                       segment_seconds=segmentation.meta.get("seconds"),
                       dice_vs_phantom_truth=_dice_by_name(segmentation, truth))
    else:
        truth_path = io.save(truth, output / "sample_ct_labels.nii.gz")
        shown.append(truth_path)
        summary.update(labels=str(truth_path), model=None,
                       note=f"shipped model {model!r} not found: showing the phantom's own labels")
    if headless:
        picture = output / "sample_ct_slice.png"
        _slice_picture(image, labels, picture)
    else:
        picture = output / "screenshot.png"
        screenshot_files(shown, picture)
    summary.update(picture=str(picture), seconds=round(time.perf_counter() - start, 2))
    (output / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _segment(image, model: str):
    try:
        from .models import registry
        from .tasks.segment import segment
    except ImportError:  # torch not installed: I/O-only installation
        return None
    if not any(card.id == model for card in registry.available()):
        return None
    return segment(image, model=model)


def _dice_by_name(prediction, truth) -> dict[str, float]:
    """Dice per structure, matching labels by name (the model and the phantom number them alike)."""
    pred, ref = np.asarray(prediction.data), np.asarray(truth.data)
    truth_ids = {name: i for i, name in truth.labels.items()}
    scores = {}
    for i, name in prediction.labels.items():
        if name not in truth_ids:
            continue
        p, t = pred == i, ref == truth_ids[name]
        if t.any():
            scores[name] = round(float(2 * (p & t).sum() / (p.sum() + t.sum())), 3)
    return scores


def _slice_picture(image, labels, path: Path) -> None:
    """Middle axial slice in a soft-tissue window with label outlines, as an 8-bit PNG."""
    from scipy import ndimage

    z = image.data.shape[0] // 2
    hu = np.asarray(image.data[z], dtype=np.float32)
    grey = np.clip((hu + 160.0) / 400.0, 0, 1) * 255
    rgb = np.repeat(grey[..., None], 3, axis=2).astype(np.uint8)
    lab = np.asarray(labels.data[z])
    edges = lab != ndimage.grey_erosion(lab, size=3)
    palette = np.array([[0, 0, 0]] + [[(97 * i) % 255, (57 * i + 90) % 255, (151 * i + 40) % 255]
                                      for i in range(1, 256)], dtype=np.uint8)
    rgb[edges & (lab > 0)] = palette[lab[edges & (lab > 0)]]
    Image.fromarray(rgb).save(path)
