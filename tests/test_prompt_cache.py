"""Prompting again from the cache: one more painted slice redoes only the prompt-dependent work,
gives exactly what a fresh computation gives, and never trusts a damaged cache entry."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import napari_medvision as mv
from napari_medvision.engine.cache import cache_dir
from napari_medvision.synthetic import ct_abdomen
from napari_medvision.tasks.prompting.propagate import demons_key, slice_displacements
from napari_medvision.tasks.prompting.volume_cache import VolumeCache

torch.set_num_threads(1)

SHAPE, SPACING = (12, 40, 48), (8.0, 6.0, 6.0)  # a small phantom: a prompt takes about a second
LIVER = 1


@pytest.fixture(scope="module")
def phantom():
    image, labels = ct_abdomen(seed=2, shape=SHAPE, spacing=SPACING)
    liver = (np.asarray(labels.data) == LIVER).astype(np.uint8)
    return image, labels.with_data(liver, labels={LIVER: "liver"})


def painted(labels, slices):
    data = np.zeros_like(labels.data)
    data[slices] = labels.data[slices]
    return labels.with_data(data)


def _slices_with_liver(labels):
    return np.flatnonzero(np.asarray(labels.data).reshape(SHAPE[0], -1).any(1))


def test_one_more_slice_from_the_cache_equals_a_fresh_prompt(phantom):
    image, truth = phantom
    z = _slices_with_liver(truth)
    first, more = [int(z[len(z) // 3])], [int(z[len(z) // 3]), int(z[2 * len(z) // 3])]

    cold = mv.prompt(image, annotations=painted(truth, first), device="cpu")
    warm = mv.prompt(image, annotations=painted(truth, more), device="cpu")
    fresh = mv.prompt(image, annotations=painted(truth, more), device="cpu", cache=False)

    assert cold.meta["cached"] == [] and fresh.meta["cached"] == []
    assert "prompt-demons" in warm.meta["cached"]
    np.testing.assert_array_equal(warm.data, fresh.data)
    assert warm.meta["choice"] == fresh.meta["choice"]
    assert warm.meta["leave_one_out"] == fresh.meta["leave_one_out"]
    # and the cached fields are SimpleITK's demons fields, not something else of the right shape
    store = VolumeCache(image)
    path = cache_dir() / f"{store.key('prompt-demons', demons_key())}.zarr"
    assert path.is_dir()
    grey = np.clip((np.asarray(image.data, np.float32) + 250) / 600, -0.5, 1.5)
    np.testing.assert_array_equal(store.get("prompt-demons", demons_key(), {"displacements": (None, "float32")},
                                            lambda: pytest.fail("the fields should be cached"))["displacements"],
                                  slice_displacements(grey))


def test_an_edited_volume_does_not_read_the_old_entries(phantom):
    image, truth = phantom
    annotations = painted(truth, [int(_slices_with_liver(truth)[2])])
    mv.prompt(image, annotations=annotations, device="cpu")
    edited = np.asarray(image.data).copy()
    edited[-1, -1, -1] += 1  # one voxel in the last slice

    again = mv.prompt(image.with_data(edited), annotations=annotations, device="cpu")

    assert again.meta["cached"] == []


def _flip_a_byte(store_path, array):
    chunk = sorted(p for p in (store_path / array).rglob("*") if p.is_file() and p.name != "zarr.json")[1]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x10  # same size, one bit: only the checksum notices
    chunk.write_bytes(bytes(data))


def test_a_damaged_cached_entry_is_rebuilt_not_trusted(phantom):
    kind, array, params = "prompt-demons", "displacements", demons_key()
    image, truth = phantom
    annotations = painted(truth, [int(_slices_with_liver(truth)[3])])
    fresh = mv.prompt(image, annotations=annotations, device="cpu", cache=False)
    mv.prompt(image, annotations=annotations, device="cpu")
    path = cache_dir() / f"{VolumeCache(image).key(kind, params)}.zarr"
    _flip_a_byte(path, array)

    rebuilt = mv.prompt(image, annotations=annotations, device="cpu")

    assert kind not in rebuilt.meta["cached"]
    np.testing.assert_array_equal(rebuilt.data, fresh.data)
    assert kind in mv.prompt(image, annotations=annotations, device="cpu").meta["cached"]  # repaired


def test_a_preview_whose_fields_were_evicted_runs_the_full_prompt(phantom):
    import shutil

    image, truth = phantom
    z = _slices_with_liver(truth)
    first = mv.prompt(image, annotations=painted(truth, [int(z[1]), int(z[-2])]), device="cpu")
    shutil.rmtree(cache_dir() / f"{VolumeCache(image).key('prompt-demons', demons_key())}.zarr")

    more = mv.prompt(image, annotations=painted(truth, [int(z[1]), int(z[len(z) // 2]), int(z[-2])]),
                     previous=first, device="cpu")

    assert more.meta["preview"] is False and more.meta["expected_dice"]["liver"] is not None


def test_normalising_some_slices_equals_those_slices_of_the_whole_volume():
    from napari_medvision.tasks.prompting.features import normalised
    from napari_medvision.volume import Volume

    rng = np.random.default_rng(0)
    grid = dict(spacing=(1.0, 1.0, 1.0))
    mr = Volume(rng.gamma(2.0, 100.0, (10, 16, 16)).astype(np.float32), modality="MR", **grid)  # percentiles
    ct = Volume(rng.integers(-1000, 1000, (10, 16, 16)).astype(np.int16), modality="CT", **grid)  # a fixed window
    rows = np.array([2, 3, 7])
    for volume in (mr, ct):
        np.testing.assert_array_equal(normalised(volume, rows), normalised(volume)[rows])


def test_hole_filling_on_the_bounding_box_matches_scipy_on_the_whole_slice():
    from scipy import ndimage as ndi

    from napari_medvision.tasks.prompting.refine import _fill_holes_per_slice

    rng = np.random.default_rng(0)
    masks = ndi.binary_opening(rng.random((40, 30, 40)) < rng.uniform(0.3, 0.8, (40, 1, 1)))
    masks[::3, :, :6] = False  # some slices with their mask away from the border
    masks[5] = False  # and an empty one

    np.testing.assert_array_equal(_fill_holes_per_slice(masks), np.stack([ndi.binary_fill_holes(m) for m in masks]))


def test_the_cache_keeps_under_its_size_cap_dropping_the_least_recently_used(tmp_path, monkeypatch):
    import os
    import time

    from napari_medvision.engine.cache import read_arrays, write_arrays

    monkeypatch.setenv("MEDVISION_CACHE_GB", "0.0025")  # 2.5 MB: room for two 1 MB entries
    block = {"a": np.random.default_rng(0).random((4, 256, 128))}  # 1 MB of float64
    paths = {name: tmp_path / f"{name}.zarr" for name in "ABC"}
    write_arrays(paths["A"], "A", block)
    write_arrays(paths["B"], "B", block)
    now = time.time()
    os.utime(paths["A"], (now - 100, now - 100))
    os.utime(paths["B"], (now - 50, now - 50))
    assert read_arrays(paths["A"], "A", {"a": ((4, 256, 128), "float64")}) is not None  # A used just now

    write_arrays(paths["C"], "C", block)

    assert paths["A"].is_dir() and paths["C"].is_dir()
    assert not paths["B"].exists()  # least recently used


def test_a_part_of_a_stack_is_read_and_verified_alone(tmp_path):
    from napari_medvision.engine.cache import read_arrays, write_arrays

    fields = np.random.default_rng(1).random((6, 2, 8, 8)).astype(np.float32)
    expect = {"f": (fields.shape, "float32")}
    path = tmp_path / "fields.zarr"
    write_arrays(path, "k", {"f": fields})
    chunk = sorted(p for p in (path / "f").rglob("*") if p.is_file() and p.name != "zarr.json")[0]  # slice 0
    damaged = bytearray(chunk.read_bytes())
    damaged[10] ^= 0x01
    chunk.write_bytes(bytes(damaged))

    part = read_arrays(path, "k", expect, rows={"f": [3, 2]})  # slice 0 is not read, so not checked

    np.testing.assert_array_equal(part["f"][2:4], fields[2:4])
    assert read_arrays(path, "k", expect, rows={"f": [0, 1]}) is None  # slice 0 is read: its CRC fails
    assert not path.exists()  # and the entry is gone, to be rebuilt
