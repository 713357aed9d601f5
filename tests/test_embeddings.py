"""Slice features and their zarr cache: reused when nothing changed, rebuilt when anything did or broke."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr

from napari_medvision.engine.cache import cache_dir, content_hash, flush_cache_writes
from napari_medvision.engine.embeddings import EmbeddingConfig, slice_features
from napari_medvision.engine.progress import CancelToken, Cancelled
from napari_medvision.models.dino import load_backbone
from napari_medvision.volume import Volume

torch.set_num_threads(1)
SMALL = EmbeddingConfig(short_side=56)  # 4 patches of 14 px on the short side: fast on a CPU


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("random-vits14")


@pytest.fixture
def ct():
    rng = np.random.default_rng(0)
    return Volume(rng.integers(-1000, 1500, (5, 28, 42)).astype(np.int16), spacing=(2.5, 0.8, 0.8), modality="CT")


def _store(features):
    """The entry on disk (the store is written in the background: wait for it first)."""
    flush_cache_writes()
    return cache_dir() / f"{features.key}.zarr"


def test_3d_volume_gives_one_feature_map_per_slice(ct, backbone):
    feats = slice_features(ct, backbone, config=SMALL)

    assert feats.features.shape == (5, 384, 4, 6)  # 28x42 resized to 56x84 -> 4x6 patches
    assert feats.features.dtype == np.float16
    assert feats.patch_grid == (4, 6) and feats.image_shape == (28, 42)
    # The resize doubles every side, so pixel 3 (centre 3.5) is the centre of patch 0 and pixel 10 of patch 1.
    pixels = feats.at_pixels(2)
    assert pixels.shape == (384, 28, 42)
    torch.testing.assert_close(pixels[:, 3, 10], torch.from_numpy(feats.features[2, :, 0, 1]).float())
    torch.testing.assert_close(feats.at_points(2, [[3, 10], [20, 30]]), pixels[:, [3, 20], [10, 30]].T)


def test_2d_grey_and_rgb_images_are_one_slice(backbone):
    rng = np.random.default_rng(1)
    grey = slice_features(rng.random((28, 28)).astype(np.float32), backbone, config=SMALL, cache=False)
    photo = Volume(rng.integers(0, 256, (28, 56, 3), dtype=np.uint8), spacing=(0.01, 0.01), rgb=True)
    colour = slice_features(photo, backbone, config=SMALL, cache=False)

    assert grey.features.shape == (1, 384, 4, 4)
    assert colour.features.shape == (1, 384, 4, 8)


def test_intensities_are_normalised_per_volume(ct, backbone):
    plain = slice_features(ct, backbone, config=SMALL, cache=False)
    shifted = slice_features(ct.data.astype(np.float32) * 2 + 1024, backbone, config=SMALL, cache=False)
    np.testing.assert_allclose(plain.features.astype(np.float32), shifted.features.astype(np.float32), atol=2e-2)


def test_second_call_reads_the_cache_without_running_the_model(ct, backbone):
    first = slice_features(ct, backbone, config=SMALL, batch_size=2)
    calls = backbone.calls

    again = slice_features(ct, backbone, config=SMALL)

    assert backbone.calls == calls
    assert again.from_cache and not first.from_cache
    np.testing.assert_array_equal(again.features, first.features)
    assert _store(again).is_dir()


def test_changed_pixels_model_or_preprocessing_miss_the_cache(ct, backbone):
    first = slice_features(ct, backbone, config=SMALL)
    edited = ct.data.copy()
    edited[4, 27, 41] += 1  # one voxel, in the last slice: a sampled hash would miss it
    calls = backbone.calls

    assert not slice_features(edited, backbone, config=SMALL).from_cache
    assert not slice_features(ct, load_backbone("random-vits16"), config=SMALL).from_cache
    assert not slice_features(ct, backbone, config=EmbeddingConfig(short_side=42)).from_cache
    assert backbone.calls == calls + 2
    assert content_hash(edited) != content_hash(ct.data) != content_hash(ct.data.astype(np.int32))
    assert len({first.key, slice_features(edited, backbone, config=SMALL).key}) == 2


def _chunk_files(store):
    return sorted(p for p in (store / "features").rglob("*") if p.is_file() and p.name != "zarr.json")


def _remove_marker(store):
    group = zarr.open_group(str(store), mode="r+")
    del group.attrs["medvision"]


def _truncate_chunk(store):
    chunk = _chunk_files(store)[1]
    chunk.write_bytes(chunk.read_bytes()[:100])


def _alter_chunk(store):
    chunk = _chunk_files(store)[3]
    data = bytearray(chunk.read_bytes())
    data[50] ^= 0x40  # same size, one flipped bit: only a checksum notices
    chunk.write_bytes(bytes(data))


def _delete_chunk(store):
    _chunk_files(store)[0].unlink()  # zarr would silently read zeros for it


@pytest.mark.parametrize("damage", [_remove_marker, _truncate_chunk, _alter_chunk, _delete_chunk])
def test_a_damaged_cache_entry_is_rebuilt_not_trusted(ct, backbone, damage):
    good = slice_features(ct, backbone, config=SMALL)
    damage(_store(good))
    calls = backbone.calls

    rebuilt = slice_features(ct, backbone, config=SMALL)

    assert not rebuilt.from_cache and backbone.calls > calls
    np.testing.assert_array_equal(rebuilt.features, good.features)
    assert slice_features(ct, backbone, config=SMALL).from_cache  # and the repaired entry is used again


def test_cancel_stops_between_batches_and_leaves_no_cache(ct, backbone):
    token = CancelToken()
    seen = []

    def progress(done, total, message):
        seen.append((done, total))
        if done >= 2:
            token.cancel()

    with pytest.raises(Cancelled):
        slice_features(ct, backbone, config=SMALL, batch_size=2, progress=progress, cancel=token)

    assert seen[:2] == [(0, 5), (2, 5)]
    flush_cache_writes()
    assert not cache_dir().exists() or not any(cache_dir().iterdir())


def test_the_store_is_written_in_the_background_and_complete_after_a_flush(ct, backbone):
    feats = slice_features(ct, backbone, config=SMALL)  # returns while its store may still be written

    flush_cache_writes()

    assert _store(feats).is_dir() and not list(cache_dir().glob(".*.partial"))
    again = slice_features(ct, backbone, config=SMALL)
    assert again.from_cache
    np.testing.assert_array_equal(again.features, feats.features)
