"""The medical DINO recipe's pieces: the Sinkhorn-Knopp teacher, the losses and a few training steps."""

import numpy as np
import pytest
import torch

from napari_medvision.recipes import medical_dino as md


def test_sinkhorn_teacher_targets_are_distributions_that_use_every_prototype_equally():
    torch.manual_seed(0)
    logits = torch.randn(16, 8) * 0.1
    logits[:, 0] += 0.4  # a prototype that a plain softmax would give to every image
    targets = md.sinkhorn_knopp(logits, temperature=0.04)
    assert torch.allclose(targets.sum(1), torch.ones(16), atol=1e-5)
    assert torch.softmax(logits / 0.04, 1)[:, 0].mean() > 0.9
    assert targets.sum(0).max() < 2 * 16 / 8  # no prototype takes more than twice its share


def test_dino_loss_is_lowest_when_the_student_matches_the_teacher():
    target = torch.softmax(torch.randn(4, 32), 1)
    teacher = [target, target]  # both global crops agree
    matching = [torch.log(target) * 0.1 for _ in range(2)]  # logits / student_temp give back log(target)
    unrelated = [torch.randn(4, 32) for _ in range(2)]
    assert md.dino_loss(matching, teacher, 0.1) < md.dino_loss(unrelated, teacher, 0.1)


def test_ibot_loss_counts_masked_patches_only():
    masks = torch.zeros(2, 2, 2, dtype=torch.bool)
    assert float(md.ibot_loss(torch.zeros(0, 8), torch.zeros(0, 8), masks, 0.1)) == 0.0
    masks[0, 0, 0] = True
    target = torch.zeros(1, 8)
    target[0, 3] = 1
    assert float(md.ibot_loss(torch.zeros(1, 8), target, masks, 0.1)) == pytest.approx(np.log(8), rel=1e-5)


def test_a_few_smoke_steps_update_the_teacher_and_keep_the_prototypes_frozen_at_first():
    rng = np.random.default_rng(0)
    slices = [rng.random((80, 80)).astype(np.float16) for _ in range(4)]
    config = md.DinoConfig.smoke()
    config.depth, config.freeze_last_layer = 2, 1.0  # prototypes frozen for the whole (short) run
    torch.manual_seed(0)
    untouched = md.DinoModel(config)
    teacher, history, _ = md.train(slices, config, steps=3, batch_size=2, device="cpu")
    assert len(history) == 3 and all(np.isfinite([h["dino"], h["ibot"]]).all() for h in history)
    before, after = untouched.state_dict(), teacher.state_dict()
    assert not torch.equal(before["backbone.blocks.0.attn.qkv.weight"], after["backbone.blocks.0.attn.qkv.weight"])
    frozen = [k for k in before if ".last." in k]
    assert frozen and all(torch.allclose(before[k], after[k]) for k in frozen)


def test_the_shipped_medical_dino_prompts_the_held_out_ct_better_than_a_random_vit_of_its_shape(data_dir):
    from napari_medvision.models.dino import Backbone, create_network, load_backbone, state_checksum
    from napari_medvision.models.registry import get_card
    from napari_medvision.recipes.ct_organs import real_ct

    ours = load_backbone("medical-dino-vitt8")  # by id: the card's checksum is checked
    config = get_card("medical-dino-vitt8").architecture["config"]
    torch.manual_seed(0)
    untrained = create_network(config["timm_name"], **config["overrides"]).eval()
    random_vit = Backbone(untrained, config["timm_name"], state_checksum(untrained.state_dict()))
    ct, labels = real_ct()  # example_ct_sm: held out of the DINO training

    dice = {name: md.prompting_dice(backbone, ct, labels, (2,), ("appearance",))["2_slices_appearance"]
            for name, backbone in (("ours", ours), ("random", random_vit))}

    assert ours.patch_size == 8 and sum(p.numel() for p in ours.network.parameters()) * 4 < 25e6
    assert dice["ours"] > dice["random"] + 0.02, dice  # the card: 0.902 against 0.837
