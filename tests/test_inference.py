"""Sliding-window inference, resampling and normalisation: tiny networks on the CPU."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("monai")

import torch.nn.functional as F  # noqa: E402

from napari_medvision.engine.inference import predict_labels, sliding_window, window_regions  # noqa: E402
from napari_medvision.engine.normalise import (channel_zscore, ct_window, normalise, percentile, rgb_unit,  # noqa: E402
                                              zscore)
from napari_medvision.engine.progress import CancelToken, Cancelled  # noqa: E402
from napari_medvision.engine.resample import resample_linear, to_input_grid, to_model_grid  # noqa: E402
from napari_medvision.models.card import ModelCard  # noqa: E402
from napari_medvision.volume import Volume  # noqa: E402


def conv_net(dims: int, in_ch: int = 1, classes: int = 3, seed: int = 0) -> torch.nn.Module:
    """Two 3x3(x3) convolutions: translation-equivariant, receptive field radius 2."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d
    return torch.nn.Sequential(conv(in_ch, 4, 3, padding=1), torch.nn.Tanh(), conv(4, classes, 3, padding=1)).eval()


def pointwise_threshold_net(dims: int, threshold: float, gain: float = 50.0) -> torch.nn.Module:
    """Logits (0, gain * (x - threshold)): class 1 wherever the normalised intensity exceeds threshold."""
    conv = (torch.nn.Conv3d if dims == 3 else torch.nn.Conv2d)(1, 2, 1)
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1] = gain
        conv.bias[1] = -gain * threshold
    return conv.eval()


def card(dims: int, patch, spacing=None, normalisation=None, channels: int = 1, labels=None) -> ModelCard:
    return ModelCard(id="test-model", task="segment", architecture={"name": "test"}, modality="CT",
                     input={"spacing": spacing, "normalisation": normalisation or {"kind": "none"},
                            "patch_size": list(patch), "channels": channels, "dims": dims},
                     sha256="0" * 64, labels=labels or {0: "background", 1: "organ"})


def monai_probabilities(net, image, roi, overlap, batch):
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        return sliding_window_inference(image[None], roi, batch, lambda x: net(x).softmax(1),
                                        overlap=overlap, mode="gaussian")[0]


# --- sliding window ---------------------------------------------------------------------

def test_one_window_equals_whole_image_inference():
    net = conv_net(3)
    image = torch.randn(1, 12, 16, 16)
    net.train()  # e.g. validating during training: run in eval mode, give the mode back
    probs = sliding_window(net, image, (12, 16, 16), out_dtype=torch.float32)
    assert net.training
    with torch.no_grad():
        whole = net.eval()(image[None]).softmax(1)[0]
    assert probs.shape == (3, 12, 16, 16) and probs.device.type == "cpu"
    torch.testing.assert_close(probs, whole, atol=1e-6, rtol=0)


def test_image_smaller_than_window_is_padded_and_cropped_back():
    net = conv_net(2)
    image = torch.randn(1, 10, 21)
    probs = sliding_window(net, image, (16, 16), out_dtype=torch.float32)
    # centred zero padding up to the window, as MONAI: 3 rows above, 3 below; x needs two windows
    assert probs.shape == (3, 10, 21)
    torch.testing.assert_close(probs, monai_probabilities(net, image, (16, 16), 0.5, 4), atol=1e-6, rtol=0)
    with torch.no_grad():
        left = net(F.pad(image, (0, 0, 3, 3))[None, :, :, :16]).softmax(1)[0, :, 3:13]
    torch.testing.assert_close(probs[:, :, :2], left[:, :, :2], atol=1e-6, rtol=0)  # only the first window there


@pytest.mark.parametrize("overlap", [0.25, 0.5, 0.75])
def test_matches_monai_sliding_window_inference(overlap):
    net = conv_net(3, seed=1)
    image = torch.randn(1, 23, 37, 30)
    ours = sliding_window(net, image, (16, 16, 16), overlap=overlap, batch_size=3, out_dtype=torch.float32)
    reference = monai_probabilities(net, image, (16, 16, 16), overlap, 3)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)


def test_float16_blend_stays_close_to_monai():
    net = conv_net(3, seed=1)
    image = torch.randn(1, 23, 37, 30)
    half = sliding_window(net, image, (16, 16, 16), overlap=0.5, batch_size=3)
    assert half.dtype == torch.float16
    # float16 keeps 11 bits: each of the up to 8 tiles added at a voxel may round by 2**-12
    assert float((half.float() - monai_probabilities(net, image, (16, 16, 16), 0.5, 3)).abs().max()) < 3e-3


def test_tiles_agree_with_whole_image_away_from_the_border():
    net = conv_net(2, seed=2)
    image = torch.randn(1, 64, 64)
    tiled = sliding_window(net, image, (24, 24), overlap=0.5, out_dtype=torch.float32)
    with torch.no_grad():
        whole = net(image[None]).softmax(1)[0]
    # A tile's rim (2 voxels, as far as its zero padding reaches) is wrong but weighs little. Within
    # roi/4 of the image's edge every covering tile is far off-centre along one axis, the weights
    # there sit on MONAI's 1e-3 floor and the rim's share grows: that band is left out.
    inner = (slice(None), slice(6, -6), slice(6, -6))
    difference = (tiled - whole)[inner].abs()
    assert float(difference.max()) < 5e-3 and float(difference.mean()) < 5e-4


def test_pointwise_network_is_exact_everywhere_and_blend_has_no_seams():
    pointwise = torch.nn.Conv3d(1, 2, 1).eval()
    image = torch.randn(1, 20, 33, 27)
    tiled = sliding_window(pointwise, image, (8, 16, 16), overlap=0.5, out_dtype=torch.float32)
    with torch.no_grad():
        whole = pointwise(image[None]).softmax(1)[0]
    torch.testing.assert_close(tiled, whole, atol=2e-6, rtol=0)

    constant = torch.nn.Conv3d(1, 3, 1).eval()
    with torch.no_grad():
        constant.weight.zero_()
        constant.bias.copy_(torch.tensor([0.3, -1.2, 2.0]))
    blended = sliding_window(constant, image, (8, 16, 16), overlap=0.5, out_dtype=torch.float32)
    expected = torch.tensor([0.3, -1.2, 2.0]).softmax(0)
    assert float((blended - expected[:, None, None, None]).abs().max()) < 1e-6


def test_windows_cover_every_voxel_and_end_on_the_edges():
    regions = window_regions((23, 37, 30), (16, 16, 16), 0.5)
    covered = np.zeros((23, 37, 30), int)
    for source, target in regions:
        covered[source] += 1
        assert all(t.stop - t.start == s.stop - s.start == 16 for s, t in zip(source, target))
    assert covered.min() >= 1
    assert max(s[0].stop for s, _ in regions) == 23 and max(s[2].stop for s, _ in regions) == 30


def test_progress_counts_up_and_cancel_stops_between_batches():
    net = conv_net(2)
    image = torch.randn(1, 40, 40)
    calls = []
    sliding_window(net, image, (16, 16), batch_size=2, progress=lambda d, t, m: calls.append((d, t)))
    done = [d for d, _ in calls]
    total = calls[0][1]
    assert total == len(window_regions((40, 40), (16, 16), 0.5)) == 16
    assert done == sorted(done) and len(set(done)) == len(done) and done[-1] == total

    token = CancelToken()
    seen = []

    def cancel_after_first(done, total, message):
        seen.append(done)
        token.cancel()

    with pytest.raises(Cancelled):
        sliding_window(net, image, (16, 16), batch_size=2, progress=cancel_after_first, cancel=token)
    assert seen == [2]


def test_out_of_memory_halves_the_batch_and_still_finishes():
    net = conv_net(3)

    class GreedyNet(torch.nn.Module):
        def forward(self, x):
            if x.shape[0] > 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
            return net(x)

    image = torch.randn(1, 20, 20, 20)
    messages = []
    with pytest.warns(RuntimeWarning, match="batch size lowered"):
        probs = sliding_window(GreedyNet(), image, (16, 16, 16), batch_size=4, out_dtype=torch.float32,
                               progress=lambda d, t, m: messages.append(m))
    assert any("out of memory" in m for m in messages)
    torch.testing.assert_close(probs, monai_probabilities(net, image, (16, 16, 16), 0.5, 1), atol=1e-5, rtol=0)


# --- resampling --------------------------------------------------------------------------

def test_linear_resampling_matches_scipy_zoom():
    from scipy import ndimage

    data = np.random.default_rng(0).normal(size=(9, 14, 11)).astype(np.float32)
    ours = resample_linear(data[None], (17, 7, 11))[0].numpy()
    scipy_zoom = ndimage.zoom(data, (17 / 9, 7 / 14, 1), order=1, grid_mode=True, mode="nearest")
    np.testing.assert_allclose(ours, scipy_zoom, atol=1e-5)


def test_labels_survive_the_model_grid_and_back():
    import SimpleITK as sitk

    from napari_medvision.volume import to_itk_geometry

    labels = np.random.default_rng(1).integers(0, 4, size=(6, 9, 8)).astype(np.uint8)
    direction = np.array([[1, 0, 0], [0, 0, 1], [0, -1, 0]], float)
    vol = Volume(labels, spacing=(3.0, 1.5, 1.0), origin=(10.0, -5.0, 2.0), direction=direction,
                 labels={0: "bg", 1: "a", 2: "b", 3: "c"})
    model = to_model_grid(vol, (1.5, 0.75, None))
    assert model.spatial_shape == (12, 18, 8) and model.data.dtype == np.uint8
    assert model.spacing == (1.5, 0.75, 1.0)

    # SimpleITK, resampling by nearest neighbour onto the grid we report, agrees voxel for voxel.
    image = sitk.GetImageFromArray(labels)
    image.SetSpacing(vol.spacing[::-1])
    image.SetOrigin(vol.origin[::-1])
    image.SetDirection(tuple(direction[::-1, ::-1].ravel()))
    spacing, origin, flat = to_itk_geometry(model)
    itk = sitk.Resample(image, model.spatial_shape[::-1], sitk.Transform(), sitk.sitkNearestNeighbor,
                        origin, spacing, flat, 0, image.GetPixelID())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(itk), model.data)

    back = to_input_grid(model, vol)
    assert back.same_grid(vol) and back.data.shape == labels.shape
    np.testing.assert_array_equal(back.data, labels)


def test_coarser_model_grid_and_back_keeps_the_shape_and_most_labels():
    zz, yy, xx = np.mgrid[:30, :41, :37]
    labels = ((zz - 15) ** 2 + (yy - 20) ** 2 + (xx - 18) ** 2 < 12**2).astype(np.uint8)
    vol = Volume(labels, spacing=(1.0, 0.8, 0.8), labels={0: "bg", 1: "ball"})
    back = to_input_grid(to_model_grid(vol, (2.5, 2.0, 2.0)), vol)
    assert back.data.shape == labels.shape and back.same_grid(vol)
    dice = 2 * np.sum(back.data & labels) / (back.data.sum() + labels.sum())
    assert dice > 0.9


# --- normalisation -----------------------------------------------------------------------

def test_normalisation_functions():
    hu = np.array([-1000, -200, 50, 300, 2000], dtype=np.int16)
    np.testing.assert_allclose(ct_window(hu, -200, 300).numpy(), [0, 0, 0.5, 1, 1])
    assert hu[0] == -1000  # the input is never changed

    mr = np.random.default_rng(2).gamma(2.0, 100.0, size=(20, 30)).astype(np.float32)
    z = zscore(mr).numpy()
    np.testing.assert_allclose(z, (mr - mr.mean()) / mr.std(ddof=1), atol=1e-4)

    lo, hi = np.percentile(mr, [0.5, 99.5])
    np.testing.assert_allclose(percentile(mr, 0.5, 99.5).numpy(), (np.clip(mr, lo, hi) - lo) / (hi - lo), atol=1e-5)

    rgb = np.array([[0, 51, 255]], dtype=np.uint8)
    np.testing.assert_allclose(rgb_unit(rgb).numpy(), [[0, 0.2, 1]])

    np.testing.assert_allclose(normalise(hu, {"kind": "ct_window", "low": -200, "high": 300}).numpy(),
                               ct_window(hu, -200, 300).numpy())
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalise(hu, {"kind": "histogram"})


def test_channel_zscore_measures_inside_the_field_of_view_only():
    # a fundus-like photo: a bright disc on black; a darker copy of it (another camera) must look alike
    yy, xx = np.mgrid[:40, :50]
    disc = (yy - 20) ** 2 + (xx - 25) ** 2 < 18 ** 2
    rng = np.random.default_rng(4)
    photo = np.where(disc, rng.uniform(60, 220, size=(3, 40, 50)), 0).astype(np.uint8)
    darker = (photo * 0.6).astype(np.uint8)
    spec = {"kind": "channel_zscore", "mask_above": 20}
    z, z_dark = normalise(photo, spec).numpy(), normalise(darker, spec).numpy()
    np.testing.assert_allclose(z[:, disc].mean(axis=1), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, disc].std(axis=1, ddof=1), 1, atol=1e-4)
    np.testing.assert_allclose(z[:, disc], z_dark[:, disc], atol=0.05)  # rounding to uint8 only
    channels_last = np.moveaxis(photo, 0, -1)  # a non-contiguous (C, H, W) view, as the engine passes
    np.testing.assert_allclose(channel_zscore(np.moveaxis(channels_last, -1, 0), 20).numpy(), z, atol=1e-6)
    np.testing.assert_allclose(channel_zscore(np.zeros((3, 4, 4)), 20).numpy(), 0)  # all dark: no NaN


# --- predict_labels: a model card's recipe on a Volume ------------------------------------------

def test_3d_model_on_a_ct_at_another_spacing():
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 2, size=(5, 6, 6))
    hu = np.kron(blocks, np.ones((4, 6, 6))).astype(np.int16) * 400 - 200  # -200 or 200 HU
    hu += rng.integers(-20, 20, size=hu.shape).astype(np.int16)
    ct = Volume(hu, spacing=(2.0, 0.8, 0.8), origin=(5, 6, 7), modality="CT")
    model_card = card(3, (16, 16, 16), spacing=(1.0, 1.6, 1.6),
                      normalisation={"kind": "ct_window", "low": -200, "high": 300})
    seg = predict_labels(pointwise_threshold_net(3, threshold=0.4), model_card, ct, device="cpu")
    assert seg.data.shape == hu.shape and seg.data.dtype == np.uint8
    assert seg.same_grid(ct) and seg.modality == "CT" and seg.labels == {0: "background", 1: "organ"}
    assert seg.meta["model"] == "test-model" and seg.meta["device"] == "cpu" and seg.meta["seconds"] > 0
    assert np.mean(seg.data == (hu > 0)) > 0.97  # threshold 0.4 of the window [-200, 300] is 0 HU


def rising_toward_patient_left_net() -> torch.nn.Module:
    """Class 1 where intensity rises along +x (array): a model that knows which way is left."""
    conv = torch.nn.Conv3d(1, 2, (1, 1, 3), padding=(0, 0, 1))
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[1, 0, 0, 0] = torch.tensor([-50.0, 0.0, 50.0])
    return conv.eval()


def test_a_3d_model_sees_every_scan_in_the_layout_it_was_trained_in():
    # the same patient stored twice: as the model's layout (x toward patient-left) and as many NIfTI
    # files store it (y toward anterior, x toward patient-right), with the matching direction
    ramp = np.broadcast_to(np.linspace(-100, 100, 12, dtype=np.float32), (4, 6, 12)).copy()
    lps = Volume(ramp, spacing=(3.0, 1.0, 2.0), modality="CT")
    nifti_like = Volume(np.ascontiguousarray(ramp[:, ::-1, ::-1]), spacing=(3.0, 1.0, 2.0), modality="CT",
                        origin=(0.0, 5.0, 22.0), direction=np.diag([1.0, -1.0, -1.0]))
    oriented = card(3, (4, 6, 12), normalisation={"kind": "none"})
    oriented.input["orientation"] = "LPS"
    net = rising_toward_patient_left_net()
    inner = (slice(None), slice(None), slice(1, -1))  # away from the zero padding at the x edges
    seg_lps = predict_labels(net, oriented, lps, device="cpu")
    seg_nifti = predict_labels(net, oriented, nifti_like, device="cpu")
    assert seg_nifti.same_grid(nifti_like)  # results stay on the input's grid
    assert np.all(seg_lps.data[inner] == 1)  # intensity rises toward patient-left everywhere
    np.testing.assert_array_equal(seg_nifti.data[:, ::-1, ::-1][inner], seg_lps.data[inner])
    # without an orientation entry the model would see the mirror image and miss every voxel
    unoriented = predict_labels(net, card(3, (4, 6, 12), normalisation={"kind": "none"}), nifti_like, device="cpu")
    assert np.all(unoriented.data[inner] == 0)


def test_model_layout_only_flips_and_swaps_axes():
    from napari_medvision.engine.orientation import back_to_input_layout, in_model_layout, layout_of, model_layout

    rng = np.random.default_rng(6)
    sagittal = np.array([[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # ITK's head T1 stores it so
    vol = Volume(rng.random((5, 6, 7)), spacing=(3.0, 2.0, 1.0), origin=(1, 2, 3), direction=sagittal)
    turned, ornt = model_layout(vol, {"orientation": "LPS"})
    np.testing.assert_allclose(turned.direction, np.eye(3))
    assert turned.spatial_shape == (6, 5, 7) and turned.spacing == (2.0, 3.0, 1.0)
    corner = vol.affine() @ [4, 0, 6, 1]  # a voxel keeps its world position and its value
    index = np.rint(np.linalg.solve(turned.affine(), corner)[:3]).astype(int)
    assert turned.data[tuple(index)] == vol.data[4, 0, 6]
    np.testing.assert_array_equal(in_model_layout(vol.data, ornt), turned.data)
    np.testing.assert_array_equal(back_to_input_layout(turned.data[None], ornt)[0], vol.data)
    as_tensor = back_to_input_layout(torch.from_numpy(turned.data.copy())[None], ornt)[0]
    np.testing.assert_array_equal(as_tensor.numpy(), vol.data)
    assert model_layout(turned, {"orientation": "LPS"})[1] is None  # already there: untouched
    assert model_layout(vol, {})[1] is None  # cards without an orientation keep the stored layout
    as_nifti, _ = model_layout(vol, {"orientation": "RAS"})  # or any other layout a model was trained in
    assert layout_of(as_nifti) == "RAS" and layout_of(turned) == "LPS" and layout_of(vol) == "LSA"
    with pytest.raises(ValueError, match="array layout 'RAX'"):
        model_layout(vol, {"orientation": "RAX"})


def test_every_stored_layout_turns_exactly_and_back():
    import itertools

    from napari_medvision.engine.orientation import back_to_input_layout, layout_of, model_layout

    data = np.random.default_rng(7).random((4, 5, 6))
    for axes in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            direction = np.zeros((3, 3))
            direction[list(axes), [0, 1, 2]] = signs  # the 48 axis-aligned ways to store a scan
            vol = Volume(data, spacing=(1.0, 2.0, 3.0), origin=(10, 20, 30), direction=direction)
            for code in ("LPS", "RAS"):
                turned, ornt = model_layout(vol, {"orientation": code})
                assert layout_of(turned) == code
                world = vol.affine() @ [3, 1, 4, 1]  # a voxel keeps its world position and its value
                index = np.rint(np.linalg.solve(turned.affine(), world)[:3]).astype(int)
                assert turned.data[tuple(index)] == data[3, 1, 4]
                np.testing.assert_array_equal(back_to_input_layout(turned.data[None], ornt)[0], data)


def test_2d_model_on_a_3d_volume_runs_slice_by_slice():
    net = conv_net(2, classes=2, seed=4)
    with torch.no_grad():
        net[2].weight.mul_(20)  # confident logits, as a trained model's
    image = np.random.default_rng(4).normal(size=(5, 20, 24)).astype(np.float32)
    vol = Volume(image, spacing=(3.0, 1.0, 1.0), modality="MR")
    seg = predict_labels(net, card(2, (20, 24)), vol, device="cpu", batch_size=2)
    with torch.no_grad():
        per_slice = net(torch.from_numpy(image)[:, None]).softmax(1).numpy()
    assert seg.data.shape == image.shape
    clear = np.abs(per_slice[:, 1] - per_slice[:, 0]) > 0.01  # float16 probabilities may flip near-ties
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(seg.data[clear], per_slice.argmax(1)[clear])


def test_rgb_photo_with_a_colour_model():
    rgb = np.random.default_rng(5).integers(0, 256, size=(30, 40, 3)).astype(np.uint8)
    photo = Volume(rgb, spacing=(0.01, 0.01), modality="fundus", rgb=True)
    red_minus_green = torch.nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        red_minus_green.weight.zero_()
        red_minus_green.bias.zero_()
        red_minus_green.weight[1, 0] = 100.0
        red_minus_green.weight[1, 1] = -100.0
    colour_card = card(2, (32, 32), channels=3, normalisation={"kind": "rgb_unit"},
                       labels={0: "background", 1: "reddish"})
    seg = predict_labels(red_minus_green.eval(), colour_card, photo, device="cpu")
    assert seg.data.shape == (30, 40) and not seg.rgb and seg.spacing == (0.01, 0.01)
    np.testing.assert_array_equal(seg.data, rgb[..., 0].astype(int) > rgb[..., 1].astype(int))


def test_a_greyscale_model_refuses_a_colour_photo():
    photo = Volume(np.zeros((8, 8, 3), np.uint8), spacing=(1, 1), rgb=True)
    with pytest.raises(ValueError, match="1-channel"):
        predict_labels(conv_net(2), card(2, (8, 8)), photo, device="cpu")


def test_default_batch_size_follows_the_measured_sweet_spots():
    from napari_medvision.engine.inference import default_batch_size

    assert default_batch_size((32, 80, 80), "cpu") == 2  # fastest on the 2-core CPU; 1 was 4x slower
    assert default_batch_size((64, 128, 128), "cpu") == 2  # never a batch of one on a CPU
    assert default_batch_size((16, 32, 32), "cpu") == 8
    assert default_batch_size((64, 128, 128), "cuda") == 8  # MONAI's fastest batch on an H100


def test_the_engine_runs_narrow_3d_networks_channels_last_on_a_gpu():
    # The layout is chosen by width, as measured on an H100 (see prefers_channels_last_3d); on a CPU
    # it changes nothing.
    from napari_medvision.engine.inference import prefers_channels_last_3d
    from napari_medvision.models.registry import build_model
    from napari_medvision.models.transunet import PRESETS_3D

    def network(preset):
        return build_model({"name": "transunet3d", "config": {**PRESETS_3D[preset], "n_classes": 3}})

    assert prefers_channels_last_3d(network("tiny"))       # widest 3D convolution: 64 channels
    assert not prefers_channels_last_3d(network("base"))   # 256 channels
    assert not prefers_channels_last_3d(torch.nn.Conv2d(1, 8, 3))  # no 3D convolution at all


@pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")),
                    reason="torch.compile's CPU backend needs a C compiler, and none is on PATH")
def test_compiled_network_gives_the_same_probabilities():
    # torch.compile (optional, for repeated use on a GPU) must not change the result; the last,
    # short batch is padded to the full batch so the compiled graph is not rebuilt for it.
    net = conv_net(2)
    image = torch.randn(1, 40, 52)
    eager = sliding_window(net, image, (16, 16), overlap=0.25, batch_size=5, activation="softmax")
    compiled = sliding_window(net, image, (16, 16), overlap=0.25, batch_size=5, activation="softmax",
                              compile=True)
    assert len(window_regions((40, 52), (16, 16), 0.25)) % 5  # a short last batch is exercised
    torch.testing.assert_close(compiled.float(), eager.float(), atol=2e-3, rtol=0)
