"""In-context prompting: segment a scan from a few painted slices or from labelled example scans.

The parts, in the order a prompt uses them:

- ``prompt``: ``mv.prompt``, the public call; checks the prompts and picks the path.
- ``features``: per-pixel intensity filters and reduced DINO features of a volume.
- ``propagate`` / ``demons``: slice-to-slice demons fields that carry painted labels along z.
- ``register``: affine registration of example scans and the local-similarity fusion of their labels.
- ``photos``: 2D targets from 2D examples (fundus photos, OCT B-scans): photo features, one head
  per example, a threshold chosen by leave-one-example-out; no registration.
- ``refine``: the appearance head, the prior's blur and the clean-up of a label map.
- ``runs``: the leave-one-out folds that estimate a prompt's Dice and choose its weights.
- ``volume_cache``: the per-volume cache entries (fields, features, heads) in ``engine.cache``.
- ``head``: a prompting head saved as a model (``mv.finetune("prompt-head", ...)``).
- ``baselines``: slice copy and plain registration, the yardsticks in docs/evaluation/prompting.md.
"""

from .prompt import prompt

__all__ = ["prompt"]
