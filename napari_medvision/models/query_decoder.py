"""The Transformer decoder of 3D TransUNet (Chen et al. 2023), after Mask2Former: learnable
queries refined by masked cross-attention to multi-scale U-Net decoder features, each query
predicting a class and a mask; the masks are combined into per-class outputs."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ._vit import LearnedPositionEmbedding, self_attention_block, to_tokens

_MODE = {2: "bilinear", 3: "trilinear"}


class MaskedCrossAttention(nn.Module):
    """Queries attend to feature tokens, each only where its current mask is foreground.

    Written here because MONAI's ``CrossAttentionBlock`` takes no attention mask; built on
    ``torch.nn.MultiheadAttention``, which does. Pre-norm, residual.

    Args:
        dim: token width of queries and features.
        heads: attention heads; must divide ``dim``.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)

    def forward(self, queries: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor,
                memory_pos: torch.Tensor, blocked: torch.Tensor | None) -> torch.Tensor:
        """Queries (B, Q, dim) updated from memory (B, N, dim); ``blocked`` (B, Q, N) True = not attended."""
        mask = None
        if blocked is not None:
            # A query whose mask is empty everywhere would attend to nothing (NaN): let it see all.
            blocked = blocked & ~blocked.all(dim=-1, keepdim=True)
            mask = blocked.repeat_interleave(self.heads, dim=0)
        update, _ = self.attention(self.norm(queries) + query_pos, memory + memory_pos, memory,
                                   attn_mask=mask, need_weights=False)
        return queries + update


class QueryMaskDecoder(nn.Module):
    """Per-class log-probabilities from multi-scale features, the Mask2Former way.

    ``num_queries`` learnable queries pass through ``layers`` rounds of masked cross-attention to
    one feature level (coarse to fine, round robin), self-attention and an MLP (MONAI
    ``TransformerBlock``). After every round each query q predicts class logits (``n_classes`` +
    "no object") and a mask logit per voxel, ``m_q(x) = mlp(query_q) . features(x) + bias_q`` on the
    full-resolution mask features. The semantic output is
    ``S_c(x) = sum_q softmax(class_q)_c * sigmoid(m_q(x))`` (no-object column dropped), returned as
    ``log(S_c / sum_c' S_c')``: log of normalised probabilities, so that softmax, cross-entropy
    and Dice work exactly as on the logits of a CNN head.

    Args:
        spatial_dims: 2 or 3.
        n_classes: output classes, background included.
        memory_channels: channels of the feature levels the queries attend to, coarse to fine.
        memory_grids: spatial size of each of those levels for the training patch; the position
            embedding is learned at the coarsest and interpolated to the others and to other inputs.
        mask_channels: channels of the full-resolution features that masks are predicted on (as dot
            products with each query's embedding).
        num_queries: number of queries (candidate masks).
        dim: token width of queries.
        heads: attention heads; must divide ``dim``.
        layers: rounds of query refinement.
        mlp_ratio: width of the MLPs relative to ``dim``.
        masked_attention: restrict each query's cross-attention to its current mask (Mask2Former).
    """

    def __init__(self, spatial_dims: int, n_classes: int, memory_channels: Sequence[int],
                 memory_grids: Sequence[Sequence[int]], mask_channels: int, num_queries: int = 16, dim: int = 64,
                 heads: int = 4, layers: int = 3, mlp_ratio: float = 2.0, masked_attention: bool = True):
        super().__init__()
        self.n_classes = n_classes
        self.masked_attention = masked_attention
        self.mode = _MODE[spatial_dims]
        # Linear on tokens rather than 1x1 convs: same maths, and 1x1x1 3D convs are slow on CPUs
        self.memory_proj = nn.ModuleList(nn.Linear(c, dim) for c in memory_channels)
        # one learned embedding at the coarsest grid plus a per-level offset (Mask2Former's level
        # embedding): a learned table per fine level would cost more weights than the whole decoder
        self.memory_pos = LearnedPositionEmbedding(dim, memory_grids[0])
        self.level_embed = nn.Parameter(torch.zeros(len(memory_channels), dim))
        # unit-variance queries, as Mask2Former's nn.Embedding: with small ones all queries start
        # alike, predict the same mask, and training sits on the class-prior plateau for long
        self.query_feat = nn.Parameter(torch.randn(1, num_queries, dim))
        self.query_pos = nn.Parameter(torch.randn(1, num_queries, dim))
        self.cross = nn.ModuleList(MaskedCrossAttention(dim, heads) for _ in range(layers))
        self.blocks = nn.ModuleList(self_attention_block(dim, heads, mlp_ratio) for _ in range(layers))
        self.out_norm = nn.LayerNorm(dim)
        self.class_head = nn.Linear(dim, n_classes + 1)
        # Mask2Former projects the full-resolution features to the query width; projecting each
        # query to the feature width instead gives the same dot products (both maps are linear)
        # without a full-resolution projection. MONAI's MLPBlock keeps its width, hence our own.
        # The extra output is a per-query mask bias (what a projection's bias would give).
        self.mask_embed = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, mask_channels + 1))

    def predict(self, queries: torch.Tensor, mask_features: torch.Tensor):
        """Class logits (B, Q, n_classes + 1) and mask logits (B, Q, *S) from queries and (B, C_mask, *S)."""
        q = self.out_norm(queries)
        embedding = self.mask_embed(q)
        masks = torch.einsum("bqc,bc...->bq...", embedding[..., :-1], mask_features)
        bias = embedding[..., -1].reshape(*embedding.shape[:2], *([1] * (mask_features.dim() - 2)))
        return self.class_head(q), masks + bias

    def semantic(self, class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """log of normalised ``sum_q softmax(class_q)_c * sigmoid(mask_q)``: (B, n_classes, *S)."""
        # float32 outside autocast: low-precision sums of tiny probabilities would round to 0 before the log
        with torch.autocast(device_type=mask_logits.device.type, enabled=False):
            probs = class_logits.float().softmax(-1)[..., : self.n_classes]
            scores = torch.einsum("bqc,bq...->bc...", probs, mask_logits.float().sigmoid()) + 1e-6
            return scores.log() - scores.sum(1, keepdim=True).log()

    def forward(self, memories: Sequence[torch.Tensor], mask_features: torch.Tensor, with_aux: bool = False):
        """memories: feature maps (B, C_l, *S_l), coarse to fine; mask_features (B, C, *S).

        Returns ``(semantic, aux)``: semantic (B, n_classes, *S) log-probabilities after the last
        round; ``aux`` holds the same before each round (for deep supervision) if ``with_aux``.
        """
        tokens, positions, small_features = [], [], []
        for memory, proj, level_embed in zip(memories, self.memory_proj, self.level_embed):
            grid = memory.shape[2:]
            tokens.append(proj(to_tokens(memory)))
            pos = self.memory_pos.resized(grid).flatten(2).transpose(1, 2) + level_embed
            positions.append(pos.to(tokens[-1].dtype))
            # masks at a coarse level = the dot product with downsampled features (both are linear)
            small_features.append(F.interpolate(mask_features, size=grid, mode=self.mode, align_corners=False))
        batch = mask_features.shape[0]
        queries = self.query_feat.expand(batch, -1, -1)
        query_pos = self.query_pos.expand(batch, -1, -1).to(queries.dtype)
        aux = []
        for i, (cross, block) in enumerate(zip(self.cross, self.blocks)):
            level = i % len(tokens)
            blocked = None
            if self.masked_attention:
                _, coarse_masks = self.predict(queries, small_features[level])
                blocked = (coarse_masks.flatten(2) < 0).detach()
            if with_aux:
                aux.append(self.semantic(*self.predict(queries, mask_features)))
            queries = block(cross(queries, query_pos, tokens[level], positions[level], blocked))
        return self.semantic(*self.predict(queries, mask_features)), aux
