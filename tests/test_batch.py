"""mv.batch and `medvision batch`: a cohort on Dask, one task per scan, errors isolated, resumable.

One 2-worker LocalCluster (made by ``batch.local_cluster``, as ``mv.batch`` makes its own) serves
most tests through its scheduler address; the worker-death test starts its own cluster.
"""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
distributed = pytest.importorskip("distributed")

import napari_medvision as mv  # noqa: E402
from napari_medvision.batch import local_cluster  # noqa: E402
from napari_medvision.batch_inputs import find_scans  # noqa: E402
from napari_medvision.cli import main as cli  # noqa: E402
from napari_medvision.engine.progress import CancelToken, Cancelled  # noqa: E402
from napari_medvision.io.dicom import write_dicom_series  # noqa: E402
from napari_medvision.models.card import ModelCard  # noqa: E402
from napari_medvision.models.transunet import PRESETS_3D  # noqa: E402

from batch_helpers import bright_parts, bright_parts_dying_once, slow_bright_parts  # noqa: E402

SHAPE = (8, 32, 32)
SPACING = (3.0, 3.0, 3.0)


# --- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two worker processes, one thread each, shared by this module's tests."""
    home = os.environ.get("MEDVISION_HOME")
    os.environ["MEDVISION_HOME"] = str(tmp_path_factory.mktemp("worker_home"))  # the workers inherit it
    try:
        with local_cluster(n_workers=2, dashboard_address=":0") as c:
            yield c
    finally:
        if home is None:
            os.environ.pop("MEDVISION_HOME", None)
        else:
            os.environ["MEDVISION_HOME"] = home


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> ModelCard:
    """An untrained 3-class CT model saved as a checkpoint path (workers find it without a user folder)."""
    torch.manual_seed(0)
    architecture = {"name": "transunet3d", "config": dict(PRESETS_3D["tiny"], n_classes=3)}
    card = ModelCard(id="tiny-ct-batch", task="segmentation", architecture=architecture, modality="CT",
                     input={"spacing": list(SPACING), "normalisation": {"kind": "ct_window", "low": -200, "high": 300},
                            "patch_size": [32, 32, 32], "channels": 1, "dims": 3},
                     labels={1: "liver", 2: "spleen"}, sha256="", metrics={"note": "untrained test model"})
    return mv.models.save_model(mv.models.build_model(architecture), card, folder=tmp_path_factory.mktemp("models"))


def write_scans(folder: Path, n: int = 5, corrupt: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        data = rng.normal(0, 100, SHAPE).astype(np.int16)
        mv.save(mv.Volume(data, SPACING, modality="CT"), folder / f"case{i}.nii.gz")
    if corrupt:
        (folder / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    return folder


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# --- the cohort -------------------------------------------------------------------------------

def test_six_scans_one_corrupt_give_five_outputs_one_error_row_and_a_rerun_recomputes_nothing(
        tmp_path, cluster, tiny_model):
    scans = write_scans(tmp_path / "study")
    out = tmp_path / "out"
    seen = []
    report = mv.batch(scans, out, task="segment", model=str(tiny_model.weights_path),
                      scheduler=cluster.scheduler_address, progress=lambda d, t, m: seen.append((d, t)))
    assert sorted(report.computed) == [f"case{i}" for i in range(5)] and report.failed == ["broken"]
    assert sorted(p.name for p in out.glob("*.nii.gz")) == [f"case{i}.nii.gz" for i in range(5)]
    assert seen[-1] == (6, 6)
    labels = mv.load(out / "case0.nii.gz")
    assert labels.spatial_shape == SHAPE and np.allclose(labels.spacing, SPACING)

    rows = read_rows(report.results)
    error = [r for r in rows if r["status"] == "error"]
    assert len(error) == 1 and error[0]["scan_id"] == "broken" and "broken.nii.gz" in error[0]["error"]
    case0 = [r for r in rows if r["scan_id"] == "case0"]
    assert [r["label_name"] for r in case0] == ["liver", "spleen"]
    data = np.asarray(labels.data)
    for row in case0:
        voxels = int(np.count_nonzero(data == int(row["label"])))
        assert int(row["voxels"]) == voxels
        assert float(row["volume_ml"]) == pytest.approx(voxels * 27 / 1000, abs=1e-3)
    assert case0[0]["input_sha256"] == hashlib.sha256((scans / "case0.nii.gz").read_bytes()).hexdigest()
    assert case0[0]["model_sha256"] == tiny_model.sha256

    again = mv.batch(scans, out, task="segment", model=str(tiny_model.weights_path), scheduler=cluster.scheduler_address)
    assert again.computed == [] and sorted(again.skipped) == [f"case{i}" for i in range(5)]
    assert again.failed == ["broken"]  # a failed scan is tried again on a rerun

    other = np.random.default_rng(7).normal(0, 100, SHAPE).astype(np.int16)
    mv.save(mv.Volume(other, SPACING, modality="CT"), scans / "case3.nii.gz")
    changed = mv.batch(scans, out, task="segment", model=str(tiny_model.weights_path),
                       scheduler=cluster.scheduler_address)
    assert changed.computed == ["case3"], "a scan whose file changed is computed again"


def test_a_worker_killed_mid_run_is_replaced_and_its_scan_run_again(tmp_path):
    scans = write_scans(tmp_path / "study", n=6, corrupt=False)
    marker = tmp_path / "killed.pid"
    report = mv.batch(scans, tmp_path / "out", task=bright_parts_dying_once, n_workers=2,
                      marker=str(marker), victim="case2")
    assert marker.exists(), "the worker was not killed: the test proved nothing"
    # A finished scan whose result was still on the dead worker runs again and finds its outputs: skipped.
    assert sorted(report.computed + report.skipped) == [f"case{i}" for i in range(6)] and report.failed == []
    victim = next(r for r in report.records if r["scan_id"] == "case2")
    assert victim["attempts"] == 2 and not victim["worker"].endswith(f":{marker.read_text()}")
    assert len(list((tmp_path / "out").glob("*.nii.gz"))) == 6


def test_cancel_keeps_finished_outputs_and_their_rows(tmp_path, cluster):
    scans = write_scans(tmp_path / "study", n=6, corrupt=False)
    out = tmp_path / "out"
    token = CancelToken()

    def cancel_after_two(done, total, message):
        if done >= 2:
            token.cancel()

    with pytest.raises(Cancelled):
        mv.batch(scans, out, task=slow_bright_parts, scheduler=cluster.scheduler_address,
                 progress=cancel_after_two, cancel=token)
    rows = read_rows(out / "results.csv")
    finished = {r["scan_id"] for r in rows}
    assert 2 <= len(finished) < 6 and {r["status"] for r in rows} == {"ok"}
    for scan_id in finished:
        assert mv.load(out / f"{scan_id}.nii.gz").spatial_shape == SHAPE
    assert not list(out.glob(".*partial*")), "no half-written file is left behind"


def test_dicom_series_get_a_dicom_seg_and_an_rtstruct(tmp_path, cluster):
    pytest.importorskip("rt_utils")
    import highdicom as hd

    study = tmp_path / "study"
    rng = np.random.default_rng(1)
    for name in ("patient1", "patient2"):
        data = np.full(SHAPE, -1000, np.int16)
        data[2:6, 8:20, 10:24] = rng.integers(10, 200)
        write_dicom_series(mv.Volume(data, (2.5, 0.8, 0.7), (10, -20, 30), modality="CT"), study / name)
    report = mv.batch(study, tmp_path / "out", task=bright_parts, scheduler=cluster.scheduler_address, rtstruct=True)
    assert sorted(report.computed) == ["patient1", "patient2"]
    image = mv.load(study / "patient1")
    seg = hd.seg.segread(tmp_path / "out" / "patient1.seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["bright"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == image.meta["SeriesInstanceUID"]
    assert int(seg.NumberOfFrames) == 4  # the labelled slices; empty frames are left out
    back = mv.load_all(tmp_path / "out" / "patient1.seg.dcm", reference=image)[0]
    np.testing.assert_array_equal(np.asarray(back.data), (np.asarray(image.data) > 0).astype(np.uint8))
    rows = read_rows(report.results)
    assert {r["outputs"] for r in rows} == {"patient1.seg.dcm;patient1.rtstruct.dcm", "patient2.seg.dcm;patient2.rtstruct.dcm"}


def test_cli_batch_on_a_running_scheduler_with_a_glob(tmp_path, cluster, tiny_model, capsys):
    scans = write_scans(tmp_path / "study", n=2)
    code = cli(["batch", str(scans / "case*.nii.gz"), "-o", str(tmp_path / "out"), "--model",
                str(tiny_model.weights_path), "--scheduler", cluster.scheduler_address])
    assert code == 0
    assert "2 scans: 2 computed" in capsys.readouterr().out
    assert cli(["batch", str(scans), "-o", str(tmp_path / "out"), "--model", str(tiny_model.weights_path),
                "--scheduler", cluster.scheduler_address]) == 1, "a failed scan makes the exit status 1"
    assert "failed: broken" in capsys.readouterr().err


def test_prompt_a_cohort_from_a_csv_with_example_columns(tmp_path, cluster):
    from napari_medvision.synthetic import ct_abdomen

    folder = tmp_path / "data"
    folder.mkdir()
    for seed in range(3):
        image, labels = ct_abdomen(seed=seed, shape=SHAPE, spacing=SPACING)
        mv.save(image, folder / f"ct{seed}.nii.gz")
        mv.save(labels, folder / f"ct{seed}_labels.nii.gz")
    table = tmp_path / "cohort.csv"
    table.write_text("id,path,example_image,example_mask\n"
                     "first,data/ct1.nii.gz,data/ct0.nii.gz,data/ct0_labels.nii.gz\n"
                     "second,data/ct2.nii.gz,data/ct0.nii.gz,data/ct0_labels.nii.gz\n")
    report = mv.batch(table, tmp_path / "out", task="prompt", scheduler=cluster.scheduler_address,
                      labels=["liver"], cache=False, device="cpu")
    assert sorted(report.computed) == ["first", "second"], report.records
    result = mv.load(tmp_path / "out" / "first.nii.gz")
    truth = np.asarray(mv.load(folder / "ct1_labels.nii.gz").data) == 1
    found = np.asarray(result.data) > 0
    assert 2 * (found & truth).sum() / (found.sum() + truth.sum()) > 0.5


# --- finding the scans, refusing bad runs (no cluster needed) ---------------------------------

def test_a_folder_gives_a_scan_per_file_and_per_dicom_series_and_skips_the_output_folder(tmp_path):
    study = write_scans(tmp_path / "study", n=2)
    write_dicom_series(mv.Volume(np.zeros(SHAPE, np.int16), SPACING, modality="CT"), study / "patient")
    write_dicom_series(mv.Volume(np.zeros(SHAPE, np.int16), SPACING, modality="CT"), study / "two", series_number=1)
    write_dicom_series(mv.Volume(np.zeros(SHAPE, np.int16), SPACING, modality="MR"), study / "two", series_number=2)
    (study / "out").mkdir()
    (study / "out" / "case0.nii.gz").write_bytes(b"an earlier output")
    scans = find_scans(study, out_dir=study / "out")
    assert sorted(s.id for s in scans) == ["broken", "case0", "case1", "patient", "two_1", "two_2"]
    assert {s.series is not None for s in scans if s.id.startswith("two")} == {True}
    assert mv.load(next(s for s in scans if s.id == "two_2").path, series=next(
        s for s in scans if s.id == "two_2").series).modality == "MR"


def test_bad_runs_are_refused_before_any_worker_starts(tmp_path):
    scans = write_scans(tmp_path / "study", n=1)
    with pytest.raises(ValueError, match="needs a model id"):
        mv.batch(scans, tmp_path / "out", task="segment")
    with pytest.raises(ValueError, match="unknown task"):
        mv.batch(scans, tmp_path / "out", task="colourise", model="x")
    with pytest.raises(ValueError, match="output folder is the input folder"):
        mv.batch(scans, scans, task=bright_parts)
    (tmp_path / "no_path.csv").write_text("file\nscan.nii.gz\n")
    with pytest.raises(ValueError, match="'path' column"):
        find_scans(tmp_path / "no_path.csv")
    with pytest.raises(ValueError, match="no file matches"):
        find_scans(str(tmp_path / "nothing*.nii.gz"))
