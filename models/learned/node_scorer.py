"""NodeScorer: step 2 of the decode loop. Features, aligned distribution and predicted acceptance
of each level's new nodes, computed inside the tree search as the nodes are drafted.

The scorer never touches verification: it changes which nodes the search keeps and expands (and,
with ``draft_from_aligned``, which distribution children are drawn from, recorded exactly as q), so
greedy output stays the target's and sampling stays lossless.
"""

from __future__ import annotations

import time

import torch

from models.learned.node_features import (
    ALIGNED_FEATURES,
    COLUMN,
    StepContext,
    aligned_features,
    base_features,
)


class NodeScorer:
    def __init__(self, alignment=None, predictor=None, lm_head_weight: torch.Tensor | None = None,
                 draft_from_aligned: bool = False):
        """``lm_head_weight`` [V, Ht]: the target's output head, for the aligned distribution."""
        self.alignment, self.predictor = alignment, predictor
        self.lm_head = lm_head_weight
        self.draft_from_aligned = draft_from_aligned
        self.use_aligned_features = predictor is not None and predictor.uses_alignment
        if (draft_from_aligned or self.use_aligned_features) and (alignment is None or lm_head_weight is None):
            raise ValueError("aligned features / draft_from_aligned need an alignment and the target's lm_head")
        self.seconds = 0.0  # time spent scoring (align + predict), reported as its own phase

    @property
    def needs_aligned_logits(self) -> bool:
        return self.draft_from_aligned or self.use_aligned_features

    @torch.no_grad()
    def aligned_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[F, V] float32: the target's head on the aligned draft states ``hidden`` [F, Hd]."""
        t = time.perf_counter()
        out = self.alignment.aligned_logits(hidden.to(self.lm_head.device), self.lm_head)
        self.seconds += time.perf_counter() - t
        return out

    @torch.no_grad()
    def score(self, probs: torch.Tensor, draft_argmax: torch.Tensor, aligned: torch.Tensor | None,
              slot: torch.Tensor, tokens: torch.Tensor, logq: torch.Tensor, depth: torch.Tensor,
              parent_path_lp: torch.Tensor, context: StepContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(features [M, F], predicted P(accept | parent accepted) [M] or None) for M new children.

        probs [F, V]: the distributions the children were drawn from; slot [M]: each child's row in
        ``probs``; the rest per child. ``aligned`` [F, V]: aligned logits when needed, else None.
        """
        t = time.perf_counter()
        slot_cpu = slot.cpu()
        rank = torch.zeros(len(slot_cpu), dtype=torch.long)
        siblings = torch.bincount(slot_cpu, minlength=probs.shape[0])[slot_cpu]
        for i in range(1, len(slot_cpu)):  # children of one parent are contiguous, in draw order
            rank[i] = rank[i - 1] + 1 if slot_cpu[i] == slot_cpu[i - 1] else 0
        feats = base_features(probs, slot.to(probs.device), logq, rank, siblings, depth, parent_path_lp, context)
        if self.use_aligned_features and aligned is not None:
            cols = [COLUMN[n] for n in ALIGNED_FEATURES]
            feats[:, cols] = aligned_features(aligned, draft_argmax, slot.to(aligned.device), tokens.to(aligned.device))
        accept = None
        if self.predictor is not None:
            accept = self.predictor(feats.to(next(self.predictor.buffers()).device)).float().cpu()
        self.seconds += time.perf_counter() - t
        return feats, accept
