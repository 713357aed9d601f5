"""Fuzz every reader: mutated files opened through ``mv.load_all`` in memory-limited child processes.

Seeds are the small real samples of the shared data folder (vendor OCT files, DICOM objects,
photos, a DRIVE GIF mask) plus tiny crops of a real CT that the project writes with its own
writers or its libraries' (NIfTI, NRRD, detached .nhdr, MHA, .mhd + raw, DICOM series, a DICOMDIR
tree, zarr, TIFF, OME-TIFF, PNG, JPEG, GIF, BMP, Zeiss cube). Each case copies one seed (a
detached header or DICOMDIR with its whole folder) and damages it: bit flips, random bytes,
truncation, header fields set to huge / negative / zero values, wrong data types, random files,
a gzip in a gzip, a decompression bomb, XML entity bombs (Heyex, OME), data files naming devices,
files outside or a million files, links out of DICOM folders. A few worker
processes (address space capped, every case with a time limit) open the cases; each is
classified as

  loaded | read_error | other_exception | crash | hang | out_of_memory | over_memory_budget

where over_memory_budget means the case's peak resident memory grew by more than 4x the decoded
size of what it loaded (or of its seed, for a file refused) plus a fixed allowance. Prints one
JSON line per format and a total line; writes ``summary.json`` and copies every failing case.

    python bench/fuzz.py --cases 300 --seed 0 --workers 2 --out /tmp/fuzz
    python bench/fuzz.py --cases 2000 --formats nhdr mhd dicomdir ome_tiff gif gif_real bmp
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import gzip
import io
import json
import multiprocessing as mp
import os
import random
import re
import resource
import shutil
import signal
import struct
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

FAILURES = ("other_exception", "crash", "hang", "out_of_memory", "over_memory_budget")
MEMORY_FACTOR = 4
# Resident memory a case may add beyond MEMORY_FACTOR x its decoded size: thread stacks, malloc
# arenas of reader threads, a library's first-use tables.
MEMORY_ALLOWANCE = 48 << 20
HUGE_VALUES = (0, 1, -1, 2, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**40, -(2**31), 10**6)


@dataclass
class Seed:
    """One readable sample: ``path`` (a file or folder) and the bytes its image decodes to."""

    format: str
    path: Path
    decoded_bytes: int


# --- seeds ------------------------------------------------------------------------------------

def data_dir() -> Path:
    return Path(os.environ.get("MEDVISION_DATA", REPO.parent / "shared" / "data"))


def make_seeds(folder: Path, data: Path, large: bool = False) -> list[Seed]:
    """Small readable seeds of every format (written under ``folder``), each checked to load;
    ``large`` adds real samples of a few MiB."""
    import napari_medvision as mv
    from napari_medvision.io.dicom import write_dicom_series

    folder.mkdir(parents=True, exist_ok=True)
    paths: list[tuple[str, Path]] = []
    ct = mv.load(data / "ct_mr_totalseg" / "example_ct_sm.nii.gz")
    crop = ct.with_data(np.ascontiguousarray(np.asarray(ct.data)[:6, 30:54, 30:62]))
    for fmt, name in (("nifti", "ct.nii"), ("nifti_gz", "ct.nii.gz"), ("nrrd", "ct.nrrd"), ("mha", "ct.mha"),
                      ("zarr", "ct.zarr"), ("tiff", "ct.tif")):
        target = folder / name
        if not target.exists():
            mv.save(crop, target)
        paths.append((fmt, target))
    series = folder / "ct_series"
    if not series.exists():
        series.mkdir()
        write_dicom_series(crop.with_data(crop.data[:4]), series)
    paths.append(("dicom_series", series))
    from PIL import Image

    photo = np.asarray(Image.open(data / "fundus_skimage" / "retina.jpg"))[600:664, 600:680]
    for fmt, name in (("png", "fundus.png"), ("jpeg", "fundus.jpg"), ("gif", "fundus.gif"), ("bmp", "fundus.bmp")):
        target = folder / name
        if not target.exists():
            Image.fromarray(photo).save(target)
        paths.append((fmt, target))
    paths += _detached_seeds(folder, crop)
    paths.append(("dicomdir", _dicomdir_seed(folder / "dicomdir", series)))
    ome = folder / "ct.ome.tif"
    if not ome.exists():
        import tifffile

        tifffile.imwrite(ome, np.asarray(crop.data), ome=True,
                         metadata={"axes": "ZYX", "PhysicalSizeX": 3.0, "PhysicalSizeY": 3.0, "PhysicalSizeZ": 3.0})
    paths.append(("ome_tiff", ome))
    cube = folder / "Macular Cube 8x4_cube_z.img"
    if not cube.exists():
        np.random.default_rng(0).integers(0, 255, 8 * 4 * 1024, dtype=np.uint8).tofile(cube)
    paths.append(("zeiss_img", cube))
    real = {
        "png_real": data / "fundus_skimage" / "microaneurysms.png",
        "dicom_ct": data / "dicom_misc" / "pydicom_test_files" / "CT_small.dcm",
        "dicom_mr": data / "dicom_misc" / "pydicom_test_files" / "MR_small.dcm",
        "dicom_multiframe": data / "dicom_misc" / "pydicom_data" / "emri_small.dcm",
        "dicom_j2k": data / "dicom_misc" / "pydicom_data" / "emri_small_jpeg_2k_lossless.dcm",
        "dicom_seg": data / "dicom_misc" / "pydicom_data" / "liver.dcm",
        "heidelberg_vol": data / "oct_heyex_synthetic" / "heyex_vol" / "test_volume.vol",
        "heyex_xml": data / "oct_heyex_synthetic" / "heyex_xml" / "test_volume",
        "e2e": data / "oct_vendor" / "e2e_minimized.E2E",
        "topcon_fda": data / "oct_vendor" / "fda_minimized.fda",
        "topcon_fds": data / "oct_vendor" / "fds_minimized.fds",
        "gif_real": data / "fundus_drive_train" / "mask" / "21_training_mask.gif",
    }
    if large:  # real samples of 1-6 MiB decoded, so that peak memory is measured against real sizes
        real.update({
            "large_nrrd": data / "nrrd_lesions" / "brain1_image.nrrd",
            "large_nifti_gz": data / "mri_brain_t1_itk" / "KmeansTest_T1RawSkullStrip.nii.gz",
            "large_dicom_multiframe": data / "dicom_ct_phantom" / "volume.dcm",
            "large_dicom_raw": data / "dicom_misc" / "pydicom_data" / "693_UNCI.dcm",
            "large_dicom_j2k": data / "dicom_misc" / "pydicom_data" / "MR2_J2KR.dcm",
            "large_tiff": data / "fundus_drive_train" / "images" / "21_training.tif",
            "large_jpeg": data / "fundus_skimage" / "retina.jpg",
        })
    paths += [(fmt, p) for fmt, p in real.items() if p.exists()]
    seeds = []
    for fmt, path in paths:
        with warnings.catch_warnings():  # the samples' own geometry notes are not what is tested
            warnings.simplefilter("ignore")
            volumes = mv.io.load_all(path)
        seeds.append(Seed(fmt, path, sum(_nbytes(v.data) for v in volumes)))
    return seeds


def _detached_seeds(folder: Path, crop) -> list[tuple[str, Path]]:
    """A detached NRRD header (``.nhdr`` over gzip data, written by medvision) and a MetaImage
    header (``.mhd`` over raw data, written by SimpleITK), each in a folder of its own."""
    import SimpleITK as sitk

    import napari_medvision as mv
    from napari_medvision.volume import to_itk_geometry

    nhdr, mhd = folder / "nhdr" / "ct.nhdr", folder / "mhd" / "ct.mhd"
    if not nhdr.exists():
        nhdr.parent.mkdir(parents=True, exist_ok=True)
        mv.save(crop, nhdr)
    if not mhd.exists():
        mhd.parent.mkdir(parents=True, exist_ok=True)
        image = sitk.GetImageFromArray(np.asarray(crop.data))
        spacing, origin, direction = to_itk_geometry(crop)
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
        sitk.WriteImage(image, str(mhd), useCompression=False)
    return [("nhdr", nhdr), ("mhd", mhd)]


def _dicomdir_seed(folder: Path, series: Path) -> Path:
    """A DICOMDIR (written by pydicom's FileSet) indexing a copy of the 4-slice DICOM series."""
    import pydicom
    from pydicom.fileset import FileSet

    index = folder / "DICOMDIR"
    if not index.exists():
        fileset = FileSet()
        for path in sorted(series.iterdir()):
            fileset.add(pydicom.dcmread(path))
        fileset.write(folder)
        fileset._stage["t"].cleanup()  # pydicom's staging folder, else removed with a ResourceWarning at exit
    return index


def _nbytes(data) -> int:
    return int(np.prod(data.shape)) * np.dtype(data.dtype).itemsize


# --- mutations --------------------------------------------------------------------------------

def _main_file(path: Path, rng: random.Random) -> Path:
    """The file of a case to damage: the file itself, or one file of a folder (headers likelier)."""
    if path.is_file():
        return path
    files = sorted(p for p in path.rglob("*") if p.is_file())
    text = [p for p in files if p.suffix.lower() in (".xml", ".json") or p.name in (".zarray", ".zattrs", ".zgroup")]
    return rng.choice(text) if text and rng.random() < 0.6 else rng.choice(files)


def _bitflip(raw: bytearray, rng: random.Random) -> str:
    n = rng.choice((1, 1, 2, 4, 16))
    limit = min(len(raw), rng.choice((512, 4096, len(raw))))
    for _ in range(n):
        i = rng.randrange(max(limit, 1))
        raw[i] ^= 1 << rng.randrange(8)
    return f"bitflip x{n}"


def _random_bytes(raw: bytearray, rng: random.Random) -> str:
    start = rng.randrange(max(len(raw), 1))
    n = rng.choice((4, 16, 64, 512))
    raw[start:start + n] = rng.randbytes(min(n, len(raw) - start))
    return f"random bytes at {start}"


def _truncate(raw: bytearray, rng: random.Random) -> str:
    keep = rng.choice((0, 1, 16, 128, 348, 1024, len(raw) // 2, len(raw) - 1, rng.randrange(max(len(raw), 1))))
    del raw[keep:]
    return f"truncated to {keep}"


def _int_field(raw: bytearray, rng: random.Random, offsets=None) -> str:
    """A 1/2/4/8-byte integer (or float) field set to an extreme value."""
    width = rng.choice((2, 4, 4, 8))
    span = min(len(raw), 2048)
    if span <= width:
        return "too short for a field"
    at = rng.choice(offsets) if offsets and rng.random() < 0.7 else rng.randrange(span - width)
    value = rng.choice(HUGE_VALUES)
    if rng.random() < 0.2:
        packed = struct.pack("<f" if width == 4 else "<d" if width == 8 else "<e", rng.choice(
            (0.0, -1.0, 6e4 if width == 2 else 1e30, float("nan"), float("inf"), 1e-30)))
    else:
        packed = (value % (1 << (8 * width))).to_bytes(width, "little")
    raw[at:at + width] = packed[:width]
    return f"field at {at} ({width} bytes) = {packed.hex()}"


def _text_numbers(raw: bytearray, rng: random.Random) -> str:
    """A number in a text header (NRRD, MetaImage, XML, JSON) set to an extreme or wrong value."""
    text = raw.decode("latin-1")
    numbers = [m for m in re.finditer(rb"-?\d+(\.\d+)?", bytes(raw[:65536]))]
    if not numbers:
        return "no numbers"
    m = rng.choice(numbers)
    new = rng.choice(("0", "-1", "-5", "99999999", "1e308", "nan", "4294967296", "2147483647", "abc", ""))
    raw[:] = (text[:m.start()] + new + text[m.end():]).encode("latin-1")
    return f"number {m.group().decode()!r} -> {new!r}"


def _text_word(raw: bytearray, rng: random.Random) -> str:
    """A type or encoding word swapped for another (wrong data type, unknown encoding)."""
    swaps = [(b"short", b"double"), (b"MET_SHORT", b"MET_DOUBLE"), (b"int16", b"float64"), (b"raw", b"gzip"),
             (b"gzip", b"raw"), (b"<i2", b"<f8"), (b"True", b"False"), (b"False", b"True"), (b"uint8", b"int64"),
             (b"\"zstd\"", b"\"blosc\""), (b"little", b"big"), (b"ct.raw", b"ct.zraw"), (b"ElementDataFile", b"HeaderSize")]
    found = [(a, b) for a, b in swaps if a in raw]
    if not found:
        return _text_numbers(raw, rng)
    a, b = rng.choice(found)
    raw[:] = bytes(raw).replace(a, b, 1)
    return f"{a.decode()} -> {b.decode()}"


# Byte offsets of size fields in binary headers (little endian), per format.
HEADER_FIELDS = {
    "nifti": [40, 42, 44, 46, 48, 50, 70, 72, 108, 112, 116],  # dim[0..5], datatype, bitpix, vox_offset, scl
    "heidelberg_vol": [12, 16, 20, 24, 32, 40, 48, 52, 56],       # width, n_bscans, depth, scales, SLO size
    "topcon_fda": [7, 11], "topcon_fds": [7, 11],
    # BMP: file size, pixel offset, header size, width, height, planes, bits, compression, image size, colours
    "bmp": [2, 10, 14, 18, 22, 26, 28, 30, 34, 46],
    # GIF: screen width, height, flags; the first image descriptor (after an 8-bit global palette)
    "gif": [6, 8, 10, 13 + 768 + 1, 13 + 768 + 3, 13 + 768 + 5, 13 + 768 + 7, 13 + 768 + 9],
}
HEADER_FIELDS["gif_real"] = HEADER_FIELDS["gif"]
# Seeds whose header names its data files: a case copies the header's whole folder.
WITH_FOLDER = ("nhdr", "mhd", "dicomdir")
DICOM_TAGS = ("Rows", "Columns", "NumberOfFrames", "BitsAllocated", "BitsStored", "SamplesPerPixel",
              "PixelRepresentation", "RescaleSlope", "PixelSpacing", "ImagePositionPatient")


def _dicom_tag(path: Path, rng: random.Random) -> str:
    import pydicom

    ds = pydicom.dcmread(path, force=True)
    tag = rng.choice(DICOM_TAGS)
    value = rng.choice((0, 1, 3, 7, 12, 64, 65535, 2**31 - 1))
    if tag in ("PixelSpacing", "ImagePositionPatient"):
        ds.__setattr__(tag, [str(rng.choice((0, -1, 1e30, "nan")))] * (2 if tag == "PixelSpacing" else 3))
    elif tag in ("NumberOfFrames", "RescaleSlope"):
        ds.__setattr__(tag, str(value))
    else:
        ds.__setattr__(tag, min(value, 65535))
    ds.save_as(path)
    return f"DICOM {tag} = {getattr(ds, tag)}"


def _e2e_fields(raw: bytearray, rng: random.Random) -> str:
    """An image chunk's size fields (count, height, width) set to extreme values."""
    at = raw.find(b"MDbData\0")
    heads = []
    while at != -1 and len(heads) < 64:
        heads.append(at)
        at = raw.find(b"MDbData\0", at + 8)
    if not heads:
        return _int_field(raw, rng)
    head = rng.choice(heads)
    field = head + 60 + rng.choice((0, 8, 12, 16))  # image header: size, type, count, height, width
    raw[field:field + 4] = (rng.choice(HUGE_VALUES) % 2**32).to_bytes(4, "little")
    return f"E2E chunk at {head}: field {field - head - 60} set"


def mutate(seed: Seed, case_dir: Path, rng: random.Random) -> tuple[Path, str]:
    """A damaged copy of ``seed`` under ``case_dir``: (its path, what was done)."""
    target = case_dir / seed.path.name
    kind = rng.choice(("bitflip", "bitflip", "random", "truncate", "field", "field", "field", "text", "swap",
                       "random_file", "special"))
    if seed.format in WITH_FOLDER:  # the header and the files it names travel together
        folder = case_dir / seed.path.parent.name
        shutil.copytree(seed.path.parent, folder, symlinks=True)
        target = folder / seed.path.name
        if kind == "random_file":
            n = rng.choice((0, 1, 100, 352, 4096))
            prefix = rng.choice((b"", b"NRRD0004\n", b"ObjectType = Image\n", b"\0" * 128 + b"DICM"))
            target.write_bytes(prefix + rng.randbytes(n))
            return target, f"header replaced by {n} random bytes after {prefix[:12]!r}"
        if kind == "special":
            special = _special(seed, target, rng)
            if special:
                return target, special
            kind = "field"
        victim = target if rng.random() < 0.6 else rng.choice(sorted(p for p in folder.rglob("*") if p.is_file()))
        return target, _damage(seed, victim, kind, rng)
    if kind == "random_file":
        n = rng.choice((0, 1, 100, 352, 4096, 70000))
        prefix = rng.choice((b"", b"\x1f\x8b", b"NRRD0004\n", b"HSF-OCT-103\0", b"CMDb", b"FOCT", b"\x89PNG\r\n\x1a\n",
                             b"II*\0", b"\0" * 128 + b"DICM", b"<?xml version='1.0'?><HEDX>"))
        if seed.path.is_dir():
            target.mkdir()
            target = target / ("junk.dcm" if seed.format == "dicom_series" else "junk")
        target.write_bytes(prefix + rng.randbytes(n))
        return (target if seed.path.is_file() else target.parent), f"random file {n} bytes after {prefix[:12]!r}"
    if seed.path.is_dir():
        shutil.copytree(seed.path, target)
    else:
        shutil.copyfile(seed.path, target)
    if kind == "special":
        special = _special(seed, target, rng)
        if special:
            return target, special
        kind = "field"
    return target, _damage(seed, _main_file(target, rng), kind, rng)


def _damage(seed: Seed, victim: Path, kind: str, rng: random.Random) -> str:
    """Damage one file of a case in place (``kind`` as chosen by :func:`mutate`); what was done."""
    dicom_file = victim.suffix.lower() == ".dcm" or (seed.format == "dicomdir" and victim.name.startswith("IM"))
    if seed.format.startswith("dicom") and kind == "field" and rng.random() < 0.7 and dicom_file:
        try:
            return _dicom_tag(victim, rng)
        except Exception as exc:  # pydicom refused to write the value: fall back to raw bytes
            kind = f"field (pydicom: {type(exc).__name__})"
    raw = bytearray(victim.read_bytes())
    compressed = raw[:2] == b"\x1f\x8b"
    if compressed:
        try:
            raw = bytearray(gzip.decompress(bytes(raw)))
        except (OSError, EOFError):  # an earlier damage already broke the stream
            compressed = False
    textual = victim.suffix.lower() in (".nrrd", ".nhdr", ".mha", ".mhd", ".xml", ".json") or victim.name.startswith(".z")
    if kind.startswith("field"):
        if seed.format == "e2e":
            what = _e2e_fields(raw, rng)
        elif textual and victim.suffix.lower() != ".mha" or victim.name.startswith(".z"):
            what = _text_numbers(raw, rng)
        else:
            what = _int_field(raw, rng, HEADER_FIELDS.get(seed.format.removesuffix("_gz")))
    elif kind == "text":
        what = _text_numbers(raw, rng) if textual else _int_field(raw, rng)
    elif kind == "swap":
        what = _text_word(raw, rng) if textual else _random_bytes(raw, rng)
    else:
        what = {"bitflip": _bitflip, "random": _random_bytes, "truncate": _truncate}[kind](raw, rng)
    if compressed and rng.random() < 0.9:
        raw = bytearray(gzip.compress(bytes(raw), compresslevel=1))
    victim.write_bytes(raw)
    return f"{victim.name}: {what}"


def _special(seed: Seed, target: Path, rng: random.Random) -> str | None:
    """Format-specific attacks: archives in archives, decompression and entity bombs, links out."""
    if seed.format == "nifti_gz":
        if rng.random() < 0.5:
            target.write_bytes(gzip.compress(target.read_bytes(), compresslevel=1))
            return "gzip inside gzip"
        return _gzip_bomb(target, rng)
    if seed.format == "heyex_xml":
        xml = next(target.glob("*.xml"))
        text = xml.read_text(errors="replace")
        bomb = ('<!DOCTYPE HEDX [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
                '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">]>')
        external = '<!DOCTYPE HEDX [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        doctype = rng.choice((bomb, external))
        body = text.split("?>", 1)[-1] if text.startswith("<?xml") else text
        body = body.replace("<Laterality>", "<Laterality>&" + ("d" if doctype is bomb else "x") + ";", 1)
        xml.write_text('<?xml version="1.0" encoding="UTF-8"?>' + doctype + body)
        return "XML entity bomb" if doctype is bomb else "XML external entity"
    if seed.format == "dicom_series":
        link = target / "link_out.dcm"
        outside = rng.choice(("/etc/passwd", str(seed.path.parent / "ct.nii"), "/proc/self/mem", "/dev/zero"))
        try:
            link.symlink_to(outside)
        except OSError:
            return None
        loop = target / "loop"
        loop.symlink_to(target, target_is_directory=True)
        return f"links to {outside} and to the folder itself"
    if seed.format in ("nhdr", "mhd"):
        return _data_file_attack(seed, target, rng)
    if seed.format == "dicomdir":
        folder = target.parent
        if rng.random() < 0.5:
            for image in [p for p in folder.rglob("*") if p.is_file() and p != target]:
                image.unlink()
            return "DICOMDIR whose image files are gone"
        outside = rng.choice(("/etc/passwd", "/proc/self/mem", "/dev/zero"))
        (folder / "PT000000" / "IM_LINK").symlink_to(outside)
        (folder / "PT000000" / "loop").symlink_to(folder, target_is_directory=True)
        return f"DICOMDIR tree with links to {outside} and to its own root"
    if seed.format == "ome_tiff":
        return _ome_attack(target, rng)
    if seed.format == "zarr":
        meta = next((p for p in target.rglob(".zarray")), None)
        if meta is None:
            return None
        spec = json.loads(meta.read_text())
        spec["chunks"] = [rng.choice((2**20, 2**31 - 1, 0, -1))] * len(spec["chunks"])
        meta.write_text(json.dumps(spec))
        return f"zarr chunks {spec['chunks']}"
    return None


def _data_file_attack(seed: Seed, header: Path, rng: random.Random) -> str:
    """A detached header naming a data file it should not: a device, a file outside its folder,
    a missing file, a folder, a link to a device, or a list or pattern of a million files."""
    text = header.read_text(encoding="latin-1")
    nrrd = seed.format == "nhdr"
    key = "data file: " if nrrd else "ElementDataFile = "
    line = next(ln for ln in text.splitlines() if ln.startswith(key))
    name = line[len(key):]
    choice = rng.choice(("/dev/zero", "/dev/urandom", "/proc/self/mem", "/etc/passwd", "../../../../../etc/hostname",
                         "missing.raw", ".", "link", "pattern", "list"))
    if choice == "link":
        (header.parent / name).unlink()
        (header.parent / name).symlink_to("/dev/zero")
        return f"data file {name} is a link to /dev/zero"
    if choice == "pattern":
        value = "ct%09d.raw 0 999999999 1" + (" 2" if rng.random() < 0.5 else "") if nrrd else "ct%09d.raw 0 999999999 1"
    elif choice == "list":
        names = "\n".join([name] * rng.choice((2, 1000, 100000)))
        value = ("LIST 2\n" if rng.random() < 0.5 else "LIST\n") + names if nrrd else "LIST\n" + names
    else:
        value = choice
    header.write_text(text.replace(line, key + value), encoding="latin-1")
    return f"data file -> {value[:40]!r}"


def _ome_attack(target: Path, rng: random.Random) -> str:
    """OME-TIFF XML with an entity bomb, an external entity, huge sizes or links to other files."""
    import tifffile

    with tifffile.TiffFile(target) as tif:
        data = tif.asarray()
        xml = tif.pages[0].description
    choice = rng.choice(("bomb", "external", "sizes", "files"))
    body = xml.split("?>", 1)[-1]
    if choice == "bomb":
        doctype = ('<!DOCTYPE OME [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
                   '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">'
                   '<!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;"><!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;">]>')
        body = body.replace('Name="Image0"', 'Name="&f;"', 1)
    elif choice == "external":
        doctype = '<!DOCTYPE OME [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
        body = body.replace('Name="Image0"', 'Name="&x;"', 1)
    else:
        doctype = ""
        if choice == "sizes":
            field = rng.choice(("SizeX", "SizeY", "SizeZ", "SizeC", "SizeT"))
            value = rng.choice(("0", "-1", "65536", "2147483647", "99999999999"))
            body = re.sub(f'{field}="\\d+"', f'{field}="{value}"', body, count=1)
        else:  # TiffData naming other files: tifffile would open them
            other = rng.choice(("/dev/zero", "/etc/passwd", "../../../../../etc/hostname", "missing.ome.tif"))
            body = re.sub(r"<TiffData[^>]*/>", f'<TiffData IFD="0" PlaneCount="{data.shape[0]}"><UUID FileName="{other}">'
                          'urn:uuid:00000000-0000-0000-0000-000000000000</UUID></TiffData>', body, count=1)
            choice = f"files ({other})"
    tifffile.imwrite(target, data, description='<?xml version="1.0" encoding="UTF-8"?>' + doctype + body,
                     metadata=None)
    return f"OME-XML {choice}"


def _gzip_bomb(target: Path, rng: random.Random) -> str:
    """A NIfTI header over a gzip stream of 64 MiB of zeros (about 64 KiB compressed) declaring
    either exactly that (a legitimate, highly compressible image) or 4 or 32 times more."""
    raw = bytearray(gzip.decompress(target.read_bytes())[:352])
    side, slices = rng.choice(((1024, 64), (2048, 64), (2048, 256)))
    struct.pack_into("<8h", raw, 40, 3, side, side, slices, 1, 1, 1, 1)
    struct.pack_into("<hh", raw, 70, 2, 8)  # uint8
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=9) as gz:
        gz.write(bytes(raw))
        zeros = bytes(1 << 20)
        for _ in range(64):
            gz.write(zeros)
    target.write_bytes(out.getvalue())
    return f"gzip bomb: 64 MiB of zeros, {side}x{side}x{slices} uint8 declared"


# --- child processes ---------------------------------------------------------------------------

def _status_kib(*fields: str) -> dict[str, int]:
    values = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in fields:
            values[key] = int(rest.split()[0]) * 1024
    return values


def _worker(conn, memory_bytes: int, seeds: list[Seed], work: str) -> None:
    """Open cases sent by the parent until told to stop; each reply is one classified result."""
    import napari_medvision as mv  # noqa: F401  (import cost paid once per worker)
    from napari_medvision.io import ReadError, load_all
    import SimpleITK, pydicom, highdicom, tifffile, zarr, dask.array, PIL.Image, isal.igzip, defusedxml  # noqa: F401,E401

    warnings.simplefilter("ignore")
    _die_with_parent()
    # A forked worker inherits the parent's dask thread pool but not its threads: a zarr read would
    # wait on it forever when the parent (a test session) had used dask. Each worker makes its own.
    import dask.threaded

    dask.threaded.default_pool = None
    dask.threaded.pools.clear()
    # Freed memory goes back to the system between cases, so that a case's resident peak is its own:
    # Pillow keeps no block cache, and glibc's heap is trimmed before each case.
    PIL.Image.core.set_blocks_max(0)
    trim = _malloc_trim()
    # Each seed is read once first: a forked worker maps the libraries' code pages only when it
    # first runs them, and those pages (shared, from the page cache) would count in a case's peak.
    from napari_medvision.io.formats import readers_for, sniffed_readers

    for seed in seeds:
        for reader in readers_for(seed.path) or sniffed_readers(seed.path):
            try:
                reader.read(seed.path)
            except Exception:
                pass
    base = _status_kib("VmSize")["VmSize"]
    resource.setrlimit(resource.RLIMIT_AS, (base + memory_bytes, resource.RLIM_INFINITY))
    while True:
        job = conn.recv()
        if job is None:
            return
        index, seed_index, case_seed = job
        seed = seeds[seed_index]
        rng = random.Random(case_seed)
        case_dir = Path(work) / f"case{index:06d}"
        if case_dir.exists():
            shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir(parents=True)
        try:
            path, what = mutate(seed, case_dir, rng)
        except Exception as exc:
            conn.send({"status": "generator_error", "error": f"{type(exc).__name__}: {exc}", "path": str(case_dir)})
            continue
        conn.send({"started": str(path), "mutation": what})
        gc.collect(0)  # the youngest generation only: a full collection costs ~0.3 s with these libraries
        trim()
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the case's own peak from here
        before = _status_kib("VmRSS")["VmRSS"]
        start = time.perf_counter()
        result = {"path": str(path), "mutation": what}
        try:
            volumes = load_all(path)
            decoded = 0
            for vol in volumes:
                if not isinstance(vol.data, np.ndarray):  # lazy (zarr): what a viewer shows first
                    np.asarray(vol.data[tuple(slice(0, 1) for _ in vol.data.shape)])
                decoded += _nbytes(vol.data) if isinstance(vol.data, np.ndarray) else 0
            result.update(status="loaded", decoded_bytes=decoded,
                          shapes=[list(map(int, v.data.shape)) for v in volumes])
        except ReadError as exc:
            # load_all turns a library's own exception into a ReadError; count those apart
            result.update(status="read_error", error=str(exc)[:300], decoded_bytes=0,
                          library_error=exc.__cause__ is not None and not isinstance(exc.__cause__, ReadError))
        except MemoryError as exc:
            result.update(status="out_of_memory", error=f"MemoryError: {exc}"[:300], decoded_bytes=0)
        except Exception as exc:
            result.update(status="other_exception", error=f"{type(exc).__name__}: {exc}"[:300], decoded_bytes=0,
                          traceback=traceback.format_exc()[-2000:])
        volumes = None
        result["seconds"] = round(time.perf_counter() - start, 4)
        result["peak_bytes"] = max(_status_kib("VmHWM")["VmHWM"] - before, 0)
        budget = MEMORY_FACTOR * max(result["decoded_bytes"], seed.decoded_bytes) + MEMORY_ALLOWANCE
        result["memory_budget"] = budget
        if result["status"] in ("loaded", "read_error") and result["peak_bytes"] > budget:
            result["status_before_memory"] = result["status"]
            result["status"] = "over_memory_budget"
        conn.send(result)
        if result["status"] not in FAILURES:
            shutil.rmtree(case_dir, ignore_errors=True)


def _die_with_parent() -> None:
    """Linux: the worker is killed when the parent ends, even if the parent is killed itself."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _malloc_trim():
    """glibc's ``malloc_trim(0)`` (returns freed heap to the system), or a no-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return lambda: libc.malloc_trim(0)
    except OSError:
        return lambda: None


class _Slot:
    """One worker process and the case it is running."""

    def __init__(self, ctx, memory_bytes, seeds, work):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker, args=(child, memory_bytes, seeds, work), daemon=True)
        self.process.start()
        child.close()
        self.job = None
        self.started = 0.0
        self.info: dict = {}

    def stop(self, kill: bool = False) -> None:
        if kill:
            self.process.kill()
        else:
            try:
                self.conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def run(cases: int, seed: int = 0, workers: int = 2, out: Path = Path("/tmp/medvision_fuzz"),
        memory_gib: float = 2.0, timeout_s: float = 10.0, data: Path | None = None, large_seeds: bool = False,
        log=None, formats: list[str] | None = None) -> dict:
    """Run ``cases`` fuzz cases (fixed ``seed``); returns the summary also written to ``out/summary.json``.

    ``formats``: only seeds of these formats (names as in the summary), e.g. for a run in chunks."""
    out = Path(out)
    work, failed = out / "cases", out / "failures"
    for folder in (work, failed):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    seeds = make_seeds(out / "seeds", data or data_dir(), large=large_seeds)
    if formats:
        unknown = set(formats) - {s.format for s in seeds}
        if unknown:
            raise ValueError(f"no seeds of format(s) {sorted(unknown)}; known: {[s.format for s in seeds]}")
        seeds = [s for s in seeds if s.format in formats]
    rng = random.Random(seed)
    # Every format gets its share: seeds are taken round-robin in a shuffled order.
    jobs = [(i, i % len(seeds), rng.getrandbits(64)) for i in range(cases)]
    rng.shuffle(jobs)
    ctx = mp.get_context("fork")
    memory = int(memory_gib * 2**30)
    slots = [_Slot(ctx, memory, seeds, str(work)) for _ in range(max(1, workers))]
    results: list[dict] = []
    start = time.perf_counter()
    pending = list(jobs)

    def finish(slot: _Slot, result: dict) -> None:
        index, seed_index, case_seed = slot.job
        result.update(case=index, format=seeds[seed_index].format, case_seed=case_seed)
        results.append(result)
        if result["status"] in FAILURES or result["status"] == "generator_error":
            _keep_failure(result, failed)
        slot.job, slot.info = None, {}
        if log and len(results) % 100 == 0:
            log(f"{len(results)}/{cases} cases, {time.perf_counter() - start:.0f} s")

    try:
        while pending or any(s.job for s in slots):
            for k, slot in enumerate(slots):
                if slot.job is None and pending:
                    slot.job, slot.started, slot.info = pending.pop(), time.perf_counter(), {}
                    slot.conn.send(slot.job)
            ready = wait([s.conn for s in slots if s.job], timeout=0.5)
            now = time.perf_counter()
            for k, slot in enumerate(slots):
                if slot.job is None:
                    continue
                if slot.conn in ready:
                    try:
                        message = slot.conn.recv()
                    except (EOFError, OSError):
                        slot.process.join(5)
                        code = slot.process.exitcode
                        finish(slot, {**slot.info, "status": "crash", "error": f"worker exit code {code}"})
                        slots[k] = _Slot(ctx, memory, seeds, str(work))
                        continue
                    if "started" in message:
                        slot.info = {"path": message["started"], "mutation": message["mutation"]}
                        slot.started = now
                    else:
                        finish(slot, message)
                elif "path" in slot.info and now - slot.started > timeout_s:
                    slot.stop(kill=True)
                    finish(slot, {**slot.info, "status": "hang", "error": f"no answer after {timeout_s:g} s"})
                    slots[k] = _Slot(ctx, memory, seeds, str(work))
                elif now - slot.started > timeout_s + 60:  # the mutation itself never finished
                    slot.stop(kill=True)
                    finish(slot, {"status": "generator_error", "error": "mutation did not finish"})
                    slots[k] = _Slot(ctx, memory, seeds, str(work))
    finally:
        for slot in slots:
            slot.stop()
    summary = summarise(results, seeds, time.perf_counter() - start, cases=cases, seed=seed, workers=workers,
                        memory_gib=memory_gib, timeout_s=timeout_s, large_seeds=large_seeds,
                        only_formats=formats or None)
    (out / "summary.json").write_text(json.dumps({**summary, "cases": results}, indent=1, default=str))
    return summary


def _keep_failure(result: dict, failed: Path) -> None:
    source = Path(result.get("path") or "")
    if result.get("format") in WITH_FOLDER and source.is_file():
        source = source.parent  # the header with the files it names
    if source.exists():
        target = failed / f"case{result['case']:06d}_{result['status']}"
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
        else:
            target.mkdir(exist_ok=True)
            shutil.copyfile(source, target / source.name)
        result["kept"] = str(target)


def summarise(results: list[dict], seeds: list[Seed], seconds: float, **run_info) -> dict:
    """Counts per status, overall and per format, with the peak-memory ratio of loaded cases."""
    statuses = ("loaded", "read_error") + FAILURES + ("generator_error",)
    per_format = {}
    for seed in seeds:
        rows = [r for r in results if r.get("format") == seed.format]
        per_format[seed.format] = {s: sum(r["status"] == s for r in rows) for s in statuses}
    # The ratio is stated for images of 1 MiB and more; below that the fixed allowance dominates.
    ratios = [r["peak_bytes"] / r["decoded_bytes"] for r in results
              if r["status"] in ("loaded", "over_memory_budget") and r.get("decoded_bytes", 0) >= 1 << 20]
    totals = {s: sum(r["status"] == s for r in results) for s in statuses}
    return {
        **run_info,
        "formats": len(seeds),
        "seconds": round(seconds, 1),
        "totals": totals,
        "failures": sum(totals[s] for s in FAILURES),
        "read_errors_from_library_exceptions": sum(bool(r.get("library_error")) for r in results),
        "loaded_1mib_or_more": len(ratios),
        "peak_over_decoded_max": round(max(ratios), 2) if ratios else None,
        "peak_over_decoded_median": round(float(np.median(ratios)), 2) if ratios else None,
        "peak_mib_max": round(max((r.get("peak_bytes", 0) for r in results), default=0) / 2**20, 1),
        "max_case_seconds": max((r.get("seconds", 0) for r in results), default=0),
        "per_format": per_format,
        "failed_cases": [{k: r.get(k) for k in ("case", "format", "status", "mutation", "error", "kept", "case_seed")}
                         for r in results if r["status"] in FAILURES + ("generator_error",)],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-gib", type=float, default=2.0, help="address space each worker may add")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a case counts as a hang")
    parser.add_argument("--out", type=Path, default=Path("/tmp/medvision_fuzz"))
    parser.add_argument("--large-seeds", action="store_true", help="add real samples of a few MiB as seeds")
    parser.add_argument("--formats", nargs="+", help="only seeds of these formats (default: all)")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    summary = run(args.cases, args.seed, args.workers, args.out, args.memory_gib, args.timeout,
                  large_seeds=args.large_seeds, log=lambda m: print(m, file=sys.stderr, flush=True),
                  formats=args.formats)
    for fmt, counts in summary["per_format"].items():
        print(json.dumps({"bench": "fuzz", "format": fmt, **counts}))
    print(json.dumps({"bench": "fuzz", **{k: v for k, v in summary.items() if k not in ("per_format", "failed_cases")},
                      "failed_cases": summary["failed_cases"][:20]}))
    return 0 if summary["failures"] == 0 and summary["totals"]["generator_error"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
