"""Logits processing and child draws. One function turns logits into the distribution used for
both the draft (q) and the target (p), so that lossless verification compares like with like.

Numerical rules (documented once, here):
- NaN logits are treated as -inf (the token can never be drawn); +inf logits share all the mass
  equally (the limit of softmax). Applied identically to p and q, so target-only sampling and
  speculative sampling see the same distribution. A row with no finite or +inf logit at all
  raises ``NumericalError``: the model is broken and no rule would be honest.
- temperature <= 0 is the greedy limit: a one-hot distribution on the argmax (lowest index on ties).
  The decoder routes ``temperature == 0`` to the greedy path altogether.
- top-k keeps the k largest logits; top-p keeps the smallest prefix of the sorted distribution
  whose mass reaches top_p (the most likely token always stays). Order: temperature, top-k, top-p.
"""

from __future__ import annotations

import torch

from models.errors import TreeSpecError


class NumericalError(TreeSpecError):
    """A distribution could not be formed (every logit NaN or -inf)."""


def sanitize_logits(logits: torch.Tensor) -> torch.Tensor:
    """float32 copy with NaN -> -inf and +inf rows reduced to a uniform choice among the +inf entries."""
    logits = logits.float()
    if bool(torch.isfinite(logits).all()):  # the common case: one check
        return logits
    logits = logits.nan_to_num(nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    pos = torch.isposinf(logits)
    if pos.any():
        has_pos = pos.any(-1, keepdim=True)
        logits = torch.where(has_pos, torch.where(pos, 0.0, float("-inf")), logits)
    if not torch.isfinite(logits).any(-1).all():
        raise NumericalError("a logits row has no finite value (all NaN or -inf); cannot form a distribution")
    return logits


def logits_to_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """logits [..., V] -> probabilities [..., V] (float32) after temperature, top-k, top-p."""
    logits = sanitize_logits(logits)
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True)
        mass_before = sorted_p.cumsum(-1) - sorted_p
        drop_sorted = mass_before >= top_p  # the first token has mass_before 0 and always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def draw_children(q: torch.Tensor, k: int, how: str, generator: torch.Generator | None) -> torch.Tensor:
    """Draw up to ``k`` children of one node from ``q`` [V]; returns token ids [k'] in draw order.

    how = "topk": the k most likely tokens (deterministic, EAGLE-2 style; q[x] > 0 only)
          "iid": k independent draws with replacement (duplicates possible)
          "without_replacement": k successive draws, each renormalised over the tokens not yet drawn
    """

    support = int((q > 0).sum())
    if how == "iid":
        return torch.multinomial(q, k, replacement=True, generator=generator)
    k = min(k, support)
    if how == "topk":
        return torch.topk(q, k).indices
    if how == "without_replacement":
        return torch.multinomial(q, k, replacement=False, generator=generator)
    raise ValueError(f"unknown child draw {how!r}")
