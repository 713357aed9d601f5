"""What a Dask worker does for one scan of a cohort run: check, load, run the task, write, record.

Each scan's outputs are written under temporary names and renamed into place; its record
(``records/<scan id>.json``) is written last, so a record always describes outputs that
exist. A rerun skips a scan whose record has the same key (input checksum, task, model and
its checksum, options) and whose outputs are all there. Any exception becomes an error record:
one bad scan never stops the others. Models and example scans are loaded once per worker
process and kept for the next scan.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import io
from .batch_inputs import Scan
from .engine.device import resolve_device
from .io.dicom import find_series
from .io.dicom_scan import choose_series
from .io.dicom_write import write_dicom_series
from .io.formats import suffix_of
from .io.rtstruct_write import write_rtstruct
from .models.registry import CardError, get_card, load_model
from .tasks.segment import segment
from .tasks.synthesize import synthesize
from .volume import Volume

RECORDS = "records"
NIFTI_FAMILY = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
IMAGE_2D = (".png", ".tif", ".tiff")
_LOADED: dict[tuple, Any] = {}  # per worker process: models and example scans, loaded once


@dataclass(frozen=True)
class Job:
    """What every scan of a run gets done to it (sent once to each worker with the task)."""

    task: str | Callable[..., Volume]  # "segment", "synthesize", "prompt", or a function Volume -> Volume
    out_dir: str
    model: str | None = None
    model_sha256: str | None = None
    resume: bool = True
    rtstruct: bool = False
    device: str | None = None
    options: dict = field(default_factory=dict)

    def key(self, input_sha256: str, examples_sha256: str | None) -> dict:
        """What must match for an earlier result to count as this one."""
        task = self.task if isinstance(self.task, str) else f"{self.task.__module__}.{self.task.__qualname__}"
        return {"input_sha256": input_sha256, "task": task, "model": self.model, "model_sha256": self.model_sha256,
                "examples_sha256": examples_sha256, "options": _plain(self.options), "rtstruct": self.rtstruct}


def run_scan(scan: Scan, job: Job) -> dict:
    """The record of ``scan`` after running ``job`` on it (status ok, skipped or error); never raises."""
    start = time.perf_counter()
    record = {"scan_id": scan.id, "input": scan.path, "series": scan.series, "status": "error", "error": "",
              "outputs": [], "labels": [], "worker": f"{socket.gethostname()}:{os.getpid()}", "runtime_s": 0.0}
    try:
        _one_thread()
        input_sha = input_checksum(scan)
        examples = _examples(scan, job)
        key = job.key(input_sha, _examples_checksum(scan, job))
        record["key"] = key
        previous = read_record(Path(job.out_dir), scan.id)
        if job.resume and _still_valid(previous, key, Path(job.out_dir)):
            previous.update(status="skipped", worker=record["worker"])
            return previous
        volume = io.load(scan.path, **scan.load_options())
        volume.meta["source"] = scan.path
        result = _run_task(volume, job, examples)
        record["outputs"] = write_outputs(result, volume, scan, job)
        record["labels"] = label_table(result)
        record["status"] = "ok"
    except Exception as exc:  # a bad file, a model that does not fit, out of memory: this scan's error row
        record["error"] = _one_line(exc)
        record["traceback"] = traceback.format_exc(limit=8)
    record["runtime_s"] = round(time.perf_counter() - start, 3)
    try:
        write_record(Path(job.out_dir), record)
    except OSError as exc:
        record.update(status="error", error=f"could not write the record: {_one_line(exc)}")
    return record


# --- the tasks ------------------------------------------------------------------------------

def _run_task(volume: Volume, job: Job, examples) -> Volume:
    options = {k: v for k, v in job.options.items() if k != "examples"}
    if callable(job.task):
        return job.task(volume, **options)
    if job.task == "segment":
        return segment(volume, model=job.model, device=job.device, network=_network(job.model, job.device), **options)
    if job.task == "synthesize":
        return synthesize(volume, model=job.model or "mvg-generalist", device=job.device, examples=examples, **options)
    if job.task == "prompt":
        from .tasks.prompting import prompt

        if not examples:
            raise ValueError("prompting needs example scans: examples=[(image, mask), ...] or example columns in the CSV")
        return prompt(volume, examples=examples, model=job.model, device=job.device, **options)
    raise ValueError(f"unknown task {job.task!r}: choose segment, synthesize or prompt")


def _network(model, device):
    """The segmentation network of ``model`` on this worker, loaded at its first scan (None: not a network)."""
    try:
        card = get_card(model)
    except CardError:
        return None  # not a weights model (e.g. an atlas): mv.segment loads what it needs
    if _atlas_backed(card.id):
        return None  # mv.segment registers the model's atlases and runs the network its own way
    device = resolve_device(device)
    key = ("model", card.id, card.sha256, str(device))
    if key not in _LOADED:
        _LOADED[key] = load_model(card, device=device)[0]
    return _LOADED[key]


def _atlas_backed(model_id: str) -> bool:
    try:
        from . import atlases
    except ImportError:
        return False
    return bool(atlases.for_model(model_id))


def _examples(scan: Scan, job: Job) -> list[tuple[Volume, Volume]] | None:
    """The example pairs for this scan (its own from the CSV, else the run's), loaded once per worker."""
    pairs = scan.examples or tuple(job.options.get("examples") or ())
    if not pairs:
        return None
    loaded = []
    for pair in pairs:
        if isinstance(pair[0], Volume):
            loaded.append(tuple(pair))
            continue
        key = ("example", str(pair[0]), str(pair[1]))
        if key not in _LOADED:
            _LOADED[key] = (io.load(pair[0]), io.load(pair[1]))
        loaded.append(_LOADED[key])
    return loaded


def _examples_checksum(scan: Scan, job: Job) -> str | None:
    pairs = scan.examples or tuple(job.options.get("examples") or ())
    if not pairs:
        return None
    digest = hashlib.sha256()
    for pair in pairs:
        for item in pair:
            if isinstance(item, Volume):
                digest.update(np.ascontiguousarray(np.asarray(item.data)).tobytes())
            else:
                digest.update(_files_checksum(_files_of(Path(item))).encode())
    return digest.hexdigest()


def _one_thread() -> None:
    """One torch thread per worker: Dask runs one scan per worker process, more would oversubscribe.

    A torch imported later starts with one thread anyway: Dask's nanny sets OMP_NUM_THREADS=1.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


# --- checksums --------------------------------------------------------------------------

def input_checksum(scan: Scan) -> str:
    """sha256 over the scan's files (for a DICOM series: that series' files, in path order)."""
    path = Path(scan.path)
    if path.is_dir() and suffix_of(path) not in (".zarr", ".ome.zarr"):
        chosen = choose_series(path, find_series(path), scan.series)
        return _files_checksum(sorted(f.path for f in chosen.files))
    return _files_checksum(_files_of(path))


def _files_of(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file())
    files = [path]
    if suffix_of(path) in (".mhd", ".nhdr"):  # header beside its raw data file
        files += sorted(p for p in path.parent.glob(path.name.rsplit(".", 1)[0] + ".*") if p != path)
    return files


def _files_checksum(files) -> str:
    """sha256 of a lone file's bytes (what ``sha256sum`` prints); of names and bytes for several."""
    files = list(files)
    digest = hashlib.sha256()
    for f in files:
        if len(files) > 1:
            digest.update(Path(f).name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# --- outputs -------------------------------------------------------------------------------

def output_names(result: Volume, volume: Volume, scan: Scan, job: Job) -> list[str]:
    """File names (in the output folder) for ``result``: the input's format family."""
    fmt = str(volume.meta.get("format", ""))
    family = suffix_of(Path(scan.path))
    if fmt == "DICOM" and result.is_labels:
        return [f"{scan.id}.seg.dcm"] + ([f"{scan.id}.rtstruct.dcm"] if job.rtstruct else [])
    if fmt == "DICOM" and result.ndim == 3 and not result.rgb:
        return [f"{scan.id}.dicom"]  # a folder of CT/MR slices
    if family in (".zarr", ".ome.zarr"):
        return [f"{scan.id}.ome.zarr"]
    if result.ndim == 2 and family in IMAGE_2D + (".jpg", ".jpeg", ".bmp", ".gif"):
        return [f"{scan.id}.png" if result.is_labels or family not in (".tif", ".tiff") else f"{scan.id}.tif"]
    return [f"{scan.id}.nii.gz"]


def write_outputs(result: Volume, volume: Volume, scan: Scan, job: Job) -> list[str]:
    """Write ``result`` beside the others in the output folder, each file whole or not at all."""
    out = Path(job.out_dir)
    result.meta.setdefault("source", scan.path)
    for key in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID"):
        if key in volume.meta:
            result.meta.setdefault(key, volume.meta[key])
    written = []
    for name in output_names(result, volume, scan, job):
        final = out / name
        tmp = out / f".{uuid.uuid4().hex[:8]}.partial.{name}"
        try:
            if name.endswith(".rtstruct.dcm"):
                write_rtstruct(result, tmp, source=scan.path)
            elif name.endswith(".dicom"):
                write_dicom_series(result, tmp, f"medvision {job.model or job.task}",
                                   study_uid=volume.meta.get("StudyInstanceUID"),
                                   frame_of_reference_uid=volume.meta.get("FrameOfReferenceUID"))
            else:
                io.save(result, tmp)
            _replace(tmp, final)
        finally:
            _remove(tmp)
        written.append(name)
    return written


def _replace(tmp: Path, final: Path) -> None:
    if tmp.is_dir() and final.exists():  # a folder cannot be renamed over another: move the old one aside first
        old = final.with_name(f".{uuid.uuid4().hex[:8]}.old.{final.name}")
        os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
    else:
        os.replace(tmp, final)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink(missing_ok=True)


def label_table(result: Volume) -> list[dict]:
    """Per label: id, name, voxel count and volume in mL (3D) — one row each in results.csv."""
    if not result.is_labels:
        return []
    data = np.asarray(result.data)
    counts = np.bincount(data.ravel().astype(np.int64)) if data.size else np.zeros(1, np.int64)
    voxel_ml = float(np.prod(result.spacing)) / 1000.0 if result.ndim == 3 else None
    ids = sorted({int(k) for k in (result.labels or {}) if int(k) != 0} | {int(v) for v in np.flatnonzero(counts) if v})
    rows = []
    for label in ids:
        n = int(counts[label]) if label < len(counts) else 0
        rows.append({"label": label, "label_name": (result.labels or {}).get(label, f"label {label}"), "voxels": n,
                     "volume_ml": None if voxel_ml is None else round(n * voxel_ml, 4)})
    return rows


# --- records --------------------------------------------------------------------------------

def record_path(out_dir: Path, scan_id: str) -> Path:
    return out_dir / RECORDS / f"{scan_id}.json"


def read_record(out_dir: Path, scan_id: str) -> dict | None:
    try:
        return json.loads(record_path(out_dir, scan_id).read_text())
    except (OSError, ValueError):
        return None


def write_record(out_dir: Path, record: dict) -> None:
    path = record_path(out_dir, record["scan_id"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{uuid.uuid4().hex[:8]}.partial")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)


def _still_valid(previous: dict | None, key: dict, out_dir: Path) -> bool:
    return (previous is not None and previous.get("status") in ("ok", "skipped") and previous.get("key") == key
            and all((out_dir / name).exists() for name in previous.get("outputs", [])))


def _plain(options: dict) -> dict:
    """Options as JSON-comparable values (examples stand in by their checksum, kept apart)."""
    return {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
            for k, v in sorted(options.items()) if k != "examples"}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:400]}" if text else type(exc).__name__
