"""Model cards and the registry: checksums checked, user models kept apart from shipped ones."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from napari_medvision import models  # noqa: E402
from napari_medvision.models.card import CardError, ModelCard  # noqa: E402
from napari_medvision.models.registry import ARCHITECTURES, register_architecture  # noqa: E402


@register_architecture("test_conv")
def _tiny(config):
    return torch.nn.Conv2d(config.get("in_channels", 1), config.get("n_classes", 2), 3, padding=1)


def make_card(model_id: str = "tiny-test") -> ModelCard:
    return ModelCard(id=model_id, task="segmentation", architecture={"name": "test_conv", "config": {"n_classes": 3}},
                     modality="CT", input={"spacing": None, "normalisation": {"kind": "zscore"},
                                           "patch_size": [32, 32], "channels": 1, "dims": 2},
                     sha256="", labels={1: "liver", 2: "spleen"})


def test_save_then_load_user_model_round_trips(tmp_path):
    net = ARCHITECTURES["test_conv"]({"n_classes": 3})
    card = models.save_model(net, make_card())
    assert card.weights_path.parent == models.user_dir()
    listed = {c.id: c for c in models.available()}
    assert listed["tiny-test"].source == "user" and listed["tiny-test"].labels == {1: "liver", 2: "spleen"}
    loaded, loaded_card = models.load_model("tiny-test")
    x = torch.randn(1, 1, 8, 8)
    assert torch.equal(loaded(x), net(x))
    assert loaded_card.sha256 == card.sha256


def test_tampered_weights_are_refused(tmp_path):
    card = models.save_model(ARCHITECTURES["test_conv"]({"n_classes": 3}), make_card("tampered"))
    data = bytearray(card.weights_path.read_bytes())
    data[-1] ^= 0xFF
    card.weights_path.write_bytes(bytes(data))
    with pytest.raises(CardError, match="checksum .* does not match"):
        models.load_model("tampered")


def test_checkpoint_by_path_needs_its_card(tmp_path):
    models.save_model(ARCHITECTURES["test_conv"]({"n_classes": 3}), make_card("by-path"), folder=tmp_path)
    net, loaded = models.load_model(tmp_path / "by-path.safetensors")
    assert loaded.id == "by-path" and loaded.source == "path"
    (tmp_path / "by-path.json").unlink()
    with pytest.raises(CardError, match="needs its model card"):
        models.load_model(tmp_path / "by-path.safetensors")


def test_models_are_never_written_into_the_shipped_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVISION_WEIGHTS", str(tmp_path))
    with pytest.raises(CardError, match="not written into the shipped weights folder"):
        models.save_model(ARCHITECTURES["test_conv"]({}), make_card("x"), folder=tmp_path)


def test_unknown_id_lists_what_is_available():
    with pytest.raises(CardError, match="no model with this id"):
        models.get_card("no-such-model")


def test_card_without_required_fields_is_refused(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text(json.dumps({"id": "broken"}))
    with pytest.raises(CardError, match="lacks task"):
        models.read_card(path)


def test_every_shipped_card_loads_with_a_matching_checksum():
    shipped = [c for c in models.available() if c.source == "shipped"]
    for card in shipped:
        network, loaded = models.load_model(card.id)
        assert loaded.metrics, f"{card.id}: the card reports no metrics on held-out data"
        assert sum(p.numel() for p in network.parameters()) > 0
