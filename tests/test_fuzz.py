"""Fuzzing every reader: 300 damaged files, all formats, fixed seed, nothing but clean ReadErrors.

``bench/fuzz.py`` makes the cases from small real samples and tiny files the project writes
itself, and opens each in a worker process with 2 GiB more address space and 10 s; a crash,
hang, out-of-memory, any exception other than ReadError, or a peak memory above 4x the decoded
size (plus a fixed allowance) fails this test. The full benchmark (10 000 cases) is in
docs/evaluation/hardening.md.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CASES = 300


def load_fuzz():
    spec = importlib.util.spec_from_file_location("medvision_bench_fuzz", REPO / "bench" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def fuzz():
    return load_fuzz()


def test_300_damaged_files_of_every_format_give_only_read_errors(fuzz, data_dir, tmp_path):
    summary = fuzz.run(CASES, seed=0, workers=2, out=tmp_path, memory_gib=2.0, timeout_s=10.0, data=data_dir)
    described = json.dumps(summary["failed_cases"], indent=1)
    assert summary["failures"] == 0, described
    assert summary["totals"]["generator_error"] == 0, described
    assert sum(summary["totals"].values()) == CASES
    # every format was damaged often enough to matter, and some damage still loads
    assert summary["formats"] >= 20
    assert all(sum(counts.values()) >= CASES // summary["formats"] for counts in summary["per_format"].values())
    assert summary["totals"]["read_error"] >= CASES // 4 and summary["totals"]["loaded"] >= CASES // 10
    assert (tmp_path / "summary.json").exists()


def test_a_crash_and_a_hang_are_caught_and_kept(fuzz, data_dir, tmp_path, monkeypatch):
    """The harness itself: a worker killed mid-case counts as a crash, a stuck one as a hang."""
    import os
    import signal
    import time

    from napari_medvision import io as medvision_io

    real_load_all = medvision_io.load_all
    crashed, hung = tmp_path / "crashed", tmp_path / "hung"  # files: each worker is a fresh fork

    parent = os.getpid()  # the seeds are checked here; only the workers are sabotaged

    def sabotaged(path, **options):
        if os.getpid() == parent:
            return real_load_all(path, **options)
        if not crashed.exists():
            crashed.touch()
            os.kill(os.getpid(), signal.SIGSEGV)
        if not hung.exists():
            hung.touch()
            time.sleep(60)
        return real_load_all(path, **options)

    monkeypatch.setattr(medvision_io, "load_all", sabotaged)  # the forked workers inherit it
    summary = fuzz.run(4, seed=1, workers=1, out=tmp_path / "run", timeout_s=2.0, data=data_dir)
    statuses = sorted(case["status"] for case in summary["failed_cases"])
    assert statuses == ["crash", "hang"], summary["failed_cases"]
    assert all(Path(case["kept"]).exists() for case in summary["failed_cases"])
