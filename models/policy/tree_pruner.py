"""TreePruner: step 3 of the decode loop. Which drafted nodes the target verifies.

Every strategy scores nodes by their *path probability* (``DraftTree.path_probs``): the product of
the predictor's P(accept | parent accepted) along the path when a predictor scored the tree, else of
the draft's own probabilities. Path probabilities never increase along a path, so the top nodes by
path probability (ties: shallower first) are closed under ancestors, and the expected number of
accepted draft tokens of a kept set is the sum of its path probabilities (docs/design.md section 6).

    none        keep everything
    threshold   keep nodes whose path probability >= min_acceptance_prob
    adaptive    threshold, moved online: up when fewer tokens are accepted than the kept nodes'
                path probabilities promised, down when more (also: threshold + adaptive_pruning)
    level       keep the level_topk most likely nodes of each depth
    ratio       cut pruning_ratio of the drafted nodes, least likely first (random draws: depth by
                depth, see ``_keep_groups``)
    budget      keep the max_verify_nodes most likely
    cost_aware  keep the k most likely, k maximising (expected accepted + 1) / (draft + verify(k + 1))
                on the measured cost profile; the search also stops drafting deeper when another
                level is expected to earn less than it costs

Losslessness. Greedy and deterministic top-k children: any selection closed under ancestors is
safe (``DraftTree.select``). Random child draws (``iid``, ``without_replacement``): dropping drawn
siblings by their own values would bias the proposal, so nodes are kept or dropped by whole sibling
groups, ranked by the parent's path probability (known before the group was drawn). ``cost_aware``
then adds whole groups one at a time while each raises the expected rate (``_greedy_groups``),
crediting a group with its parent's path probability times ``group_accept``: the pruner's running
estimate of P(some child of a verified group is accepted | its parent was), learned online from
past steps (``observe``), never from the draws being judged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from models.decoding.tree import DraftTree

STRATEGIES = ("none", "threshold", "adaptive", "level", "ratio", "budget", "cost_aware")


@dataclass
class PruneResult:
    tree: DraftTree
    drafted: int  # nodes before pruning (root excluded)
    verified: int  # nodes kept
    expected: float  # sum of the kept nodes' path probabilities


class TreePruner:
    def __init__(self, cfg, cost=None):
        """``cfg``: a PruningConfig; ``cost``: a ``models.policy.cost_model.CostModel`` (cost_aware only)."""
        self.cfg = cfg
        self.strategy = "adaptive" if cfg.strategy == "threshold" and cfg.adaptive_pruning else cfg.strategy
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown pruning strategy {cfg.strategy!r}; one of {STRATEGIES}")
        if self.strategy == "cost_aware" and cost is None:
            raise ValueError("pruning.strategy=cost_aware needs a cost profile")
        self.cost = cost
        self.threshold = float(cfg.min_acceptance_prob)
        self.group_accept = 0.5  # cost_aware with random draws: see the module docstring

    # ------------------------------------------------------------------ step 3
    def prune(self, tree: DraftTree, random_draws: bool = False, draft_ms: float = 0.0) -> PruneResult:
        """The sub-tree to verify (closed under ancestors; whole sibling groups with random draws)."""
        n = tree.num_drafted
        pp = tree.path_probs()  # [N], root 1
        if self.strategy == "none" or n == 0:
            return PruneResult(tree, n, n, float(pp[1:].sum()))
        if random_draws and self.strategy == "cost_aware":  # expected = what the sizing credited the groups with
            keep, expected, _ = self._greedy_groups(tree, pp, draft_ms)
            kept, _ = tree.select(keep)
            return PruneResult(kept, n, kept.num_drafted, expected)
        keep = self._keep_groups(tree, pp) if random_draws else self._keep_nodes(tree, pp, draft_ms)
        kept, _ = tree.select(keep)
        return PruneResult(kept, n, kept.num_drafted, float(kept.path_probs()[1:].sum()))

    def _order(self, tree: DraftTree, pp: torch.Tensor) -> torch.Tensor:
        """Drafted nodes, most likely first; ties: shallower first, then earlier (ancestors first)."""
        idx = torch.arange(1, len(tree))
        key = torch.stack([-pp[1:].double(), tree.depth[1:].double().cpu(), idx.double()], 1)
        order = sorted(range(len(idx)), key=lambda i: tuple(key[i].tolist()))
        return idx[order]

    def _keep_nodes(self, tree: DraftTree, pp: torch.Tensor, draft_ms: float) -> list[int]:
        c, s = self.cfg, self.strategy
        order = self._order(tree, pp)
        if s in ("threshold", "adaptive"):
            return [int(i) for i in order if pp[i] >= self.threshold]
        if s == "budget":
            return order[: c.max_verify_nodes].tolist()
        if s == "ratio":
            return order[: len(order) - int(math.floor(c.pruning_ratio * len(order)))].tolist()
        if s == "level":
            # Most likely first, so a parent is decided before its children; a node whose parent
            # was cut is cut too (else ``select`` would pull the parent back in, past level_topk).
            per_depth: dict[int, int] = {}
            kept, keep = {0}, []
            parents = tree.parents.tolist()
            for i in order.tolist():
                d = int(tree.depth[i])
                if parents[i] in kept and per_depth.get(d, 0) < c.level_topk:
                    per_depth[d] = per_depth.get(d, 0) + 1
                    kept.add(i)
                    keep.append(i)
            return keep
        # cost_aware: the k most likely nodes, k by the measured cost of verifying k + 1 tokens
        order, cum, k = self._cost_sized(tree, pp, draft_ms)
        return order[:k].tolist()

    def _cost_sized(self, tree: DraftTree, pp: torch.Tensor, draft_ms: float) -> tuple[torch.Tensor, list[float], int]:
        """(nodes most likely first, cum[j] = sum of the j largest path probabilities, the best k)."""
        order = self._order(tree, pp)
        cum = [0.0] + pp[order].double().cumsum(0).tolist()
        return order, cum, self.cost.best_size(cum, draft_ms)

    def _greedy_groups(self, tree: DraftTree, pp: torch.Tensor, draft_ms: float) -> tuple[list[int], float, int]:
        """Random draws, cost_aware: (kept nodes, credited value, node count).

        Sibling groups in order of their parent's path probability (ties: shallower first, so a group
        comes before every group below it); a group whose parent is kept is added when it raises the
        expected rate of the groups added so far, crediting it with ``pp[parent] * group_accept``. So
        whether a group is kept depends on its size, its parent and the groups decided before it,
        never on what was drawn in it or below it (unlike a best prefix, which would look at the
        groups below). A group that does not pay is skipped, not a stop: on a non-monotone cost curve
        a later, larger set may pay again."""
        groups = tree.children_lists()
        depth = tree.depth.tolist()
        kept_nodes, keep, value, nodes = {0}, [], 0.0, 0
        for u in sorted(groups, key=lambda u: (-float(pp[u]), depth[u], u)):
            if u not in kept_nodes:
                continue
            kids, gain = groups[u], float(pp[u]) * self.group_accept
            if self.cost.rate(value + gain, draft_ms, nodes + len(kids)) > self.cost.rate(value, draft_ms, nodes):
                keep += kids
                kept_nodes.update(kids)
                value, nodes = value + gain, nodes + len(kids)
        return keep, value, nodes

    def _keep_groups(self, tree: DraftTree, pp: torch.Tensor) -> list[int]:
        """Whole sibling groups, by the parent's path probability; a group needs its parent kept
        (every strategy but cost_aware, which sizes groups by cost: ``_greedy_groups``).

        Whether a group is kept may depend on nothing drawn in it or below it. ``ratio`` therefore
        cannot cap against all drafted nodes: how many children a node below got depends on what was
        drawn (without replacement, a draft distribution with fewer tokens than the width gives fewer
        children). It goes depth by depth instead: groups whose parent is at depth d must fit within
        the cut of the nodes drafted down to depth d + 1 (all of them at the last depth); the root's
        group always stays.
        """
        c, s = self.cfg, self.strategy
        groups = tree.children_lists()  # {parent: children}
        depth = tree.depth.tolist()
        if s == "ratio":
            parents = sorted(groups, key=lambda u: (depth[u], -float(pp[u]), u))
            upto: dict[int, int] = {}  # parent depth d -> nodes drafted at depths <= d + 1
            for u, kids in groups.items():
                upto[depth[u]] = upto.get(depth[u], 0) + len(kids)
            running = 0
            for d in sorted(upto):
                running += upto[d]
                upto[d] = running - math.floor(c.pruning_ratio * running)
        else:
            parents = sorted(groups, key=lambda u: (-float(pp[u]), depth[u], u))
        kept_nodes, keep, per_depth = {0}, [], {}
        for u in parents:
            kids = groups[u]
            if u not in kept_nodes:
                continue
            d = depth[u] + 1
            if s in ("threshold", "adaptive") and pp[u] < self.threshold:
                continue
            if s == "budget" and len(keep) + len(kids) > c.max_verify_nodes:
                continue
            if s == "ratio" and u != 0 and len(keep) + len(kids) > upto[depth[u]]:
                continue
            if s == "level" and per_depth.get(d, 0) + len(kids) > c.level_topk:
                continue
            per_depth[d] = per_depth.get(d, 0) + len(kids)
            keep += kids
            kept_nodes.update(kids)
        return keep

    # ------------------------------------------------------------------ online feedback
    def observe(self, expected: float, realised: int, random_draws: bool = False) -> None:
        """After a step: ``expected`` = the kept tree's ``PruneResult.expected``, ``realised`` = the draft
        tokens accepted. Adaptive threshold: multiplicative step toward accepting what the kept nodes
        promise. cost_aware with random draws: the same step on ``group_accept``."""
        if expected <= 0:
            return
        if self.strategy == "cost_aware" and random_draws:
            step = self.cfg.adaptive_rate * (realised - expected) / max(expected, 1.0)
            self.group_accept = min(1.0, max(0.02, self.group_accept * math.exp(step)))
            return
        if self.strategy != "adaptive":
            return
        step = self.cfg.adaptive_rate * (expected - realised) / max(expected, 1.0)
        self.threshold = min(0.9, max(1e-4, self.threshold * math.exp(step)))

    # ------------------------------------------------------------------ early stop while drafting
    def stop_drafting(self, tree: DraftTree, frontier: list[int], draft_ms: float = 0.0,
                      random_draws: bool = False) -> bool:
        """Whether to stop before drafting another level under ``frontier``.

        threshold / adaptive: exact: stop when no frontier node reaches the threshold (a child's path
        probability never exceeds its parent's, so every child would be cut). budget (node level):
        exact: stop when ``max_verify_nodes`` nodes already have a path probability >= the best
        frontier node's (children lose ties to shallower nodes). cost_aware: stop when one more level
        is expected to earn less than it costs: its gain ~ each frontier node's path probability times
        the best conditional acceptance seen at the current depth, its cost one more draft level plus
        verifying the extra nodes, compared as tokens per ms with and without the level.
        """
        if not frontier or tree.num_drafted == 0:
            return False
        if self.strategy in ("threshold", "adaptive"):
            return bool((tree.path_probs()[frontier] < self.threshold).all())
        if self.strategy == "budget" and not random_draws:
            pp = tree.path_probs()
            return int((pp[1:] >= pp[frontier].max()).sum()) >= self.cfg.max_verify_nodes
        if self.strategy != "cost_aware":
            return False
        pp = tree.path_probs()
        if random_draws:  # whole groups: the frontier's groups would be credited pp[parent] * group_accept
            _, value, nodes = self._greedy_groups(tree, pp, draft_ms)
            now = self.cost.rate(value, draft_ms, nodes)
            gain = float(pp[frontier].sum()) * self.group_accept
            width = len(frontier) * max(len(k) for k in tree.children_lists().values())
            later = self.cost.rate(value + gain, draft_ms + self.cost.draft(len(frontier)), nodes + width)
            return later <= now
        _, cum, k = self._cost_sized(tree, pp, draft_ms)
        now = self.cost.rate(cum[k], draft_ms, k)
        depth = int(tree.depth[frontier[0]])
        at_depth = (tree.depth == depth).nonzero().flatten()
        cond = tree.accept_prob[at_depth] if tree.accept_prob is not None else tree.logprobs[at_depth].exp()
        best = float(cond.max()) if len(cond) else 0.0
        gain = float(pp[frontier].sum()) * best
        # one more level drafts the frontier; at best one kept child per frontier node
        later = self.cost.rate(cum[k] + gain, draft_ms + self.cost.draft(len(frontier)), k + len(frontier))
        return later <= now
