"""napari finds the plugin's manifest: valid, shipped in the wheel, and reachable in an editable install.

The top-level ``napari.yaml`` is the single source; ``napari_medvision/napari.yaml`` is a relative
symlink to it, which a wheel must turn into a real file.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

npe2 = pytest.importorskip("npe2")

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "napari.yaml"
PACKAGED = REPO / "napari_medvision" / "napari.yaml"
ENTRY_POINT = "napari-medvision = napari_medvision:napari.yaml"


def test_manifest_is_valid_and_every_command_imports():
    manifest = npe2.PluginManifest.from_file(MANIFEST)
    assert manifest.name == "napari-medvision"
    assert manifest.display_name == "MedVision"
    manifest.validate_imports()  # every python_name resolves to a callable
    sample_keys = {s.key for s in manifest.contributions.sample_data}
    assert sample_keys == {"ct", "mr", "oct", "fundus"}
    assert all("(synthetic)" in s.display_name for s in manifest.contributions.sample_data)


def test_npe2_validate_command_line_accepts_manifest():
    npe2_cli = Path(sys.executable).with_name("npe2")
    if not npe2_cli.exists():
        pytest.skip("npe2 command-line tool not installed beside this Python")
    result = subprocess.run([str(npe2_cli), "validate", str(MANIFEST)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout


def test_package_manifest_is_a_relative_link_to_the_top_level_one():
    assert PACKAGED.is_symlink()
    assert os.readlink(PACKAGED) == "../napari.yaml"
    assert PACKAGED.read_bytes() == MANIFEST.read_bytes()


def test_reader_patterns_cover_every_readable_suffix():
    from napari_medvision.io import readable_suffixes

    reader = npe2.PluginManifest.from_file(MANIFEST).contributions.readers[0]
    assert reader.accepts_directories
    assert "*" not in reader.filename_patterns  # never take over every file
    uncovered = [
        s for s in readable_suffixes() if not any(fnmatch.fnmatch(f"scan{s}", p) for p in reader.filename_patterns)
    ]
    assert not uncovered, f"napari.yaml reader misses {uncovered}"


def test_writer_extensions_are_all_writable():
    from napari_medvision.io import writable_suffixes

    writable = set(writable_suffixes()) | {".ome.zarr"}  # .ome.zarr is written by the .zarr writer
    for writer in npe2.PluginManifest.from_file(MANIFEST).contributions.writers:
        assert set(writer.filename_extensions) <= writable, writer.display_name


def _source_copy(tmp_path: Path) -> Path:
    """The files a build needs, copied (links kept as links) so builds leave the repo untouched."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "napari_medvision", src / "napari_medvision", symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "napari.yaml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, src / name)
    (src / "README.md").touch()
    return src


def _napari_finds_plugin(site_dir: Path, cwd: Path) -> str:
    """Ask npe2, in a fresh Python that sees only ``site_dir``, for the plugin's manifest file."""
    code = (
        "import site, sys; site.addsitedir(sys.argv[1]);"
        "from npe2 import PluginManifest;"
        "m = PluginManifest.from_distribution('napari-medvision');"
        "print(m.name, m.display_name, len(m.contributions.readers));"
        "import napari_medvision; print(napari_medvision.__file__)"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code, str(site_dir)], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


def test_wheel_ships_manifest_as_real_file_and_napari_finds_it(tmp_path):
    pytest.importorskip("build")
    src = _source_copy(tmp_path)
    dist = tmp_path / "dist"
    # -n -x: build with the installed setuptools, offline (no isolated build environment).
    result = subprocess.run([sys.executable, "-m", "build", "--wheel", "-n", "-x", "--outdir", str(dist), str(src)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (wheel,) = dist.glob("napari_medvision-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo("napari_medvision/napari.yaml")
        is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
        assert not is_link
        assert zf.read(info) == MANIFEST.read_bytes()
        (entry_points,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
        text = zf.read(entry_points).decode()
        assert "[napari.manifest]" in text and ENTRY_POINT in text
        installed = tmp_path / "site"
        zf.extractall(installed)
    out = _napari_finds_plugin(installed, cwd=tmp_path)
    assert out.splitlines()[0] == "napari-medvision MedVision 1"
    assert Path(out.splitlines()[1]).is_relative_to(installed)


def test_editable_install_lets_napari_find_manifest(tmp_path):
    pytest.importorskip("setuptools")
    src = _source_copy(tmp_path)
    wheels = tmp_path / "editable"
    wheels.mkdir()
    # the PEP 660 hook pip calls for `pip install -e .`, run in the project folder
    build = "import sys; from setuptools import build_meta; print(build_meta.build_editable(sys.argv[1]))"
    result = subprocess.run([sys.executable, "-c", build, str(wheels)], cwd=src, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    name = result.stdout.strip().splitlines()[-1]
    installed = tmp_path / "site"
    with zipfile.ZipFile(wheels / name) as zf:
        zf.extractall(installed)
    out = _napari_finds_plugin(installed, cwd=tmp_path)
    assert out.splitlines()[0] == "napari-medvision MedVision 1"
    # the package is imported from a source folder itself: edits show without reinstalling. Where the
    # running environment already holds this project as an editable install (the test command's
    # .venv), its finder answers first and points at the repository: that is an editable install too.
    location = Path(out.splitlines()[1])
    assert location.is_relative_to(src) or location.is_relative_to(Path(__file__).resolve().parents[1])
    assert "site-packages" not in location.parts


def test_prefer_reader_names_medvision_for_medical_formats_in_napari_settings(tmp_path):
    pytest.importorskip("napari")
    import npe2
    import yaml

    config = tmp_path / "settings.yaml"  # napari reads and writes here, never the user's own settings
    config.write_text("plugins:\n  extension2reader:\n    '*.csv': other-plugin\n")
    env = {**os.environ, "NAPARI_CONFIG": str(config)}
    run = subprocess.run([sys.executable, "-m", "napari_medvision.cli", "prefer-reader"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    chosen = yaml.safe_load(config.read_text())["plugins"]["extension2reader"]
    assert chosen["*.nii.gz"] == "napari-medvision" and chosen["*.dcm"] == "napari-medvision"
    assert chosen["*.csv"] == "other-plugin" and "*.png" not in chosen
    manifest_patterns = set(npe2.PluginManifest.from_file(str(MANIFEST)).contributions.readers[0].filename_patterns)
    assert set(chosen) - {"*.csv"} <= manifest_patterns
