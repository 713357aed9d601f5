"""The quick-start job (`medvision demo`) writes the sample, its segmentation and a picture."""

from __future__ import annotations

import json

import numpy as np

import napari_medvision as mv
from napari_medvision._demo import DEMO_MODEL, run_demo


def test_headless_demo_writes_files_that_read_back(tmp_path):
    summary = run_demo(tmp_path / "out", headless=True)
    image = mv.load(summary["image"])
    assert image.modality == "CT" and image.data.shape == tuple(summary["shape"])
    labels = mv.load(summary.get("segmentation") or summary["labels"])
    assert labels.is_labels and labels.same_grid(image, tol=1e-4)
    picture = mv.load(summary["picture"])
    assert np.asarray(picture.data).std() > 10, "the slice picture is blank"
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["image"] == summary["image"]
    if summary["model"] == DEMO_MODEL:
        # The shipped CT model must find the big organs of the phantom it never saw (seed 0 is held out).
        assert summary["dice_vs_phantom_truth"]["liver"] > 0.5
