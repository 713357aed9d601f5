"""``mv.batch``: one task (segment, synthesize, prompt) over a cohort of scans on Dask distributed.

Without a scheduler a ``LocalCluster`` sized to the machine runs one worker process per scan in
flight (one thread each, for torch); with ``scheduler="tcp://host:8786"`` the user's own cluster
does (``dask scheduler`` / ``dask worker``, dask-jobqueue, Kubernetes). Dask places one task per
scan, replaces a worker that dies, and shows the run on its dashboard. The per-scan work (resume
check, outputs, records) is in :mod:`.batch_worker`; finding the scans in :mod:`.batch_inputs`.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from distributed import Client, KilledWorker, LocalCluster, wait

from .batch_inputs import Scan, find_scans
from .batch_worker import Job, run_scan, write_record
from .engine.progress import CancelToken, Cancelled, ProgressFn, check, report
from .models.registry import CardError, get_card

TASKS = ("segment", "synthesize", "prompt")
WORKER_MEMORY = 4 * 2**30  # bytes a worker is given at least: a 512x512x300 CT, its labels and a model
ATTEMPTS = 2  # a scan whose worker dies is run once more, then recorded as an error
RESULT_COLUMNS = ("scan_id", "input", "series", "status", "input_sha256", "task", "model", "model_sha256", "label",
                  "label_name", "voxels", "volume_ml", "runtime_s", "attempts", "outputs", "worker", "error")


@dataclass
class BatchReport:
    """What a cohort run did: one record per scan, the results table and where to watch it."""

    out_dir: Path
    results: Path  # results.csv: a row per scan and label
    records: list[dict] = field(default_factory=list)
    dashboard: Optional[str] = None
    n_workers: int = 0
    wall_s: float = 0.0

    def ids(self, status: str) -> list[str]:
        return [r["scan_id"] for r in self.records if r["status"] == status]

    @property
    def computed(self) -> list[str]:
        return self.ids("ok")

    @property
    def skipped(self) -> list[str]:
        """Scans whose outputs a previous run made from the same input and model."""
        return self.ids("skipped")

    @property
    def failed(self) -> list[str]:
        return self.ids("error")

    def __str__(self) -> str:
        return (f"{len(self.records)} scans: {len(self.computed)} computed, {len(self.skipped)} already done, "
                f"{len(self.failed)} failed; results in {self.results}")


def batch(inputs, out_dir, task: str | Callable = "segment", model: Optional[str] = None,
          scheduler: Any = None, n_workers: Optional[int] = None, resume: bool = True, *,
          rtstruct: bool = False, device: Optional[str] = None, memory_limit: str | int = "auto",
          progress: Optional[ProgressFn] = None, cancel: Optional[CancelToken] = None,
          log: Optional[Callable[[str], None]] = None, **task_options) -> BatchReport:
    """Run ``task`` on every scan of ``inputs``; outputs and ``results.csv`` go to ``out_dir``.

    inputs: a folder (a scan per file, zarr store or DICOM series), a glob, a CSV with a ``path``
        column (and ``example_image``/``example_mask`` columns for prompting), or a list of paths.
    task: ``"segment"`` (needs ``model``), ``"synthesize"``, ``"prompt"`` (needs examples), or a
        function ``Volume -> Volume`` taking ``task_options`` as keywords.
    scheduler: None for a LocalCluster on this machine; a scheduler address (``"tcp://host:8786"``),
        a ``distributed.Client`` or a cluster object for an existing cluster. ``out_dir`` and the
        inputs must then be paths every worker sees.
    n_workers: LocalCluster workers (default: the cores, at most one per 4 GiB of memory).
    resume: skip scans whose outputs exist for the same input checksum, task, model and options.
    rtstruct: for DICOM scans, an RTSTRUCT beside the DICOM SEG (needs rt-utils).
    task_options: passed to the task, e.g. ``overlap=0.25`` or ``examples=[(image, mask), ...]``.
    Returns a :class:`BatchReport`; a scan that fails is an error row, the run goes on. Cancelling
    (``cancel`` or Ctrl-C) stops the pending scans; finished outputs and their rows stay.
    """
    started = time.perf_counter()
    out = Path(out_dir).expanduser().resolve()
    _check_out_dir(inputs, out)
    job = _job(task, model, out, resume, rtstruct, device, task_options)
    scans = find_scans(inputs, out)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda line: print(line, file=sys.stderr))
    client, own_client, own_cluster = _connect(scheduler, n_workers, memory_limit)
    records: dict[str, dict] = {}
    report_ = BatchReport(out, out / "results.csv")
    try:
        report_.dashboard = _dashboard(client)
        report_.n_workers = len(client.scheduler_info(n_workers=-1).get("workers", {}))
        say(f"medvision batch: {len(scans)} scans on {report_.n_workers} Dask workers"
            + (f"; dashboard {report_.dashboard}" if report_.dashboard else ""))
        started_line = f"{len(scans)} scans submitted" + (f"; dashboard {report_.dashboard}" if report_.dashboard else "")
        _run(client, scans, job, records, progress, cancel, started_line)
    finally:
        report_.records = [records[s.id] for s in scans if s.id in records]
        write_results(report_.results, report_.records)
        report_.wall_s = round(time.perf_counter() - started, 3)
        cluster = client.cluster if own_cluster else None
        if own_client:
            client.close()
        if cluster is not None:
            cluster.close()
    return report_


def local_cluster(n_workers: Optional[int] = None, memory_limit: str | int = "auto",
                  dashboard_address: Optional[str] = ":8787") -> LocalCluster:
    """A LocalCluster for cohort runs: worker processes with one thread each and a memory limit.

    The scheduler fails a task at the first worker death (``allowed_failures=0``); ``batch`` then
    submits it once more itself, so a scan that kills its worker twice becomes an error row.
    """
    return LocalCluster(n_workers=n_workers or default_workers(), threads_per_worker=1, processes=True,
                        memory_limit=memory_limit, dashboard_address=dashboard_address,
                        scheduler_kwargs={"allowed_failures": 0})


def default_workers() -> int:
    """The cores of this machine, but no more workers than 4 GiB of memory each allows."""
    import psutil

    return max(1, min(os.cpu_count() or 1, psutil.virtual_memory().total // WORKER_MEMORY))


def _connect(scheduler, n_workers, memory_limit) -> tuple[Client, bool, bool]:
    """A client for the given scheduler (or a new LocalCluster); whether this run made the client, the cluster."""
    if scheduler is None:
        return Client(local_cluster(n_workers, memory_limit)), True, True
    if isinstance(scheduler, Client):
        return scheduler, False, False
    if isinstance(scheduler, str):
        try:
            return Client(scheduler, timeout="20s"), True, False
        except OSError as exc:
            raise ValueError(f"no Dask scheduler answers at {scheduler}: {exc}") from exc
    return Client(scheduler), True, False  # a cluster object (LocalCluster, dask-jobqueue, dask-kubernetes)


def _run(client: Client, scans: list[Scan], job: Job, records: dict[str, dict], progress, cancel,
         started_line: str) -> None:
    """Submit a task per scan; put each record in ``records`` as it finishes (a dead worker's scan runs once more)."""
    token = uuid.uuid4().hex[:8]
    attempts = {s.id: 1 for s in scans}
    by_future = {client.submit(run_scan, s, job, key=f"medvision-{s.id}-{token}-1", pure=False): s for s in scans}
    pending = set(by_future)
    report(progress, 0, len(scans), started_line)
    try:
        while pending:
            check(cancel)
            try:
                done, pending = wait(pending, timeout=0.5, return_when="FIRST_COMPLETED")
            except TimeoutError:
                continue
            for future in done:
                scan = by_future.pop(future)
                record = _collect(future, scan, job, attempts[scan.id])
                if record is None:  # the worker died: Dask replaced it, run the scan once more
                    attempts[scan.id] += 1
                    again = client.submit(run_scan, scan, job, key=f"medvision-{scan.id}-{token}-{attempts[scan.id]}",
                                          pure=False)
                    by_future[again] = scan
                    pending.add(again)
                    continue
                record["attempts"] = attempts[scan.id]
                records[scan.id] = record
                report(progress, len(records), len(scans), f"{scan.id}: {record['status']}")
    except (Cancelled, KeyboardInterrupt):
        client.cancel(list(pending))
        raise


def _collect(future, scan: Scan, job: Job, attempt: int) -> Optional[dict]:
    """The scan's record; None when its worker died and it has a try left."""
    try:
        return future.result()
    except KilledWorker:
        if attempt < ATTEMPTS:
            return None
        problem = f"the worker running it died {attempt} times (out of memory? see the worker logs)"
    except Exception as exc:  # the task could not even start (e.g. napari_medvision missing on a worker)
        problem = f"{type(exc).__name__}: {str(exc).strip()[:400]}"
    record = {"scan_id": scan.id, "input": scan.path, "series": scan.series, "status": "error", "error": problem,
              "outputs": [], "labels": [], "worker": "", "runtime_s": 0.0}
    try:
        write_record(Path(job.out_dir), record)
    except OSError:
        pass
    return record


def write_results(path: Path, records: list[dict]) -> Path:
    """``results.csv``: a row per scan and label (voxels, mL), one row for a scan without labels."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for record in records:
            key = record.get("key") or {}
            base = {"scan_id": record["scan_id"], "input": record["input"], "series": record.get("series") or "",
                    "status": record["status"], "input_sha256": key.get("input_sha256", ""),
                    "task": key.get("task", ""), "model": key.get("model") or "",
                    "model_sha256": key.get("model_sha256") or "", "runtime_s": record.get("runtime_s", ""),
                    "attempts": record.get("attempts", 1), "outputs": ";".join(record.get("outputs", [])),
                    "worker": record.get("worker", ""), "error": record.get("error", "")}
            for label in record.get("labels") or [{}]:
                writer.writerow({**base, **label})
    os.replace(tmp, path)
    return path


def _job(task, model, out: Path, resume, rtstruct, device, options) -> Job:
    """The run's settings, checked before any worker starts (unknown task, missing model)."""
    if not callable(task) and task not in TASKS:
        raise ValueError(f"unknown task {task!r}: choose one of {', '.join(TASKS)}")
    if task == "segment" and not model:
        raise ValueError("segmenting a cohort needs a model id (see `medvision models`)")
    if task == "prompt" and "examples" not in options and "annotations" in options:
        raise ValueError("a cohort is prompted with example scans (examples=), not with painted slices")
    if "examples" in options:
        options["examples"] = tuple((p if hasattr(p, "data") else str(Path(p).expanduser().resolve()),
                                     m if hasattr(m, "data") else str(Path(m).expanduser().resolve()))
                                    for p, m in options["examples"])
    model_sha = _model_checksum(model) if model else None
    if model and Path(str(model)).expanduser().exists():
        model = str(Path(str(model)).expanduser().resolve())  # workers elsewhere need the full path
    return Job(task=task, out_dir=str(out), model=model, model_sha256=model_sha, resume=resume, rtstruct=rtstruct,
               device=device, options=dict(options))


def _model_checksum(model) -> Optional[str]:
    """The weights' sha256 from the model card; None for ids that are not weights (atlases)."""
    try:
        return get_card(model).sha256 or None
    except CardError:
        if _atlases_available():
            return None  # mv.segment resolves atlas-backed ids itself, scan by scan
        raise


def _atlases_available() -> bool:
    return importlib.util.find_spec(f"{__package__}.atlases") is not None


def _check_out_dir(inputs, out: Path) -> None:
    if isinstance(inputs, (str, os.PathLike)):
        source = Path(inputs).expanduser()
        if source.is_dir() and source.resolve() == out:
            raise ValueError(f"{out}: the output folder is the input folder; choose another so scans and results stay apart")


def _dashboard(client: Client) -> Optional[str]:
    try:
        return client.dashboard_link
    except Exception:  # a scheduler started without bokeh serves no dashboard
        return None


class _CallableModule(type(sys)):
    """This module, callable as :func:`batch`.

    Importing ``napari_medvision.batch`` makes Python set the package's ``batch`` attribute to the
    module, which would hide the function ``mv.batch``; calling the module calls the function.
    """

    def __call__(self, *args, **kwargs) -> BatchReport:
        return batch(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
