"""The quick-start picture: files opened in napari through this plugin, then a screenshot."""

from __future__ import annotations

from pathlib import Path


def screenshot_files(paths: list[Path], picture: Path) -> None:
    """Open ``paths`` with the plugin in a napari viewer and save a screenshot of the canvas."""
    import napari

    viewer = napari.Viewer(show=True)
    try:
        for path in paths:
            viewer.open(str(path), plugin="napari-medvision")
        viewer.dims.set_point(0, viewer.dims.range[0].start + (viewer.dims.range[0].stop - viewer.dims.range[0].start) / 2)
        viewer.reset_view()
        viewer.screenshot(str(picture), canvas_only=True)
    finally:
        viewer.close()
