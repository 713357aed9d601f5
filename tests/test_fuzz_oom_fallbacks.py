"""Out-of-memory fallbacks of the sliding window, each exercised by injecting the error.

GPU out of memory: the batch halves, then the run continues on the CPU. CPU MemoryError: the
batch halves; at one window, or when the result itself does not fit, a MemoryError says so in a
sentence. No GPU is needed: the "accelerator" of the GPU test is torch's meta device, on which
the injected network always runs out of memory, so the real fallback code moves it to the CPU.
"""

from __future__ import annotations

import pytest
import torch

from napari_medvision.engine import inference
from napari_medvision.engine.inference import ResultTooLarge, sliding_window

torch.set_num_threads(1)


def conv_net(classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Conv3d(1, classes, 3, padding=1)


def reference(net, image, roi):
    return sliding_window(net, image, roi, batch_size=1, out_dtype=torch.float32)


class FailsAbove(torch.nn.Module):
    """Runs ``net`` but raises ``error`` for batches larger than ``limit`` (or on ``device_type``)."""

    def __init__(self, net, error, limit: int = 0, device_type: str | None = None):
        super().__init__()
        self.net, self.error, self.limit, self.device_type = [net], error, limit, device_type
        self.batches: list[tuple[str, int]] = []

    def forward(self, x):
        self.batches.append((x.device.type, x.shape[0]))
        if x.shape[0] > self.limit or x.device.type == self.device_type:
            raise self.error("out of memory (injected)")
        return self.net[0](x)


def test_cpu_memory_error_halves_the_batch_and_gives_the_same_result():
    net = conv_net()
    image = torch.randn(1, 20, 20, 20)
    flaky = FailsAbove(net, MemoryError, limit=1)
    with pytest.warns(RuntimeWarning) as caught:
        probs = sliding_window(flaky, image, (16, 16, 16), batch_size=4, out_dtype=torch.float32)
    assert [str(w.message) for w in caught] == ["CPU out of memory: batch size lowered to 2",
                                               "CPU out of memory: batch size lowered to 1"]
    assert [size for _, size in flaky.batches[:3]] == [4, 2, 1]
    torch.testing.assert_close(probs, reference(net, image, (16, 16, 16)), atol=1e-5, rtol=0)


def test_cpu_memory_error_at_one_window_is_a_clear_error():
    image = torch.randn(1, 20, 20, 20)
    with pytest.raises(MemoryError, match=r"out of memory on the CPU even for one 16x16x16 window at a time; "
                                          r"close other programs or crop the image"):
        with pytest.warns(RuntimeWarning):
            sliding_window(FailsAbove(conv_net(), MemoryError, limit=0), image, (16, 16, 16), batch_size=2)


def test_result_too_large_for_memory_is_a_clear_error_without_retrying(monkeypatch):
    real_zeros = torch.zeros
    image = torch.randn(1, 20, 20, 20)

    def zeros(*shape, **kwargs):  # the 3-class blend buffer is the only allocation of 3 x 20^3
        dims = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple) else shape
        if tuple(dims) == (3, 20, 20, 20):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real_zeros(*shape, **kwargs)

    monkeypatch.setattr(torch, "zeros", zeros)
    flaky = FailsAbove(conv_net(), MemoryError, limit=8)
    with pytest.raises(ResultTooLarge, match=r"the 3-class result on a 20x20x20 grid needs 0\.0 GiB of memory, "
                                             r"which is not free; crop the image"):
        sliding_window(flaky, image, (16, 16, 16), batch_size=4)
    assert len(flaky.batches) == 1  # no pointless retries with smaller batches


def test_gpu_out_of_memory_halves_the_batch_then_continues_on_the_cpu(monkeypatch):
    net = conv_net()
    image = torch.randn(1, 20, 20, 20)
    # The meta device holds no values: blend weights are made on the CPU, and tiles on it go
    # straight to the network (torch's autocast knows no meta device), which then runs out of memory.
    real_weights, real_forward = inference.blend_weights, inference._forward
    monkeypatch.setattr(inference, "blend_weights", lambda roi, blend="gaussian", device="cpu": real_weights(roi, blend))

    def forward(network, tiles, *args, **kwargs):
        if tiles.device.type == "meta":
            network(tiles)
        return real_forward(network, tiles, *args, **kwargs)

    monkeypatch.setattr(inference, "_forward", forward)
    flaky = FailsAbove(net, torch.cuda.OutOfMemoryError, limit=8, device_type="meta")
    messages = []
    with pytest.warns(RuntimeWarning) as caught:
        probs = sliding_window(flaky, image, (16, 16, 16), batch_size=4, device="meta", out_dtype=torch.float32,
                               progress=lambda done, total, message: messages.append(message))
    assert [str(w.message) for w in caught] == ["GPU out of memory: batch size lowered to 2",
                                               "GPU out of memory: batch size lowered to 1",
                                               "GPU out of memory even for one tile: continuing on the CPU"]
    assert flaky.batches[:4] == [("meta", 4), ("meta", 2), ("meta", 1), ("cpu", 1)]
    assert messages[-1].endswith("tiles on cpu")
    torch.testing.assert_close(probs, reference(net, image, (16, 16, 16)), atol=1e-5, rtol=0)
