"""DraftTreeSearch: grow a draft tree under the root, one draft forward per depth level.

static   every frontier node gets ``branching[d]`` children at depth d (a chain is [1] * K).
dynamic  (EAGLE-2) each level expands the ``max_candidates`` frontier nodes with the highest
         cumulative draft log-prob, ``max_candidates`` children each; at the end all nodes are
         reranked by cumulative log-prob and the best ``max_nodes`` are kept (closed under ancestors).

Greedy decoding draws children deterministically (top-k of the draft logits). Sampling draws them
from the processed draft distribution q (``models.sampling.draw_children``) and records q per
expanded node in ``tree.draft_probs``. Losslessness of sampling constrains the search: a node's
drawn children may only be kept or dropped *together*, never by their own values (keeping the
likelier draws would bias the proposal). So with random draws the dynamic search spends its budget
while expanding (whole sibling groups, parents chosen by already-drawn values) and skips the final
rerank; with deterministic top-k children (EAGLE-2's own setting) the rerank is safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from models.drafter import Drafter
from models.sampling import draw_children
from models.tree import DraftTree


@dataclass
class TreeShape:
    mode: str  # "static" | "dynamic"
    max_depth: int
    max_candidates: int
    max_nodes: int
    branching: list[int]


class DraftTreeSearch:
    def __init__(self, shape: TreeShape, to_probs: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 child_draw: str = "topk"):
        """``to_probs`` None means greedy (top-k of raw logits); else the sampling distribution."""
        self.shape = shape
        self.to_probs = to_probs
        self.child_draw = child_draw if to_probs is not None else "topk"
        self.levels_run = 0  # draft forwards of the last grow()

    @property
    def random_draws(self) -> bool:
        return self.child_draw != "topk"

    def grow(self, drafter: Drafter, root_token: int, depth: int, generator: torch.Generator | None = None) -> DraftTree:
        """Tree of at most ``depth`` levels under ``root_token`` (depth 0: the root alone)."""
        shape = self.shape
        tree = DraftTree.from_root(root_token)
        frontier = [0]
        path_lp = torch.zeros(1)  # [N] cumulative draft log-prob, kept in step with the tree
        budget = shape.max_nodes
        self.levels_run = 0
        for d in range(depth):
            width = shape.branching[d] if shape.mode == "static" else shape.max_candidates
            if shape.mode == "dynamic" and self.random_draws:
                frontier = frontier[: max(0, budget // width)]  # whole sibling groups only
                if not frontier:
                    break
            logits = drafter.propose(tree, frontier).float()  # [F, V]
            self.levels_run += 1
            parents, tokens, logq = self._draw(tree, frontier, logits, width, generator)
            new = tree.add_children(parents, tokens, logq)
            path_lp = torch.cat([path_lp, path_lp[parents] + logq])
            budget -= len(new)
            if shape.mode == "static" or d == depth - 1:
                frontier = new.tolist()
            else:
                top = torch.topk(path_lp[new], min(shape.max_candidates, len(new))).indices
                frontier = new[top.sort().values].tolist()
        if shape.mode == "dynamic" and not self.random_draws and tree.num_drafted > shape.max_nodes:
            # Rerank: best max_nodes by path log-prob. Along a path log-probs never increase, and on
            # ties the stable order puts lower indices (shallower nodes) first, so ancestors win.
            order = torch.sort(path_lp[1:], descending=True, stable=True).indices[: shape.max_nodes] + 1
            tree, _ = tree.select(order)
        return tree

    def _draw(self, tree: DraftTree, frontier: list[int], logits: torch.Tensor, width: int,
              generator: torch.Generator | None):
        """Children for each frontier node: (parents [M], tokens [M], log q [M])."""
        if self.to_probs is None:  # greedy: top-k of the draft logits, log-probs for ranking
            logp = torch.log_softmax(logits, dim=-1)
            top = torch.topk(logp, width, dim=-1)  # [F, width]
            parents = torch.tensor(frontier).repeat_interleave(width)
            return parents, top.indices.flatten().cpu(), top.values.flatten().cpu()
        q = self.to_probs(logits)  # [F, V]
        parents, tokens, logq = [], [], []
        for i, node in enumerate(frontier):
            kids = draw_children(q[i], width, self.child_draw, generator)
            tree.draft_probs[node] = q[i]
            parents += [node] * len(kids)
            tokens.append(kids.cpu())
            logq.append(q[i, kids].log().cpu())
        return torch.tensor(parents, dtype=torch.long), torch.cat(tokens), torch.cat(logq)
