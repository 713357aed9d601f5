"""The Batch panel: runs mv.batch off the GUI thread and says what the run did."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("napari")
distributed = pytest.importorskip("distributed")

import napari_medvision as mv  # noqa: E402
from napari_medvision._napari.widgets.batch import BatchWidget  # noqa: E402

pytestmark = pytest.mark.napari


def test_panel_runs_a_folder_of_scans_and_reports_the_results(make_napari_viewer, qtbot, tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        mv.save(mv.Volume(rng.normal(0, 100, (8, 32, 32)).astype(np.int16), (3, 3, 3), modality="CT"),
                tmp_path / f"case{i}.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"not a scan")
    panel = BatchWidget(make_napari_viewer())
    assert [panel.task_box.itemText(i) for i in range(panel.task_box.count())] == ["segment", "synthesize", "prompt"]
    assert panel.model_box.findData("ct-abdomen-organs-3d") >= 0
    panel.model_box.setCurrentIndex(panel.model_box.findData("ct-abdomen-organs-3d"))
    panel.inputs.setText(str(tmp_path))
    panel.output.setText(str(tmp_path / "out"))
    # An in-process cluster keeps the test quick; the panel passes its address as a user would.
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as c:
        panel.scheduler.setText(c.scheduler_address)
        panel.run()
        qtbot.waitUntil(lambda: panel.runner.run_button.isEnabled(), timeout=300_000)
    assert panel.runner.status.text().startswith("3 scans: 2 computed, 0 already done, 1 failed")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["case0.nii.gz", "case1.nii.gz"]


def test_panel_refuses_to_start_without_scans(make_napari_viewer):
    panel = BatchWidget(make_napari_viewer())
    panel.run()
    assert panel.runner.status.text().startswith("not run: choose the scans")
    assert panel.runner.run_button.isEnabled()
