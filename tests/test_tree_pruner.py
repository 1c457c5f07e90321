"""TreePruner (step 3 of the decode loop): which drafted nodes the target verifies.

- every strategy on hand-built trees whose kept sets are worked out by hand (draft probabilities,
  and predictor probabilities when the tree carries ``accept_prob``), node-level and by whole
  sibling groups (random child draws), the adaptive threshold's online updates;
- properties over random trees: the pruned tree is closed under ancestors, topologically ordered,
  maps back to the original nodes, honours its strategy's limit; with random draws it keeps whole
  sibling groups, decided without looking at the group's own values or anything below it;
- greedy output identical to target-only decoding with every strategy on the five tiny archs;
- sampling lossless (the chi-square / TV machinery of test_lossless_sampling.py, same sample counts
  and thresholds) for node-level pruning with top-k children and group-level pruning with iid and
  without-replacement draws; node-level pruning of random draws is biased (negative control);
- cost_aware with random child draws: whole groups added greedily on hand-built trees, decided
  without looking at the group or below, lossless in the chi-square test, its estimate learned online;
- refusals: out-of-range pruning values, at construction and when set on a built config before
  ``generate``; cost_aware without a profile.
"""

import dataclasses
import math
import random

import pytest
import torch
from conftest import (  # + the exact-distribution machinery of the sampling tests
    ARCHS,
    HORIZON,
    P_MIN,
    N,
    Table,
    TableDrafter,
    exact_distribution,
    goodness_of_fit,
    memoized,
    noisy_copy,
    tiny_model,
)

from models.config import SpeculativeDecodingConfig
from models.decoding.sampling import logits_to_probs
from models.decoding.tree import DraftTree
from models.decoding.tree_search import DraftTreeSearch, TreeShape
from models.decoding.verification import verify_sampling
from models.errors import ConfigError
from models.policy.cost_model import CostModel
from models.policy.tree_pruner import STRATEGIES, TreePruner
from speculative_decoder import SpeculativeDecoder

BASE = SpeculativeDecodingConfig()
PRUNING = BASE.pruning


def pruning(**kw):
    """A validated PruningConfig: the defaults with ``kw`` replaced."""
    return dataclasses.replace(PRUNING, **kw)


def build(spec, accept=None, tokens=None) -> DraftTree:
    """DraftTree from [(parent, draft prob)] for nodes 1..n (parents before children), optionally
    with the predictor's P(accept | parent accepted) per node."""
    tree = DraftTree.from_root(0)
    for i, (parent, q) in enumerate(spec):
        tree.add_children(torch.tensor([parent]), torch.tensor([tokens[i] if tokens else 10 + i]),
                          torch.tensor([math.log(q)]),
                          accept_prob=None if accept is None else torch.tensor([accept[i]]))
    return tree


# Nodes 1..7: parent, draft probability; path probability and the order by it, by hand:
#   1 (0) .6  -> .6        order: 1 .6, 3 .33, 2 .3, 5 .27, 6 .2673, 7 .264, 4 .12
#   2 (0) .3  -> .3        sibling groups: 0 -> {1, 2}, 1 -> {3, 4}, 2 -> {5}, 3 -> {7}, 5 -> {6};
#   3 (1) .55 -> .33       groups by parent path probability: 0, 1, 3, 2, 5
#   4 (1) .2  -> .12
#   5 (2) .9  -> .27
#   6 (5) .99 -> .2673     (deeper than node 3's child 7, but more likely: level must not take it
#   7 (3) .8  -> .264       without its parent)
SPEC = [(0, .6), (0, .3), (1, .55), (1, .2), (2, .9), (5, .99), (3, .8)]
PP = [1, .6, .3, .33, .12, .27, .2673, .264]
ALL = {1, 2, 3, 4, 5, 6, 7}


def kept(result) -> set[int]:
    """Original indices of the drafted nodes a PruneResult keeps."""
    tree = result.tree
    return set(range(1, len(tree))) if tree.origin is None else set(tree.origin[1:].tolist())


NODE_CASES = [  # (strategy, config values, kept nodes), top-k children: node by node
    ("none", {}, ALL),
    ("threshold", dict(min_acceptance_prob=.25), ALL - {4}),
    ("threshold", dict(min_acceptance_prob=.28), {1, 2, 3}),
    ("threshold", dict(min_acceptance_prob=.5), {1}),
    ("threshold", dict(min_acceptance_prob=.7), set()),
    ("adaptive", dict(min_acceptance_prob=.28), {1, 2, 3}),  # before any feedback: the threshold
    ("threshold", dict(min_acceptance_prob=.28, adaptive_pruning=True), {1, 2, 3}),
    ("budget", dict(max_verify_nodes=1), {1}),
    ("budget", dict(max_verify_nodes=3), {1, 2, 3}),
    ("budget", dict(max_verify_nodes=4), {1, 2, 3, 5}),
    ("budget", dict(max_verify_nodes=6), ALL - {4}),
    ("budget", dict(max_verify_nodes=100), ALL),
    ("ratio", dict(pruning_ratio=0.0), ALL),
    ("ratio", dict(pruning_ratio=.4), {1, 2, 3, 5, 6}),  # cut floor(2.8) = 2
    ("ratio", dict(pruning_ratio=.5), {1, 2, 3, 5}),  # cut floor(3.5) = 3
    ("ratio", dict(pruning_ratio=.9), {1}),  # cut floor(6.3) = 6
    ("level", dict(level_topk=1), {1, 3, 7}),  # depth 3: 6 is likelier than 7, but its parent 5 is cut
    ("level", dict(level_topk=2), ALL - {4}),
    ("level", dict(level_topk=3), ALL),
]

GROUP_CASES = [  # (strategy, config values, kept nodes), random child draws: whole sibling groups
    ("none", {}, ALL),
    ("threshold", dict(min_acceptance_prob=.25), ALL),  # 4 (.12) stays with its sibling 3
    ("threshold", dict(min_acceptance_prob=.31), {1, 2, 3, 4, 7}),  # groups of 0, 1, 3
    ("threshold", dict(min_acceptance_prob=.5), {1, 2, 3, 4}),
    ("threshold", dict(min_acceptance_prob=1.0), {1, 2}),  # the root's path probability is 1
    ("adaptive", dict(min_acceptance_prob=.31), {1, 2, 3, 4, 7}),
    ("budget", dict(max_verify_nodes=1), set()),  # the root's group alone is too big
    ("budget", dict(max_verify_nodes=2), {1, 2}),
    ("budget", dict(max_verify_nodes=3), {1, 2, 5}),  # 1's group does not fit, 2's does
    ("budget", dict(max_verify_nodes=5), {1, 2, 3, 4, 7}),
    ("budget", dict(max_verify_nodes=7), ALL),
    # ratio, depth by depth: nodes down to depth 2 (5), down to depth 3 (7); the root's group stays
    ("ratio", dict(pruning_ratio=0.0), ALL),
    ("ratio", dict(pruning_ratio=.2), {1, 2, 3, 4, 7}),  # <= 5 - 1 down to depth 2: 2's group no longer fits
    ("ratio", dict(pruning_ratio=.4), {1, 2, 5, 6}),  # <= 5 - 2 = 3 down to depth 2: 1's group does not fit
    ("ratio", dict(pruning_ratio=.9), {1, 2}),  # the root's group, over the cap of 1
    ("level", dict(level_topk=1), set()),  # the root's group has two nodes at depth 1
    ("level", dict(level_topk=2), {1, 2, 3, 4, 7}),  # 2's group would make three at depth 2
    ("level", dict(level_topk=3), ALL),
]


@pytest.mark.parametrize("random_draws,cases", [(False, NODE_CASES), (True, GROUP_CASES)], ids=["nodes", "groups"])
def test_hand_built_tree(random_draws, cases):
    tree = build(SPEC)
    torch.testing.assert_close(tree.path_probs(), torch.tensor(PP), rtol=1e-5, atol=0)
    for strategy, values, want in cases:
        result = TreePruner(pruning(strategy=strategy, **values)).prune(tree, random_draws=random_draws)
        assert kept(result) == want, (strategy, values)
        assert result.drafted == 7 and result.verified == len(want)
        assert result.expected == pytest.approx(sum(PP[i] for i in want), rel=1e-5)
        assert len(tree) == 8  # the input tree is left as it was


def linear_cost(slope: float, base: float = 10.0, draft: float = 0.0) -> CostModel:
    """verify(N) = base + slope * (N - 1) ms, every draft level ``draft`` ms."""
    return CostModel(verify_ms={1: base, 64: base + slope * 63}, draft_ms={1: draft, 8: draft})


# cost_aware with random draws, groups in order 0 {1, 2}, 1 {3, 4}, 3 {7}, 2 {5}, 5 {6}, each credited
# its parent's path probability x group_accept (0.5): .5, .3, .165, .15, .135. Worked by hand with
# verify(N) = 10 + slope (N - 1), no draft time: a group joins when it raises (value + 1) / verify.
GROUP_COST_CASES = [  # (cost model, kept nodes, credited value)
    # slope 2: {1,2} 1.5/14 > 1/10; +{3,4} 1.8/18 < 1.5/14; {7}: parent cut; +{5} 1.65/16 < .107
    (linear_cost(2.0), {1, 2}, .5),
    # slope 1.2: .1210, .1216, .1228, .12297 each better; +{6} 2.25/18.4 = .1223 is not
    (linear_cost(1.2), ALL - {6}, 1.115),
    (linear_cost(.25), ALL, 1.25),
    # the root's group costs more than it earns: nothing is verified
    (CostModel(verify_ms={1: 10, 3: 20, 64: 200}, draft_ms={1: 0}), set(), 0.0),
    # non-monotone: verify(5) < verify(3); 2-node and 4-node sets each pay
    (CostModel(verify_ms={1: 10, 3: 14, 5: 12, 8: 13}, draft_ms={1: 0}), ALL, 1.25),
]


@pytest.mark.parametrize("case", range(len(GROUP_COST_CASES)))
def test_cost_aware_by_whole_groups(case):
    cost, want, value = GROUP_COST_CASES[case]
    tree = build(SPEC)
    result = TreePruner(pruning(strategy="cost_aware"), cost).prune(tree, random_draws=True)
    assert kept(result) == want
    assert result.verified == len(want) and result.expected == pytest.approx(value, rel=1e-6)


def test_group_accept_learns_from_realised_tokens():
    pruner = TreePruner(pruning(strategy="cost_aware"), linear_cost(1.0))
    start = pruner.group_accept
    pruner.observe(1.0, 3, random_draws=True)  # more accepted than credited: up
    assert pruner.group_accept > start
    high = pruner.group_accept
    for _ in range(50):
        pruner.observe(2.0, 0, random_draws=True)
    assert 0.02 <= pruner.group_accept < high
    pruner.observe(1.0, 3)  # node-level values are not rescaled
    assert pruner.group_accept < high


def test_path_probs_from_predictor_when_present():
    """With accept_prob the path probability is the product of the predictor's conditional
    probabilities (root 1), and the strategies rank by it; without, by the draft's probabilities."""
    accept = [.5, .9, .5, .9, .4, .5, .5]
    scored = build(SPEC, accept=accept)
    pp = [1, .5, .9, .25, .45, .36, .18, .125]  # order: 2, 1, 4, 5, 3, 6, 7
    torch.testing.assert_close(scored.path_probs(), torch.tensor(pp), rtol=1e-6, atol=0)
    torch.testing.assert_close(build(SPEC).path_probs(), torch.tensor(PP), rtol=1e-5, atol=0)
    assert scored.path_logprobs().exp()[3] == pytest.approx(.33, rel=1e-5)  # the draft's, unchanged
    cases = [("budget", dict(max_verify_nodes=1), {2}), ("budget", dict(max_verify_nodes=3), {1, 2, 4}),
             ("threshold", dict(min_acceptance_prob=.3), {1, 2, 4, 5}), ("ratio", dict(pruning_ratio=.5), {1, 2, 4, 5}),
             ("level", dict(level_topk=1), {2, 5, 6})]
    for strategy, values, want in cases:
        result = TreePruner(pruning(strategy=strategy, **values)).prune(scored)
        assert kept(result) == want, (strategy, values)
        assert result.expected == pytest.approx(sum(pp[i] for i in want), rel=1e-5)
        assert result.tree.accept_prob is not None  # travels with the kept nodes
    # groups by the parent's predicted path probability: 0 (1), 2 (.9), 1 (.5), 5 (.36), 3 (.25)
    result = TreePruner(pruning(strategy="budget", max_verify_nodes=4)).prune(scored, random_draws=True)
    assert kept(result) == {1, 2, 5, 6}


def test_ties_keep_the_shallower_node():
    """A child the predictor is sure of has its parent's path probability: the parent goes first, so
    a budget is never exceeded by ancestors pulled back in."""
    tree = build([(0, .5), (1, .5), (0, .5)], accept=[.5, 1.0, .4])  # pp: .5, .5, .4
    for budget, want in ((1, {1}), (2, {1, 2}), (3, {1, 2, 3})):
        result = TreePruner(pruning(strategy="budget", max_verify_nodes=budget)).prune(tree)
        assert kept(result) == want and result.verified == budget


def test_adaptive_threshold_follows_feedback():
    tree = build(SPEC)
    pruner = TreePruner(pruning(strategy="adaptive", min_acceptance_prob=.25, adaptive_rate=.2))
    assert pruner.strategy == "adaptive" and pruner.threshold == .25
    assert kept(pruner.prune(tree)) == ALL - {4}
    pruner.observe(expected=2.0, realised=0)  # fewer accepted than promised: stricter
    assert pruner.threshold == pytest.approx(.25 * math.exp(.2 * 2 / 2))  # .305
    assert kept(pruner.prune(tree)) == {1, 3}
    pruner.observe(expected=1.0, realised=3)  # more accepted than promised: looser
    assert pruner.threshold == pytest.approx(.25 * math.exp(.2) * math.exp(-.4))  # .205
    assert kept(pruner.prune(tree)) == ALL - {4}
    before = pruner.threshold
    pruner.observe(expected=2.0, realised=2)
    pruner.observe(expected=0.0, realised=0)  # nothing was verified: nothing to learn
    assert pruner.threshold == before
    for _ in range(100):
        pruner.observe(expected=5.0, realised=0)
    assert pruner.threshold == pytest.approx(.9)  # bounded above: something is always verified
    assert kept(pruner.prune(tree)) == set()
    for _ in range(200):
        pruner.observe(expected=0.5, realised=5)
    assert pruner.threshold == pytest.approx(1e-4)  # bounded below
    assert kept(pruner.prune(tree)) == ALL
    # threshold + adaptive_pruning is adaptive; plain threshold (and the others) ignore feedback
    assert TreePruner(pruning(strategy="threshold", adaptive_pruning=True)).strategy == "adaptive"
    for strategy in ("threshold", "budget", "ratio", "level"):
        pruner = TreePruner(pruning(strategy=strategy, min_acceptance_prob=.25))
        pruner.observe(expected=5.0, realised=0)
        assert pruner.threshold == .25 and kept(pruner.prune(tree)) == kept(TreePruner(pruner.cfg).prune(tree))


def test_none_and_empty_trees_pass_through():
    tree = build(SPEC)
    result = TreePruner(pruning(strategy="none")).prune(tree)
    assert result.tree is tree and result.verified == result.drafted == 7
    root = DraftTree.from_root(5)
    for strategy in STRATEGIES[:-1]:
        for random_draws in (False, True):
            result = TreePruner(pruning(strategy=strategy)).prune(root, random_draws=random_draws)
            assert result.tree is root and result.drafted == result.verified == 0 and result.expected == 0


# ---------------------------------------------------------------------- properties over random trees
def random_tree(rng: random.Random, scored: bool) -> DraftTree:
    n = rng.randint(1, 39)  # drafted nodes: 2..40 nodes with the root
    spec = [(rng.randrange(i), rng.uniform(1e-3, 1.0)) for i in range(1, n + 1)]
    accept = None
    if scored:  # (0, 1], with some exact 1s (ties between parent and child)
        accept = [1.0 if rng.random() < .15 else 1.0 - rng.random() for _ in range(n)]
    return build(spec, accept=accept, tokens=[rng.randrange(96) for _ in range(n)])


def random_pruner(rng: random.Random, strategy: str, n: int) -> TreePruner:
    values = dict(threshold=dict(min_acceptance_prob=rng.choice([0.0, rng.uniform(0, .6), 1.0])),
                  adaptive=dict(min_acceptance_prob=rng.uniform(0, .6)),
                  level=dict(level_topk=rng.randint(1, 4)),
                  ratio=dict(pruning_ratio=rng.choice([0.0, rng.uniform(0, .99)])),
                  budget=dict(max_verify_nodes=rng.randint(1, n + 1))).get(strategy, {})
    cost = None
    if strategy == "cost_aware":  # a random, possibly non-monotone verify curve
        sizes = sorted(rng.sample(range(2, 64), 3))
        cost = CostModel(verify_ms={1: 10.0, **{k: rng.uniform(8, 40) for k in sizes}},
                         draft_ms={1: rng.uniform(0, 3), 8: rng.uniform(0, 6)})
    return TreePruner(pruning(strategy=strategy, **values), cost)


def check_subtree(tree: DraftTree, result, credited: float | None = None) -> list[int]:
    """The pruned tree is a topologically ordered sub-tree closed under ancestors that maps back to
    the original nodes; returns its origin (original index of each node). ``credited``: cost_aware by
    groups, whose expected value is each kept group's parent path probability times this."""
    sub = result.tree
    origin = list(range(len(tree))) if sub.origin is None else sub.origin.tolist()
    assert origin[0] == 0 and origin == sorted(set(origin)) and origin[-1] < len(tree)
    assert sub.parents[0] == -1 and sub.depth[0] == 0
    parents = sub.parents.tolist()
    for i in range(1, len(sub)):
        assert 0 <= parents[i] < i  # topological, and the parent is kept
        assert origin[parents[i]] == int(tree.parents[origin[i]])  # the same parent as in the original
    assert sub.tokens.tolist() == tree.tokens[origin].tolist()
    assert sub.depth.tolist() == tree.depth[origin].tolist()
    assert sub.logprobs.tolist() == tree.logprobs[origin].tolist()
    if tree.accept_prob is not None:
        assert sub.accept_prob.tolist() == tree.accept_prob[origin].tolist()
    assert result.drafted == tree.num_drafted and result.verified == len(sub) - 1
    pp = tree.path_probs()
    if credited is None:
        expected = float(pp[origin[1:]].sum())
    else:
        expected = credited * sum(float(pp[u]) for u in {int(tree.parents[i]) for i in origin[1:]})
    assert result.expected == pytest.approx(expected, rel=1e-5, abs=1e-6)
    return origin


def check_limits(tree: DraftTree, pruner: TreePruner, origin: list[int], random_draws: bool) -> None:
    """Each strategy's own limit holds after the closure under ancestors."""
    c, n, pp, kept_n = pruner.cfg, tree.num_drafted, tree.path_probs(), len(origin) - 1
    if pruner.strategy in ("threshold", "adaptive"):
        key = [int(tree.parents[i]) for i in origin[1:]] if random_draws else origin[1:]
        assert all(pp[i] >= pruner.threshold for i in key)  # node's (or, by groups, parent's) path probability
        if not random_draws:
            assert kept_n == int((pp[1:] >= pruner.threshold).sum())
    elif pruner.strategy == "budget":
        assert kept_n <= c.max_verify_nodes
        if not random_draws:
            assert kept_n == min(n, c.max_verify_nodes)
    elif pruner.strategy == "ratio":
        if not random_draws:
            assert kept_n == n - math.floor(c.pruning_ratio * n)
        else:  # depth by depth: kept down to each depth within the cut of what was drafted down there
            root = len(tree.children(0))
            depths = tree.depth.tolist()
            for k in range(1, tree.max_depth + 1):
                drafted = sum(1 for i in range(1, len(tree)) if depths[i] <= k)
                kept_k = sum(1 for i in origin[1:] if depths[i] <= k)
                assert kept_k <= max(root, drafted - math.floor(c.pruning_ratio * drafted))
    elif pruner.strategy == "level":
        per_depth = {}
        for i in origin[1:]:
            per_depth[int(tree.depth[i])] = per_depth.get(int(tree.depth[i]), 0) + 1
        assert all(v <= c.level_topk for v in per_depth.values())
    elif pruner.strategy == "cost_aware":
        cost = pruner.cost
        if not random_draws:  # the best prefix of the nodes by path probability
            cum = [0.0] + sorted(pp[1:].tolist(), reverse=True)
            cum = [sum(cum[: k + 1]) for k in range(n + 1)]
            rates = [cost.rate(cum[k], 0.0, k) for k in range(n + 1)]
            assert cost.rate(float(pp[origin[1:]].sum()), 0.0, kept_n) == pytest.approx(max(rates), rel=1e-6)
        else:  # no single kept group whose removal (with everything below it) would raise the rate
            value = lambda nodes: pruner.group_accept * sum(float(pp[u]) for u in {int(tree.parents[i]) for i in nodes})
            now = cost.rate(value(origin[1:]), 0.0, kept_n)
            assert kept_n == 0 or now > cost.rate(0.0, 0.0, 0) or math.isclose(now, cost.rate(0.0, 0.0, 0))
    else:
        assert kept_n == n


def check_whole_groups(tree: DraftTree, origin: list[int]) -> None:
    children, kept_set = tree.children_lists(), set(origin)
    for u in origin:
        kids = set(children.get(u, []))
        assert kids <= kept_set or not kids & kept_set, (u, kids, kept_set)


def test_random_trees_properties():
    rng = random.Random(0)
    for t in range(200):
        tree = random_tree(rng, scored=t % 2 == 1)
        for strategy in STRATEGIES:
            for random_draws in (False, True):
                pruner = random_pruner(rng, strategy, tree.num_drafted)
                result = pruner.prune(tree, random_draws=random_draws)
                origin = check_subtree(tree, result, credited=pruner.group_accept
                                       if strategy == "cost_aware" and random_draws else None)
                check_limits(tree, pruner, origin, random_draws)
                if random_draws:
                    check_whole_groups(tree, origin)
                again = pruner.prune(result.tree, random_draws=random_draws)  # origin composes
                check_subtree(tree, dataclasses.replace(again, drafted=tree.num_drafted),
                              credited=pruner.group_accept if strategy == "cost_aware" and random_draws else None)


def test_group_decisions_ignore_the_group_and_below():
    """With random child draws a sibling group is kept or dropped before looking at what was drawn:
    re-drawing the values of everything below a parent, and growing fewer nodes under its children
    (without replacement a node may get fewer children than the width; a dynamic search expands
    other nodes), never changes whether the parent's group is kept."""
    rng, g = random.Random(1), torch.Generator().manual_seed(1)
    strategies = STRATEGIES
    kept_groups = 0
    for t in range(200):
        tree = random_tree(rng, scored=t % 2 == 1)
        groups = tree.children_lists()
        u = rng.choice(sorted(groups))
        paths = [tree.path_to(i) for i in range(len(tree))]
        below = [i for i in range(1, len(tree)) if u in paths[i][:-1]]  # u's children and their subtrees
        deep = [i for i in below if len(paths[i]) - paths[i].index(u) > 2]  # under u's children
        cut = {i for i in deep if rng.random() < .3}
        stay = [i for i in range(len(tree)) if not set(paths[i]) & cut]  # closed under ancestors
        other, old = tree.select(stay)
        redraw = torch.tensor([j for j, i in enumerate(old.tolist()) if i in below])
        logprobs = other.logprobs.clone()
        logprobs[redraw] = torch.empty(len(redraw)).uniform_(-7, 0, generator=g)
        accept = None
        if tree.accept_prob is not None:
            accept = other.accept_prob.clone()
            accept[redraw] = 1 - torch.rand(len(redraw), generator=g)
        other = dataclasses.replace(other, logprobs=logprobs, accept_prob=accept, _anc=None)
        for strategy in strategies:
            pruner = random_pruner(rng, strategy, tree.num_drafted)
            first = groups[u][0]
            a = first in kept(pruner.prune(tree, random_draws=True))
            b = first in kept(TreePruner(pruner.cfg, pruner.cost).prune(other, random_draws=True))
            assert a == b, (t, strategy, pruner.cfg, u, sorted(cut))
            kept_groups += a
    assert kept_groups > 100


# ---------------------------------------------------------------------- greedy losslessness
GREEDY_STRATEGIES = {
    "none": {}, "threshold": dict(min_acceptance_prob=.05), "adaptive": dict(min_acceptance_prob=.05),
    "level": dict(level_topk=2), "ratio": dict(pruning_ratio=.4), "budget": dict(max_verify_nodes=5),
}
SHAPES = {
    "dynamic": dict(mode="dynamic", max_depth=4, max_candidates=3, max_nodes=12),
    "static": dict(mode="static", max_depth=3, branching=[3, 2, 1], max_nodes=16),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_target_with_every_strategy(arch):
    target = tiny_model(arch, seed=0)
    target.generation_config.eos_token_id = None
    draft = noisy_copy(target, 0.3)
    only = dataclasses.replace(BASE, decoding=dataclasses.replace(BASE.decoding, method="target_only", do_sample=False))
    reference = SpeculativeDecoder.from_models(target, None, None, only)
    g = torch.Generator().manual_seed(ARCHS.index(arch))
    case = 0
    for shape, search in SHAPES.items():
        for strategy, values in GREEDY_STRATEGIES.items():
            prompt = torch.randint(2, 96, (1, 3 + case % 7), generator=g)
            case += 1
            want, _ = reference.generate(prompt, max_new_tokens=24)
            config = dataclasses.replace(
                BASE, decoding=dataclasses.replace(BASE.decoding, method="tree", do_sample=False),
                tree_search=dataclasses.replace(BASE.tree_search, **search),
                pruning=pruning(strategy=strategy, **values))
            decoder = SpeculativeDecoder.from_models(target, draft, None, config)
            got, stats = decoder.generate(prompt, max_new_tokens=24)
            label = (arch, shape, strategy)
            assert got.tolist() == want.tolist(), label
            assert stats.new_tokens == 24 and stats.stop_reason == "max_new_tokens", label
            # verified = the policy's nodes (never more than the draft proposed) + the lookup branch's own
            assert stats.nodes_drafted >= stats.drafted_tokens - stats.lookup_nodes > 0, label
            assert 0 <= stats.pruned_fraction < 1 and math.isfinite(stats.expected_accepted), label
            if strategy == "none":
                assert stats.pruned_fraction == 0, label
            elif strategy in ("ratio", "budget", "level"):
                assert stats.pruned_fraction > 0, label


# ---------------------------------------------------------------------- sampling losslessness
PRUNED_VARIANTS = {
    # name: (mode, depth, width, branching, max_nodes, child_draw, temperature, top_k, top_p, pruning, table seed)
    # top-k children are deterministic: node-level pruning
    "dynamic-topk-budget": ("dynamic", 3, 2, [2, 2, 2], 6, "topk", 1.0, 0, 1.0,
                            dict(strategy="budget", max_verify_nodes=3), 11),
    "static-topk-threshold": ("static", 2, 3, [3, 2], 9, "topk", 1.0, 0, 1.0,
                              dict(strategy="threshold", min_acceptance_prob=.15), 11),
    # random children: whole sibling groups
    # (the budget's last group: the second depth-1 group or, when likelier, a depth-2 group)
    "dynamic-iid-budget": ("dynamic", 3, 2, [2, 2, 2], 8, "iid", 1.0, 0, 1.0, dict(strategy="budget", max_verify_nodes=6), 11),
    # cost_aware by whole groups, its group_accept estimate moving with every step's feedback
    "dynamic-iid-cost_aware": ("dynamic", 3, 2, [2, 2, 2], 8, "iid", 1.0, 0, 1.0,
                               dict(strategy="cost_aware", cost=linear_cost(1.0, draft=1.0)), 11),
    # top-p leaves some nodes fewer children than the width: a cap on all drafted nodes would keep
    # the root's group only when its children happen to have wide distributions (TV 0.2 here)
    "static-without_replacement-ratio": ("static", 2, 2, [2, 2], 6, "without_replacement", 1.0, 0, .8,
                                         dict(strategy="ratio", pruning_ratio=.8), 232),
}


def pruned_speculative_sample(table, search, pruner, to_probs, prompt, root, generator, counts, memo=None):
    """speculative_sample (helpers.py) with step 3 between drafting and verifying.
    ``memo`` caches (pruned tree, target logits) per context: only for top-k children and a
    stateless pruner, where both are deterministic functions of the context."""
    drafter = TableDrafter(table)
    drafter.prefill(torch.tensor([prompt]))
    out = []
    while len(out) < HORIZON:
        key = drafter.context + (root,)
        if memo is None or key not in memo:
            result = pruner.prune(search.grow(drafter, root, search.shape.max_depth, generator), search.random_draws)
            tree = result.tree
            logits = table.node_logits(drafter.context, tree, 0)
            counts[0] += result.drafted
            counts[1] += result.verified
            if memo is not None:
                memo[key] = tree, logits
        tree, logits = memo[key] if memo is not None else (tree, logits)
        path, nxt = verify_sampling(tree, logits, to_probs, search.child_draw, generator)
        if memo is None:
            pruner.observe(result.expected, len(path) - 1, search.random_draws)
        drafter.commit(tree, path)
        out += tree.tokens[path[1:]].tolist() + [nxt]
        root = nxt
    return tuple(out[:HORIZON])


def run_pruned_variant(name: str, n: int = N, seed: int = 0, variants=None):
    mode, depth, width, branching, max_nodes, draw, temperature, top_k, top_p, values, table_seed = \
        (variants or PRUNED_VARIANTS)[name]
    table = Table(seed=table_seed, noise=1.5)
    to_probs = memoized(lambda logits: logits_to_probs(logits, temperature, top_k, top_p))
    search = DraftTreeSearch(TreeShape(mode, depth, width, max_nodes, branching), to_probs, draw)
    values = dict(values)
    cost = values.pop("cost", None)
    pruner = TreePruner(pruning(**values), cost)
    deterministic = draw == "topk" and pruner.strategy != "adaptive"
    memo = {} if deterministic else None
    prompt, root = [3, 1, 4], 2
    generator = torch.Generator().manual_seed(seed)
    counts = [0, 0]  # nodes drafted, verified
    with torch.inference_mode():  # the same draws, less autograd bookkeeping per op
        samples = [pruned_speculative_sample(table, search, pruner, to_probs, prompt, root, generator, counts, memo)
                   for _ in range(n)]
    return samples, exact_distribution(table, to_probs, tuple(prompt) + (root,)), counts


@pytest.mark.parametrize("name", list(PRUNED_VARIANTS))
def test_pruned_sampling_is_lossless(name):
    samples, probs, (drafted, verified) = run_pruned_variant(name)
    assert 0 < verified < drafted  # the pruner cut nodes, and kept some
    pvalue, tv, bound = goodness_of_fit(samples, probs)
    assert pvalue > P_MIN and tv < bound, f"{name}: chi2 p={pvalue:.2e} TV={tv:.4f} bound={bound:.4f}"


def test_node_level_pruning_of_random_draws_is_biased(monkeypatch):
    """Why random draws are pruned by whole groups: keeping the likelier of the drawn siblings biases
    the proposal, and the goodness-of-fit test sees it (with a tenth of the samples)."""
    import models.policy.tree_pruner as tree_pruner

    monkeypatch.setattr(tree_pruner.TreePruner, "_keep_groups",
                        lambda self, tree, pp: self._keep_nodes(tree, pp, 0.0))
    variants = {"iid-nodes": ("static", 1, 3, [3], 3, "iid", 1.0, 0, 1.0, dict(strategy="budget", max_verify_nodes=1), 11)}
    samples, probs, _ = run_pruned_variant("iid-nodes", n=N // 10, variants=variants)
    pvalue, tv, bound = goodness_of_fit(samples, probs)
    assert pvalue < P_MIN, f"negative control passed: chi2 p={pvalue:.2e} TV={tv:.4f} bound={bound:.4f}"


# ---------------------------------------------------------------------- refusals
BAD = [  # (override, key named in the error, value set on a built config)
    ("pruning.strategy=bogus", "pruning.strategy", ("strategy", "bogus")),
    ("pruning.min_acceptance_prob=1.5", "pruning.min_acceptance_prob", ("min_acceptance_prob", 1.5)),
    ("pruning.pruning_ratio=1.0", "pruning.pruning_ratio", ("pruning_ratio", 1.0)),
    ("pruning.max_verify_nodes=0", "pruning.max_verify_nodes", ("max_verify_nodes", 0)),
    ("pruning.adaptive_pruning=true", "pruning.adaptive_pruning", ("adaptive_pruning", True)),
]


@pytest.fixture(scope="module")
def decoder():
    target = tiny_model("llama")
    target.generation_config.eos_token_id = None
    config = SpeculativeDecodingConfig.from_overrides(["decoding=sampling", "tree_search.child_draw=iid",
                                                       "pruning=budget", "tree_search.max_depth=2"])
    return SpeculativeDecoder.from_models(target, noisy_copy(target, 0.3), None, config)


@pytest.mark.parametrize("override,key,assign", BAD, ids=[b[1] for b in BAD])
def test_bad_pruning_values_refused(override, key, assign, decoder):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        SpeculativeDecodingConfig.from_overrides(["pruning=budget", override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        pruning(**{"strategy": "budget", **dict([assign])})
    prompt = torch.tensor([[5, 6, 7]])
    field, value = assign
    good = getattr(decoder.config.pruning, field)
    setattr(decoder.config.pruning, field, value)
    try:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            decoder.generate(prompt, max_new_tokens=4)
    finally:
        setattr(decoder.config.pruning, field, good)
    _, stats = decoder.generate(prompt, max_new_tokens=4)  # usable again once the value is put back
    assert stats.new_tokens == 4


@pytest.mark.parametrize("draw", ["iid", "without_replacement"])
def test_cost_aware_with_random_child_draws(draw, decoder):
    """Allowed since cost_aware prunes random draws by whole groups; runs end to end."""
    overrides = ["pruning=cost_aware", "decoding=sampling", f"tree_search.child_draw={draw}"]
    assert SpeculativeDecodingConfig.from_overrides(overrides).pruning.strategy == "cost_aware"
    prompt = torch.tensor([[5, 6, 7]])
    old = decoder.config.tree_search.child_draw, decoder.config.pruning.strategy, decoder.config.pruning.cost_profile
    decoder.config.tree_search.child_draw, decoder.config.pruning.strategy = draw, "cost_aware"
    try:
        _, stats = decoder.generate(prompt, max_new_tokens=12, do_sample=True, temperature=1.0)
        assert stats.new_tokens == 12 and stats.steps >= 1
    finally:
        decoder.config.tree_search.child_draw, decoder.config.pruning.strategy, decoder.config.pruning.cost_profile = old


def test_pruner_refusals():
    with pytest.raises(ValueError, match="cost profile"):
        TreePruner(pruning(strategy="cost_aware"))
    cfg = pruning(strategy="budget")
    cfg.strategy = "bogus"  # past validation
    with pytest.raises(ValueError, match="bogus"):
        TreePruner(cfg)


@pytest.mark.parametrize("strategy", ["threshold", "adaptive", "budget"])
def test_early_stop_never_changes_what_is_kept(strategy):
    """stop_drafting (threshold / budget) is exact: when it says stop, no child the next level could
    draft under the frontier would have been kept, so the pruned tree is the same either way."""
    rng, stops = random.Random(7), 0
    for _ in range(300):
        n = rng.randint(2, 30)
        spec = [(rng.randrange(i), rng.uniform(1e-3, 1.0)) for i in range(1, n + 1)]
        scored = rng.random() < .5
        accept = [1.0 if rng.random() < .15 else 1.0 - rng.random() for _ in range(n)] if scored else None
        tree = build(spec, accept=accept)
        deepest = int(tree.depth.max())
        frontier = (tree.depth == deepest).nonzero().flatten().tolist()
        pruner = random_pruner(rng, strategy, n)
        if not pruner.stop_drafting(tree, frontier):
            continue
        stops += 1
        extra = [(rng.choice(frontier), rng.uniform(1e-3, 1.0)) for _ in range(rng.randint(1, 6))]
        more = [1.0 if rng.random() < .3 else 1.0 - rng.random() for _ in extra] if scored else None
        bigger = build(spec + extra, accept=None if accept is None else accept + more)
        assert kept(pruner.prune(tree)) == kept(pruner.prune(bigger))
    assert stops > 20  # the property was exercised
