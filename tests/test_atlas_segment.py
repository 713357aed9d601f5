"""Atlas-backed segmentation: the network a caller passes, fine-tuned models' atlases, the body box, the output grid."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import napari_medvision as mv
from napari_medvision import atlases
from napari_medvision.engine.resample import labels_from_probabilities
from napari_medvision.models.registry import build_model, get_card, load_model, save_model
from napari_medvision.synthetic import ct_abdomen
from napari_medvision.tasks import atlas_segment
from napari_medvision.tasks.atlas_segment import labels_on_grid, segment_with_atlases
from napari_medvision.tasks.prompting.register import sampling_shares

SHAPE, SPACING = (16, 48, 40), (2.5, 2.0, 2.0)


def phantom(seed):
    return ct_abdomen(seed=seed, shape=SHAPE, spacing=SPACING)


def tiny_with_atlas():
    """The tiny CT network and a user atlas set whose card says it backs that network."""
    from test_segment import tiny_ct_model

    card = tiny_ct_model()
    atlas = atlases.add("tiny-anatomy", [phantom(1)])
    data = json.loads((atlas.folder / "atlas.json").read_text())
    data["models"] = [card.id]
    (atlas.folder / "atlas.json").write_text(json.dumps(data))
    return card


class Counting(torch.nn.Module):
    """A network that counts its calls."""

    def __init__(self, network):
        super().__init__()
        self.network, self.calls = network, 0

    def forward(self, x):
        self.calls += 1
        return self.network(x)


def test_segment_uses_the_network_it_is_given_on_the_atlas_path(monkeypatch):
    card = tiny_with_atlas()
    network = Counting(load_model(card)[0])

    def no_loading(*args, **kwargs):
        raise AssertionError("the atlas path loaded the model although a network was given")

    monkeypatch.setattr("napari_medvision.models.registry.load_model", no_loading)
    target, _ = phantom(3)
    seg = mv.segment(target, model=card.id, network=network, device="cpu")
    assert network.calls > 0
    assert seg.meta["network"] == card.id and [e["atlas"] for e in seg.meta["atlases"]] == ["tiny-anatomy"]
    with pytest.raises(ValueError, match="atlas set, which has no network"):
        mv.segment(target, model="tiny-anatomy", network=network)


def test_a_fine_tuned_model_keeps_its_parents_atlases_and_brings_its_own_network():
    parent = tiny_with_atlas()
    torch.manual_seed(1)
    child = save_model(build_model(parent.architecture),
                       dataclasses.replace(parent, id="tiny-ct-ft-1", parent=parent.id, sha256=""))
    grandchild = save_model(build_model(parent.architecture),
                            dataclasses.replace(parent, id="tiny-ct-ft-2", parent=child.id, sha256=""))
    assert [a.name for a in atlases.for_model(grandchild.id)] == ["tiny-anatomy"]
    assert [a.name for a in atlases.for_model(get_card(child.id))] == ["tiny-anatomy"]
    assert atlases.for_model("no-such-model") == []
    target, _ = phantom(3)
    seg = mv.segment(target, model=grandchild.id, device="cpu")
    assert seg.meta["network"] == grandchild.id and seg.meta["atlases"][0]["atlas"] == "tiny-anatomy"


def test_air_around_the_body_is_left_out_of_the_work_and_changes_little(monkeypatch):
    body_box = atlas_segment.body_box  # a 3-step margin: this small phantom's grid is narrower than the default 15
    monkeypatch.setattr(atlas_segment, "body_box", lambda *a, **k: body_box(*a, **{**k, "margin": 3}))
    atlas = atlases.add("pad-anatomy", [phantom(1)])
    target, truth = phantom(3)
    pad = ((0, 0), (12, 12), (10, 10))
    padded = target.with_data(np.pad(np.asarray(target.data), pad, constant_values=-1000.0),
                              origin=tuple(np.asarray(target.origin) - target.direction @ np.array([0, 24.0, 20.0])))
    plain = segment_with_atlases(target, [atlas])
    wide = segment_with_atlases(padded, [atlas])
    # the air was cropped away: the work grid is the body's box plus 3 voxels, not the padded 72 x 60
    assert all(w <= p + 6 for w, p in zip(wide.meta["working_shape"], plain.meta["working_shape"]))
    inner = np.asarray(wide.data)[:, 12:-12, 10:-10]
    assert not np.asarray(wide.data)[:, :12].any() and not np.asarray(wide.data)[:, :, -10:].any()
    liver = next(k for k, v in plain.labels.items() if v == "liver")
    a, b = np.asarray(plain.data) == liver, inner == liver
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.95


@pytest.mark.parametrize("work, out", [((9, 14, 12), (21, 31, 40)), ((12, 10, 16), (7, 10, 9))])
def test_labels_on_grid_equal_resampling_every_channel_everywhere(work, out, monkeypatch):
    monkeypatch.setattr(atlas_segment, "OUTPUT_SLAB", 4)  # several slabs along z
    rng = np.random.default_rng(0)
    posterior = np.zeros((5, *work), np.float32)
    posterior[0] = rng.random(work)
    for c in (1, 2, 4):  # channel 3 empty, as an organ the anatomy checks removed
        z, y, x = (int(rng.integers(0, n)) for n in work)
        posterior[c, max(0, z - 2):z + 2, max(0, y - 3):y + 3, max(0, x - 3):x + 3] = 1.5 * rng.random()
    expected = labels_from_probabilities(torch.from_numpy(posterior), out)
    assert np.array_equal(labels_on_grid(posterior, out), expected)
    assert np.array_equal(labels_on_grid(posterior[:1], out), np.zeros(out, np.uint8))


def test_the_atlas_affine_samples_a_fixed_number_of_voxels_per_level():
    shares = sampling_shares((30, 101, 122), atlas_segment.AFFINE_SHRINKS, 1.0, atlas_segment.AFFINE_SAMPLES)
    assert shares[0] == 1.0  # 7 x 25 x 30 voxels at a quarter: all of them
    assert shares[1] * 15 * 50 * 61 == pytest.approx(atlas_segment.AFFINE_SAMPLES)
    assert sampling_shares((30, 101, 122)) == [0.2, 0.2, 0.2]  # prompting's defaults are unchanged


def test_every_registration_stage_is_named_in_the_progress():
    """The panel's bar names the affine and the deformable stage of each member, so no stage is silent."""
    atlas = atlases.add("staged-anatomy", [phantom(1)])
    seen = []
    segment_with_atlases(phantom(3)[0], [atlas], progress=lambda done, total, message: seen.append(message))
    assert "registering atlas staged-anatomy (1/1)" in seen
    assert "deformable registration (demons): atlas staged-anatomy (1/1)" in seen
    assert seen.index("deformable registration (demons): atlas staged-anatomy (1/1)") < seen.index("done")
