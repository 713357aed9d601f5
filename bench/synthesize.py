"""Synthesis benchmark: slices per second of MVG over a 3D volume, at several tile batch sizes.

One simulated brain MR (``--shape``, ``--spacing``) is turned from T1 into T2 with an example
pair (T1, T2) of another simulated subject, slice by slice as ``mv.synthesize`` does. The model
is ``mvg-generalist`` by default (or ``--model`` an id or checkpoint); ``--preset`` builds a
randomly initialised network of an MVG preset instead, so the benchmark runs before weights are
shipped (speed does not depend on training). Each batch size: best of ``--repeat`` after a
warm-up; then one end-to-end ``mv.synthesize`` call (model load and checksum included). Prints one
JSON line per measurement; peak memory as in ``bench/segment.py``.

    python bench/synthesize.py --device cuda                                     # the GPU machine
    python bench/synthesize.py --device cpu --preset cpu --threads 1 --shape 32,40,32 --spacing 4.5,4.5,4.5
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from segment import best_time as timed  # noqa: E402  (same memory and timing conventions)


def random_model(preset: str, folder: Path):
    """A randomly initialised MVG of ``preset`` saved with its card into ``folder`` (not the user folder)."""
    import napari_medvision as mv
    from napari_medvision.models.card import ModelCard

    architecture = {"name": "mvg", "config": {"preset": preset}}
    torch.manual_seed(0)
    card = ModelCard(id=f"bench-mvg-{preset}", task="synthesis", architecture=architecture, modality="MR",
                     input={"dims": 2, "channels": 1}, sha256="", metrics={"note": "random weights, for timing"})
    return mv.models.save_model(mv.models.build_model(architecture), card, folder=folder)


def brains(shape, spacing):
    """The query T1 (subject 0) and an example pair (T1, T2) of subject 1."""
    from napari_medvision.synthetic import brain_mr

    query, _ = brain_mr(seed=0, shape=shape, spacing=spacing, contrasts=("T1",))
    example, _ = brain_mr(seed=1, shape=shape, spacing=spacing, contrasts=("T1", "T2"))
    return query["T1"], (example["T1"], example["T2"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    parser.add_argument("--model", default="mvg-generalist", help="MVG model id or checkpoint (default mvg-generalist)")
    parser.add_argument("--preset", default=None, help="time a random-weights MVG of this preset (tiny, cpu, small) "
                                                       "instead of --model")
    parser.add_argument("--shape", default="96,112,96", help="volume shape, slices,rows,columns")
    parser.add_argument("--spacing", default="1.5,1.5,1.5", help="voxel size in mm, z,y,x")
    parser.add_argument("--batches", default=None, help="tile batch sizes (default 8,16,32,64 on a GPU; 4,16 on a CPU)")
    parser.add_argument("--steps", type=int, default=1, help="autoregressive steps (1: one pass)")
    parser.add_argument("--overlap", type=float, default=0.5)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()

    import napari_medvision as mv
    from napari_medvision.engine.device import resolve_device
    from napari_medvision.tasks.synthesize import _run

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    gpu = device.startswith("cuda")
    shape = tuple(int(n) for n in args.shape.split(","))
    spacing = tuple(float(s) for s in args.spacing.split(","))
    batches = [int(b) for b in (args.batches or ("8,16,32,64" if gpu else "4,16")).split(",")]

    with tempfile.TemporaryDirectory() as folder:
        card = random_model(args.preset, Path(folder)) if args.preset else mv.models.get_card(args.model)
        network, card = mv.models.load_model(card, device=device)
        start = time.perf_counter()
        query, pair = brains(shape, spacing)
        simulate_s = time.perf_counter() - start
        from napari_medvision.engine.synthesis import tile_starts

        tiles = len(tile_starts(max(shape[1], network.tile), network.tile, args.overlap)) * \
            len(tile_starts(max(shape[2], network.tile), network.tile, args.overlap))
        context = {"benchmark": "synthesize", "device": device,
                   "device_name": torch.cuda.get_device_name() if gpu else (platform.processor() or platform.machine()),
                   "date": date.today().isoformat(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "model": card.id, "preset": args.preset, "tile": network.tile, "patch": network.patch,
                   "parameters": sum(p.numel() for p in network.parameters()), "input_shape": list(shape),
                   "spacing_mm": list(spacing), "tiles_per_slice": tiles, "task": "T1 -> T2, one example pair",
                   "steps": args.steps, "overlap": args.overlap, "simulation_s": round(simulate_s, 1)}

        def emit(record: dict, peak: dict) -> None:
            print(json.dumps({**record, **peak, **context}), flush=True)

        for batch in batches:
            def run(batch=batch):
                return _run(network, query, [pair], None, device, args.steps, args.overlap, batch, 0.7, None, None)

            seconds, out, peak = timed(run, device, args.repeat)
            emit({"measure": "slices_per_second", "batch_size": batch, "seconds": round(seconds, 3),
                  "slices_per_s": round(shape[0] / seconds, 2), "output_finite": bool(np.isfinite(out.data).all())},
                 peak)

        def end_to_end():
            return mv.synthesize(query, model=card, examples=[pair], device=device, steps=args.steps,
                                 overlap=args.overlap)

        seconds, out, peak = timed(end_to_end, device, 1)
        emit({"measure": "mv.synthesize", "batch_size": "default", "seconds": round(seconds, 3),
              "slices_per_s": round(shape[0] / seconds, 2), "output_shape": list(out.data.shape)}, peak)


if __name__ == "__main__":
    main()
