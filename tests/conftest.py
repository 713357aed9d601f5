"""Shared fixtures: where the real data lives, and a temporary user folder for models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``MEDVISION_DATA`` if set, else ``../shared/data`` beside the repository."""
    return Path(os.environ.get("MEDVISION_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture
def data_dir() -> Path:
    """The real-data folder; tests that need it skip with a reason where it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real data folder {path} is absent (set MEDVISION_DATA to use another)")
    return path


@pytest.fixture
def one_torch_thread():
    """Tiny models train faster on one thread than on two that wait for each other on a busy 2-core CPU."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _user_home(tmp_path_factory, monkeypatch):
    """Keep user models and caches of every test out of the real home folder."""
    monkeypatch.setenv("MEDVISION_HOME", str(tmp_path_factory.mktemp("medvision_home")))


def pytest_collection_finish(session):
    """Undo opencv-python's Qt plugin path (set when MONAI optionally imports cv2 during collection).

    With it, the first QApplication loads cv2's own Qt platform plugins and aborts; napari must
    use the Qt binding's own. Inside napari the application exists before any plugin module is imported.
    """
    for key in ("QT_QPA_PLATFORM_PLUGIN_PATH", "QT_QPA_FONTDIR"):
        if "cv2" in os.environ.get(key, ""):
            del os.environ[key]


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Record each phase's report on the test item (napari's viewer fixture reads ``rep_call``).

    A test skipped during setup (real data absent) never reaches the call phase, so napari's
    teardown would fail on the missing attribute; the setup report stands in for it then.
    """
    outcome = yield
    report = outcome.get_result()
    setattr(item, "rep_" + report.when, report)
    if report.when == "setup" and not report.passed:
        item.rep_call = report
