"""Brain MR synthesis on real brains: leave-one-subject-out quality and whole-volume time.

Quality (``--quality``): for each named task, ``recipes/mr_contrast.leave_one_out`` fits the
contrast model on two of the three real multi-contrast brains and scores it on the third, for
each of the three, next to the unchanged input, histogram matching and the grey-level intensity
map fitted on the same two brains. With ``--mvg`` the MVG generalist is scored on T1 -> T2 too,
prompted with a real pair of a training brain (every 5th slice of the held-out brain: MVG runs at
about 3 s per 240x240 slice on this CPU).

Time (default): ``mv.synthesize(t1, task=...)`` on a whole 240x240x155 real T1, as a user calls
it (model load and checksum included), with ``torch`` at ``--threads`` threads; with the process's
CPU seconds and the machine's load beside the wall time.

Prints one JSON line per measurement.

    OMP_NUM_THREADS=2 python bench/synthesis_real.py --threads 2
    OMP_NUM_THREADS=1 python bench/synthesis_real.py --quality --tasks t1-to-t2 --mvg
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


def context(threads: int) -> dict:
    return {"device": f"{platform.machine()} CPU, {threads} torch threads", "date": date.today().isoformat()}


def time_whole_volume(tasks, threads: int) -> None:
    import napari_medvision as mv
    from napari_medvision.recipes.mr_contrast import FILES, FOLDER
    from napari_medvision.recipes.common import data_dir

    subject = "aurora_example"
    for task in tasks:
        source = task.split("-to-")[0].upper()
        t1 = mv.load(data_dir() / FOLDER / subject / f"{FILES[subject][source]}.nii.gz")
        start, cpu_start = time.perf_counter(), time.process_time()
        out = mv.synthesize(t1, task=task)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        # CPU seconds of this process too: on a shared machine the wall time mostly measures the others
        print(json.dumps({"measure": "mv.synthesize whole volume", "task": task, "shape": list(t1.data.shape),
                          "seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2),
                          "load_average_1min": round(os.getloadavg()[0], 1), "model": out.meta.get("model"),
                          **context(threads)}), flush=True)


def mvg_scores(held: str, train: list[str]) -> dict:
    """MVG T1 -> T2 on every 5th slice of ``held``, prompted with the first training brain's real pair."""
    import napari_medvision as mv
    from napari_medvision.recipes.mr_contrast import load_contrast, ssim_scores
    from napari_medvision.tasks.mr_contrast import brain_mask

    query, spacing = load_contrast(held, "T1")
    truth = load_contrast(held, "T2")[0]
    prompt_image, prompt_spacing = load_contrast(train[0], "T1")
    prompt_target = load_contrast(train[0], "T2")[0]
    picks = slice(10, len(query) - 10, 5)
    volume = mv.Volume(query[picks], spacing=(5.0, *spacing[1:]), modality="MR")
    example = (mv.Volume(prompt_image[picks], spacing=(5.0, *prompt_spacing[1:]), modality="MR"),
               mv.Volume(prompt_target[picks], spacing=(5.0, *prompt_spacing[1:]), modality="MR"))
    out = np.asarray(mv.synthesize(volume, examples=[example], consistency=0).data)
    out = np.where(brain_mask(query[picks]), out, 0)
    return ssim_scores(out, truth[picks], brain_mask(query[picks]))


def quality(tasks, threads: int, with_mvg: bool) -> None:
    from napari_medvision.recipes.mr_contrast import FILES, PAIRS, leave_one_out, summary

    names = {f"{s.lower()}-to-{t.lower()}": (s, t) for s, t in PAIRS}
    for task in tasks:
        source, target = names[task]
        results = leave_one_out(source, target, log=lambda line: None)
        if with_mvg and task == "t1-to-t2":
            for held in results:
                others = [s for s in FILES if s != held]
                results[held]["mvg (real pair prompt, every 5th slice)"] = mvg_scores(held, others)
        for held, scores in results.items():
            print(json.dumps({"measure": "leave-one-subject-out", "task": task, "held_out": held, **scores,
                              **context(threads)}), flush=True)
        print(json.dumps({"measure": "leave-one-subject-out mean", "task": task, **summary(results),
                          **context(threads)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="*", default=["t1-to-t2", "t2-to-t1", "t1-to-flair"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quality", action="store_true", help="leave-one-subject-out scores instead of time")
    parser.add_argument("--mvg", action="store_true", help="with --quality: score MVG on T1 -> T2 as well")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quality:
        quality(args.tasks, args.threads, args.mvg)
    else:
        time_whole_volume(args.tasks, args.threads)


if __name__ == "__main__":
    main()
