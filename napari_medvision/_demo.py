"""The quick-start job: make the sample CT, save it, read it back, and picture it.

With a display, the picture is a napari screenshot of the files opened through the plugin;
headless, a PNG of the middle slice with the organ outlines drawn over it.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from . import io, synthetic


def run_demo(output: Path, headless: bool = True) -> dict:
    """Write the sample CT, its labels and a picture into ``output``; return what was written."""
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    image, labels = synthetic.sample("ct", seed=0)
    image_path = io.save(image, output / "sample_ct.nii.gz")
    labels_path = io.save(labels, output / "sample_ct_labels.nii.gz")
    reread = io.load(image_path)
    if not (np.array_equal(np.asarray(reread.data), np.asarray(image.data)) and reread.same_grid(image, tol=1e-6)):
        raise RuntimeError(f"{image_path}: the saved sample does not read back identically")
    if headless:
        picture = output / "sample_ct_slice.png"
        _slice_picture(image, labels, picture)
    else:
        from ._napari.demo import screenshot_files

        picture = output / "screenshot.png"
        screenshot_files([image_path, labels_path], picture)
    return {
        "image": str(image_path),
        "labels": str(labels_path),
        "picture": str(picture),
        "shape": list(image.data.shape),
        "spacing_mm": list(image.spacing),
        "organs": sorted(labels.labels.values()),
        "seconds": round(time.perf_counter() - start, 2),
    }


def _slice_picture(image, labels, path: Path) -> None:
    """Middle axial slice in a soft-tissue window with label outlines, as an 8-bit PNG."""
    from PIL import Image
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
