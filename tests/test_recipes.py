"""The recipes that made the shipped weights still run end to end (a few steps, into a temp folder)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")


def test_fundus_recipe_trains_and_writes_a_loadable_model_with_a_card(data_dir, tmp_path):
    from napari_medvision import models
    from napari_medvision.recipes import fundus_vessels

    assert fundus_vessels.main(["--steps", "2", "--batch-size", "2", "--preset", "tiny", "--synthetic", "1",
                                "--threads", "1", "--out", str(tmp_path)]) == 0
    card = json.loads((tmp_path / "fundus-vessels-2d.json").read_text())
    assert card["training"]["steps"] == 2 and card["metrics"]
    network, loaded = models.load_model(tmp_path / "fundus-vessels-2d.safetensors")
    assert loaded.labels == {1: "vessel"}
