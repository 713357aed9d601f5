"""A tiny, randomly initialised MVG saved into the test user folder (the real one is shipped in weights/)."""

from __future__ import annotations

import torch

import napari_medvision as mv
from napari_medvision.models.card import ModelCard


def tiny_mvg_model(model_id: str = "tiny-mvg", seed: int = 0) -> ModelCard:
    architecture = {"name": "mvg", "config": {"preset": "tiny"}}
    torch.manual_seed(seed)
    card = ModelCard(id=model_id, task="synthesis", architecture=architecture, modality="MR, CT, fundus, OCT",
                     input={"dims": 2, "channels": 1, "tile": 32}, sha256="")
    return mv.models.save_model(mv.models.build_model(architecture), card)
