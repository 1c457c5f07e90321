"""DraftTreeSearch: grow a draft tree under the root, one draft forward per depth level.

static   every frontier node gets ``branching[d]`` children at depth d (a chain is [1] * K).
dynamic  (EAGLE-2) each level expands the ``max_candidates`` frontier nodes with the highest
         cumulative draft log-prob, ``max_candidates`` children each; at the end all nodes are
         reranked by cumulative log-prob and the best ``max_nodes`` are kept (closed under ancestors).

Greedy decoding draws children deterministically (top-k of the draft logits). Sampling draws them
from the processed draft distribution q (``models.decoding.sampling.draw_children``) and records q per
expanded node in ``tree.draft_probs``. Losslessness of sampling constrains the search: a node's
drawn children may only be kept or dropped *together*, never by their own values (keeping the
likelier draws would bias the proposal). So with random draws the dynamic search spends its budget
while expanding (whole sibling groups, parents chosen by already-drawn values) and skips the final
rerank; with deterministic top-k children (EAGLE-2's own setting) the rerank is safe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from models.decoding.context import StepContext
from models.decoding.drafter import Drafter
from models.decoding.sampling import draw_children
from models.decoding.tree import DraftTree, Expansion
from models.errors import DrafterError


class NodeScoring(Protocol):
    """What the search asks of a node scorer (``models.learned.node_scorer.NodeScorer``): step 2 of
    the decode loop, run on each level's new nodes as they are drafted."""

    predictor: object | None  # an acceptance predictor, when one is loaded
    draft_from_aligned: bool  # propose children from the aligned distribution instead of the draft's
    seconds: float  # time spent scoring, booked as the ``score`` phase

    @property
    def needs_aligned_logits(self) -> bool: ...

    def aligned_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...

    def score(self, probs, draft_argmax, aligned, slot, tokens, logq, depth, parent_path_lp,
              context: StepContext) -> tuple[torch.Tensor, torch.Tensor | None]: ...


@dataclass
class TreeShape:
    mode: str  # "static" | "dynamic"
    max_depth: int
    max_candidates: int
    max_nodes: int
    branching: list[int]


class DraftTreeSearch:
    def __init__(self, shape: TreeShape, to_probs: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 child_draw: str = "topk", scorer: NodeScoring | None = None, rank_by: str = "draft"):
        """``to_probs`` None means greedy (top-k of raw logits); else the sampling distribution.

        ``scorer`` (optional) computes node features and, with a predictor, P(accept | parent) per
        node as it is drafted; ``rank_by="predictor"`` then ranks the dynamic search's frontier and
        final rerank by predicted path probability instead of the draft's cumulative log-prob.
        """
        self.shape = shape
        self.to_probs = to_probs
        self.child_draw = child_draw if to_probs is not None else "topk"
        self.scorer = scorer
        self.rank_by = rank_by
        if rank_by == "predictor" and (scorer is None or scorer.predictor is None):
            raise ValueError("rank_by='predictor' needs an acceptance predictor")
        self.levels_run = 0  # draft forwards of the last grow()
        self.level_widths: list[int] = []  # frontier width of each draft forward of the last grow()
        # Optional early stop (cost-aware pruning): stop_rule(tree, frontier, level_widths) -> True
        # stops before drafting another level.
        self.stop_rule = None
        self.vocab_size: int | None = None  # the target's, when known: drafts must match it

    @property
    def random_draws(self) -> bool:
        return self.child_draw != "topk"

    def _checked(self, drafter: Drafter, logits, width: int) -> torch.Tensor:
        """The drafter's logits as float, refused unless [width, vocab] (vocab = the target's when
        known) and free of NaN (-inf is allowed: reduced-vocabulary heads mask tokens with it)."""
        name = type(drafter).__name__
        if not isinstance(logits, torch.Tensor):
            raise DrafterError(f"{name}.propose returned {type(logits).__name__}, not a tensor of logits [F, V]")
        if logits.dim() != 2 or logits.shape[0] != width or (self.vocab_size and logits.shape[1] != self.vocab_size):
            want = f"[{width}, {self.vocab_size or 'V'}]"
            raise DrafterError(f"{name}.propose returned logits of shape {list(logits.shape)} for a frontier of "
                               f"{width} node(s); expected {want} (one row per frontier node, the target's vocabulary)")
        logits = logits.float()
        if torch.isnan(logits).any():
            raise DrafterError(f"{name}.propose returned NaN logits (an overflow in the draft? try model.dtype=float32)")
        return logits

    def grow(self, drafter: Drafter, root_token: int, depth: int, generator: torch.Generator | None = None,
             context: StepContext | None = None) -> DraftTree:
        """Tree of at most ``depth`` levels under ``root_token`` (depth 0: the root alone)."""
        shape, scorer = self.shape, self.scorer
        context = context or StepContext()
        tree = DraftTree.from_root(root_token)
        frontier = [0]
        path_lp = torch.zeros(1)  # [N] cumulative draft log-prob, kept in step with the tree
        rank_score = path_lp  # [N] what the dynamic search ranks by: log path probability
        budget = shape.max_nodes
        self.levels_run, self.level_widths = 0, []
        for d in range(depth):
            if d > 0 and self.stop_rule is not None and self.stop_rule(tree, frontier, self.level_widths):
                break
            width = shape.branching[d] if shape.mode == "static" else shape.max_candidates
            if shape.mode == "dynamic" and self.random_draws:
                keep = max(0, budget // width)  # whole sibling groups only: the best-ranked parents
                if len(frontier) > keep:
                    best = torch.topk(rank_score[frontier], keep).indices.sort().values
                    frontier = [frontier[i] for i in best.tolist()]
                if not frontier:
                    break
            logits = self._checked(drafter, drafter.propose(tree, frontier), len(frontier))  # [F, V]
            hidden = drafter.last_hidden  # [F, Hd] or None
            self.levels_run += 1
            self.level_widths.append(len(frontier))
            aligned = scorer.aligned_logits(hidden) if scorer is not None and scorer.needs_aligned_logits else None
            if scorer is not None and scorer.draft_from_aligned:
                logits = aligned  # propose from the aligned distribution (recorded as q like any other)
            probs = torch.softmax(logits, dim=-1) if self.to_probs is None else self.to_probs(logits)  # [F, V]
            argmax = probs.argmax(-1)  # [F]
            for i, node in enumerate(frontier):
                tree.expansions[node] = Expansion(None if hidden is None else hidden[i], int(argmax[i]))
            slot, tokens, logq = self._draw(tree, frontier, logits, probs, width, generator)
            parents = torch.tensor(frontier, dtype=torch.long)[slot]
            feats = accept = None
            if scorer is not None:
                feats, accept = scorer.score(probs, argmax, aligned, slot, tokens, logq, tree.depth[parents] + 1,
                                             path_lp[parents], context)
            new = tree.add_children(parents, tokens, logq, feats, accept)
            path_lp = torch.cat([path_lp, path_lp[parents] + logq])
            if self.rank_by == "predictor":
                rank_score = torch.cat([rank_score, rank_score[parents] + accept.clamp(min=1e-12).log()])
            else:
                rank_score = path_lp
            budget -= len(new)
            if shape.mode == "static" or d == depth - 1:
                frontier = new.tolist()
            else:
                top = torch.topk(rank_score[new], min(shape.max_candidates, len(new))).indices
                frontier = new[top.sort().values].tolist()
        if shape.mode == "dynamic" and not self.random_draws and tree.num_drafted > shape.max_nodes:
            # Rerank: best max_nodes by path score. Along a path scores never increase, and on ties
            # the stable order puts lower indices (shallower nodes) first, so ancestors win.
            order = torch.sort(rank_score[1:], descending=True, stable=True).indices[: shape.max_nodes] + 1
            tree, _ = tree.select(order)
        return tree

    def _draw(self, tree: DraftTree, frontier: list[int], logits: torch.Tensor, probs: torch.Tensor, width: int,
              generator: torch.Generator | None):
        """Children for each frontier node: (slot [M]: row of the parent in ``frontier``, tokens [M],
        log q [M]); siblings are contiguous, in draw order."""
        if self.to_probs is None:  # greedy: top-k of the draft logits, log-probs for ranking
            top = torch.topk(torch.log_softmax(logits, dim=-1), width, dim=-1)  # [F, width]
            slot = torch.arange(len(frontier)).repeat_interleave(width)
            return slot, top.indices.flatten().cpu(), top.values.flatten().cpu()
        slot, tokens, logq = [], [], []
        for i, node in enumerate(frontier):
            kids = draw_children(probs[i], width, self.child_draw, generator)
            tree.draft_probs[node] = probs[i]
            slot += [i] * len(kids)
            tokens.append(kids.cpu())
            logq.append(probs[i, kids].log().cpu())
        return torch.tensor(slot, dtype=torch.long), torch.cat(tokens), torch.cat(logq)
