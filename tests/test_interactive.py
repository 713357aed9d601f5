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


def test_growth_stops_where_it_leaks_through_a_gap_not_in_open_space():
    """CT soft tissue: the growth from a click stops where its rate, low while it fills an organ
    walled by an edge, rises again as it pours through a gap in the wall."""
    from napari_medvision.tasks.interactive_method import geodesic_grown

    z, y, x = np.mgrid[:30, :40, :48]
    r = np.sqrt((z - 15) ** 2 + (y - 20) ** 2 + (x - 14) ** 2)
    edge = np.where((r > 9) & (r <= 10.5), 20.0, 0.0).astype(np.float32)  # a wall around a ball
    edge[14:17, 19:22, 22:26] = 0.0  # a 3x3-voxel gap in it towards +x
    click = [(np.array([15]), np.array([20]), np.array([14]))]
    everywhere = np.ones(edge.shape, dtype=bool)
    grown = geodesic_grown(edge, (3.0, 3.0, 3.0), click, everywhere)
    assert grown[r <= 9].all()  # the whole ball
    assert grown[r > 10.5].sum() < 0.01 * (r > 10.5).sum()  # next to nothing beyond the wall
    assert geodesic_grown(np.zeros_like(edge), (3.0, 3.0, 3.0), click, everywhere).all()  # no wall: all


def test_a_negative_click_on_a_bulge_takes_the_bulge_not_the_object():
    """The cut stops at the neck joining a wrongly included bulge of the same brightness to the
    object, though the negative click is nearer to the ball's far side than the positive click is."""
    rng = np.random.default_rng(1)
    z, y, x = np.mgrid[:24, :40, :48]
    ball = (z - 12) ** 2 + (y - 20) ** 2 + (x - 16) ** 2 <= 8 ** 2
    bulge = ((z - 12) ** 2 + (y - 20) ** 2 + (x - 29) ** 2 <= 5 ** 2) & ~ball
    image = (np.where(ball | bulge, 200.0, 80.0) + rng.normal(0, 10, ball.shape)).astype(np.float32)
    s = InteractiveSession(mv.Volume(image, spacing=(1.5, 1.5, 1.5), modality="MR"))
    first = s.add_point((12, 20, 10))
    assert (first & bulge).sum() > 0.5 * bulge.sum()  # the bulge looks like the object: taken in
    preview = s.preview_slice(12, s.point((12, 20, 30), positive=False))
    cut = s.add_point((12, 20, 30), positive=False)
    assert dice(preview, cut[12]) > 0.95  # the slice preview cuts at the same neck
    assert (cut & bulge).sum() < 0.2 * (first & bulge).sum()
    assert (cut & ball).sum() > 0.97 * (first & ball).sum()


def simulated_clicks(session, truth, clicks):
    """The bench's simulated user: (mask before, click, positive, mask after) for each click."""
    from scipy import ndimage as ndi

    def centre(region):
        distance = ndi.distance_transform_edt(np.pad(region, 1), sampling=session.spacing)[1:-1, 1:-1, 1:-1]
        return tuple(int(i) for i in np.unravel_index(int(np.argmax(distance)), region.shape))

    mask, steps = np.zeros_like(truth), []
    for k in range(clicks):
        if k == 0:
            point, positive = centre(truth), True
        else:
            labels, n = ndi.label(mask ^ truth)
            if n == 0:
                break
            point = centre(labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1)
            positive = bool(truth[point])
        after = session.add_point(point, positive=positive)
        steps.append((mask, point, positive, after))
        mask = after
    return steps


def assert_negative_clicks_remove_only_what_is_wrong(steps, truth, spacing, radius_mm=15.0):
    """Each negative click takes most of the false positive within ``radius_mm`` of it (a false
    positive can be a thin rim along the whole object: one click fixes the part it lands on) and
    never lowers Dice by more than 0.02."""
    from scipy import ndimage as ndi

    negatives = [step for step in steps if not step[2]]
    assert negatives, "the simulated user made no negative click: the test checks nothing"
    for before, point, _, after in negatives:
        wrong, _ = ndi.label(before & ~truth)
        grid = np.ogrid[tuple(slice(0, n) for n in truth.shape)]
        near = sum(((g - p) * s) ** 2 for g, p, s in zip(grid, point, spacing)) <= radius_mm ** 2
        region = (wrong == wrong[point]) & near  # the false positive clicked on, near the click
        assert (after & region).sum() <= 0.5 * region.sum(), f"the click at {point} left its false positive"
        assert dice(after, truth) > dice(before, truth) - 0.02, f"the click at {point} lowered Dice"


def test_real_ct_negative_clicks_remove_the_false_positive_without_the_object(data_dir):
    """Real abdominal CT, left autochthon muscle (tuning data): the first click spills into its
    neighbours; each negative click of the simulated user removes the spill it lands on."""
    folder = data_dir / "ct_mr_totalseg"
    s = InteractiveSession(mv.load(folder / "example_ct_sm.nii.gz"))
    truth = np.asarray(mv.load(folder / "example_seg.nii.gz").data) == 86
    assert_negative_clicks_remove_only_what_is_wrong(simulated_clicks(s, truth, 5), truth, s.spacing)


def test_real_brats_negative_click_never_collapses_the_tumour(data_dir):
    """BraTS 2013 patient 3, FLAIR, cropped around the tumour (where a negative click took the
    whole scan's mask from 0.87 to 0.53 Dice under the former halfway cut): a negative click at
    the centre of the largest false positive after three clicks."""
    folder = data_dir / "mri_brain_tumour_brats2013" / "brats_2013_pat0003_1"
    image = mv.load(folder / "Flair_subtrMeanDivStd.nii.gz")
    truth = np.asarray(mv.load(folder / "OTMultiClass.nii.gz").data) > 0
    from scipy import ndimage as ndi

    box = tuple(slice(max(s.start - 12, 0), s.stop + 12) for s in ndi.find_objects(truth.astype(np.uint8))[0])
    crop = image.with_data(np.ascontiguousarray(np.asarray(image.data)[box]))
    s = InteractiveSession(crop, use_cache=False)
    truth = truth[box]
    steps = simulated_clicks(s, truth, 3)
    before = steps[-1][3]
    wrong, n = ndi.label(before & ~truth)
    largest = wrong == np.argmax(np.bincount(wrong.ravel())[1:]) + 1  # the largest false positive
    distance = ndi.distance_transform_edt(largest, sampling=s.spacing)
    point = tuple(int(i) for i in np.unravel_index(int(np.argmax(distance)), largest.shape))
    steps.append((before, point, False, s.add_point(point, positive=False)))
    assert_negative_clicks_remove_only_what_is_wrong(steps, truth, s.spacing)
