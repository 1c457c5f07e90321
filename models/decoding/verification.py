"""Verification: which drafted path the target keeps, and the token it adds. Pure functions.

Both take the target's logits for every tree node (one forward over root + nodes) and return
``(path, next_token)``: ``path`` are node indices root -> last accepted node (root included), and
``next_token`` is the target's own token after that node (the *bonus*, or the correction where a
draft was rejected). Emitted this step: ``tree.tokens[path[1:]]`` then ``next_token``.
"""

from __future__ import annotations

from typing import Callable

import torch

from models.decoding.tree import DraftTree

# Probability mass below which a rejection residual max(p - q, 0) is treated as empty. A rejection
# happens with exactly that mass, so falling back to p there moves the output distribution by at
# most this much (total variation), instead of dividing rounding noise by itself.
RESIDUAL_EPS = 1e-7


def verify_greedy(tree: DraftTree, target_logits: torch.Tensor) -> tuple[list[int], int]:
    """Longest path whose every token is the target's argmax at its parent, plus the argmax after it.

    target_logits: [N, V], row i = target logits after the path root -> node i.
    """
    argmax = target_logits.argmax(-1).tolist()  # [N]
    tokens, children = tree.tokens.tolist(), tree.children_lists()
    path, node = [0], 0
    while True:
        nxt = next((c for c in children.get(node, ()) if tokens[c] == argmax[node]), None)
        if nxt is None:
            return path, argmax[node]
        path.append(nxt)
        node = nxt


def verify_sampling(
    tree: DraftTree,
    target_logits: torch.Tensor,
    to_probs: Callable[[torch.Tensor], torch.Tensor],
    child_draw: str,
    generator: torch.Generator | None,
) -> tuple[list[int], int]:
    """Recursive rejection sampling over siblings (lossless: output ~ the target's distribution).

    At node u with target distribution p (``to_probs`` of its logits) and draft distribution q
    (``tree.draft_probs[u]``, what u's children were drawn from), try the children in draw order:
    accept x with probability min(1, p[x] / q[x]); on rejection p <- normalize(max(p - q, 0)), and
    for ``without_replacement`` also q[x] <- 0, q <- normalize(q). With ``topk`` the children are
    deterministic, i.e. q is a point mass at x: accept with probability p[x], else p[x] <- 0,
    p <- normalize(p). If no child is accepted, the emitted token is drawn from the residual p; at a
    leaf it is drawn from p (the bonus). Nodes in ``tree.fixed`` (deterministic proposals, e.g. the
    prompt-lookup branch, added after the drawn siblings) are point masses too, whatever ``child_draw``.
    """
    tokens, children = tree.tokens.tolist(), tree.children_lists()
    fixed = set() if tree.fixed is None else set(tree.fixed.nonzero().flatten().tolist())
    path, node = [0], 0
    while True:
        p = to_probs(target_logits[node])  # [V]
        kids = children.get(node, [])
        accepted = None
        if kids:
            drawn = child_draw != "topk" and any(c not in fixed for c in kids)
            q = tree.draft_probs[node].to(p.device, torch.float32) if drawn else None
            for c in kids:
                x = tokens[c]
                u = torch.rand((), generator=generator, device=p.device)
                if child_draw == "topk" or c in fixed:  # a point-mass proposal
                    if u < p[x]:
                        accepted = c
                        break
                    p = _renormalize(p.index_fill(0, torch.tensor([x], device=p.device), 0.0), p)
                    continue
                if q[x] <= 0:  # cannot be drawn; a child we never drew is never accepted
                    continue
                if u * q[x] < p[x]:
                    accepted = c
                    break
                p = _renormalize((p - q).clamp_(min=0.0), p)
                if child_draw == "without_replacement":
                    q = _renormalize(q.index_fill(0, torch.tensor([x], device=q.device), 0.0), q)
        if accepted is None:
            return path, int(torch.multinomial(p, 1, generator=generator))
        path.append(accepted)
        node = accepted


def _renormalize(residual: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """residual / sum, or ``fallback`` where the residual has (numerically) no mass left."""
    total = residual.sum()
    if total <= RESIDUAL_EPS:
        return fallback
    return residual / total
