"""Segmentation benchmark: medvision's sliding window against MONAI's, then the full predict_labels path.

One 3D TransUNet (``transunet3d`` preset, random weights: speed and memory do not depend on
training), one synthetic CT of ``--slices x --size x --size`` voxels at 1 x 0.7 x 0.7 mm, one
overlap. MONAI's ``sliding_window_inference`` runs the same network on the same model-grid
tensor with the same autocast and a softmax per tile, at the fastest batch size of a small
sweep; medvision runs at its default batch size (and at ``--engine-batches``, if given). Prints
one JSON line per measurement (best of ``--repeat`` after a warm-up) and a ratio line with the
largest difference between the outputs.
Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the process's peak resident
memory, reset before each measurement (torch allocations bypass tracemalloc).

    python bench/segment.py --device cuda                        # 300x512x512 on the GPU machine
    python bench/segment.py --device cpu --slices 48 --size 96   # a quick check on a laptop
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import resource
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def build_network(preset: str, classes: int) -> tuple[torch.nn.Module, dict]:
    from napari_medvision.models.registry import build_model
    from napari_medvision.models.transunet import PRESETS_3D

    config = {**PRESETS_3D[preset], "n_classes": classes}
    torch.manual_seed(0)
    return build_model({"name": "transunet3d", "config": config}).eval(), config


def make_card(config: dict, spacing: list[float], classes: int):
    from napari_medvision.models.card import ModelCard

    return ModelCard(id="bench-transunet3d", task="segment", architecture={"name": "transunet3d", "config": config},
                     modality="CT", sha256="0" * 64, labels={k: f"class {k}" for k in range(classes)},
                     input={"spacing": spacing, "normalisation": {"kind": "ct_window", "low": -200, "high": 300},
                            "patch_size": list(config["img_size"]), "channels": 1, "dims": 3})


def make_ct(slices: int, size: int):
    from napari_medvision.synthetic import ct_abdomen

    return ct_abdomen(seed=0, shape=(slices, size, size), spacing=(1.0, 0.7, 0.7))[0]


def synchronise(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_time(fn, device: str, repeat: int) -> tuple[float, object, dict]:
    """Best wall time of ``repeat`` runs after one warm-up, the last result, and the peak memory.

    Peak memory in MiB: ``torch.cuda.max_memory_allocated`` (and its growth over what was
    allocated before), or the ``CpuPeak`` record.
    """
    result = fn()  # warm-up: cuDNN autotuning, lazy CUDA init, page faults
    del result
    times = []
    cpu = CpuPeak()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        cpu.start()
    result = None
    for _ in range(repeat):
        del result
        synchronise(device)
        start = time.perf_counter()
        result = fn()
        synchronise(device)
        times.append(time.perf_counter() - start)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
        return min(times), result, {"peak_gpu_mib": round(peak, 1), "peak_gpu_growth_mib": round(peak - base, 1)}
    return min(times), result, cpu.stop()


class Setup:
    """Everything both engines share: network, card, CT and the normalised model-grid tensor."""

    def __init__(self, args):
        from napari_medvision.engine.inference import prepare_image

        self.args = args
        self.device = args.device
        if args.model:
            from napari_medvision.models.registry import load_model

            self.network, self.card = load_model(args.model, device="cpu")
            self.roi = tuple(self.card.input["patch_size"])
        else:
            self.network, config = build_network(args.preset, args.classes)
            self.card = make_card(config, args.spacing, args.classes)
            self.roi = tuple(config["img_size"])
        self.monai_network = copy.deepcopy(self.network)  # our engine changes the memory format
        self.ct = make_ct(args.slices, args.size)
        self.image = prepare_image(self.ct, self.card.input, self.device)

    def medvision(self, batch_size: int, channels_last_3d: bool | None = None, compile: bool = False):
        """The engine at ``batch_size``; ``channels_last_3d=None`` lets it pick the layout, as users get it."""
        from napari_medvision.engine.inference import sliding_window

        network = copy.deepcopy(self.network)  # the engine may change the weights' layout
        return lambda: sliding_window(network, self.image, self.roi, overlap=self.args.overlap,
                                      batch_size=batch_size, device=self.device, out_device=None,
                                      channels_last_3d=channels_last_3d, compile=compile)

    def monai(self, batch_size: int):
        from monai.inferers import sliding_window_inference

        from napari_medvision.engine.inference import _amp_dtype

        net = self.monai_network.to(self.device)
        amp = _amp_dtype(torch.device(self.device), True)

        def predictor(x):
            return net(x).float().softmax(1)

        def run():
            with torch.inference_mode(), torch.autocast(torch.device(self.device).type,
                                                        dtype=amp or torch.float32, enabled=amp is not None):
                return sliding_window_inference(self.image[None], self.roi, batch_size, predictor,
                                                overlap=self.args.overlap, mode="gaussian",
                                                sw_device=self.device, device=self.device)[0]
        return run

    def predict(self, batch_size: int):
        from napari_medvision.engine.inference import predict_labels

        return lambda: predict_labels(self.network, self.card, self.ct, device=self.device,
                                      overlap=self.args.overlap, batch_size=batch_size)


class CpuPeak:
    """Peak resident memory of what runs between ``start`` and ``stop`` (MiB).

    Linux: the kernel's high-water mark is reset first (``/proc/self/clear_refs``), so each
    measurement sees only its own peak; elsewhere ``ru_maxrss``, which never goes down.
    """

    def start(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.linux = True
        except OSError:
            self.linux = False
        self.before = self._status("VmRSS") if self.linux else self._maxrss()

    def stop(self) -> dict:
        peak = self._status("VmHWM") if self.linux else self._maxrss()
        return {"peak_rss_mib": round(peak, 1), "peak_rss_growth_mib": round(peak - self.before, 1)}

    @staticmethod
    def _status(field: str) -> float:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        raise OSError(field)

    @staticmethod
    def _maxrss() -> float:
        scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--preset", default=None, help="transunet3d preset (default: base on a GPU, tiny on a CPU)")
    parser.add_argument("--classes", type=int, default=14)
    parser.add_argument("--spacing", default="1.5,1.5,1.5", help="model spacing in mm, z,y,x")
    parser.add_argument("--model", default=None,
                        help="a shipped or user model id (e.g. ct-abdomen-organs-3d): benchmark it with its card")
    parser.add_argument("--monai-batches", default=None,
                        help="MONAI batch sizes to sweep (default 1,2,4,8 on a GPU; 1,2,4 on a CPU)")
    parser.add_argument("--engine-batches", default=None,
                        help="also time medvision at these batch sizes (default: its own default only)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the engine with torch.compile (compiling is left out of the time)")
    args = parser.parse_args()

    from napari_medvision.engine.device import resolve_device
    from napari_medvision.engine.inference import default_batch_size

    args.device = resolve_device(args.device)
    args.preset = args.preset or ("base" if args.device.startswith("cuda") else "tiny")
    if args.model:
        args.preset = "from card"
    args.spacing = [float(s) for s in str(args.spacing).split(",")]
    gpu = args.device.startswith("cuda")
    setup = Setup(args)
    if args.model:
        args.classes = int(setup.card.architecture["config"]["n_classes"])
    context = {"benchmark": "segment", "device": args.device,
               "device_name": torch.cuda.get_device_name() if gpu else (platform.processor() or platform.machine()),
               "date": date.today().isoformat(), "torch": torch.__version__, "preset": args.preset,
               "input_shape": [args.slices, args.size, args.size], "model_grid": list(setup.image.shape[1:]),
               "roi": list(setup.roi), "overlap": args.overlap, "classes": args.classes, "model": args.model}

    def emit(record: dict, peak: dict) -> None:
        record.update(peak)
        print(json.dumps({**record, **context}), flush=True)

    from napari_medvision.engine.inference import prefers_channels_last_3d

    layout = "channels_last_3d" if gpu and prefers_channels_last_3d(setup.network) else "default"
    ours_batch = default_batch_size(setup.roi, args.device)
    ours_s, ours, peak = best_time(setup.medvision(ours_batch), args.device, args.repeat)
    emit({"measure": "sliding_window", "impl": "medvision", "layout": layout, "batch_size": ours_batch,
          "seconds": round(ours_s, 3)}, peak)
    for batch in (int(b) for b in (args.engine_batches or "").split(",") if b and int(b) != ours_batch):
        seconds, _, peak = best_time(setup.medvision(batch), args.device, args.repeat)
        emit({"measure": "sliding_window", "impl": "medvision", "layout": layout, "batch_size": batch,
              "seconds": round(seconds, 3)}, peak)

    if gpu:  # the layout the engine did not pick, to check its choice (prefers_channels_last_3d)
        other = layout == "default"
        seconds, _, peak = best_time(setup.medvision(ours_batch, channels_last_3d=other), args.device, args.repeat)
        emit({"measure": "sliding_window", "impl": "medvision",
              "layout": "channels_last_3d" if other else "default", "batch_size": ours_batch,
              "seconds": round(seconds, 3)}, peak)

    if args.compile:  # torch.compile'd network; the warm-up run (not timed) pays for compiling
        seconds, _, peak = best_time(setup.medvision(ours_batch, compile=True), args.device, args.repeat)
        emit({"measure": "sliding_window", "impl": "medvision", "compile": True, "layout": layout,
              "batch_size": ours_batch, "seconds": round(seconds, 3)}, peak)

    sweep = args.monai_batches or ("1,2,4,8" if gpu else "1,2,4")
    monai_best = None
    for batch in (int(b) for b in sweep.split(",")):
        seconds, reference, peak = best_time(setup.monai(batch), args.device, args.repeat)
        emit({"measure": "sliding_window", "impl": "monai", "batch_size": batch, "seconds": round(seconds, 3)},
             peak)
        if monai_best is None or seconds < monai_best[0]:
            monai_best = (seconds, batch, float((ours.float() - reference.float()).abs().max()))
        del reference
    print(json.dumps({"measure": "ratio", "medvision_seconds": round(ours_s, 3),
                      "monai_best_seconds": round(monai_best[0], 3), "monai_best_batch": monai_best[1],
                      "monai_over_medvision": round(monai_best[0] / ours_s, 3),
                      "max_abs_diff": float(f"{monai_best[2]:.3g}"), **context}), flush=True)
    del ours

    seconds, labels, peak = best_time(setup.predict(ours_batch), args.device, max(1, args.repeat - 1))
    emit({"measure": "predict_labels", "batch_size": ours_batch, "seconds": round(seconds, 3),
          "output_shape": list(labels.data.shape), "output_dtype": str(labels.data.dtype),
          "classes_found": int(np.unique(labels.data).size)}, peak)


if __name__ == "__main__":
    main()
