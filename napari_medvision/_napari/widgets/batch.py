"""Batch panel: a folder (or glob, or CSV) of scans + a task and model -> outputs and results.csv, on Dask.

The run happens in ``mv.batch`` (a local Dask cluster, or the scheduler given); the panel shows its
progress and the dashboard link, and its Cancel button stops the scans not yet finished.
"""

from __future__ import annotations

from typing import Any

import napari
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLineEdit, QPushButton,
                            QSpinBox, QVBoxLayout, QWidget)

from ... import models
from ...batch import batch
from ._task_runner import TaskRunner

MODEL_TASKS = {"segment": "segmentation", "synthesize": "synthesis", "prompt": None}


class BatchWidget(QWidget):
    """Choose the scans, the output folder, the task and model; run them all on Dask."""

    def __init__(self, napari_viewer: napari.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.inputs = QLineEdit()
        self.inputs.setPlaceholderText("folder of scans, a glob such as study/*.nii.gz, or a CSV")
        self.output = QLineEdit()
        self.output.setPlaceholderText("output folder")
        self.task_box = QComboBox()
        self.task_box.addItems(list(MODEL_TASKS))
        self.model_box = QComboBox()
        self.workers = QSpinBox()
        self.workers.setRange(0, 256)
        self.workers.setSpecialValueText("auto")
        self.scheduler = QLineEdit()
        self.scheduler.setPlaceholderText("empty: a local cluster; or tcp://host:8786")
        self.rtstruct = QCheckBox("also RTSTRUCT for DICOM scans")
        self.resume = QCheckBox("skip scans already done")
        self.resume.setChecked(True)
        tips = {
            self.inputs: "the scans: a folder (a scan per file, zarr store or DICOM series), a glob, or a CSV "
                         "with a 'path' column",
            self.output: "the folder for each scan's output and results.csv (a row per scan and label, "
                         "volumes in mL); made if missing",
            self.task_box: "segment: a label map per scan (needs a model); synthesize: a new image per scan; "
                           "prompt: give a CSV whose example_image / example_mask columns name labelled scans",
            self.model_box: "the model every scan runs through; each worker loads it once",
            self.workers: "Dask worker processes on this machine, one scan each at a time (auto: one per core, "
                          "at most one per 4 GiB of memory); unused with a scheduler address",
            self.scheduler: "address of a running Dask scheduler, e.g. tcp://host:8786 (empty: a local cluster); "
                            "every worker must see the scans and the output folder",
            self.rtstruct: "for DICOM scans, an RTSTRUCT file beside the DICOM SEG (needs rt-utils)",
            self.resume: "skip a scan whose outputs exist for the same input checksum, task, model and options",
        }
        for widget, tip in tips.items():
            widget.setToolTip(tip)
        form = QFormLayout()
        form.addRow("scans", _with_browse(self.inputs, self._browse_inputs))
        form.addRow("output", _with_browse(self.output, self._browse_output))
        form.addRow("task", self.task_box)
        form.addRow("model", self.model_box)
        form.addRow("workers", self.workers)
        form.addRow("scheduler", self.scheduler)
        form.addRow("", self.rtstruct)
        form.addRow("", self.resume)
        self.runner = TaskRunner("Run cohort")
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.runner)
        layout.addStretch(1)
        self.runner.run_button.clicked.connect(self.run)
        self.task_box.currentTextChanged.connect(self._refresh_models)
        self._refresh_models()

    def _refresh_models(self, *_: Any) -> None:
        task = self.task_box.currentText()
        self.model_box.clear()
        if task == "prompt":
            self.model_box.addItem("intensity only", None)
        kind = MODEL_TASKS[task]
        cards = models.available(task=kind) if kind else [c for c in models.available() if "dino" in c.id]
        for card in cards:
            self.model_box.addItem(f"{card.id} ({card.source})", card.id)

    def _browse_inputs(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder of scans")
        if folder:
            self.inputs.setText(folder)

    def _browse_output(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Output folder")
        if folder:
            self.output.setText(folder)

    def run(self) -> None:
        inputs, output = self.inputs.text().strip(), self.output.text().strip()
        task, model = self.task_box.currentText(), self.model_box.currentData()
        if not inputs or not output:
            self.runner.refuse("choose the scans and an output folder first")
            return
        if task == "segment" and not model:
            self.runner.refuse("choose a segmentation model first")
            return
        self.runner.start(batch, self._done, inputs=inputs, out_dir=output, task=task, model=model,
                          scheduler=self.scheduler.text().strip() or None, n_workers=self.workers.value() or None,
                          resume=self.resume.isChecked(), rtstruct=self.rtstruct.isChecked(), log=_quiet)

    def _done(self, report) -> str:
        return str(report)


def _with_browse(line: QLineEdit, browse) -> QWidget:
    box = QWidget()
    row = QHBoxLayout(box)
    row.setContentsMargins(0, 0, 0, 0)
    row.addWidget(line)
    button = QPushButton("…")
    button.setToolTip("choose a folder")
    button.clicked.connect(browse)
    row.addWidget(button)
    return box


def _quiet(line: str) -> None:
    """The panel shows the dashboard link in its status line (from the first progress report)."""
