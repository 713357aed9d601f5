"""mv.synthesize and `medvision synthesize`: an example pair shows the task, MVG fills in the query.

The network here is a tiny randomly initialised MVG (``tests/mvg_helpers.py``): these tests check
the plumbing (canvas, masks, tiling, units, geometry, errors), not image quality; the shipped
model's quality is measured by ``recipes/mvg_evaluation.py``.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import napari_medvision as mv  # noqa: E402
from napari_medvision.cli import main as cli  # noqa: E402
from napari_medvision.engine.progress import Cancelled, CancelToken  # noqa: E402
from napari_medvision.engine.synthesis import tile_starts, unit_scale  # noqa: E402
from napari_medvision.models.mvg import (  # noqa: E402
    QUERY_TARGET, hybrid_target_mask, intensity_prior, make_canvas, quadrant_of_tokens)
from napari_medvision.tasks.synthesis_baselines import histogram_matching, identity, linear_map  # noqa: E402
from napari_medvision.tasks.synthesis_tasks import TASKS, low_dose_ct  # noqa: E402

from mvg_helpers import tiny_mvg_model  # noqa: E402
from test_segment import tiny_ct_model  # noqa: E402

torch.set_num_threads(1)

# A whole head on a coarse grid: ~1 s to simulate once per module, milliseconds to synthesize.
# (Thin slabs at fine spacing hold a shrunken head and are slower to simulate.)
SHAPE, SPACING = (8, 48, 40), (12.0, 4.0, 4.0)


@pytest.fixture(scope="module")
def brain():
    """T1, T2 and tissue labels of one simulated head (the query and its own example pair)."""
    from napari_medvision.synthetic import brain_mr

    images, labels = brain_mr(seed=1, shape=SHAPE, spacing=SPACING, contrasts=("T1", "T2"))
    return images["T1"], images["T2"], labels


@pytest.fixture
def model():
    return tiny_mvg_model().id


def lively_network(model_id):
    """The network of ``model_id`` with a random last layer: a new MVG starts by outputting its
    intensity prior (zero last layer), which would hide what the Transformer reads."""
    network, _ = mv.models.load_model(model_id)
    torch.manual_seed(2)
    for parameter in network.pixel_head[-1].parameters():
        torch.nn.init.normal_(parameter, std=0.5)
    return network


def middle_slice(volume):
    """The middle axial slice as a 2D Volume with its in-plane geometry."""
    return mv.Volume(np.asarray(volume.data)[len(volume.data) // 2], spacing=volume.spacing[1:],
                     modality=volume.modality, labels=volume.labels)


def oblique(volume):
    """``volume`` with a rotated direction and an origin away from zero, to check geometry is kept."""
    angle = np.deg2rad(20)
    direction = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    return mv.Volume(volume.data, spacing=(2.0, 1.25, 1.1), origin=(-40.0, 12.5, 7.0), direction=direction,
                     modality=volume.modality)


# --- the public call ----------------------------------------------------------------------------

def test_a_3d_volume_gives_an_image_on_its_grid(brain, model):
    t1, t2, _ = brain
    query = oblique(t1)
    before = np.array(query.data, copy=True)
    out = mv.synthesize(query, model=model, examples=[(t1, t2)], device="cpu")
    assert not out.is_labels and out.modality == "MR" and not out.rgb
    assert out.data.shape == SHAPE and out.data.dtype == np.float32 and np.isfinite(out.data).all()
    assert out.same_grid(query, tol=1e-9)
    np.testing.assert_array_equal(query.data, before)  # the input is never changed


def test_a_2d_slice_and_a_colour_photo_give_2d_images(brain, model):
    t1, t2, _ = brain
    out = mv.synthesize(middle_slice(t1), model=model, examples=[(middle_slice(t1), middle_slice(t2))], device="cpu")
    assert out.data.shape == SHAPE[1:] and out.spacing == t1.spacing[1:]

    from napari_medvision.synthetic import fundus_photo

    photo, vessels = fundus_photo(seed=0, size=(64, 56))
    out = mv.synthesize(photo, model=model, examples=[(photo, vessels)], device="cpu")
    assert out.data.shape == (64, 56) and not out.rgb and out.spacing == photo.spacing


def test_a_2d_query_with_a_3d_example_and_arrays_as_examples(brain, model):
    t1, t2, _ = brain
    out = mv.synthesize(middle_slice(t1), model=model, examples=[(np.asarray(t1.data), np.asarray(t2.data))],
                        device="cpu")
    assert out.data.shape == SHAPE[1:] and np.isfinite(out.data).all()

    # a 2D query is paired with the example's middle slice (its first is the top of the head):
    # each example slice's target is its own number x 10, and a new network returns the target's
    # grey level (its intensity prior), so the output shows which slice was used
    numbered = t1.with_data(np.broadcast_to(10.0 * np.arange(SHAPE[0])[:, None, None], SHAPE).astype(np.float32))
    out = mv.synthesize(middle_slice(t1), model=model, examples=[(t1, numbered)], device="cpu")
    np.testing.assert_allclose(out.data, 10.0 * ((SHAPE[0] - 1) // 2), atol=0.5)


def test_the_example_pair_conditions_the_output(brain, model):
    t1, t2, _ = brain
    # the mirrored T2 has the same grey levels (so the same unit range): only its content differs
    mirrored = t2.with_data(np.ascontiguousarray(np.asarray(t2.data)[..., ::-1]))
    a = mv.synthesize(t1, model=model, examples=[(t1, t2)], device="cpu")
    b = mv.synthesize(t1, model=model, examples=[(t1, mirrored)], device="cpu")
    assert a.data.shape == b.data.shape
    assert np.abs(a.data - b.data).mean() > 1e-3 * np.abs(a.data).mean()


def test_a_denoising_pair_runs_on_the_query_pixels_and_a_contrast_pair_at_the_example_scale(brain, model, monkeypatch):
    """A pair that changes units shows anatomy at its own scale, so the query is brought to the
    example's pixel spacing; a pair in one unit space (denoising, inpainting) shows a local
    operation, so the query keeps its own pixels (resampled, a small object would lose its detail)."""
    from napari_medvision.engine import synthesis
    from napari_medvision.tasks import synthesize as synthesize_module

    shapes = []
    generate = synthesis.generate_slices

    def recording(network, queries, *args, **kwargs):
        shapes.append(queries[0].shape)
        return generate(network, queries, *args, **kwargs)

    monkeypatch.setattr(synthesize_module, "generate_slices", recording)  # the name tasks.synthesize calls
    t1, t2, _ = brain

    def coarse(volume):  # the example at twice the query's pixel size
        return mv.Volume(np.ascontiguousarray(np.asarray(volume.data)[:, ::2, ::2]), spacing=(12.0, 8.0, 8.0),
                         modality="MR")

    noise = np.random.default_rng(0).normal(0, 0.01 * float(np.ptp(t1.data)), SHAPE).astype(np.float32)
    noisy = t1.with_data(np.asarray(t1.data) + noise)
    mv.synthesize(t1, model=model, examples=[(coarse(noisy), coarse(t1))], device="cpu")
    mv.synthesize(t1, model=model, examples=[(coarse(t1), coarse(t2))], device="cpu")
    assert shapes == [SHAPE[1:], (SHAPE[1] // 2, SHAPE[2] // 2)]


def test_same_inputs_and_seed_give_the_same_output(brain, model):
    t1, t2, _ = brain
    a = mv.synthesize(t1, model=model, examples=[(t1, t2)], device="cpu")
    b = mv.synthesize(t1, model=model, examples=[(t1, t2)], device="cpu")
    np.testing.assert_array_equal(a.data, b.data)

    # the seed picks the holes of the self-made inpainting example
    hole = np.zeros(SHAPE, bool)
    hole[:, 20:30, 15:25] = True
    a = mv.synthesize(t1, model=model, task="inpaint", mask=hole, seed=3, device="cpu")
    b = mv.synthesize(t1, model=model, task="inpaint", mask=hole, seed=3, device="cpu")
    c = mv.synthesize(t1, model=model, task="inpaint", mask=hole, seed=4, device="cpu")
    np.testing.assert_array_equal(a.data, b.data)
    assert not np.array_equal(a.data, c.data)


def test_autoregressive_generation_keeps_the_first_chunk_and_redoes_the_rest(brain, model):
    network = lively_network(model)
    torch.manual_seed(1)
    tile = network.tile
    prompt_image, prompt_target, query = (torch.rand(2, 1, tile, tile) for _ in range(3))
    one = network.generate(prompt_image, prompt_target, query, steps=1)
    two = network.generate(prompt_image, prompt_target, query, steps=2)
    assert one.shape == two.shape == (2, 1, tile, tile)
    half = network.tile_tokens // 2 * network.patch  # first chunk: the top half of the token rows
    torch.testing.assert_close(two[..., :half, :], one[..., :half, :], rtol=0, atol=0)
    assert (two[..., half:, :] - one[..., half:, :]).abs().max() > 1e-6  # conditioned on the first chunk

    t1, t2, _ = brain
    out = mv.synthesize(t1, model=model, examples=[(t1, t2)], steps=2, device="cpu")
    assert out.data.shape == SHAPE and np.isfinite(out.data).all()


def test_label_map_examples_give_named_labels(brain, model):
    t1, _, labels = brain
    out = mv.synthesize(t1, model=model, examples=[(t1, labels)], device="cpu")
    example_ids = set(np.unique(labels.data).tolist())
    assert out.is_labels and out.data.shape == SHAPE and out.data.dtype == np.uint8
    assert set(np.unique(out.data).tolist()) <= example_ids
    assert out.labels == {k: labels.labels[k] for k in example_ids if k}
    assert out.same_grid(t1)
    # how grey levels became labels was fitted on the (mirrored) prompt pair and is reported
    assert out.meta["decoding"] in ("midway", "quantiles") and len(out.meta["decision_levels"]) == len(example_ids) - 1


def test_one_structure_is_cut_at_the_level_that_fits_the_prompt_pair(brain, model):
    from napari_medvision.tasks.synthesize import LEVELS

    t1, _, labels = brain
    white_matter = labels.with_data((np.asarray(labels.data) == 2).astype(np.uint8), labels={1: "white matter"})
    out = mv.synthesize(t1, model=model, examples=[(t1, white_matter)], device="cpu")
    (level,) = out.meta["decision_levels"]
    assert out.meta["decoding"] == f"level {level:.2f}" and np.isclose(LEVELS, level, atol=1e-4).any()
    assert set(np.unique(out.data).tolist()) <= {0, 1} and out.labels == {1: "white matter"}


def test_inpainting_changes_only_the_masked_pixels(brain, model):
    t1, _, _ = brain
    hole = np.zeros(SHAPE, bool)
    hole[:, 18:30, 12:26] = True
    out = mv.synthesize(t1, model=model, task="inpaint", mask=mv.Volume(hole.astype(np.uint8), spacing=t1.spacing),
                        device="cpu")
    original = np.asarray(t1.data)
    np.testing.assert_array_equal(out.data[~hole], original[~hole])
    assert not np.allclose(out.data[hole], original[hole])


def test_progress_reaches_the_end_and_cancel_stops(brain, model):
    t1, t2, _ = brain
    seen = []
    mv.synthesize(t1, model=model, examples=[(t1, t2), (t1, t2)], batch_size=8, device="cpu",
                  progress=lambda done, total, message: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        mv.synthesize(t1, model=model, examples=[(t1, t2)], device="cpu", cancel=token)


def test_bad_requests_are_refused_with_the_reason(brain, model):
    t1, t2, labels = brain
    with pytest.raises(ValueError, match="is a label map"):
        mv.synthesize(labels, model=model, examples=[(t1, t2)])
    series = mv.Volume(np.zeros((2, 4, 32, 32), np.float32), spacing=(1, 1, 1), modality="MR")
    with pytest.raises(ValueError, match="a 2D image or a 3D volume, this one is 4D"):
        mv.synthesize(series, model=model, examples=[(t1, t2)])
    with pytest.raises(ValueError, match="say what to synthesize"):
        mv.synthesize(t1, model=model)
    with pytest.raises(ValueError, match="unknown synthesis task 'make-it-pretty'"):
        mv.synthesize(t1, model=model, task="make-it-pretty")
    with pytest.raises(ValueError, match="inpainting needs mask="):
        mv.synthesize(t1, model=model, task="inpaint")
    with pytest.raises(ValueError, match=r"inpainting mask has shape \(8, 48\)"):
        mv.synthesize(t1, model=model, task="inpaint", mask=np.ones((8, 48), bool))
    with pytest.raises(ValueError, match="inpainting mask is empty"):
        mv.synthesize(t1, model=model, task="inpaint", mask=np.zeros(SHAPE, bool))
    tiny_ct_model()
    with pytest.raises(ValueError, match="tiny-ct is a segmentation model; synthesis needs an MVG model"):
        mv.synthesize(t1, model="tiny-ct", examples=[(t1, t2)])
    with pytest.raises(ValueError, match="no model with this id"):
        mv.synthesize(t1, model="no-such-model", examples=[(t1, t2)])


def test_named_tasks_are_listed():
    names = mv.synthesis_tasks()
    assert {"t1-to-t2", "t2-to-t1", "denoise-ct", "inpaint", "segment-ct-organs"} <= set(names)
    assert names == sorted(TASKS)


# --- the network's canvas and training masks ----------------------------------------------------

def test_canvas_puts_the_four_tiles_in_their_quadrants():
    t = 16
    tiles = [torch.full((1, 1, t, t), float(k)) for k in (1, 2, 3, 4)]
    canvas = make_canvas(*tiles)
    assert canvas.shape == (1, 1, 2 * t, 2 * t)
    assert (canvas[..., :t, :t] == 1).all() and (canvas[..., :t, t:] == 2).all()  # prompt image | prompt target
    assert (canvas[..., t:, :t] == 3).all() and (canvas[..., t:, t:] == 4).all()  # query image  | query target
    assert (make_canvas(*tiles[:3])[..., t:, t:] == 0).all()  # no answer given: zeros

    # patch tokens in raster order (as Conv2d + flatten makes them) carry the quadrant's tile
    patch = 4
    per_token = torch.nn.functional.avg_pool2d(canvas, patch).flatten()
    grid = 2 * t // patch
    np.testing.assert_array_equal(per_token.numpy(), quadrant_of_tokens(grid).numpy() + 1)
    assert quadrant_of_tokens(4).tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]


def test_the_network_cannot_see_a_hidden_answer(model):
    network = lively_network(model)
    assert int((network.token_quadrant == QUERY_TARGET).sum()) == network.tile_tokens ** 2
    torch.manual_seed(0)
    t = network.tile
    prompt_image, prompt_target, query, answer = (torch.rand(2, 1, t, t) for _ in range(4))
    with torch.no_grad():
        blind = network(make_canvas(prompt_image, prompt_target, query))
        hidden = network(make_canvas(prompt_image, prompt_target, query, answer))
        shown = network(make_canvas(prompt_image, prompt_target, query, answer),
                        torch.zeros(2, network.tile_tokens ** 2, dtype=torch.bool))
    assert blind.shape == (2, 1, t, t)
    torch.testing.assert_close(hidden, blind)  # a fully hidden answer is never read
    assert (shown - blind).abs().max() > 1e-6  # a visible one is


def test_the_intensity_prior_reads_the_grey_level_mapping_off_the_prompt_pair():
    torch.manual_seed(0)
    prompt_image, query = torch.rand(2, 1, 1, 32, 32)
    prior = intensity_prior(prompt_image, 1.0 - prompt_image, query)  # an inverted contrast, like T1 -> T2
    assert prior.shape == query.shape
    expected = 1.0 - query
    assert float((prior - expected).abs().mean()) < 0.06
    assert np.corrcoef(prior.flatten().numpy(), expected.flatten().numpy())[0, 1] > 0.97
    # a new network outputs exactly this prior: training starts from the plain grey-level mapping
    network = mv.models.build_model({"name": "mvg", "config": {"preset": "tiny"}}).eval()
    with torch.no_grad():
        out = network(make_canvas(prompt_image, 1.0 - prompt_image, query))
    torch.testing.assert_close(out, prior)


def test_hybrid_masks_mix_masked_modelling_and_raster_prefixes():
    t = 6
    generator = torch.Generator().manual_seed(0)
    mask = hybrid_target_mask(200, t, mim_ratio=0.5, generator=generator)
    assert mask.shape == (200, t * t) and mask.dtype == torch.bool
    assert mask.any(1).all()  # every sample has something to predict

    def is_prefix(row):  # whole token rows visible from the top, everything after hidden
        visible = int((~row).sum())
        return visible % t == 0 and bool((~row[:visible]).all()) and bool(row[visible:].all())

    prefix = [is_prefix(row) for row in mask]
    assert 50 < sum(prefix) < 150  # about half of each kind
    autoregressive = hybrid_target_mask(50, t, mim_ratio=0.0, generator=generator)
    assert all(is_prefix(row) for row in autoregressive)
    assert len({int((~row).sum()) for row in autoregressive}) > 2  # random prefix lengths
    masked = hybrid_target_mask(200, t, mim_ratio=1.0, mim_keep=(0.2, 0.4), generator=generator)
    assert 0.55 < masked.float().mean() < 0.85  # 20-40 % of patches stay visible


# --- units, tiling, baselines, degradations ----------------------------------------------------

def test_unit_scales_round_trip():
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 2, 5], size=(6, 7)).astype(np.uint8)
    scale = unit_scale(labels, is_labels=True)
    assert scale.levels == (0, 2, 5)
    unit = scale.to_unit(labels)
    np.testing.assert_array_equal(scale.decode_labels(unit), labels)
    # generated grey levels are never exact: anything nearer to a level than to its neighbour decodes to it
    np.testing.assert_array_equal(scale.decode_labels(unit + rng.uniform(-0.19, 0.19, unit.shape)), labels)

    hu = rng.uniform(-1200, 2000, 100).astype(np.float32)
    ct = unit_scale(hu, "CT")
    assert ct.to_unit(np.array([-1000.0, 0.0, 1000.0])).tolist() == [0.0, 0.5, 1.0]
    np.testing.assert_allclose(ct.from_unit(ct.to_unit(hu)), hu, rtol=1e-5, atol=1e-3)

    mr = rng.gamma(2.0, 100.0, 10000).astype(np.float32)
    scale = unit_scale(mr, "MR")
    low, high = np.percentile(mr, [0.5, 99.5])
    np.testing.assert_allclose(scale.to_unit(np.array([low, high])), [0.0, 1.0], atol=1e-5)


@pytest.mark.parametrize("length,tile,overlap", [(10, 32, 0.5), (32, 32, 0.5), (33, 32, 0.5), (100, 32, 0.5),
                                                 (257, 64, 0.25), (500, 128, 0.75)])
def test_tiles_cover_the_length_with_the_overlap_asked(length, tile, overlap):
    starts = tile_starts(length, tile, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    covered = np.zeros(max(length, tile), bool)
    for s in starts:
        covered[s:s + tile] = True
    assert covered[:length].all()
    if length > tile:
        assert starts[-1] == length - tile  # no tile runs past the end
        assert all(b - a <= tile * (1 - overlap) for a, b in zip(starts, starts[1:]))


def test_baselines():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 100, (20, 20))
    query = rng.uniform(0, 100, (10, 10))
    np.testing.assert_allclose(linear_map(query, image, 2.5 * image - 40), 2.5 * query - 40, rtol=1e-5, atol=1e-3)

    target = rng.exponential(50.0, (40, 40))
    matched = histogram_matching(rng.normal(0, 1, (40, 40)), target)
    quantiles = [0.1, 0.25, 0.5, 0.75, 0.9]
    np.testing.assert_allclose(np.quantile(matched, quantiles), np.quantile(target, quantiles), rtol=0.05)

    target_scale = unit_scale(target)
    copied = identity(query, target_scale)
    np.testing.assert_allclose(np.percentile(copied, [0.5, 99.5]), [target_scale.low, target_scale.high], rtol=1e-4)


def test_low_dose_ct_noise_grows_as_photons_fall_and_averages_to_zero_in_water():
    yy, xx = np.mgrid[:64, :64]
    water = np.where((yy - 32) ** 2 + (xx - 32) ** 2 < 28 ** 2, 0.0, -1000.0)
    centre = (yy - 32) ** 2 + (xx - 32) ** 2 < 15 ** 2
    rng = np.random.default_rng(0)
    noise = {photons: (low_dose_ct(water, 1.0, photons, rng) - water)[centre] for photons in (1e4, 1e5, 1e6)}
    stds = {p: float(n.std()) for p, n in noise.items()}
    # Poisson counts: noise std goes as 1 / sqrt(photons), about 3.2x per tenfold drop
    for high, low in ((1e6, 1e5), (1e5, 1e4)):
        assert 2.5 < stds[low] / stds[high] < 4.0, stds
    for p, n in noise.items():
        assert abs(float(n.mean())) < 0.15 * stds[p], (p, float(n.mean()), stds[p])
    assert low_dose_ct(water, 1.0, 1e5, rng).dtype == np.float32


# --- command line ------------------------------------------------------------------------------

def test_command_line_synthesize_writes_an_image_on_the_input_grid(brain, model, tmp_path, capsys):
    import nibabel as nib

    t1, t2, _ = brain
    query = mv.save(oblique(t1), tmp_path / "t1.nii.gz")
    ex_image, ex_target = mv.save(t1, tmp_path / "ex_t1.nii.gz"), mv.save(t2, tmp_path / "ex_t2.nii.gz")
    out = tmp_path / "t2_like.nii.gz"
    code = cli(["synthesize", str(query), "-o", str(out), "--model", model, "--example", str(ex_image),
                str(ex_target), "--device", "cpu", "--steps", "2", "--consistency", "0.5", "--seed", "1"])
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    written, source = mv.load(out), mv.load(query)
    assert written.same_grid(source, tol=1e-5) and not written.is_labels
    header = nib.load(str(out))  # checked apart from our reader: NIfTI stores (x, y, z)
    assert header.shape == SHAPE[::-1]
    np.testing.assert_allclose(header.header.get_zooms(), (1.1, 1.25, 2.0), rtol=1e-6)  # oblique()'s


def test_command_line_lists_tasks_and_refuses_bad_input(brain, model, tmp_path, capsys):
    assert cli(["synthesize", "--list-tasks"]) == 0
    listed = capsys.readouterr().out
    assert "t1-to-t2" in listed and "inpaint" in listed and "denoise-ct" in listed

    t1, t2, _ = brain
    query = str(mv.save(t1, tmp_path / "t1.nii.gz"))
    out = str(tmp_path / "out.nii.gz")
    tiny_ct_model()
    bad = {
        "say what to synthesize": ["--model", model],
        "unknown synthesis task": ["--model", model, "--task", "make-it-pretty"],
        "inpainting needs mask=": ["--model", model, "--task", "inpaint"],
        "is a segmentation model": ["--model", "tiny-ct", "--example", query, query],
    }
    for reason, options in bad.items():
        assert cli(["synthesize", query, "-o", out, "--device", "cpu", *options]) == 2
        err = capsys.readouterr().err
        assert reason in err and len(err.strip().splitlines()) == 1, err
    assert cli(["synthesize", str(tmp_path / "missing.nii.gz"), "-o", out, "--model", model, "--task", "t1-to-t2"]) == 2
    assert not (tmp_path / "out.nii.gz").exists()


# --- the shipped model ---------------------------------------------------------------------------

def test_shipped_mvg_loads_through_the_registry(brain):
    if "mvg-generalist" not in [card.id for card in mv.models.available()]:
        pytest.skip("mvg-generalist is not shipped in weights/ yet (its recipe is recipes/mvg_generalist.py)")
    from napari_medvision.synthetic import brain_mr

    network, card = mv.models.load_model("mvg-generalist", device="cpu")
    assert card.task == "synthesis" and card.architecture["name"] == "mvg" and network.tile % network.patch == 0
    t1, t2, labels = brain
    # the example pair of another subject at about the training recipe's pixel size sets the scale
    example, _ = brain_mr(seed=2, shape=(8, 120, 100), spacing=(12.0, 1.6, 1.6), contrasts=("T1", "T2"))
    query, truth = middle_slice(t1), np.asarray(middle_slice(t2).data)
    out = mv.synthesize(query, model=card, examples=[(example["T1"], example["T2"])], device="cpu")
    assert out.data.shape == SHAPE[1:] and np.isfinite(out.data).all()
    # a T2-like contrast inside the brain (CSF bright, white matter dark), unlike the T1 it was made from
    brain_tissue = np.asarray(middle_slice(labels).data) > 0
    to_t2 = np.corrcoef(out.data[brain_tissue], truth[brain_tissue])[0, 1]
    assert to_t2 > np.corrcoef(np.asarray(query.data)[brain_tissue], truth[brain_tissue])[0, 1] + 0.2
    assert to_t2 > 0.3


def test_shipped_mvg_denoises_a_real_low_dose_ct(data_dir):
    """The named denoise-ct task on real CT it never trained on (TotalSegmentator slices 20-29, 3 mm),
    scored as docs/evaluation/synthesis-mvg.md reports it: clearer than the noisy input, and structurally closer to
    the truth than the grey-level map read off the same prompt pair."""
    if "mvg-generalist" not in [card.id for card in mv.models.available()]:
        pytest.skip("mvg-generalist is not shipped in weights/ yet (its recipe is recipes/mvg_generalist.py)")
    from napari_medvision.recipes.mvg_evaluation import LOW_DOSE_PHOTONS, image_metrics
    from napari_medvision.tasks.synthesis_baselines import intensity_map

    ct = mv.load(data_dir / "ct_mr_totalseg" / "example_ct_sm.nii.gz")
    clean = np.asarray(ct.data, np.float32)[20:30]
    rng = np.random.default_rng(7)
    noisy = ct.with_data(np.stack([low_dose_ct(s, ct.spacing[-1], LOW_DOSE_PHOTONS, rng) for s in clean]))
    denoised = np.asarray(mv.synthesize(noisy, task="denoise-ct", device="cpu").data)
    prompt_image, prompt_target = (np.asarray(v.data) for v in TASKS["denoise-ct"].make_examples(0)[0])
    prior = intensity_map(np.asarray(noisy.data), prompt_image, prompt_target, "CT")

    window = unit_scale(np.zeros(1), "CT")
    mvg, before, baseline = (image_metrics(a, clean, window) for a in (denoised, np.asarray(noisy.data), prior))
    assert mvg["psnr"] > before["psnr"] + 2.0 and mvg["ssim"] > before["ssim"] + 0.1
    assert mvg["ssim"] > baseline["ssim"] + 0.03 and mvg["psnr"] > baseline["psnr"] - 0.5


def test_an_example_pair_off_one_grid_is_refused():
    import numpy as np
    import pytest

    import napari_medvision as mv
    from mvg_helpers import tiny_mvg_model

    tiny_mvg_model()
    image = mv.Volume(np.random.default_rng(0).random((24, 20)).astype(np.float32), spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="prompt pair must lie on one grid"):
        mv.synthesize(image, model="tiny-mvg", examples=[(image, np.zeros((12, 20), np.float32))])


def test_label_examples_with_different_ids_share_one_grey_level_per_id():
    """Averaging two label examples compares like with like: id 2 is the same grey in both."""
    import numpy as np
    import pytest

    from napari_medvision.tasks.synthesize import _prepared_examples

    image = np.random.default_rng(0).random((2, 16, 16)).astype(np.float32)
    two_ids = np.zeros((2, 16, 16), np.uint8)
    two_ids[:, :8] = 2
    three_ids = two_ids.copy()
    three_ids[:, 12:] = 3
    examples, scale = _prepared_examples([(image, two_ids), (image, three_ids)], "MR")
    assert scale.levels == (0, 2, 3)
    assert examples[0][1][0, 0, 0] == examples[1][1][0, 0, 0] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="mix label-map and image targets"):
        _prepared_examples([(image, two_ids), (image, image)], "MR")
