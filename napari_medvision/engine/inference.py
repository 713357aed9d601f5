"""Sliding-window inference: class probabilities and label maps from a segmentation network.

``sliding_window`` tiles an image into network-sized windows and blends the tile predictions
with Gaussian weights (sigma = roi / 8, as nnU-Net and MONAI's ``mode="gaussian"``).
``predict_labels`` runs a model card's whole recipe on a Volume: resample to the model's
spacing, normalise, tile, and bring the argmax back onto the input grid.

Window placement (``dense_patch_slices``) and the weight map (``compute_importance_map``) are
MONAI's, so the blend matches ``monai.inferers.sliding_window_inference``. The loop itself is
ours because MONAI's lacks what a GUI and a 300x512x512 CT need: a progress callback and a
cancel check per batch, float16 accumulation buffers (half the memory; the count map stays
float32), tiles padded one by one instead of a padded copy of the whole image, a choice of
accumulating on the GPU or the CPU by free memory, and recovery from CUDA out-of-memory
(halve the batch, then finish on the CPU) without losing the batches already done.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..volume import Volume
from .device import resolve_device
from .normalise import normalise
from .orientation import back_to_input_layout, model_layout
from .progress import CancelToken, ProgressFn, check, report
from .resample import grid_shape, labels_from_probabilities, resample_linear


# --- windows and weights --------------------------------------------------------------------

def _scan_interval(image_size, roi_size, overlap: float) -> tuple[int, ...]:
    """Step between window starts per axis (MONAI's rule: ``int(roi * (1 - overlap))``, at least 1)."""
    return tuple(r if r == n else max(int(r * (1 - overlap)), 1) for n, r in zip(image_size, roi_size))


def window_regions(spatial: Sequence[int], roi_size: Sequence[int], overlap: float):
    """For each window: ``(source, target)`` slices into the image and into the tile.

    Windows are placed as MONAI does on the image padded (centred, zeros) up to ``roi_size``;
    the last window of each axis ends exactly on the image's edge. ``target`` is narrower than
    the tile only where the tile hangs over that padding.
    """
    from monai.data.utils import dense_patch_slices

    padded = tuple(max(n, r) for n, r in zip(spatial, roi_size))
    before = tuple((p - n) // 2 for p, n in zip(padded, spatial))
    regions = []
    for window in dense_patch_slices(padded, roi_size, _scan_interval(padded, roi_size, overlap)):
        source, target = [], []
        for sl, n, pad in zip(window, spatial, before):
            o0 = sl.start - pad
            a, b = max(o0, 0), min(sl.stop - pad, n)
            source.append(slice(a, b))
            target.append(slice(a - o0, b - o0))
        regions.append((tuple(source), tuple(target)))
    return regions


def blend_weights(roi_size: Sequence[int], blend: str = "gaussian", device="cpu") -> torch.Tensor:
    """Per-voxel tile weights: Gaussian with sigma = roi/8 (floored at 1e-3), or constant."""
    from monai.data.utils import compute_importance_map

    if blend not in ("gaussian", "constant"):
        raise ValueError(f"blend must be 'gaussian' or 'constant', got {blend!r}")
    return compute_importance_map(tuple(roi_size), mode=blend, sigma_scale=0.125, device=device,
                                  dtype=torch.float32)


# --- the network on one batch ---------------------------------------------------------------

def _amp_dtype(device: torch.device, amp: bool):
    # CPU and MPS stay float32: bf16 on CPUs without native support is slower, not faster.
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _memory_format(ndim: int):
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


def _to_channels_last(network: torch.nn.Module, dims: tuple[int, ...] = (4,)) -> None:
    """Conv weights of these ranks in channels-last layout (faster cuDNN kernels); values are unchanged."""
    for p in network.parameters():
        if p.dim() in dims:
            p.data = p.data.contiguous(memory_format=_memory_format(p.dim()))


# Widest 3D convolution (output channels) up to which channels-last-3d is the faster layout.
CHANNELS_LAST_3D_MAX_WIDTH = 64


def prefers_channels_last_3d(network: torch.nn.Module) -> bool:
    """Whether a network's 3D convolutions run faster channels-last-3d on CUDA: narrow ones do.

    In ``bench/segment.py`` the shipped CT model (widest 3D convolution 64 channels) runs about
    a third faster channels-last-3d, the ``base`` preset (256 channels) slower; widths between
    are untested and keep the default layout (figures: docs/benchmarks.md).
    """
    widths = [p.shape[0] for p in network.parameters() if p.dim() == 5]
    return bool(widths) and max(widths) <= CHANNELS_LAST_3D_MAX_WIDTH


def _forward(network, tiles: torch.Tensor, amp_dtype, activation: Optional[str],
             channels_last_3d: bool = False) -> torch.Tensor:
    if tiles.is_cuda and (tiles.dim() == 4 or channels_last_3d):
        tiles = tiles.contiguous(memory_format=_memory_format(tiles.dim()))
    with torch.autocast(tiles.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        out = network(tiles)
    if isinstance(out, (tuple, list)):  # deep supervision: the full-resolution head comes first
        out = out[0]
    if tuple(out.shape[2:]) != tuple(tiles.shape[2:]):
        raise ValueError(f"the network returned tiles of shape {tuple(out.shape[2:])} for input tiles of "
                         f"{tuple(tiles.shape[2:])}; segmentation networks must keep the spatial shape")
    out = out.float()
    if activation == "softmax":
        return torch.softmax(out, dim=1)
    if activation == "sigmoid":
        return torch.sigmoid(out)
    return out


class SliceWise(torch.nn.Module):
    """A 2D network run on ``(B, C, 1, Y, X)`` tiles: one slice of a 3D volume per tile."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, 0]
        if x.is_cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        out = self.network(x)
        return (out[0] if isinstance(out, (tuple, list)) else out)[:, :, None]


# --- sliding window -------------------------------------------------------------------------

class ResultTooLarge(MemoryError):
    """The blended result itself does not fit in host memory (smaller batches cannot help)."""


def _is_oom(exc: BaseException) -> bool:
    """GPU memory exhausted, or host memory (MemoryError) on any device."""
    return isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError))


def _is_host_oom(exc: BaseException) -> bool:
    """A failed host allocation: Python's MemoryError, or torch's CPU allocator error."""
    return isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)


class _Blend:
    """Accumulation buffers (weighted probabilities and weight sum) and where they live."""

    def __init__(self, n_classes, spatial, compute_device: torch.device, dtype, progress):
        numel = int(np.prod(spatial))
        need = numel * (n_classes * torch.empty((), dtype=dtype).element_size() + 4)
        self.device = torch.device("cpu")
        if compute_device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(compute_device)
            if need < free // 2:  # leave the other half to the network's activations
                self.device = compute_device
        elif compute_device.type == "mps":
            self.device = compute_device
        try:
            self.sum = torch.zeros((n_classes, *spatial), dtype=dtype, device=self.device)
            self.weight = torch.zeros(tuple(spatial), dtype=torch.float32, device=self.device)
        except torch.cuda.OutOfMemoryError:
            self.device = torch.device("cpu")
            self.sum = self.weight = None
            self._cpu_buffers(n_classes, spatial, dtype, need)
        except (MemoryError, RuntimeError) as exc:
            self.sum = self.weight = None
            if self.device.type != "cpu" or not _is_host_oom(exc):
                raise
            self._raise_too_large(n_classes, spatial, need, exc)
        if self.device.type == "cpu" and compute_device.type != "cpu":
            report(progress, 0, 1, f"blending on the CPU ({need / 2**30:.1f} GiB does not fit the GPU)")

    @staticmethod
    def _raise_too_large(n_classes, spatial, need: int, exc: BaseException):
        raise ResultTooLarge(f"the {n_classes}-class result on a {'x'.join(map(str, spatial))} grid needs "
                             f"{need / 2**30:.1f} GiB of memory, which is not free; crop the image or free "
                             "memory and try again") from exc

    def _cpu_buffers(self, n_classes, spatial, dtype, need: int) -> None:
        try:
            self.sum = torch.zeros((n_classes, *spatial), dtype=dtype)
            self.weight = torch.zeros(tuple(spatial), dtype=torch.float32)
        except (MemoryError, RuntimeError) as exc:
            self.sum = self.weight = None
            if not _is_host_oom(exc):
                raise
            self._raise_too_large(n_classes, spatial, need, exc)

    def to_cpu(self) -> None:
        self.sum, self.weight, self.device = self.sum.cpu(), self.weight.cpu(), torch.device("cpu")

    def add(self, weighted: torch.Tensor, weights: torch.Tensor, regions) -> None:
        """Add one batch of weighted tiles (already on this device and dtype); allocates nothing."""
        for tile, (source, target) in zip(weighted, regions):
            self.sum[(slice(None), *source)] += tile[(slice(None), *target)]
            self.weight[source] += weights[target]

    def result(self, out_device) -> torch.Tensor:
        """Weighted mean, divided in place slab by slab (no second full-size buffer)."""
        step = max(1, (1 << 23) // max(1, self.sum[:, 0].numel()))  # 32 MiB of float32 at a time
        for a in range(0, self.sum.shape[1], step):
            part = self.sum[:, a:a + step]
            part.copy_(part.float().div_(self.weight[a:a + step]))
        self.weight = None
        return self.sum if out_device is None else self.sum.to(out_device)


def sliding_window(
    network: torch.nn.Module,
    image: torch.Tensor,
    roi_size: Sequence[int],
    overlap: float = 0.5,
    batch_size: int = 4,
    blend: str = "gaussian",
    device: str | torch.device = "cpu",
    amp: bool = True,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    out_dtype: torch.dtype = torch.float16,
    activation: Optional[str] = "softmax",
    compile: bool = False,
    out_device: str | torch.device | None = "cpu",
    stats: Optional[dict[str, Any]] = None,
    channels_last_3d: Optional[bool] = None,
) -> torch.Tensor:
    """Class probabilities ``(n_classes, *spatial)`` for ``image`` ``(C, *spatial)``, 2D or 3D.

    network: maps ``(B, C, *roi_size)`` to ``(B, n_classes, *roi_size)`` logits; it is moved to
        ``device`` and run in eval mode (its previous mode is restored afterwards).
    overlap: fraction of a window shared with its neighbour along each axis (0 <= overlap < 1).
    batch_size: windows per network call; halved on CUDA out-of-memory, then the CPU takes over.
    amp: bfloat16 autocast on CUDA (float16 where bf16 is unsupported); CPU runs float32.
    activation: applied to each tile before blending ("softmax", "sigmoid" or None for raw
        outputs); blending probabilities keeps float16 accumulation in a safe range.
    out_device: where the result goes; ``None`` leaves it where it was accumulated.
    stats: if given, filled with the device used, final batch size, window count and where the
        blend was accumulated.
    channels_last_3d: run 3D convolutions in the channels-last-3d layout on CUDA (2D ones always
        run channels-last there). ``None`` (default) picks by width (``prefers_channels_last_3d``).
    """
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    spatial = tuple(int(n) for n in image.shape[1:])
    roi = tuple(int(r) for r in roi_size)
    if len(roi) != len(spatial) or len(roi) not in (2, 3):
        raise ValueError(f"roi_size {roi} does not fit an image of shape {tuple(image.shape)} (C, *spatial)")
    dev = torch.device(device)
    regions = window_regions(spatial, roi, overlap)
    total = len(regions)
    batch_size = max(1, int(batch_size))

    was_training = network.training
    network = network.to(dev).eval()
    if channels_last_3d is None:
        channels_last_3d = prefers_channels_last_3d(network)
    if dev.type == "cuda":
        _to_channels_last(network, (4, 5) if channels_last_3d else (4,))
        free, _ = torch.cuda.mem_get_info(dev)
        if image.device != dev and image.numel() * 4 < free // 4:
            image = image.to(dev, torch.float32)  # tiles are then cut on the GPU, no per-batch copies
    run = torch.compile(network) if compile else network
    amp_dtype = _amp_dtype(dev, amp)
    weights = blend_weights(roi, blend, dev)
    acc: Optional[_Blend] = None
    acc_weights = None
    moved_from = None

    done = 0
    # no_grad rather than inference_mode: callers may change the result in place afterwards
    try:
        with torch.no_grad():
            while done < total:
                check(cancel)
                batch = regions[done:done + batch_size]
                # torch.compile specialises on shape: pad the last batch rather than recompile
                rows = batch_size if compile else len(batch)
                try:
                    tiles = torch.zeros((rows, image.shape[0], *roi), dtype=torch.float32, device=image.device)
                    for i, (source, target) in enumerate(batch):
                        tiles[(i, slice(None), *target)] = image[(slice(None), *source)]
                    probs = _forward(run, tiles.to(dev, non_blocking=True), amp_dtype, activation,
                                     channels_last_3d)[:len(batch)]
                    if acc is None:
                        acc = _Blend(probs.shape[1], spatial, dev, out_dtype, progress)
                        acc_weights = weights.to(acc.device)
                    weighted = (probs * weights).to(acc.device, out_dtype)
                    del tiles, probs
                except Exception as exc:
                    if not _is_oom(exc) or isinstance(exc, ResultTooLarge):
                        raise
                    tiles = probs = None
                    if batch_size == 1 and dev.type == "cpu":
                        raise MemoryError(f"out of memory on the CPU even for one {'x'.join(map(str, roi))} window at "
                                          "a time; close other programs or crop the image and try again") from exc
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                    if batch_size > 1:
                        batch_size //= 2
                        where = "GPU" if dev.type != "cpu" else "CPU"
                        message = f"{where} out of memory: batch size lowered to {batch_size}"
                    else:
                        # The network itself moves (a copy would need GPU memory first); it goes back
                        # to the GPU at the end.
                        moved_from, dev, amp_dtype = dev, torch.device("cpu"), None
                        run, image, weights = network.to(dev), image.cpu(), weights.cpu()
                        if acc is not None:
                            acc.to_cpu()
                            acc_weights = weights
                        torch.cuda.empty_cache()
                        message = "GPU out of memory even for one tile: continuing on the CPU"
                    warnings.warn(message, RuntimeWarning, stacklevel=2)
                    report(progress, done, total, message)
                    continue
                acc.add(weighted, acc_weights, batch)
                done += len(batch)
                report(progress, done, total, f"{done}/{total} tiles on {dev.type}")
            if stats is not None:
                stats.update(device=dev.type, batch_size=batch_size, windows=total, blended_on=acc.device.type)
            result = acc.result(out_device)
    finally:
        network.train(was_training)  # a training loop that validates with us keeps its mode
    if moved_from is not None:
        try:
            network.to(moved_from)
        except torch.cuda.OutOfMemoryError:
            warnings.warn("the network stays on the CPU: the GPU is still out of memory", RuntimeWarning,
                          stacklevel=2)
    return result


# --- a model card's recipe on a Volume --------------------------------------------------------

def default_batch_size(patch_size: Sequence[int], device: str) -> int:
    """Windows per call: about 8M voxels per batch on a GPU, 0.4M (and at least 2) on a CPU.

    On a GPU 8 windows of 64x128x128 (8M voxels) is the fastest batch in ``bench/segment.py``.
    On a CPU 2 windows of the shipped CT model's 32x80x80 beat 4, and a batch of one is about
    four times slower (oneDNN's 3D kernels for a batch of one). Out-of-memory halves it
    (``sliding_window``).
    """
    voxels = int(np.prod(patch_size))
    if device.startswith("cuda"):
        return int(np.clip(round(2**23 / voxels), 1, 32))
    return int(np.clip(round(4e5 / voxels), 2, 8))


def model_spacing(volume: Volume, card_input: dict[str, Any]) -> tuple | None:
    """The card's spacing in the volume's axes (a 2D model's spacing on a 3D volume keeps z)."""
    spacing = card_input.get("spacing")
    if spacing is None:
        return None
    spacing = tuple(None if s is None else float(s) for s in spacing)
    if len(spacing) == volume.ndim - 1:
        spacing = (None, *spacing)
    if len(spacing) != volume.ndim:
        raise ValueError(f"the model card's spacing {spacing} does not fit a {volume.ndim}D image")
    return spacing


def prepare_image(volume: Volume, card_input: dict[str, Any], device: str | torch.device = "cpu") -> torch.Tensor:
    """``(C, *spatial)`` float32 tensor on the model's grid, normalised as the card says.

    Training and inference both call this, so a model always sees what it was trained on.
    Resampling comes before normalisation (statistics on the smaller grid; both steps are
    linear inside the window, so the order changes nothing but the clipping edge).
    """
    if volume.n_leading:
        raise ValueError(f"{volume!r} is a series; segment one time point at a time")
    channels = int(card_input.get("channels", 1))
    have = 3 if volume.rgb else 1
    if channels != have:
        raise ValueError(f"the model expects {channels}-channel images, this one has {have}")
    data = np.moveaxis(volume.data, -1, 0) if volume.rgb else volume.data[None]
    spacing = model_spacing(volume, card_input)
    shape = volume.spatial_shape if spacing is None else grid_shape(volume.spatial_shape, volume.spacing, spacing)
    if shape == volume.spatial_shape:
        image = normalise(np.asarray(data), card_input.get("normalisation")).to(device)
    else:
        image = resample_linear(data, shape, device=device)
        image = normalise(image, card_input.get("normalisation"), inplace=True)
    return image.contiguous()


def predict_labels(
    network: torch.nn.Module,
    card,
    volume: Volume,
    device: Optional[str] = None,
    overlap: float = 0.5,
    batch_size: Optional[int] = None,
    progress: Optional[ProgressFn] = None,
    cancel: Optional[CancelToken] = None,
    compile: bool = False,
) -> Volume:
    """Labels Volume (argmax, uint8; uint16 above 256 classes) on ``volume``'s grid.

    Runs the recipe of ``card.input``: turn the axes to the card's ``orientation`` (flips and
    swaps, see :mod:`.orientation`), resample to the model spacing, normalise, sliding window
    at ``patch_size`` (a 2D model on a 3D volume: batches of slices along axis 0), then class
    probabilities (float16) resampled linearly back to the input grid, the argmax taken there
    and the axes turned back. Geometry and modality are the input's; label names the card's;
    ``meta`` records the model id, device and seconds.
    """
    start = time.perf_counter()
    spec = card.input
    dims = int(spec.get("dims", 3))
    patch = tuple(int(p) for p in spec["patch_size"])
    if dims == 3 and volume.ndim != 3:
        raise ValueError(f"model {card.id} segments 3D volumes, this image is {volume.ndim}D")
    dev = resolve_device(device)
    turned, ornt = model_layout(volume, spec)
    try:
        image = prepare_image(turned, spec, dev)
    except torch.cuda.OutOfMemoryError:
        image = prepare_image(turned, spec, "cpu")
    if dims == 2 and volume.ndim == 3:
        network, roi = SliceWise(network), (1, *patch[-2:])
    else:
        roi = patch[-volume.ndim:]
    stats: dict[str, Any] = {}
    probs = sliding_window(network, image, roi, overlap=overlap,
                           batch_size=batch_size or default_batch_size(roi, dev), device=dev,
                           progress=progress, cancel=cancel, out_dtype=torch.float16, compile=compile,
                           out_device=None, stats=stats)
    del image
    check(cancel)
    labels = np.ascontiguousarray(back_to_input_layout(labels_from_probabilities(probs, turned.spatial_shape), ornt))
    names = card.labels if card.labels is not None else {k: f"class {k}" for k in range(1, probs.shape[0])}
    del probs
    result = volume.with_data(labels, labels=names, rgb=False)
    result.meta = {"model": card.id, "device": stats["device"], "batch_size": stats["batch_size"],
                   "seconds": round(time.perf_counter() - start, 3)}
    if "source" in volume.meta:
        result.meta["source"] = volume.meta["source"]
    report(progress, stats["windows"], stats["windows"], "labels on the input grid")
    return result
