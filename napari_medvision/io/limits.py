"""Size checks made before a reader allocates what a header declares.

A header is an untrusted claim: a flipped bit in a dimension field can ask for terabytes. Every
reader compares the bytes its header declares with the bytes the file actually holds before it
allocates, so a damaged or hostile file gives a :class:`ReadError` instead of an out-of-memory
crash. Compressed data may expand, but not without bound: deflate (gzip, zlib, zip) can shrink
data at most 1032-fold, so a larger claim is a damaged header or a decompression bomb.
"""

from __future__ import annotations

import math
import resource
from pathlib import Path

from .errors import ReadError

# Deflate's largest possible ratio (a run of one byte value: 258 bytes per 2-bit code).
MAX_DEFLATE_RATIO = 1032
# Image codecs (JPEG 2000, JPEG-LS, RLE, PNG) can beat deflate on blank images; any declared size
# up to this is accepted whatever the file size, above it the ratio applies.
SMALL_DECLARED_BYTES = 64 << 20
# Files walked when a folder is searched for DICOM images; a larger folder gives a ReadError.
MAX_FOLDER_FILES = 50_000


def declared_bytes(shape, itemsize: int) -> int:
    """Bytes an array of ``shape`` needs; ReadError-free (negative or absurd sizes give huge numbers)."""
    total = int(itemsize)
    for n in shape:
        n = int(n)
        if n < 0:
            return -1
        total *= n
    return total


def check_raw(path: Path, what: str, shape, itemsize: int, available: int) -> int:
    """Bytes of ``shape`` x ``itemsize``; ReadError when that is negative or more than ``available``."""
    need = declared_bytes(shape, itemsize)
    if need < 0:
        raise ReadError(path, f"declares a negative size for {what} {tuple(int(n) for n in shape)}")
    if need > available:
        raise ReadError(path, f"is truncated or its header is damaged: {what} of shape "
                              f"{tuple(int(n) for n in shape)} needs {_size(need)}, the file holds {_size(available)}")
    return need


def check_compressed(path: Path, what: str, shape, itemsize: int, stored: int,
                     ratio: float = MAX_DEFLATE_RATIO) -> int:
    """Bytes ``shape`` x ``itemsize`` declares for data stored compressed in ``stored`` bytes.

    ReadError when the claim is negative or exceeds both :data:`SMALL_DECLARED_BYTES` and
    ``ratio`` times the stored bytes (a damaged header or a decompression bomb).
    """
    need = declared_bytes(shape, itemsize)
    if need < 0:
        raise ReadError(path, f"declares a negative size for {what} {tuple(int(n) for n in shape)}")
    if need > SMALL_DECLARED_BYTES and need > ratio * max(stored, 0):
        raise ReadError(path, f"declares {what} of shape {tuple(int(n) for n in shape)} ({_size(need)}) from "
                              f"{_size(stored)} of compressed data, more than {ratio:g}-fold: the header is damaged "
                              "or the file is a decompression bomb")
    return need


def check_memory(path: Path, what: str, need: int) -> None:
    """ReadError when ``need`` bytes exceed the memory this process can still take.

    A header may truthfully declare an image larger than the machine's memory (or a gzip stream
    may expand to one); refusing before the allocation keeps the viewer alive.
    """
    free = available_memory()
    if free is not None and need > free:
        raise ReadError(path, f"is too large to load: {what} needs {_size(need)}, "
                              f"this process can take about {_size(free)} more")


def available_memory() -> int | None:
    """Bytes this process may still allocate: the system's available memory, less where an
    address-space or data limit (``ulimit -v`` / ``-d``) is tighter; None where unknown."""
    status = _proc_fields("/proc/self/status")
    candidates = []
    meminfo = _proc_fields("/proc/meminfo")
    if "MemAvailable" in meminfo:
        candidates.append(meminfo["MemAvailable"])
    for limit, used in ((resource.RLIMIT_AS, "VmSize"), (resource.RLIMIT_DATA, "VmData")):
        soft, _hard = resource.getrlimit(limit)
        if soft != resource.RLIM_INFINITY and used in status:
            candidates.append(max(soft - status[used], 0))
    return min(candidates) if candidates else None


def _proc_fields(name: str) -> dict[str, int]:
    """``{field: bytes}`` from a /proc file of ``Field:  123 kB`` lines (empty off Linux)."""
    try:
        lines = Path(name).read_text().splitlines()
    except OSError:
        return {}
    fields = {}
    for line in lines:
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[key] = int(parts[0]) * 1024
    return fields


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} bytes"
    exp = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024 ** exp:.1f} {('bytes', 'KiB', 'MiB', 'GiB', 'TiB')[exp]}"
