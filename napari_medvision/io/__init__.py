"""Reading and writing medical images as :class:`~napari_medvision.volume.Volume`.

``load`` picks a reader by suffix (or by sniffing the file), ``save`` a writer by suffix.
Every failure is a :class:`ReadError` / :class:`WriteError` naming the file and the problem.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from ..volume import Volume
from .errors import FolderTooLargeError, GeometryWarning, MultipleSeriesError, ReadError, WriteError
from .formats import READERS, WRITERS, readers_for, sniffed_readers, suffix_of, writer_for

# Importing the format modules registers their readers and writers.
from . import nifti, itk, image2d, zarr_store  # noqa: E402,F401
from . import dicom  # noqa: E402,F401
from . import oct  # noqa: E402,F401
from . import dicom_seg_write  # noqa: E402,F401  (label maps of DICOM scans -> .dcm DICOM SEG)

__all__ = [
    "load",
    "load_all",
    "save",
    "ReadError",
    "WriteError",
    "MultipleSeriesError",
    "FolderTooLargeError",
    "GeometryWarning",
    "readable_suffixes",
    "writable_suffixes",
]

MAX_LEADING_AXES = 1


def load(path: str | os.PathLike, **options) -> Volume:
    """The image stored at ``path`` (a file or a DICOM/zarr folder) as a Volume.

    Options go to the format's reader: ``series=`` for DICOM folders holding several series,
    ``shape=`` for Zeiss OCT cubes, ``modality=`` to override the guessed modality.
    """
    return load_all(path, **options)[0]


def load_all(path: str | os.PathLike, **options) -> list[Volume]:
    """The image at ``path`` followed by any label maps stored with it (OCT layers, masks)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ReadError(path, "no such file or folder")
    if path.is_dir() and not any(path.iterdir()):
        raise ReadError(path, "the folder is empty")
    modality = options.pop("modality", None)
    by_suffix = readers_for(path)
    candidates = by_suffix or ([] if path.is_dir() else sniffed_readers(path))
    if not candidates:
        raise ReadError(path, f"is not in a format medvision reads (suffix {suffix_of(path) or 'none'!r}); "
                              f"readable: {', '.join(readable_suffixes())}")
    first_error: ReadError | None = None
    for reader in candidates:
        try:
            volumes = reader.read(path, **options)
        except (MultipleSeriesError, FolderTooLargeError):
            raise
        except ReadError as exc:
            first_error = first_error or exc
            continue
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # a library's own error: say which file and which reader
            if first_error is None:
                first_error = ReadError(path, f"could not be read as {reader.name}: {_reason(exc)}")
                first_error.__cause__ = exc
            continue
        for vol in volumes:
            _check(path, vol)
            vol.meta.setdefault("source", str(path))
            vol.meta.setdefault("format", reader.name)
            if modality is not None:
                vol.modality = modality
            if vol.labels is None and looks_like_label_map(vol):
                vol.labels = {}
            if vol.labels == {}:
                vol.labels = {v: f"label {v}" for v in values_present(np.asarray(vol.data)) if v != 0}
            if modality is None and vol.modality is None and vol.labels is None:
                vol.modality = guess_modality(vol)
        return volumes
    if by_suffix and path.is_file():
        actual = sniffed_readers(path, exclude=by_suffix)
        if actual:
            raise ReadError(path, f"is named {suffix_of(path)} but holds {actual[0].name} data; "
                                  f"rename it to {actual[0].suffixes[0]}") from first_error
    assert first_error is not None
    if path.is_dir() and not suffix_of(path) and not sniffed_readers(path):
        raise ReadError(path, "holds no image medvision reads: no DICOM files, zarr store or Heyex XML export "
                              "(to open one file, choose the file itself)") from first_error
    raise first_error


def save(volume: Volume, path: str | os.PathLike) -> Path:
    """Write ``volume`` to ``path``; the format comes from the suffix. Returns the path written.

    Writes go to a temporary name first and are renamed into place, so a failed save never
    leaves a half-written file where a good one was.
    """
    path = Path(path).expanduser()
    writer = writer_for(path)
    if writer is None:
        raise WriteError(path, f"cannot write suffix {suffix_of(path) or 'none'!r}; writable: "
                               f"{', '.join(writable_suffixes())}")
    if not path.parent.exists():
        raise WriteError(path, f"the folder {path.parent} does not exist")
    try:
        writer.write(volume, path)
    except WriteError:
        raise
    except Exception as exc:
        raise WriteError(path, f"could not be written as {writer.name}: {_reason(exc)}") from exc
    return path


MAX_GUESSED_LABELS = 64


def looks_like_label_map(vol: Volume) -> bool:
    """An unnamed integer map with few non-negative values (a mask or segmentation), not an image.

    Only files that do not say what they hold (NIfTI, NRRD, MHA without medvision's label
    names) are guessed; photos and scanners' own formats state their modality.
    """
    if vol.rgb or vol.modality is not None or not isinstance(vol.data, np.ndarray):
        return False
    if not np.issubdtype(vol.data.dtype, np.integer) or vol.data.size == 0:
        return False
    step = max(1, vol.data.size // 4_000_000)
    sample = vol.data.reshape(-1)[::step]
    if sample.min() < 0:
        return False
    values = np.unique(sample)
    return len(values) <= MAX_GUESSED_LABELS and values.max() < 1000 and not (len(values) > 16 and _is_dense(values))


def values_present(data: np.ndarray) -> list[int]:
    """The distinct values of an integer array, ascending; 8/16-bit arrays are counted (a
    histogram in one pass) instead of sorted."""
    if data.dtype.kind in "iu" and data.dtype.itemsize <= 2 and data.size:
        flat = data.reshape(-1)
        low = int(np.iinfo(data.dtype).min)
        counts = np.zeros(1 << (8 * data.dtype.itemsize), np.int64)
        step = 1 << 20  # bincount widens to int64: a million values at a time keeps that small
        for start in range(0, flat.size, step):
            part = flat[start:start + step]
            counts += np.bincount(part.astype(np.int32) - low if low else part, minlength=counts.size)
        return [int(v) + low for v in np.flatnonzero(counts)]
    return [int(v) for v in np.unique(data)]


def _is_dense(values: np.ndarray) -> bool:
    """A run of consecutive grey levels (a low-bit image) rather than scattered label ids."""
    return values.max() - values.min() + 1 == len(values) and values.min() == 0 and len(values) > 32


def guess_modality(vol: Volume) -> str | None:
    """A best guess when the header does not say: HU-like ranges are CT, other 3D greys MR."""
    if vol.rgb:
        return "fundus"
    if not isinstance(vol.data, np.ndarray) or vol.ndim != 3:
        return None
    step = max(1, int(round((vol.data.size / 2e6) ** (1 / 3))))
    sample = vol.data[(..., *(slice(None, None, step),) * 3)]
    low, high = np.percentile(sample, [1, 99.5])
    if low <= -500 and high >= 100:
        return "CT"
    return "MR"


def readable_suffixes() -> list[str]:
    return sorted({s for r in READERS for s in r.suffixes})


def writable_suffixes() -> list[str]:
    return sorted({s for w in WRITERS for s in w.suffixes})


def _reason(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _check(path: Path, vol: Volume) -> None:
    """Refuse arrays napari and the models cannot use; warn on partly invalid values."""
    if vol.ndim not in (2, 3):
        raise ReadError(path, f"has {vol.ndim} spatial dimensions; medvision handles 2D and 3D images")
    if vol.n_leading > MAX_LEADING_AXES:
        raise ReadError(path, f"has {vol.data.ndim} dimensions (shape {tuple(vol.data.shape)}); "
                              "medvision handles 2D, 3D, RGB and 4D (series of 3D) images")
    if any(s == 0 for s in vol.data.shape):
        raise ReadError(path, f"holds no voxels (shape {tuple(vol.data.shape)})")
    if isinstance(vol.data, np.ndarray) and np.issubdtype(vol.data.dtype, np.floating):
        finite = np.isfinite(vol.data)
        if not finite.any():
            raise ReadError(path, "contains no valid values: every voxel is NaN or infinite")
        if not finite.all():
            bad = int(finite.size - finite.sum())
            warnings.warn(f"{path}: {bad} voxels are NaN or infinite", GeometryWarning, stacklevel=3)
