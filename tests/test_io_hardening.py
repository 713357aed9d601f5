"""Damaged or hostile files: refused with a ReadError before anything header-sized is allocated.

Each test builds the attack a file from a PACS, a vendor machine or an e-mail could carry
(a header declaring a huge image, a gzip bomb, an XML entity bomb, links out of a DICOM folder)
and checks the one-sentence error and, where it matters, that memory stayed small.
"""

from __future__ import annotations

import gzip
import io
import re
import struct
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest

import napari_medvision as mv
from napari_medvision import Volume
from napari_medvision.io import GeometryWarning, ReadError, limits
from napari_medvision.io.dicom import write_dicom_series
from napari_medvision.io.dicom_scan import CappedReader

REPO = Path(__file__).resolve().parents[1]
SMALL_MEMORY = 32 << 20  # more than any test input here, far less than what the headers declare


def small_ct() -> Volume:
    return Volume(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6), spacing=(2.0, 1.0, 1.0), modality="CT")


def load_with_peak(path, **options):
    """``mv.load(path)`` and the peak of memory traced meanwhile (numpy's allocations included)."""
    tracemalloc.start()
    try:
        try:
            result = mv.load(path, **options)
        except Exception as exc:
            result = exc
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return result, peak


def nifti_header(path: Path) -> bytearray:
    raw = path.read_bytes()
    return bytearray(gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw)


# --- NIfTI ------------------------------------------------------------------------------------

def test_nifti_declaring_a_huge_image_is_refused_before_allocating(tmp_path):
    raw = nifti_header(mv.save(small_ct(), tmp_path / "ct.nii"))
    struct.pack_into("<4h", raw, 40, 3, 30000, 30000, 30000)  # dim[0..3]
    bad = tmp_path / "huge.nii"
    bad.write_bytes(raw)
    error, peak = load_with_peak(bad)
    assert isinstance(error, ReadError) and "huge.nii" in str(error)
    assert "header is damaged" in str(error) and "49.1 TiB" in str(error)
    assert peak < SMALL_MEMORY


def test_nifti_gzip_bomb_is_refused_before_decompressing(tmp_path):
    raw = nifti_header(mv.save(small_ct(), tmp_path / "ct.nii"))[:352]
    struct.pack_into("<4h", raw, 40, 3, 2048, 2048, 512)
    struct.pack_into("<hh", raw, 70, 2, 8)  # uint8: 2 GiB declared
    stream = io.BytesIO()
    with gzip.GzipFile(fileobj=stream, mode="wb", compresslevel=9) as gz:
        gz.write(bytes(raw))
        gz.write(bytes(32 << 20))  # 32 MiB of zeros compress to about 32 KiB
    bomb = tmp_path / "bomb.nii.gz"
    bomb.write_bytes(stream.getvalue())
    error, peak = load_with_peak(bomb)
    assert isinstance(error, ReadError)
    assert re.search(r"bomb\.nii\.gz: declares .* \(2\.0 GiB\) from .* decompression bomb", str(error))
    assert peak < SMALL_MEMORY


def test_gzip_stream_longer_than_declared_is_read_only_as_far_as_declared(tmp_path):
    good = mv.save(small_ct(), tmp_path / "ct.nii")
    stream = io.BytesIO()
    with gzip.GzipFile(fileobj=stream, mode="wb") as gz:
        gz.write(good.read_bytes())
        gz.write(bytes(64 << 20))  # 64 MiB hidden after the voxels
    padded = tmp_path / "padded.nii.gz"
    padded.write_bytes(stream.getvalue())
    vol, peak = load_with_peak(padded)
    assert isinstance(vol, Volume)
    np.testing.assert_array_equal(vol.data, small_ct().data)
    assert peak < SMALL_MEMORY


def test_an_image_larger_than_free_memory_is_refused_with_the_sizes(tmp_path, monkeypatch):
    path = mv.save(small_ct(), tmp_path / "ct.nii.gz")
    monkeypatch.setattr(limits, "available_memory", lambda: 100)
    with pytest.raises(ReadError, match=r"ct\.nii\.gz: is too large to load: the voxel data needs 240 bytes, "
                                        r"this process can take about 100 bytes more"):
        mv.load(path)


def test_available_memory_respects_an_address_space_limit():
    free = limits.available_memory()
    assert free is not None and free > 0


# --- NRRD / MetaImage -------------------------------------------------------------------------

@pytest.mark.parametrize("suffix, field", [(".mha", b"DimSize = 6 5 4"), (".nrrd", b"sizes: 6 5 4")])
def test_nrrd_and_metaimage_declaring_a_huge_image_are_refused_before_allocating(tmp_path, suffix, field):
    path = mv.save(small_ct(), tmp_path / f"ct{suffix}")
    raw = path.read_bytes()
    assert field in raw
    path.write_bytes(raw.replace(field, field.replace(b"6 5 4", b"60000 50000 40000"), 1))
    error, peak = load_with_peak(path)
    assert isinstance(error, ReadError) and f"ct{suffix}" in str(error)
    assert "shape (60000, 50000, 40000, 1) (218.3 TiB)" in str(error) and "decompression bomb" in str(error)
    assert peak < SMALL_MEMORY


# --- DICOM ------------------------------------------------------------------------------------

def dicom_slice(tmp_path) -> Path:
    return write_dicom_series(small_ct(), tmp_path / "series")[0]


@pytest.mark.parametrize("field, value", [("Rows", 65535), ("NumberOfFrames", "2147483647")])
def test_dicom_declaring_more_pixels_than_it_holds_is_refused(tmp_path, field, value):
    import pydicom

    path = dicom_slice(tmp_path)
    ds = pydicom.dcmread(path)
    setattr(ds, field, value)
    if field == "Rows":
        ds.Columns = 65535
    ds.save_as(path)
    error, peak = load_with_peak(path)
    assert isinstance(error, ReadError) and path.name in str(error)
    assert "needs" in str(error) and "the file holds" in str(error)
    assert peak < SMALL_MEMORY


def test_damaged_element_length_never_allocates_it(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(b"x" * 100)
    tracemalloc.start()
    with CappedReader(path) as fp:
        fp.seek(40)
        data = fp.read(4 << 30)  # as pydicom does with a damaged 4 GiB element length
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert data == b"x" * 60 and peak < 1 << 20


def test_dicom_folder_does_not_follow_links_out_of_it(tmp_path):
    outside = write_dicom_series(small_ct().with_data(small_ct().data + 7), tmp_path / "elsewhere",
                                 series_uid="1.2.826.0.1.3680043.8.498.1")
    folder = tmp_path / "study"
    write_dicom_series(small_ct(), folder)
    (folder / "linked.dcm").symlink_to(outside[0])
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    (folder / "passwd.dcm").symlink_to("/etc/passwd")
    vol = mv.load(folder)  # one series: the linked file from elsewhere is not seen
    assert vol.meta["files"] == 4
    np.testing.assert_array_equal(vol.data, small_ct().data)


def test_dicom_folder_walk_stops_at_its_file_limit(tmp_path, monkeypatch):
    folder = tmp_path / "huge_study"
    write_dicom_series(small_ct(), folder)
    monkeypatch.setattr(limits, "MAX_FOLDER_FILES", 3)
    with pytest.raises(ReadError, match=r"huge_study: holds more than 3 files; open the folder of one study"):
        mv.load(folder)


# --- folders ----------------------------------------------------------------------------------

def test_folder_without_images_names_the_folder(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    with pytest.raises(ReadError, match=r"notes: holds no image medvision reads"):
        mv.load(folder)


# --- Heidelberg -------------------------------------------------------------------------------

@pytest.fixture
def heyex(data_dir):
    return data_dir / "oct_heyex_synthetic"


def test_vol_declaring_huge_bscans_is_refused_before_allocating(heyex, tmp_path):
    raw = bytearray((heyex / "heyex_vol" / "test_volume.vol").read_bytes())
    struct.pack_into("<3I", raw, 12, 60000, 60000, 60000)  # width, B-scans, depth
    bad = tmp_path / "huge.vol"
    bad.write_bytes(raw)
    error, peak = load_with_peak(bad)
    assert isinstance(error, ReadError) and "huge.vol" in str(error) and "header is damaged" in str(error)
    assert peak < SMALL_MEMORY


def test_vol_with_zero_scale_falls_back_to_pixels_and_says_so(heyex, tmp_path):
    raw = bytearray((heyex / "heyex_vol" / "test_volume.vol").read_bytes())
    struct.pack_into("<3d", raw, 24, 0.0, 0.0, 0.0)  # scale x, distance, scale y
    bad = tmp_path / "noscale.vol"
    bad.write_bytes(raw)
    with pytest.warns(GeometryWarning, match=r"noscale\.vol: .*spacing is given in pixels"):
        vol = mv.load(bad)
    assert vol.spacing == (1.0, 1.0, 1.0) and vol.meta["spacing_unit"] == "pixel"


@pytest.mark.parametrize("doctype, entity", [
    ('<!DOCTYPE HEDX [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">]>', "&b;"),
    ('<!DOCTYPE HEDX [<!ENTITY x SYSTEM "file:///etc/passwd">]>', "&x;"),
])
def test_heyex_xml_entities_are_refused(heyex, tmp_path, doctype, entity):
    import shutil

    folder = tmp_path / "export"
    shutil.copytree(heyex / "heyex_xml" / "test_volume", folder)
    xml = next(folder.glob("*.xml"))
    text = xml.read_text()
    body = text.split("?>", 1)[1] if text.startswith("<?xml") else text
    xml.write_text('<?xml version="1.0"?>' + doctype + body.replace("<Laterality>", "<Laterality>" + entity, 1))
    with pytest.raises(ReadError, match=r"\.xml: uses XML features refused for safety \(EntitiesForbidden\)"):
        mv.load(folder)


# --- photos, TIFF, zarr -----------------------------------------------------------------------

def test_png_declaring_a_huge_image_is_refused_before_decoding(tmp_path):
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 60000, 60000, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b""))
    bad = tmp_path / "huge.png"
    bad.write_bytes(png)
    error, peak = load_with_peak(bad)
    assert isinstance(error, ReadError) and "huge.png" in str(error)
    assert peak < SMALL_MEMORY


def test_tiff_declaring_more_than_it_holds_is_refused(tmp_path):
    path = mv.save(small_ct(), tmp_path / "ct.tif")
    import tifffile

    tifffile.imwrite(path, np.zeros((64, 64), np.uint16))
    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        tags = tif.pages[0].tags
        width_at, length_at = tags["ImageWidth"].valueoffset, tags["ImageLength"].valueoffset
        width_type = tags["ImageWidth"].dtype
    fmt = "<I" if width_type == 4 else "<H"
    struct.pack_into(fmt, raw, width_at, 60000)
    struct.pack_into(fmt, raw, length_at, 60000)
    path.write_bytes(raw)
    error, peak = load_with_peak(path)
    assert isinstance(error, ReadError) and "ct.tif" in str(error)
    assert peak < SMALL_MEMORY


def test_zarr_with_a_damaged_chunk_is_refused_by_name(tmp_path):
    store = mv.save(small_ct(), tmp_path / "ct.zarr")
    chunk = next(p for p in sorted((store / "0").rglob("*")) if p.is_file() and not p.name.startswith("."))
    chunk.write_bytes(b"\x00garbage" * 4)
    with pytest.raises(ReadError, match=r"ct\.zarr: has a damaged chunk"):
        mv.load(store)


# --- no pickle, no standard-library XML parsing ---------------------------------------------

def test_package_uses_no_pickle_and_no_standard_library_xml_parser():
    offenders = []
    for path in (REPO / "napari_medvision").rglob("*.py"):
        text = path.read_text()
        for pattern in (r"^\s*import pickle", r"^\s*from pickle", r"pickle\.loads?\(", r"allow_pickle=True",
                        r"^\s*import xml\.etree", r"ElementTree\.parse", r"minidom", r"xml\.sax"):
            if re.search(pattern, text, re.MULTILINE):
                offenders.append(f"{path.relative_to(REPO)}: {pattern}")
    assert not offenders, offenders


def test_mvg_training_bank_round_trips_through_npz(tmp_path):
    from napari_medvision.recipes.mvg_data import Family, load_families, save_families

    rng = np.random.default_rng(0)
    family = Family("segmentation", 0.5, aligned=False)
    family.add("ct organs", [rng.random((4, 5), dtype=np.float32)] * 2, [np.ones((4, 5), np.uint8)] * 2)
    family.add("vessels/fundus", [rng.random((3, 3), dtype=np.float32)], [np.zeros((3, 3), np.float32)])
    path = tmp_path / "bank.npz"
    save_families([family, Family("empty", 1.0)], path)
    back = load_families(path)
    assert [(f.name, f.weight, f.aligned) for f in back] == [("segmentation", 0.5, False), ("empty", 1.0, True)]
    for name, sources in family.variants.items():
        for (images, targets), (images2, targets2) in zip(sources, back[0].variants[name]):
            for a, b in zip(images + targets, images2 + targets2):
                np.testing.assert_array_equal(a, b)
                assert a.dtype == b.dtype
    with np.load(path, allow_pickle=False) as raw:  # nothing in the file needs pickle
        assert all(raw[k].dtype != object for k in raw.files)


def test_no_warning_leaks_from_a_clean_load(tmp_path):
    path = mv.save(small_ct(), tmp_path / "ct.nrrd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mv.load(path)


# --- the napari reader ------------------------------------------------------------------------

@pytest.mark.parametrize("content", [None, "readme.txt"])
def test_napari_reader_takes_an_empty_or_imageless_folder_and_names_it(tmp_path, monkeypatch, content):
    from napari_medvision._napari import reader

    folder = tmp_path / "exported"
    folder.mkdir()
    if content:
        (folder / content).write_text("no images")
    shown = []
    monkeypatch.setattr(reader, "show_problem", shown.append)
    read = reader.get_reader(str(folder))
    assert read is not None  # not napari's generic refusal
    assert read(str(folder)) == reader.NOTHING_TO_SHOW
    expected = "the folder is empty" if content is None else "holds no image medvision reads"
    assert shown == [f"Could not open exported: {expected}" + ("" if content is None else
                     ": no DICOM files, zarr store or Heyex XML export (to open one file, choose the file itself)")]


def test_napari_reader_leaves_a_folder_of_pictures_to_napari(tmp_path):
    from napari_medvision._napari import reader

    folder = tmp_path / "stack"
    folder.mkdir()
    for i in range(2):
        mv.save(Volume(np.zeros((4, 4), np.uint8), spacing=(1, 1)), folder / f"{i}.png")
    assert reader.get_reader(str(folder)) is None


def test_vendor_file_without_pixel_size_tells_the_user_and_marks_its_layers(data_dir, monkeypatch):
    from napari_medvision._napari import reader

    notices = []
    monkeypatch.setattr(reader, "show_notice", notices.append)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeometryWarning)
        layers = reader.read(str(data_dir / "oct_vendor" / "e2e_minimized.E2E"))
    assert notices == ["e2e_minimized.E2E: the file gives no pixel size; distances and the voxel scale are in "
                       "pixels, not mm"]
    assert layers and all(kwargs["metadata"]["spacing_unit"] == "pixel" for _data, kwargs, _kind in layers)


def test_file_with_pixel_size_gives_no_notice(tmp_path, monkeypatch):
    from napari_medvision._napari import reader

    notices = []
    monkeypatch.setattr(reader, "show_notice", notices.append)
    layers = reader.read(str(mv.save(small_ct(), tmp_path / "ct.nii.gz")))
    assert notices == [] and "spacing_unit" not in layers[0][1]["metadata"]


# --- cases the 10 000-case fuzz run found -------------------------------------------------------

def test_tiff_strip_reaching_past_the_end_is_refused_before_reading_it(tmp_path):
    import tifffile

    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, np.zeros((64, 64), np.uint16), rowsperstrip=16)
    raw = bytearray(path.read_bytes())
    with tifffile.TiffFile(path) as tif:
        tag = tif.pages[0].tags["StripByteCounts"]
        at, fmt = tag.valueoffset, "<I" if tag.dtype == 4 else "<H"
    struct.pack_into(fmt, raw, at, 0xFFFF if fmt == "<H" else 2_000_000_000)
    path.write_bytes(raw)
    error, peak = load_with_peak(path)
    assert isinstance(error, ReadError) and re.search(r"strips\.tif: is truncated or damaged: page 1 has image data "
                                                      r"up to byte \d+, the file has \d+", str(error))
    assert peak < SMALL_MEMORY


def test_zarr_declaring_billions_of_chunks_is_refused(tmp_path):
    import json

    store = mv.save(small_ct(), tmp_path / "ct.zarr")
    meta = store / "0" / ".zarray"
    spec = json.loads(meta.read_text())
    spec["shape"][1] = 2**31 - 1
    meta.write_text(json.dumps(spec))
    with pytest.raises(ReadError, match=r"ct\.zarr: declares \d+ chunks .* medvision opens stores of up to"):
        mv.load(store)


def test_dicom_jpeg2000_frame_larger_than_its_header_is_refused_before_decoding(data_dir, tmp_path):
    raw = bytearray((data_dir / "dicom_misc" / "pydicom_data" / "emri_small_jpeg_2k_lossless.dcm").read_bytes())
    siz = raw.index(b"\xff\x4f\xff\x51")
    struct.pack_into(">I", raw, siz + 8, 40000)  # Xsiz: the codestream claims 40000 columns
    path = tmp_path / "j2k.dcm"
    path.write_bytes(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GeometryWarning)
        error, peak = load_with_peak(path)
    assert isinstance(error, ReadError)
    assert "j2k.dcm: holds a JPEG 2000 frame of 40000x64 pixels where the header says 64x64" in str(error)
    assert peak < SMALL_MEMORY


def test_field_of_view_of_a_large_photo_is_found_on_a_subsample(monkeypatch):
    from napari_medvision.io import image2d
    from napari_medvision.io.image2d import FOV_MAX_PIXELS, field_of_view

    side = 1500  # 2.25 megapixels: above FOV_MAX_PIXELS
    assert side * side > FOV_MAX_PIXELS
    yy, xx = np.mgrid[:side, :side]
    disc = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (0.45 * side) ** 2
    photo = np.zeros((side, side, 3), np.uint8)
    photo[disc] = (180, 90, 40)
    mask = field_of_view(photo)
    monkeypatch.setattr(image2d, "FOV_MAX_PIXELS", side * side)
    full = field_of_view(photo)
    assert mask.shape == disc.shape
    assert (mask & full).sum() / (mask | full).sum() > 0.99  # the subsample's edge moves by about a pixel
    assert (mask & disc).sum() / (mask | disc).sum() > 0.98


@pytest.mark.parametrize("suffix", [".nhdr", ".mhd"])
@pytest.mark.parametrize("name, problem", [("/dev/zero", "not a regular file"), (".", "not a regular file"),
                                           ("missing.raw", "does not exist"), ("empty.raw", "is empty")])
def test_detached_header_naming_a_device_folder_or_missing_file_is_refused(tmp_path, suffix, name, problem):
    header = mv.save(small_ct(), tmp_path / f"ct{suffix}")
    (tmp_path / "empty.raw").touch()
    key = "data file: " if suffix == ".nhdr" else "ElementDataFile = "
    text = header.read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith(key))
    header.write_text(text.replace(line, key + name))
    with pytest.raises(ReadError, match=f"ct{re.escape(suffix)}: names the data file .*{problem}"):
        mv.load(header)


def test_metaimage_with_a_field_that_is_not_text_still_loads(tmp_path):
    header = mv.save(small_ct(), tmp_path / "ct.mhd")
    header.write_bytes(header.read_bytes().replace(b"ElementDataFile", b"Extra\xff\xfe = 1\nElementDataFile"))
    back = mv.load(header)
    np.testing.assert_array_equal(back.data, small_ct().data)
    assert not any("\ufffd" in k or "Extra" in k for k in back.meta)


def test_dicomdir_with_a_damaged_index_still_opens_its_tree(tmp_path):
    import pydicom
    from pydicom.fileset import FileSet

    series = tmp_path / "series"
    series.mkdir()
    write_dicom_series(small_ct(), series)
    fileset = FileSet()
    for path in sorted(series.iterdir()):
        fileset.add(pydicom.dcmread(path))
    fileset.write(tmp_path / "tree")
    fileset._stage["t"].cleanup()  # pydicom's staging folder, else removed with a ResourceWarning later
    index = tmp_path / "tree" / "DICOMDIR"
    index.write_bytes(b"NRRD0004\n" + bytes(range(256)) * 4)  # no longer a DICOM file, looks like NRRD
    np.testing.assert_array_equal(mv.load(index).data, small_ct().data)


def test_palette_photo_converts_like_pillow(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)).convert("P", colors=200)
    photo.save(tmp_path / "p.gif")
    photo.save(tmp_path / "p.bmp")
    for name in ("p.gif", "p.bmp"):
        with Image.open(tmp_path / name) as img:
            expected = np.asarray(img.convert("RGB"))
        volumes = mv.io.load_all(tmp_path / name)
        np.testing.assert_array_equal(volumes[0].data, expected)
        assert volumes[0].rgb and volumes[1].meta["role"] == "field of view"


@pytest.mark.parametrize("name", ["MR2_J2KR.dcm", "693_J2KR.dcm", "emri_small_jpeg_2k_lossless.dcm"])
def test_compressed_dicom_decoded_frame_by_frame_matches_pydicom(data_dir, name):
    import pydicom

    path = data_dir / "dicom_misc" / "pydicom_data" / name
    if not path.exists():
        pytest.skip(f"{name} is not in the data folder")
    from napari_medvision.io.dicom_pixels import raw_frames
    from napari_medvision.io.dicom_scan import read_header

    expected = pydicom.dcmread(path).pixel_array
    frames = raw_frames(read_header(path))
    np.testing.assert_array_equal(frames.reshape(expected.shape), expected)
    into = np.zeros(frames.shape, frames.dtype)
    assert raw_frames(read_header(path), into) is not None and np.array_equal(into, frames)


def test_jpeg2000_dicom_peak_memory_stays_within_its_decoded_size(data_dir):
    """tracemalloc sees numpy's allocations (not OpenJPEG's own buffers): nothing beyond the
    decoder's one frame and the output, where the whole stored array plus the output was held."""
    path = data_dir / "dicom_misc" / "pydicom_data" / "MR2_J2KR.dcm"
    if not path.exists():
        pytest.skip("MR2_J2KR.dcm is not in the data folder")
    mv.load(path)
    volume, peak = load_with_peak(path)
    assert volume.data.dtype == np.float32
    assert peak < 1.75 * volume.data.nbytes, peak / volume.data.nbytes  # 2.4x before
