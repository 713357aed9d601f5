"""Interactive prompts (``mv.InteractiveSession``): clicks, boxes, lassos, scribbles, undo, objects."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("skimage")

import napari_medvision as mv  # noqa: E402
from napari_medvision.tasks.interactive import InteractionError, InteractiveSession  # noqa: E402


def dice(a, b) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def two_balls(bridge: bool = False, seed: int = 0):
    """A noisy MR-like volume with a bright ball at each end (joined by a thick bridge if asked)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.mgrid[:24, :40, :64]
    left = (z - 12) ** 2 + (y - 20) ** 2 + (x - 16) ** 2 <= 8 ** 2
    right = (z - 12) ** 2 + (y - 20) ** 2 + (x - 48) ** 2 <= 8 ** 2
    image = np.where(left | right, 200.0, 80.0)
    if bridge:
        image[10:15, 18:23, 16:48] = 200.0
    image = (image + rng.normal(0, 10, image.shape)).astype(np.float32)
    return mv.Volume(image, spacing=(2.0, 1.5, 1.5), modality="MR"), left, right


def test_a_click_gives_the_object_in_3d_and_undo_redo_step_through_it():
    volume, left, right = two_balls()
    s = mv.InteractiveSession(volume)
    mask = s.add_point((12, 20, 16))
    assert mask.dtype == bool and mask.shape == volume.data.shape
    # one click takes the ball's core (its blurred rim looks different), never the other ball
    assert dice(mask, left) > 0.5 and not (mask & right).any()
    both = s.add_point((12, 20, 48))
    assert (both & right).sum() > 0.3 * right.sum() and (both & left).sum() == (mask & left).sum()
    assert s.undo().sum() == mask.sum() and s.redo().sum() == both.sum()
    assert s.redo().sum() == both.sum()  # nothing to redo: unchanged
    s.reset()
    assert not s.mask.any() and s.undo().sum() == both.sum()


def test_a_negative_click_cuts_away_a_neighbour_of_the_same_brightness():
    volume, left, right = two_balls(bridge=True)
    s = InteractiveSession(volume)
    s.add_point((12, 20, 16))
    stroke = np.zeros(left.shape, dtype=bool)
    stroke[12, 20, 26:38] = True  # along the bridge: same brightness, joined to the right ball
    leaked = s.add_scribble(stroke)
    assert (leaked & right).sum() > 0.3 * right.sum()
    cut = s.add_point((12, 20, 48), positive=False)
    assert (cut & right).sum() < 0.1 * (leaked & right).sum()
    assert (cut & left).sum() > 0.9 * (leaked & left).sum()


def test_box_lasso_and_scribble_each_give_the_object():
    volume, left, _ = two_balls()
    s = InteractiveSession(volume)
    assert dice(s.add_box((4, 12, 8), (20, 28, 24)), left) > 0.8  # 3D box
    s.reset()
    assert dice(s.add_box((12, 11, 7), (12, 29, 25)), left) > 0.8  # a box on one slice
    s.reset()
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    polygon = np.stack([20 + 8 * np.sin(t), 16 + 8 * np.cos(t)], 1)
    lasso = s.add_lasso(polygon, 12)
    assert dice(lasso, left) > 0.85
    s.reset()
    scribble = np.zeros(left.shape, dtype=bool)
    scribble[12, 18:23, 14:19] = True
    assert dice(s.add_scribble(scribble), left) > 0.5  # like a click: the core of the ball


def test_accepted_objects_go_into_one_labels_volume_with_names():
    volume, left, right = two_balls()
    s = InteractiveSession(volume)
    first = s.add_point((12, 20, 16))
    assert s.next_object("left ball") == 1
    assert not s.mask.any() and not s.can_undo
    second = s.add_point((12, 20, 48))
    assert s.next_object() == 2
    assert s.next_object("empty") == 0  # an empty object is not accepted
    labels = s.labels
    assert labels.labels == {1: "left ball", 2: "object 2"} and labels.spacing == volume.spacing
    np.testing.assert_array_equal(labels.data == 1, first)
    np.testing.assert_array_equal(labels.data == 2, second & ~first)


def test_bad_prompts_are_refused_with_a_reason_and_change_nothing():
    volume, _, _ = two_balls()
    s = InteractiveSession(volume)
    with pytest.raises(InteractionError, match="outside the volume"):
        s.add_point((12, 20, 64))
    with pytest.raises(InteractionError, match="no area"):
        s.add_box((12, 10, 10), (12, 10, 30))
    with pytest.raises(InteractionError, match="must match the volume"):
        s.add_scribble(np.ones((2, 2, 2), bool))
    with pytest.raises(InteractionError, match="at least 3"):
        s.add_lasso([[1, 1], [2, 2]], 3)
    assert not s.can_undo and not s.undo().any()  # nothing to undo: an empty mask, no error
    with pytest.raises(InteractionError, match="3D grey image"):
        InteractiveSession(mv.Volume(np.zeros((8, 8), np.float32), spacing=(1.0, 1.0)))


def test_the_slice_preview_agrees_with_the_3d_mask_on_its_slice():
    volume, left, _ = two_balls()
    s = InteractiveSession(volume)
    pending = s.point((12, 20, 16))
    preview = s.preview_slice(12, pending)
    mask = s.add_point((12, 20, 16))
    assert dice(preview, mask[12]) > 0.95


def test_a_scan_seen_before_starts_from_the_cache():
    volume, _, _ = two_balls()
    first = InteractiveSession(volume)
    second = InteractiveSession(volume)  # read from $MEDVISION_HOME's zarr cache
    np.testing.assert_array_equal(first.grid.fine, second.grid.fine)
    assert second.grid.factors == first.grid.factors and second.grid.noise == pytest.approx(first.grid.noise)
    np.testing.assert_array_equal(first.add_point((12, 20, 16)), second.add_point((12, 20, 16)))


def test_real_ct_liver_after_one_and_five_simulated_clicks(data_dir):
    """The bench's simulated user on the real abdominal CT (its liver, 38 k voxels)."""
    from scipy import ndimage as ndi

    folder = data_dir / "ct_mr_totalseg"
    image = mv.load(folder / "example_ct_sm.nii.gz")
    truth = np.asarray(mv.load(folder / "example_seg.nii.gz").data) == 5
    s = InteractiveSession(image)

    def centre(region):
        distance = ndi.distance_transform_edt(np.pad(region, 1), sampling=s.spacing)[1:-1, 1:-1, 1:-1]
        return np.unravel_index(int(np.argmax(distance)), region.shape)

    mask = s.add_point(centre(truth))
    assert dice(mask, truth) > 0.8  # one click: the liver, not a leak into its neighbours
    for _ in range(4):
        labels, _ = ndi.label(mask ^ truth)
        largest = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
        point = centre(largest)
        mask = s.add_point(point, positive=bool(truth[point]))
    assert dice(mask, truth) > 0.75


def test_growth_stops_behind_an_edge_not_at_the_same_distance_without_one():
    """CT soft tissue is bounded by the geodesic cost from the click: an edge is costly to cross."""
    from napari_medvision.tasks.interactive_method import geodesic_within

    edge = np.zeros((8, 8, 80), dtype=np.float32)
    edge[:, :, 40] = 50.0  # an edge across the volume at x = 40
    click = [(np.array([4]), np.array([4]), np.array([20]))]
    everywhere = np.ones(edge.shape, dtype=bool)
    reached = geodesic_within(edge, (3.0, 3.0, 3.0), click, everywhere, limit=150.0)
    assert reached[4, 4, :20].all() and reached[4, 4, 21:40].all()  # up to 60 mm on the click's side
    assert not reached[4, 4, 41:].any()  # nothing behind the edge, 63 mm away
    no_edge = geodesic_within(np.zeros_like(edge), (3.0, 3.0, 3.0), click, everywhere, limit=150.0)
    assert no_edge[4, 4, 41:60].all()
