"""The Interactive panel in a real viewer: a click gives the object; the event loop stays responsive."""

from __future__ import annotations

import time

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("skimage")

from qtpy.QtCore import QTimer  # noqa: E402

from napari_medvision._napari.widgets.interactive import InteractiveWidget, layer_volume  # noqa: E402
from napari_medvision.tasks.interactive import InteractiveSession  # noqa: E402

pytestmark = pytest.mark.napari


def ball_scan() -> tuple[np.ndarray, np.ndarray]:
    """A noisy 24x40x64 scan with one bright ball (the object to click), and the ball's mask."""
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:24, :40, :64]
    ball = (z - 12) ** 2 + (y - 20) ** 2 + (x - 16) ** 2 <= 8 ** 2
    return (np.where(ball, 200.0, 80.0) + rng.normal(0, 10, ball.shape)).astype(np.float32), ball


def test_a_click_in_the_panel_shows_the_object_and_never_blocks_the_viewer(make_napari_viewer, qtbot):
    image, ball = ball_scan()
    viewer = make_napari_viewer()
    viewer.add_image(image, name="scan", scale=(2.0, 1.5, 1.5))
    viewer.add_labels(np.zeros(ball.shape, np.uint16), name="scan objects")  # the user's: never replaced
    panel = InteractiveWidget(viewer)
    panel.start()
    qtbot.waitUntil(lambda: panel.session is not None, timeout=60_000)
    assert panel.objects.name == "scan objects [2]" and not viewer.layers["scan objects"].data.any()

    gaps, last = [], [time.perf_counter()]

    def tick():
        now = time.perf_counter()
        gaps.append(now - last[0])
        last[0] = now

    handled = []  # CPU seconds each panel handler held the GUI thread (wall time varies with the machine's load)

    def timed(name):
        method = getattr(panel, name)

        def run(*args, **kwargs):
            start = time.thread_time()
            out = method(*args, **kwargs)
            handled.append((time.thread_time() - start, name))
            return out

        setattr(panel, name, run)

    for name in ("_show_preview", "_show_mask", "accepted", "_next"):
        timed(name)
    timer = QTimer()
    timer.timeout.connect(tick)
    timer.start(20)
    panel.add_click((12, 20, 16), positive=True)
    qtbot.waitUntil(lambda: panel.worker is None and panel.current.data.any(), timeout=60_000)
    panel.name_edit.setText("ball")
    panel.accept()
    qtbot.waitUntil(lambda: panel.objects.data.any(), timeout=60_000)
    timer.stop()

    assert panel.objects.metadata["label_names"] == {1: "ball"}
    same = InteractiveSession(layer_volume(viewer.layers["scan"])).add_point((12, 20, 16))
    np.testing.assert_array_equal(panel.objects.data == 1, same)  # the panel does what the API does
    assert (same & ball).sum() > 0.9 * same.sum()
    # The panel's own work on the GUI thread takes under 100 ms of CPU a step (the computing is in
    # a worker). The event loop's wall-clock gaps also hold napari's own work (adding the click's
    # marker to the Points layer, as in napari's own add mode; canvas redraws in Xvfb's software
    # OpenGL) and the load of a shared machine: 0.1-0.3 s were seen on a 2-core CPU; bounded loosely.
    assert max(handled)[0] < 0.1, f"{max(handled)[1]} took {max(handled)[0] * 1000:.0f} ms of CPU on the GUI thread"
    assert max(gaps) < 1.0, f"the event loop was blocked {max(gaps) * 1000:.0f} ms"

    panel.add_click((12, 20, 70), positive=True)  # outside the volume: refused with a reason
    qtbot.waitUntil(lambda: panel.worker is None and "outside the volume" in panel.status.text(), timeout=30_000)


def test_boxes_lassos_and_scribbles_drawn_in_the_panel_layers_give_the_object(make_napari_viewer, qtbot):
    image, ball = ball_scan()
    viewer = make_napari_viewer()
    viewer.add_image(image, name="scan", scale=(2.0, 1.5, 1.5))
    panel = InteractiveWidget(viewer)
    assert {"N", "U", "Shift+U", "T"} <= {str(k) for k in viewer.keymap}  # shortcuts bound in napari
    panel.start()
    qtbot.waitUntil(lambda: panel.session is not None, timeout=60_000)

    def shown():
        qtbot.waitUntil(lambda: panel.worker is None and not panel.queue and panel.current.data.any(), timeout=60_000)
        mask = panel.current.data.astype(bool)
        return 2 * (mask & ball).sum() / (mask.sum() + ball.sum())

    def reset():
        panel.enqueue("reset")
        qtbot.waitUntil(lambda: panel.worker is None and not panel.current.data.any(), timeout=60_000)

    panel.shapes.add_rectangles(np.array([[12, 11, 7], [12, 11, 25], [12, 29, 25], [12, 29, 7]], float))
    assert shown() > 0.7  # a box on slice 12
    reset()
    t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    panel.shapes.add_polygons(np.stack([np.full(16, 12.0), 20 + 8 * np.sin(t), 16 + 8 * np.cos(t)], 1))
    assert shown() > 0.8  # a lasso
    reset()
    panel.scribbles.paint((12, 20, 16), 1)
    assert shown() > 0.5  # a scribble (like a click)


class _Mouse:
    """A mouse event as napari's layer callbacks receive it (world position)."""

    def __init__(self, kind: str, position, modifiers=(), button: int = 1):
        self.type, self.position, self.modifiers, self.button = kind, tuple(position), list(modifiers), button
        self.is_dragging, self.handled, self.dims_displayed = False, False, [1, 2]


def test_mouse_clicks_on_the_clicks_layer_are_positive_and_shift_clicks_negative(make_napari_viewer, qtbot):
    from napari.utils.interactions import mouse_press_callbacks, mouse_release_callbacks

    from napari_medvision.tasks.interactive import Point

    rng = np.random.default_rng(0)
    image = rng.normal(100, 10, (12, 20, 24)).astype(np.float32)
    viewer = make_napari_viewer()
    viewer.add_image(image, name="scan", scale=(2.0, 1.5, 1.5))
    panel = InteractiveWidget(viewer)
    panel.start()
    qtbot.waitUntil(lambda: panel.session is not None, timeout=60_000)
    for modifiers, world in (((), (12.0, 15.0, 18.0)), (("Shift",), (12.0, 6.0, 6.0))):
        mouse_press_callbacks(panel.points, _Mouse("mouse_press", world, modifiers))
        mouse_release_callbacks(panel.points, _Mouse("mouse_release", world, modifiers))
        qtbot.waitUntil(lambda: panel.worker is None and not panel.queue, timeout=60_000)
    assert panel.session.prompts == (Point((6, 10, 12), True), Point((6, 4, 4), False))
    assert len(panel.points.data) == 2
