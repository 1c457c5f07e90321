"""StepContext: what the last verification told the next step, before its tree is drafted.

The decoder makes one from the target's distribution at the position that produced the next root;
node scoring (``models.learned``) reads it as the features a draft cannot know by itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepContext:
    """What the last verification told us, known before the next tree is drafted."""

    target_entropy: float = 0.0
    target_top1_prob: float = 1.0
    prev_accepted: int = 0

    @classmethod
    def from_probs(cls, p: torch.Tensor, prev_accepted: int) -> "StepContext":
        """p: [V] the target's distribution at the position that produced the next root."""
        p = p.float()
        return cls(float(torch.special.entr(p).sum()), float(p.max()), int(prev_accepted))
