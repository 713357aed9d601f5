"""The training loop learns, validates, stops early, resumes and survives a cancel."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_medvision.engine.progress import CancelToken, Cancelled  # noqa: E402
from napari_medvision.engine.sampling import PatchSampler  # noqa: E402
from napari_medvision.engine.training import TrainConfig, dice_per_class, train_segmentation  # noqa: E402


def disc_images(n: int = 4, size: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for _ in range(n):
        cy, cx, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(4, 8)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.int64)
        images.append((mask * 1.0 + rng.normal(0, 0.3, mask.shape))[None].astype(np.float32))
        labels.append(mask)
    return images, labels


def small_net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 2, 3, padding=1))


def validation_dice(images, labels):
    def score(net):
        x = torch.from_numpy(np.stack(images))
        pred = net(x).argmax(1).numpy()
        return float(np.mean([dice_per_class(p, t, [1])[1] for p, t in zip(pred, labels)]))
    return score


def test_training_learns_a_disc_and_keeps_the_best_weights():
    images, labels = disc_images()
    sampler = PatchSampler(images, labels, (32, 32))
    val_images, val_labels = disc_images(2, seed=1)
    net = small_net()
    before = validation_dice(val_images, val_labels)(net)
    result = train_segmentation(net, sampler.sample, TrainConfig(steps=60, batch_size=4, val_every=20, lr=1e-2),
                                validate=validation_dice(val_images, val_labels))
    after = validation_dice(val_images, val_labels)(net)
    assert after > 0.8 > before
    assert after == pytest.approx(result.best_score)
    assert [h["step"] for h in result.history] == [20, 40, 60]


def test_cancel_keeps_the_best_weights_so_far():
    images, labels = disc_images()
    token = CancelToken()

    def cancel_at_30(done, total, message):
        if done == 30:
            token.cancel()

    net = small_net()
    with pytest.raises(Cancelled) as info:
        train_segmentation(net, PatchSampler(images, labels, (32, 32)).sample,
                           TrainConfig(steps=100, batch_size=2, val_every=10),
                           validate=validation_dice(images, labels), progress=cancel_at_30, cancel=token)
    assert info.value.result.steps_done == 30
    assert info.value.result.stopped_because == "cancelled"


def test_resume_continues_where_the_checkpoint_stopped(tmp_path):
    images, labels = disc_images()
    sampler = PatchSampler(images, labels, (32, 32), augment=False)
    config = TrainConfig(steps=20, batch_size=2, val_every=10)
    full = small_net()
    train_segmentation(full, sampler.sample, config, checkpoint=tmp_path / "full")

    token = CancelToken()
    part = small_net()
    with pytest.raises(Cancelled):
        train_segmentation(part, sampler.sample, config, checkpoint=tmp_path / "part", cancel=token,
                           progress=lambda d, t, m: token.cancel() if d == 10 else None)
    resumed = small_net()
    result = train_segmentation(resumed, sampler.sample, config, checkpoint=tmp_path / "part")
    assert result.steps_done == 20
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b)


def test_early_stopping_when_validation_stalls():
    images, labels = disc_images()
    result = train_segmentation(small_net(), PatchSampler(images, labels, (32, 32)).sample,
                                TrainConfig(steps=500, batch_size=2, val_every=5, patience=2),
                                validate=lambda net: 0.5)
    assert result.stopped_because == "early stopping" and result.steps_done == 15


def test_anchor_keeps_the_weights_near_where_training_started():
    """L2-SP (``anchor``): fine-tuning with a strong anchor moves the weights far less from the parent's."""
    images, labels = disc_images()
    sampler = PatchSampler(images, labels, (32, 32), augment=False)
    parent = [p.detach().clone() for p in small_net().parameters()]

    def distance_after(anchor: float) -> float:
        net = small_net()
        train_segmentation(net, sampler.sample, TrainConfig(steps=20, batch_size=2, val_every=20, lr=1e-2,
                                                            warmup_steps=2, anchor=anchor))
        return float(sum(((p.detach() - p0) ** 2).sum() for p, p0 in zip(net.parameters(), parent)) ** 0.5)

    free, anchored = distance_after(0.0), distance_after(100.0)
    assert free > 0.05                 # training moved the weights
    assert anchored < 0.5 * free       # the anchor held them near the parent's


def test_shares_set_how_often_each_image_is_drawn():
    """A small real scan among big phantoms: ``shares`` draws it as often as asked, not by its size."""
    big = [np.zeros((1, 64, 64), np.float32)] * 3
    small = [np.ones((1, 16, 16), np.float32)]
    labels = [np.zeros((64, 64), np.int64)] * 3 + [np.ones((16, 16), np.int64)]
    rng = np.random.default_rng(0)

    def small_share(sampler) -> float:
        images, _ = sampler.sample(rng, 2000)
        return float((images[:, 0, 0, 0] == 1).mean())

    by_size = PatchSampler(big + small, labels, (16, 16), augment=False)
    asked = PatchSampler(big + small, labels, (16, 16), augment=False, shares=[0.2, 0.2, 0.2, 0.4])
    assert small_share(by_size) == pytest.approx(256 / (3 * 4096 + 256), abs=0.01)
    assert small_share(asked) == pytest.approx(0.4, abs=0.04)
    with pytest.raises(ValueError, match="shares"):
        PatchSampler(big + small, labels, (16, 16), shares=[1.0, 1.0])


def test_learning_rate_decays_over_the_time_budget_when_it_runs_out_before_the_steps():
    # A GPU lease or a CPU afternoon: 30000 steps asked, 300 s allowed. The schedule follows
    # whichever ends first, so a run stopped by its budget ends at a low learning rate.
    from napari_medvision.engine.training import _warmup_cosine

    clock = {"elapsed": 0.0}
    factor = _warmup_cosine(TrainConfig(steps=30000, warmup_steps=10, time_budget_s=300), clock)
    assert factor(100) > 0.99  # early: by steps and by time, still near the peak
    clock["elapsed"] = 150.0
    assert factor(100) == pytest.approx(0.51, abs=0.01)  # half the time gone: half-way down the cosine
    clock["elapsed"] = 300.0
    assert factor(100) == pytest.approx(0.02)  # the budget spent: the floor
    without_budget = _warmup_cosine(TrainConfig(steps=30000, warmup_steps=10), clock)
    assert without_budget(100) > 0.99  # no budget: steps alone set the schedule
