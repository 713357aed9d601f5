"""OCT readers: Heidelberg .vol / Heyex XML / .E2E, Topcon .fda / .fds, Zeiss Cirrus .img.

Expected values come from the files' own header bytes (read here with ``struct``) or from
eyepy / oct-converter where they are installed, never from the reader under test.
"""

from __future__ import annotations

import math
import shutil
import struct
import warnings

import numpy as np
import pytest

import napari_medvision.io as mio
from napari_medvision.io import GeometryWarning, ReadError
from napari_medvision.io.oct import region_labels


@pytest.fixture
def oct_vendor(data_dir):
    return data_dir / "oct_vendor"


@pytest.fixture
def heyex(data_dir):
    return data_dir / "oct_heyex_synthetic"


def _oct_converter(monkeypatch):
    """oct-converter 0.7 with numpy 2: it calls ``np.fromstring`` in binary mode, removed in numpy 2."""
    readers = pytest.importorskip("oct_converter.readers")
    if np.lib.NumpyVersion(np.__version__) >= "2.0.0":
        monkeypatch.setattr(np, "fromstring", lambda s, dtype=float, **_: np.frombuffer(s, dtype=dtype).copy(),
                            raising=False)
    return readers


# --- Heidelberg .vol ------------------------------------------------------------------------
def test_vol_shape_and_spacing_come_from_the_header(heyex):
    path = heyex / "heyex_vol" / "test_volume.vol"
    raw = path.read_bytes()
    width, n_bscans, depth = struct.unpack_from("<3I", raw, 12)
    scale_x, distance, scale_y = struct.unpack_from("<3d", raw, 24)

    volumes = mio.load_all(path)

    vol = volumes[0]
    assert vol.modality == "OCT"
    assert vol.data.shape == (n_bscans, depth, width) == (10, 40, 50)
    assert vol.spacing == pytest.approx((distance, scale_y, scale_x))
    assert vol.meta["slo"].shape == (50, 50)
    assert len(volumes) == 1  # this file holds no layer segmentation


def test_vol_pixels_match_eyepy(heyex):
    ep = pytest.importorskip("eyepy")
    path = heyex / "heyex_vol" / "test_volume.vol"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ep.import_heyex_vol(str(path))
    vol = mio.load(path)
    np.testing.assert_array_equal(vol.data, expected.data)
    np.testing.assert_array_equal(vol.meta["slo"], expected.localizer.data)
    assert vol.spacing == pytest.approx((expected.scale_z, expected.scale_y, expected.scale_x))


def test_truncated_vol_is_refused_with_its_name(heyex, tmp_path):
    bad = tmp_path / "cut.vol"
    bad.write_bytes((heyex / "heyex_vol" / "test_volume.vol").read_bytes()[:20000])
    with pytest.raises(ReadError, match="cut.vol.*truncated"):
        mio.load(bad)


# --- Heyex XML export -----------------------------------------------------------------------
def test_heyex_xml_folder_gives_volume_and_layer_labels(heyex):
    ep = pytest.importorskip("eyepy")
    folder = heyex / "heyex_xml" / "test_volume"
    expected = ep.import_heyex_xml(str(folder))

    vol, labels = mio.load_all(folder)

    assert vol.data.shape == expected.shape == (10, 40, 50)
    np.testing.assert_array_equal(vol.data, expected.data)
    assert vol.spacing == pytest.approx((expected.scale_z, expected.scale_y, expected.scale_x))
    assert labels.is_labels and labels.same_grid(vol)
    assert set(labels.meta["boundaries"]) == set(expected.layers) and len(expected.layers) == 11
    assert len(labels.labels) == 10  # one region between each pair of consecutive boundaries
    for name, rows in labels.meta["boundaries"].items():
        np.testing.assert_array_equal(rows, expected.layers[name].data)


def test_heyex_region_between_opl_and_elm_is_labelled(heyex):
    ep = pytest.importorskip("eyepy")
    folder = heyex / "heyex_xml" / "test_volume"
    layers = ep.import_heyex_xml(str(folder)).layers
    _, labels = mio.load_all(folder / "test_dummy.xml")  # the XML file itself works too

    region = {name: k for k, name in labels.labels.items()}["OPL-ELM"]
    opl, elm = layers["OPL"].data, layers["ELM"].data
    b, col = np.argwhere(np.isfinite(opl) & np.isfinite(elm))[-1]
    rows = np.arange(labels.data.shape[1])
    inside = (rows >= opl[b, col]) & (rows < elm[b, col])
    assert inside.any()
    assert np.all(labels.data[b, inside, col] == region)
    assert not np.any(labels.data[b, ~inside, col] == region)


def test_heyex_folder_missing_a_bscan_image_is_refused(heyex, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(heyex / "heyex_xml" / "test_volume", folder)
    (folder / "B3.tif").chmod(0o644)
    (folder / "B3.tif").unlink()
    with pytest.raises(ReadError, match="B3.tif"):
        mio.load(folder)


def test_an_xml_that_is_not_heyex_is_refused(tmp_path):
    other = tmp_path / "notes.xml"
    other.write_text("<notes><note>hello</note></notes>")
    with pytest.raises(ReadError, match="notes.xml"):
        mio.load(other)


# --- Topcon ---------------------------------------------------------------------------------
def _chunk(raw: bytes, name: bytes) -> int:
    """Offset of a Topcon chunk's payload, found by its name in the raw bytes."""
    at = raw.index(bytes([len(name)]) + name)
    return at + 1 + len(name) + 4


def test_fda_single_bscan_shape_and_spacing_from_header(oct_vendor):
    path = oct_vendor / "fda_minimized.fda"
    raw = path.read_bytes()
    width, height, n = struct.unpack_from("<3I", raw, _chunk(raw, b"@IMG_JPEG") + 9)
    x_mm, y_mm, z_um = struct.unpack_from("<3d", raw, _chunk(raw, b"@PARAM_SCAN_04") + 12)

    vol = mio.load(path)

    assert vol.data.shape == (n, height, width) == (1, 650, 512)
    assert vol.spacing == pytest.approx((y_mm / n, z_um / 1000, x_mm / width))
    assert vol.spacing[1:] == pytest.approx((0.0035, 6 / 512))
    assert vol.data.std() > 10  # a real B-scan, not a blank decode


def test_topcon_pixels_match_oct_converter(oct_vendor, monkeypatch):
    readers = _oct_converter(monkeypatch)
    for cls, name in ((readers.FDA, "fda_minimized.fda"), (readers.FDS, "fds_minimized.fds")):
        expected = cls(str(oct_vendor / name)).read_oct_volume()
        vol = mio.load(oct_vendor / name)
        np.testing.assert_array_equal(vol.data, np.stack(expected.volume))
        x, between, z = expected.pixel_spacing
        assert vol.spacing == pytest.approx((between, z, x))


def test_fds_raw_volume(oct_vendor):
    path = oct_vendor / "fds_minimized.fds"
    raw = path.read_bytes()
    start = _chunk(raw, b"@IMG_SCAN_03")
    width, height, _bits, n = struct.unpack_from("<4I", raw, start + 1)
    first_pixels = struct.unpack_from(f"<{width}H", raw, start + 22)

    vol = mio.load(path)

    assert vol.data.shape == (n, height, width) == (4, 3, 2)
    assert vol.data.dtype == np.uint16
    assert tuple(vol.data[0, 0]) == first_pixels  # first row of the first B-scan
    assert vol.meta["slo"].ndim == 3


@pytest.mark.parametrize("suffix", [".fda", ".fds"])
def test_text_renamed_as_topcon_is_refused(tmp_path, suffix):
    fake = tmp_path / f"report{suffix}"
    fake.write_text("patient report, not an OCT scan\n" * 10)
    with pytest.raises(ReadError, match=f"report{suffix}"):
        mio.load(fake)


def test_truncated_fds_is_refused(oct_vendor, tmp_path):
    cut = tmp_path / "cut.fds"
    cut.write_bytes((oct_vendor / "fds_minimized.fds").read_bytes()[:1000])
    with pytest.raises(ReadError, match="cut.fds.*truncated"):
        mio.load(cut)


# --- Heidelberg .E2E ------------------------------------------------------------------------
def test_e2e_bscan_decodes_to_a_retina(oct_vendor):
    path = oct_vendor / "e2e_minimized.E2E"
    raw = path.read_bytes()
    # The B-scan's image header ends with height 496, width 512; its 16-bit floats follow.
    pixels_at = raw.index(struct.pack("<2I", 496, 512)) + 8
    stored = struct.unpack_from("<8H", raw, pixels_at + 2 * (250 * 512 + 100))
    by_hand = [(1 + (s & 0x3FF) / 1024) * math.ldexp(1.0, (s >> 10) - 63) for s in stored]

    with pytest.warns(GeometryWarning, match="spacing"):
        reflectivity = mio.load(path, raw=True)
    with pytest.warns(GeometryWarning):
        vol = mio.load(path)

    assert vol.data.shape == (1, 496, 512) and vol.data.dtype == np.uint8
    np.testing.assert_allclose(reflectivity.data[0, 250, 100:108], by_hand, rtol=1e-6)
    profile = vol.data[0].mean(axis=1)
    assert 150 < int(np.argmax(profile)) < 300  # the bright retina band lies mid-image
    assert profile[150:300].max() > 10 * profile[:100].mean()


def test_e2e_without_bscans_is_refused(oct_vendor, tmp_path):
    head = tmp_path / "head.E2E"
    head.write_bytes((oct_vendor / "e2e_minimized.E2E").read_bytes()[:2000])
    with pytest.raises(ReadError, match="head.E2E.*vol or XML"):
        mio.load(head)


# --- Zeiss Cirrus .img ----------------------------------------------------------------------
def _write_cirrus(path, cube: np.ndarray) -> None:
    """Store a (B-scans, depth, width) cube the way Cirrus does: every axis reversed."""
    cube[::-1, ::-1, ::-1].astype(np.uint8).tofile(path)


def test_cirrus_cube_size_from_the_file_name(tmp_path):
    cube = np.zeros((8, 1024, 64), np.uint8)
    cube[2, 100, 5] = 200  # B-scan 2, near the top, left side
    path = tmp_path / "P1_Macular Cube 64x8_6-25-2009_10-51-44_OD_sn7564_cube_z.img"
    _write_cirrus(path, cube)

    vol = mio.load(path)

    assert vol.data.shape == (8, 1024, 64)
    assert vol.data[2, 100, 5] == 200 and int(vol.data.sum()) == 200
    assert vol.spacing == pytest.approx((6 / 7, 2 / 1023, 6 / 63))
    assert vol.meta["laterality"] == "OD"


def test_cirrus_200x200_protocol_from_file_size(tmp_path):
    path = tmp_path / "scan.img"
    with open(path, "wb") as f:  # a sparse 40 MB file of zeros
        f.truncate(200 * 200 * 1024)
    vol = mio.load(path)
    assert vol.data.shape == (200, 1024, 200)
    assert vol.spacing == pytest.approx((6 / 199, 2 / 1023, 6 / 199))


def test_cirrus_shape_option_and_unknown_size(tmp_path):
    path = tmp_path / "odd.img"
    _write_cirrus(path, np.arange(3 * 16 * 5, dtype=np.uint8).reshape(3, 16, 5))
    with pytest.raises(ReadError, match="odd.img.*shape="):
        mio.load(path)
    vol = mio.load(path, shape=(3, 16, 5))
    np.testing.assert_array_equal(vol.data, np.arange(240, dtype=np.uint8).reshape(3, 16, 5))


# --- boundaries to regions ------------------------------------------------------------------
def test_region_labels_fill_rows_between_boundaries():
    top = np.array([[2.0, 2.5, np.nan]], np.float32)
    bottom = np.array([[5.0, 4.0, 6.0]], np.float32)
    labels = region_labels([top, bottom], depth=8)
    assert labels.shape == (1, 8, 3)
    assert labels[0, :, 0].tolist() == [0, 0, 1, 1, 1, 0, 0, 0]
    assert labels[0, :, 1].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert not labels[0, :, 2].any()  # top boundary missing in that A-scan
