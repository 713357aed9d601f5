"""Appearance head fitted on the prompt, its product with a spatial prior, and the final clean-up.

The head is a two-layer MLP on per-pixel features (``_features``), fitted in about a second on
the pixels the user gave (annotated slices, or example scans). It knows what each label looks
like but not where it is; the prior (propagated slices or registered examples) knows where but
not the exact boundary. Their product, ``p(c) ~ head(c) * prior(c) ** weight``, keeps both.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import ndimage as ndi

from .features import _scipy_kernel, correlate_along

MAX_SAMPLES = 20_000
EPS = 1e-3


class AppearanceHead:
    """Softmax MLP ``features -> (n_classes,)``; class 0 is background."""

    def __init__(self, n_classes: int, hidden: int = 32, steps: int = 150, device: str = "cpu", seed: int = 0):
        self.n_classes, self.hidden, self.steps, self.device, self.seed = n_classes, hidden, steps, device, seed
        self.net = None

    def fit(self, features: np.ndarray, classes: np.ndarray) -> "AppearanceHead":
        """Fit on ``features`` ``(N, F)`` and class ids ``(N,)``; a class-balanced subsample of ``MAX_SAMPLES``."""
        import torch

        rng = np.random.default_rng(self.seed)
        picked = balanced_sample(classes, MAX_SAMPLES, rng)
        x = torch.from_numpy(features[picked].astype(np.float32)).to(self.device)
        y = torch.from_numpy(classes[picked].astype(np.int64)).to(self.device)
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-4)
        weight = class_weights(classes, classes[picked], self.n_classes).to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net = _mlp(x.shape[1], self.n_classes, self.hidden).to(self.device)
        optimiser = torch.optim.Adam(self.net.parameters(), lr=1e-2, weight_decay=1e-4)
        loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
        xs = (x - self.mean) / self.std
        for _ in range(self.steps):
            optimiser.zero_grad()
            loss = loss_fn(self.net(xs), y)
            loss.backward()
            optimiser.step()
        return self

    @classmethod
    def from_stored(cls, network) -> "AppearanceHead":
        """The head of a stored ``models.appearance_head.AppearanceHeadNet``, for its fast ``predict``."""
        head = cls(int(network.mlp[-1].out_features), hidden=int(network.mlp[0].out_features),
                   device=str(network.mean.device))
        head.net, head.mean, head.std = network.mlp, network.mean, network.std
        return head

    def state_names(self, n_features: int) -> list[str]:
        """The names ``state()`` gives a head on ``n_features`` features."""
        return [f"net.{k}" for k in _mlp(n_features, self.n_classes, self.hidden).state_dict()] + ["mean", "std"]

    def state(self) -> dict[str, np.ndarray]:
        """The fitted head as named float32 arrays (to keep it in the prompt cache)."""
        arrays = {f"net.{k}": v.detach().cpu().numpy() for k, v in self.net.state_dict().items()}
        return dict(arrays, mean=self.mean.cpu().numpy(), std=self.std.cpu().numpy())

    def load(self, state: dict[str, np.ndarray]) -> "AppearanceHead":
        """This head with the weights of ``state()`` (bit for bit the head that was fitted)."""
        import torch

        features = state["mean"].shape[0]
        self.net = _mlp(features, self.n_classes, self.hidden).to(self.device)
        self.net.load_state_dict({k[4:]: torch.from_numpy(v) for k, v in state.items() if k.startswith("net.")})
        self.mean = torch.from_numpy(state["mean"]).to(self.device)
        self.std = torch.from_numpy(state["std"]).to(self.device)
        return self

    def predict(self, features: np.ndarray, chunk: Optional[int] = None, on_device: bool = False):
        """Class probabilities ``(n_classes, *features.shape[:-1])`` float32 (numpy; a tensor left on
        the head's device with ``on_device``, for what follows there).

        The normalisation is folded into the first layer and the pixels go through in chunks: of
        32k on a CPU, whose activations stay in its cache (3x faster than 256k chunks on one
        core); of 1M on a GPU, where each chunk costs a launch and a copy each way (300 slices
        of 256x256 are 600 chunks of 32k).
        """
        import torch

        if chunk is None:
            chunk = 1 << 20 if str(self.device).startswith("cuda") else 1 << 15

        first, second, third = self.net[0], self.net[2], self.net[4]
        flat = features.reshape(-1, features.shape[-1])
        if on_device:
            out = torch.empty((self.n_classes, flat.shape[0]), dtype=torch.float32, device=self.device)
        else:
            out = np.empty((self.n_classes, flat.shape[0]), dtype=np.float32)
        with torch.no_grad():
            w1 = first.weight / self.std
            b1 = first.bias - w1 @ self.mean
            w1, w2, w3 = w1.T.contiguous(), second.weight.T.contiguous(), third.weight.T.contiguous()
            for start in range(0, flat.shape[0], chunk):
                x = torch.from_numpy(np.ascontiguousarray(flat[start:start + chunk], dtype=np.float32))
                hidden = torch.addmm(b1, x.to(self.device), w1).relu_()
                hidden = torch.addmm(second.bias, hidden, w2).relu_()
                logits = torch.addmm(third.bias, hidden, w3)
                prob = torch.softmax(logits, dim=1).T
                out[:, start:start + chunk] = prob if on_device else prob.cpu().numpy()
        return out.reshape((self.n_classes,) + features.shape[:-1])


def _mlp(n_features: int, n_classes: int, hidden: int):
    """The head's layers: the same MLP a stored head (``models.appearance_head``) keeps."""
    from ...models.appearance_head import AppearanceHeadNet

    return AppearanceHeadNet(n_features, n_classes, hidden).mlp


def class_weights(classes: np.ndarray, sampled: np.ndarray, n_classes: int):
    """Cross-entropy weights for a class-balanced sample ``sampled`` of ``classes`` (a float tensor).

    Sampling balanced the classes; weighting by sqrt(frequency) gives back part of the prior
    odds, so a rare label is neither drowned nor painted everywhere.
    """
    import torch

    counts = torch.bincount(torch.from_numpy(sampled.astype(np.int64)), minlength=n_classes).float()
    freq = torch.from_numpy(np.bincount(classes, minlength=n_classes) / len(classes)).float()
    weight = freq.sqrt() / counts.clamp_min(1) * len(sampled)
    return torch.where(counts > 0, weight / weight[counts > 0].mean(), weight)


def balanced_sample(classes: np.ndarray, total: int, rng) -> np.ndarray:
    present = np.unique(classes)
    per_class = max(1, total // len(present))
    picked = []
    for c in present:
        where = np.flatnonzero(classes == c)
        picked.append(where if len(where) <= per_class else rng.choice(where, per_class, replace=False))
    return np.concatenate(picked)


SOFTEN_CAP = 3.0  # the widest in-plane blur of the prior, in pixels
SOFTEN_REACH = int(4 * SOFTEN_CAP + 0.5) + 1  # pixels that blur reaches (scipy truncates at 4 sigma)


def soften(prior, distance: Optional[np.ndarray] = None, base: float = 0.5, per_slice: float = 0.25,
           cap: float = SOFTEN_CAP):
    """The prior ``(K+1, z, y, x)`` blurred in-plane, more the farther a slice is from its source.

    distance: ``(z,)`` slices to the nearest annotated slice (None: ``base`` everywhere). A mask
    carried over ten slices is only roughly where the organ is; its edge should not be trusted.
    prior: a numpy array or a torch tensor: in host memory blurred by scipy around the labels
    (``_blur_around_labels``), on a GPU by torch (``_soften_torch``); the same numbers to float32
    rounding either way.
    """
    dist = np.zeros(prior.shape[1]) if distance is None else np.asarray(distance, dtype=float)
    sigmas = [min(cap, base + per_slice * d) for d in dist]
    if not isinstance(prior, np.ndarray):
        if prior.device.type != "cpu":
            return _soften_torch(prior, sigmas)
        import torch

        return torch.from_numpy(soften(prior.numpy(), distance, base, per_slice, cap))
    out = np.empty_like(prior)
    for z, sigma in enumerate(sigmas):
        out[:, z] = _blur_around_labels(prior[:, z], sigma) if sigma > 0 else prior[:, z]
    out /= np.maximum(out.sum(0, keepdims=True), 1e-6)
    return out


SURE = 1.0 - 1e-5  # background probability that counts as sure


def _blur_around_labels(planes: np.ndarray, sigma: float) -> np.ndarray:
    """``planes`` ``(K+1, y, x)`` blurred in-plane, computed only within the blur's reach of the labels.

    Farther away the labels' blur is exactly 0, so once normalised the prior there is background
    alone, as on the whole slice; an organ in a 256x256 CT slice is blurred in a crop a third of
    its size (a warm 300-slice prompt spent a third of its time here). Where the background is
    not sure (below ``SURE``) outside the labels' box, the whole slice is blurred: only where it
    is 1 does blurring a crop with its edges reflected give the whole slice's numbers.
    """
    reach = int(4.0 * sigma + 0.5)  # scipy's default truncation at 4 sigma
    labelled = (planes[1:] > 0).any(0)
    rows, cols = np.flatnonzero(labelled.any(1)), np.flatnonzero(labelled.any(0))
    if rows.size == 0:
        return planes if planes[0].min() >= SURE else ndi.gaussian_filter(planes, (0, sigma, sigma))
    y0, y1 = max(rows[0] - reach, 0), min(rows[-1] + 1 + reach, planes.shape[1])
    x0, x1 = max(cols[0] - reach, 0), min(cols[-1] + 1 + reach, planes.shape[2])
    background = planes[0].copy()
    background[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = 1.0
    if background.min() < SURE:
        return ndi.gaussian_filter(planes, (0, sigma, sigma))
    out = np.zeros_like(planes)
    out[0] = 1.0
    out[:, y0:y1, x0:x1] = ndi.gaussian_filter(planes[:, y0:y1, x0:x1], (0, sigma, sigma))
    return out


def _soften_torch(prior, sigmas: list[float]):
    """``soften`` of a tensor: the slices of each sigma blurred together with scipy's own kernel and
    its reflected edges (``_features.correlate_along``; torch has no such filter), so it matches the
    scipy path to float32 rounding. Distances are whole slices, so there are a dozen sigmas at most.
    """
    import torch

    out = prior.clone()
    for sigma in sorted(set(sigmas)):
        if sigma <= 0:
            continue
        rows = torch.as_tensor([z for z, s in enumerate(sigmas) if s == sigma], device=prior.device)
        kernel = torch.as_tensor(_scipy_kernel(sigma, 0), device=prior.device, dtype=prior.dtype)
        part = prior.index_select(1, rows).flatten(0, 1).unsqueeze(1)  # (K+1 * n, 1, y, x)
        part = correlate_along(correlate_along(part, kernel, 2), kernel, 3)
        out[:, rows] = part.view(prior.shape[0], len(rows), *prior.shape[2:])
    return out / out.sum(0, keepdim=True).clamp_min(1e-6)


def combine(head, prior, weight: float = 1.0):
    """``head * prior ** weight`` normalised over classes; either may be None (then the other alone).

    numpy arrays or torch tensors (on one device), as given."""
    if head is None:
        return prior
    if prior is None:
        return head
    if not isinstance(head, np.ndarray):
        import torch

        log = torch.log(head.clamp_min(EPS)) + weight * torch.log(prior.clamp_min(EPS))
        return torch.softmax(log, dim=0)
    log = np.log(np.maximum(head, EPS)) + weight * np.log(np.maximum(prior, EPS))
    log -= log.max(0, keepdims=True)
    p = np.exp(log)
    return p / p.sum(0, keepdims=True)


def compact_labels(annotations: np.ndarray, slices, class_ids) -> set[int]:
    """Labels drawn as one thick blob per slice (organs), for which stray islands are errors.

    A label counts as compact when, over the annotated slices, its largest 2D component holds at
    least 85 % of its area and a one-pixel erosion keeps at least half of it. Grey matter,
    vessels and other many-piece or thin labels keep all their pieces and their loops unfilled.
    """
    compact = set()
    for k in class_ids:
        total = biggest = core = 0
        for z in slices:
            mask = annotations[z] == k
            if not mask.any():
                continue
            lab, n = ndi.label(mask)
            sizes = np.bincount(lab.ravel())[1:]
            total += int(sizes.sum())
            biggest += int(sizes.max())
            core += int(ndi.binary_erosion(mask).sum())
        if total and biggest >= 0.85 * total and core >= 0.5 * total:
            compact.add(int(k))
    return compact


def clean_up(classes: np.ndarray, compact: set[int], anchor: Optional[np.ndarray] = None) -> np.ndarray:
    """Class map with stray islands of each compact label removed and holes filled per slice.

    anchor: class map of what is known (the annotated pixels, or the registered prior); the
    components of a label that touch its anchor are kept, else the largest one. Keeping the
    largest alone could throw away the very organ the user painted in favour of a look-alike.
    """
    out = classes.copy()
    for k in compact:
        mask = classes == k
        if not mask.any():
            continue
        lab, n = ndi.label(mask)
        if n > 1:
            touched = np.unique(lab[(anchor == k) & mask]) if anchor is not None else np.array([], int)
            touched = touched[touched > 0]
            if len(touched) == 0:
                touched = [np.argmax(np.bincount(lab.ravel())[1:]) + 1]
            keep = np.isin(lab, touched)
            out[mask & ~keep] = 0
            mask = keep
        out[_fill_holes_per_slice(mask) & (out == 0)] = k
    return out


def _fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_fill_holes`` of each slice, run on the mask's bounding box plus a 1-pixel ring.

    Same result as on the whole slice (everything outside the box is background joined to the
    border through the ring), at a fraction of the cost for an organ in a large slice.
    """
    filled = np.zeros_like(mask)
    for z, one in enumerate(mask):
        rows, cols = np.flatnonzero(one.any(1)), np.flatnonzero(one.any(0))
        if rows.size == 0:
            continue
        y0, y1 = max(rows[0] - 1, 0), min(rows[-1] + 2, one.shape[0])
        x0, x1 = max(cols[0] - 1, 0), min(cols[-1] + 2, one.shape[1])
        filled[z, y0:y1, x0:x1] = ndi.binary_fill_holes(one[y0:y1, x0:x1])
    return filled
