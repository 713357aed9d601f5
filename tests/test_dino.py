"""DINO backbones: official release checkpoints load into timm's architectures, features have the patch grid."""

from __future__ import annotations

import pytest
import torch

from napari_medvision.io.errors import ReadError
from napari_medvision.models.card import ModelCard
from napari_medvision.models.dino import load_backbone, official_state_dict
from napari_medvision.models.registry import save_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def image():
    torch.manual_seed(1)
    return torch.rand(1, 3, 42, 56)


def test_official_dinov2_checkpoint_gives_identical_features(tmp_path, image):
    random = load_backbone("random-vits14")
    state = official_state_dict(random.network)
    # The release layout (dinov2_vits14_pretrain.pth): 37x37 positions + class token at 518 px.
    assert state["pos_embed"].shape == (1, 37 * 37 + 1, 384)
    assert state["mask_token"].shape == (1, 384)
    assert {"cls_token", "blocks.11.ls1.gamma", "blocks.0.attn.qkv.weight", "norm.weight"} <= set(state)
    torch.save(state, tmp_path / "dinov2_vits14_pretrain.pth")

    loaded = load_backbone(tmp_path / "dinov2_vits14_pretrain.pth")

    assert loaded.name == "vit_small_patch14_dinov2"
    assert (loaded.patch_size, loaded.embed_dim) == (14, 384)
    assert torch.equal(loaded.features(image), random.features(image))
    assert loaded.checksum != random.checksum


def test_dinov2_with_registers_is_recognised_from_its_tensors(tmp_path, image):
    random = load_backbone("random-vits14-reg4")
    state = official_state_dict(random.network)
    assert state["register_tokens"].shape == (1, 4, 384)
    assert state["pos_embed"].shape == (1, 1370, 384)  # the class token's position sits in front
    torch.save(state, tmp_path / "dinov2_vits14_reg4_pretrain.pth")

    loaded = load_backbone(tmp_path / "dinov2_vits14_reg4_pretrain.pth")

    assert loaded.name == "vit_small_patch14_reg4_dinov2"
    assert loaded.num_prefix_tokens == 5
    torch.testing.assert_close(loaded.features(image), random.features(image), rtol=0, atol=1e-5)


def test_official_dinov3_safetensors_loads(tmp_path, image):
    from safetensors.torch import save_file

    random = load_backbone("random-vits16")
    state = official_state_dict(random.network)
    assert state["storage_tokens"].shape == (1, 4, 384)
    assert "blocks.0.ls1.gamma" in state and "pos_embed" not in state  # RoPE: no absolute positions
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "dinov3_vits16.safetensors"))

    loaded = load_backbone(tmp_path / "dinov3_vits16.safetensors")

    assert loaded.name == "vit_small_patch16_dinov3"
    assert torch.equal(loaded.features(image), random.features(image))


def test_features_cover_every_pixel_on_the_patch_grid():
    backbone = load_backbone("random-vits14")
    grey = torch.rand(2, 1, 30, 45)

    feats = backbone.features(grey)

    assert feats.shape == (2, 384, 3, 4)  # ceil(30/14), ceil(45/14): padded, nothing cut off
    assert torch.equal(feats, backbone.features(grey.expand(-1, 3, -1, -1)))
    assert backbone.calls == 2


def test_random_backbones_are_seeded():
    a, b = load_backbone("random-vits16"), load_backbone("random-vits16")
    x = torch.rand(1, 1, 32, 32)
    assert torch.equal(a.features(x), b.features(x))


def test_registered_dino_model_loads_by_id(tmp_path, image):
    random = load_backbone("random-vits14")
    card = ModelCard(id="dino-test", task="features", modality="any", sha256="",
                     architecture={"name": "dino", "config": {"timm_name": "vit_small_patch14_dinov2"}},
                     input={"normalisation": {"kind": "percentile"}, "patch_size": 14})
    save_model(random.network, card)

    loaded = load_backbone("dino-test")

    assert loaded.checksum == card.sha256
    assert torch.equal(loaded.features(image), random.features(image))


def test_a_file_that_is_no_dino_checkpoint_is_refused(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ReadError, match="weights.pth.*DINO"):
        load_backbone(path)


def test_a_patch_8_checkpoint_like_our_medical_dino_keeps_its_patch_size(tmp_path):
    from napari_medvision.models.dino import Backbone, create_network

    torch.manual_seed(0)
    network = create_network("vit_small_patch14_reg4_dinov2", patch_size=8, img_size=224)
    state = official_state_dict(network)
    assert state["pos_embed"].shape == (1, 28 * 28 + 1, 384)
    torch.save(state, tmp_path / "medical_dino_vits8.pth")

    loaded = load_backbone(tmp_path / "medical_dino_vits8.pth")

    x = torch.rand(1, 1, 40, 64)
    assert loaded.patch_size == 8 and loaded.features(x).shape == (1, 384, 5, 8)
    torch.testing.assert_close(loaded.features(x), Backbone(network, "ref", "").features(x), rtol=0, atol=1e-5)
