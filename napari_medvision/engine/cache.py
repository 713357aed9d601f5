"""The on-disk cache of per-volume work: zarr stores written atomically and verified on read.

Embeddings, demons fields and fitted prompt heads are expensive and asked for again each time the
user paints one more slice, so they are kept under keys that change with the pixels, the model
and the preprocessing::

    $MEDVISION_HOME/cache/embeddings/<key>.zarr

A store is written under a temporary name and renamed once complete; its ``medvision`` attribute
(the completion marker, written last) lists every array with its shape, dtype and CRC32. On open
the marker, shapes, dtypes and checksums are verified; anything that does not match, or fails to
read, is deleted and recomputed: a cache entry is never trusted blindly. The folder is capped at
``$MEDVISION_CACHE_GB`` (least recently used entries go first).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import threading
import uuid
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import platformdirs
import zarr

CACHE_FORMAT = 2  # bump when the store layout or the preprocessing code changes meaning
MARKER = "medvision"

def cache_dir() -> Path:
    """``$MEDVISION_HOME/cache/embeddings`` (default: the platform's user data folder)."""
    if os.environ.get("MEDVISION_HOME"):
        root = Path(os.environ["MEDVISION_HOME"])
    else:
        root = Path(platformdirs.user_data_dir("napari-medvision"))
    return root / "cache" / "embeddings"


def content_hash(data: Any, rgb: bool = False, slices_per_block: int = 16) -> str:
    """SHA-256 of every byte of ``data`` plus its shape and dtype (numpy or dask, read in blocks), 32 hex digits.

    A strided sample would miss a one-voxel edit (a user fixing a slice), so all bytes are hashed.
    SHA-256, not blake2b: CPUs with SHA instructions (x86 since Zen / Ice Lake, ARMv8) hash with it
    more than twice as fast (about 0.1 s for a 300x512x512 int16 CT), and the Prompt panel hashes
    a volume twice per painted slice (the preview, then the checked prompt).
    """
    digest = hashlib.sha256()
    digest.update(json.dumps([list(map(int, data.shape)), str(data.dtype), rgb]).encode())
    for start in range(0, data.shape[0], slices_per_block):
        block = np.ascontiguousarray(np.asarray(data[start:start + slices_per_block]))
        digest.update(memoryview(block).cast("B"))
    return digest.hexdigest()[:32]




def _crc(features: np.ndarray) -> int:
    if features.ndim < 2:
        return zlib.crc32(memoryview(np.ascontiguousarray(features).reshape(-1)).cast("B"))
    crc = 0
    for one in features:  # slice by slice: no copy of a whole non-contiguous volume
        crc = zlib.crc32(memoryview(np.ascontiguousarray(one)).cast("B"), crc)
    return crc




# Writing a store is left to one background thread: on a GPU writing a 300-slice store (about
# 225 MB) takes a good third as long as computing the features, so the caller gets its features
# while they are stored. A read of the same entry waits for its write; the process waits for all
# of them at exit (``flush_cache_writes``), and an interrupted write leaves only a ``.partial``
# folder, never an entry that looks complete.
_writer: Optional[ThreadPoolExecutor] = None
_pending: dict[Path, Future] = {}
_pending_lock = threading.Lock()




def write_arrays_later(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Queue :func:`write_arrays` on the cache's writer thread (``arrays`` must not change afterwards)."""
    global _writer
    with _pending_lock:
        if _writer is None:
            _writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="medvision-cache")
        _pending[path] = _writer.submit(write_arrays, path, key, arrays)


def wait_for_write(path: Path) -> None:
    with _pending_lock:
        future = _pending.pop(path, None)
    _settle(future)


def flush_cache_writes() -> None:
    """Wait until every feature store queued for writing is on disk."""
    with _pending_lock:
        futures = list(_pending.values())
        _pending.clear()
    for future in futures:
        _settle(future)


def _settle(future: Optional[Future]) -> None:
    """Wait for a queued write; one that failed costs a recomputation next time, never the caller's result."""
    if future is None:
        return
    try:
        future.result()
    except Exception:  # the atomic write left no entry that looks complete
        pass


atexit.register(flush_cache_writes)


def _row_crcs(values: np.ndarray) -> list[int]:
    """CRC32 of every slice (row along axis 0): a part of a stack can be verified alone."""
    return [zlib.crc32(memoryview(np.ascontiguousarray(one)).cast("B")) for one in values]


def _checked(array, info: dict, rows: Optional[Sequence[int]]) -> Optional[np.ndarray]:
    """The stored ``array`` (or only its ``rows``; the others left unset), or None if a checksum fails."""
    per_row = info.get("crc32_rows")
    if rows is None or per_row is None:
        values = array[...]
        ok = _row_crcs(values) == per_row if per_row is not None else _crc(values) == info.get("crc32")
        return values if ok else None
    values = np.empty(array.shape, dtype=array.dtype)  # rows never written commit no memory
    wanted = sorted({int(r) for r in rows})
    for start, stop in _runs(wanted):
        values[start:stop] = array[start:stop]
    return values if all(_row_crcs(values[r:r + 1])[0] == per_row[r] for r in wanted) else None


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted row numbers as ``[start, stop)`` runs of consecutive rows (one read each)."""
    runs: list[tuple[int, int]] = []
    for r in rows:
        if runs and r == runs[-1][1]:
            runs[-1] = (runs[-1][0], r + 1)
        else:
            runs.append((r, r + 1))
    return runs


def read_arrays(path: Path, key: str, expect: dict[str, tuple[Optional[Sequence[int]], str]],
                rows: Optional[dict[str, Sequence[int]]] = None) -> Optional[dict[str, np.ndarray]]:
    """Named arrays of a complete, intact store at ``path``, else ``None`` (and the store is removed).

    expect: ``{name: (shape, dtype)}``; the marker's key, every shape, dtype and CRC32 must match
    (a shape of ``None``: whatever the marker records, still checked against the stored array).
    rows: ``{name: slices}`` to read (and verify) only these rows of a stack of slices; the rest
    of that array is left unset. A preview of a 300x512x512 prompt needs the demons fields of a
    few slices, not the 0.6 GB of all of them.
    Shared by every cache of per-volume work (features here, prompt fields and features in
    ``tasks.prompting.volume_cache``), so they all verify the same way.
    """
    if not path.exists():
        return None
    try:
        group = zarr.open_group(str(path), mode="r")
        marker = dict(group.attrs.get(MARKER) or {})
        listed = marker.get("arrays") or {}
        ok = marker.get("complete") is True and marker.get("key") == key and set(listed) == set(expect)
        out = {}
        for name, (shape, dtype) in expect.items() if ok else ():
            array, info = group[name], listed[name]
            recorded = info.get("shape")
            if (recorded != list(array.shape) or (shape is not None and recorded != list(shape))
                    or array.dtype != np.dtype(dtype) or info.get("dtype") != np.dtype(dtype).str):
                break
            values = _checked(array, info, (rows or {}).get(name))
            if values is None:
                break
            out[name] = values
        else:
            if ok:
                _touch(path)
                return out
    except Exception:  # any read error means "not usable": recompute rather than trust it
        pass
    shutil.rmtree(path, ignore_errors=True)
    return None


def write_arrays(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    """Write named arrays to ``path`` atomically: temporary store, marker last, then rename."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(tmp), mode="w")
        listed = {}
        for name, values in arrays.items():
            values = np.ascontiguousarray(values)
            # Features and fields are noise-like floats: compression saves little and costs read time.
            # One chunk per slice for stacks of slices, one in all for small tables (weights, a PCA basis).
            chunks = ((1,) + tuple(values.shape[1:]) if values.ndim >= 3 and values.shape[0]
                      else tuple(max(1, d) for d in values.shape))
            array = group.create_array(name, shape=values.shape, dtype=values.dtype, chunks=chunks,
                                       compressors=None, fill_value=0)
            array[...] = values
            listed[name] = {"shape": list(values.shape), "dtype": values.dtype.str}
            if chunks[0] == 1 and values.ndim >= 3:
                listed[name]["crc32_rows"] = _row_crcs(values)
            else:
                listed[name]["crc32"] = _crc(values)
        group.attrs[MARKER] = {"complete": True, "key": key, "arrays": listed, "format": CACHE_FORMAT}
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        prune(path.parent, keep=path)
    except OSError:
        pass  # a read-only or full disk costs speed next time, never the result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_limit_bytes() -> int:
    """Size cap of the cache folder: ``$MEDVISION_CACHE_GB`` gigabytes (default 20)."""
    try:
        return int(float(os.environ.get("MEDVISION_CACHE_GB", "20")) * 1e9)
    except ValueError:
        return int(20e9)


def prune(folder: Path, keep: Optional[Path] = None, limit: Optional[int] = None) -> list[Path]:
    """Remove the least recently used entries until the folder fits ``limit`` bytes; return them.

    A 300x512x512 CT costs ~0.6 GB of demons fields plus its DINO features, so without a cap the
    cache grows with every new scan. ``keep`` (the entry just written) is never removed.
    """
    limit = cache_limit_bytes() if limit is None else limit
    entries = []
    for entry in folder.glob("*.zarr"):
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        entries.append((entry.stat().st_mtime, size, entry))
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, entry in sorted(entries):
        if total <= limit:
            break
        if keep is not None and entry == keep:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        total -= size
        removed.append(entry)
    return removed


def _touch(path: Path) -> None:
    """Mark an entry as used now (the cap removes the least recently used first)."""
    try:
        os.utime(path)
    except OSError:
        pass
