"""Prompt lookup (models/decoding/lookup.py): the index, merging a chain into a tree, and the decoder with it."""

import dataclasses

import pytest
import torch
from conftest import tiny_model

from models.decoding.lookup import PromptLookup, add_lookup_branch, next_lookup_span
from models.decoding.tree import DraftTree
from models.errors import ConfigError
from speculative_decoder import SpeculativeDecoder, SpeculativeDecodingConfig


def test_longest_suffix_latest_occurrence():
    lk = PromptLookup([5, 1, 2, 3, 9, 7, 2, 3, 4, 1, 2], max_ngram=3, min_ngram=1)
    # suffix [1, 2] (no earlier [4, 1, 2]): its latest earlier occurrence is at 1..2, followed by 3, 9, 7
    assert lk.propose(3) == [3, 9, 7]
    lk.extend([3])  # suffix [1, 2, 3] occurred at 1..3 -> 9, 7, 2, 3, 4, 1, 2, 3 ... (capped)
    assert lk.propose(4) == [9, 7, 2, 3]
    lk.extend([8])  # 8 never occurred, and no longer suffix matches
    assert lk.propose(4) == []
    assert lk.propose(0) == []


def test_prefers_longer_ngram_and_recent_match():
    lk = PromptLookup([1, 2, 6, 0, 2, 7, 2], max_ngram=2, min_ngram=1)
    assert lk.propose(1) == [7]  # 1-gram [2]: latest earlier occurrence at 4 -> 7
    lk = PromptLookup([1, 2, 6, 0, 2, 7, 1, 2], max_ngram=2, min_ngram=1)
    assert lk.propose(1) == [6]  # 2-gram [1, 2] beats the more recent 1-gram match
    lk = PromptLookup([1, 2, 6, 0, 2, 7, 1, 2], max_ngram=2, min_ngram=2)
    lk.extend([5])
    assert lk.propose(2) == []  # min_ngram=2: a lone matching token is not enough


def test_invalid_ngram_range():
    with pytest.raises(ValueError, match="min_ngram"):
        PromptLookup([1, 2], max_ngram=1, min_ngram=2)


def test_merge_walks_drafted_nodes_then_appends_fixed_chain():
    tree = DraftTree.from_root(3)
    a, b = tree.add_children(torch.tensor([0, 0]), torch.tensor([4, 7]), torch.log(torch.tensor([0.6, 0.3]))).tolist()
    c = int(tree.add_children(torch.tensor([a]), torch.tensor([5]), torch.tensor([-0.1]))[0])
    sub, _ = tree.select([c, b])  # as after pruning: origin maps to the grown tree
    added = add_lookup_branch(sub, [4, 5, 9, 9])
    assert added == 2
    assert sub.tokens.tolist() == [3, 4, 7, 5, 9, 9]
    assert sub.parents.tolist() == [-1, 0, 0, 1, 3, 4]
    assert sub.fixed.tolist() == [False] * 4 + [True] * 2
    assert sub.origin.tolist() == [0, 1, 2, 3, -1, -1]  # new nodes map to nothing the draft grew
    assert sub.depth.tolist() == [0, 1, 1, 2, 3, 4]
    assert add_lookup_branch(sub, [4, 5]) == 0 and len(sub) == 6  # already in the tree
    assert add_lookup_branch(sub, []) == 0
    # a scored tree: the new nodes get zero features / predicted acceptance (not scored)
    scored = DraftTree.from_root(1)
    scored.add_children(torch.tensor([0]), torch.tensor([2]), torch.zeros(1), torch.ones(1, 3), torch.full((1,), 0.5))
    add_lookup_branch(scored, [8])
    assert scored.features.shape == (3, 3) and scored.features[2].abs().sum() == 0
    assert scored.accept_prob.tolist() == [1.0, 0.5, 0.0]
    # select keeps the flags
    kept, _ = sub.select([5])
    assert kept.tokens.tolist() == [3, 4, 5, 9, 9] and kept.fixed.tolist() == [False, False, False, True, True]


def test_copy_mode_span_doubles_on_whole_copies_and_resets_on_a_miss():
    grow = lambda span, copy, accepted: next_lookup_span(span, copy, accepted, base=4, max_span=16)
    assert grow(4, [1, 2, 3, 4], [1, 2, 3, 4]) == 8  # whole copy accepted: double
    assert grow(8, [1] * 8, [1] * 8 + [5]) == 16  # more accepted than copied (draft nodes below): still whole
    assert grow(16, [1] * 16, [1] * 16) == 16  # capped
    assert grow(16, [1, 2, 3], [1, 2, 3]) == 16  # a shorter copy (text ran out) accepted whole: keep
    assert grow(16, [1, 2, 3, 4], [1, 2, 9]) == 4  # a miss: back to the base span
    assert grow(8, [], [7, 7]) == 8  # no match this step: keep
    assert next_lookup_span(4, [1, 2, 3, 4], [1, 2, 3, 4], base=4, max_span=0) == 4  # copy mode off


def _config(base, lookup_tokens, **search):
    search.setdefault("lookup_max_tokens", 0)  # a fixed span unless a test asks for copy mode
    return dataclasses.replace(
        base, decoding=dataclasses.replace(base.decoding, method="tree", do_sample=False),
        tree_search=dataclasses.replace(base.tree_search, mode="dynamic", max_depth=3, max_candidates=2, max_nodes=6,
                                        lookup_tokens=lookup_tokens, **search))


def test_lookup_adds_accepted_tokens_and_stays_exact(default_config):
    """A random draft almost never agrees with the target, but tiny random targets fall into loops
    that the lookup branch copies: same tokens as the target alone, fewer target forwards."""
    target = tiny_model("llama", seed=0)
    target.generation_config.eos_token_id = None
    draft = tiny_model("llama", seed=7)
    plain = SpeculativeDecoder.from_models(target, draft, None, _config(default_config, 0))
    looked = SpeculativeDecoder.from_models(target, draft, None, _config(default_config, 8))
    short = SpeculativeDecoder.from_models(target, draft, None, _config(default_config, 2))
    copying = SpeculativeDecoder.from_models(target, draft, None, _config(default_config, 2, lookup_max_tokens=16))
    forwards = {0: 0, 8: 0, 2: 0, "copy": 0}
    lookup_accepted = 0
    for prompt in ([5, 9, 5, 9, 5], [11, 12, 13], [40, 2, 40, 2, 40, 2]):
        ids = torch.tensor([prompt])
        a, sa = plain.generate(ids, max_new_tokens=48)
        b, sb = looked.generate(ids, max_new_tokens=48)
        d, sd = short.generate(ids, max_new_tokens=48)
        c, sc = copying.generate(ids, max_new_tokens=48)
        assert a.tolist() == b.tolist() == d.tolist() == c.tolist()
        assert sa.lookup_nodes == 0 and sa.lookup_accepted == 0
        forwards[0] += sa.target_forwards
        forwards[8] += sb.target_forwards
        forwards[2] += sd.target_forwards
        forwards["copy"] += sc.target_forwards
        lookup_accepted += sb.lookup_accepted
        for s in (sb, sc):
            assert s.lookup_accepted <= s.accepted_tokens and s.lookup_nodes <= s.drafted_tokens
    assert lookup_accepted > 0 and forwards[8] < forwards[0]
    # copy mode starts at 2 tokens and doubles through the loops: fewer forwards than a fixed 2
    assert forwards["copy"] < forwards[2]


def test_lookup_config_is_validated(default_config):
    with pytest.raises(ConfigError, match="lookup_tokens"):
        SpeculativeDecodingConfig.from_overrides(["tree_search.lookup_tokens=-1"])
    with pytest.raises(ConfigError, match="lookup_min_ngram"):
        SpeculativeDecodingConfig.from_overrides(["tree_search.lookup_min_ngram=4", "tree_search.lookup_max_ngram=2"])
    with pytest.raises(ConfigError, match="lookup_max_tokens"):
        SpeculativeDecodingConfig.from_overrides(["tree_search.lookup_max_tokens=-1"])
    assert SpeculativeDecodingConfig.from_overrides(["tree_search.lookup_tokens=10"]).tree_search.lookup_max_tokens == 8
    cfg = SpeculativeDecodingConfig.from_overrides([])
    cfg.tree_search.lookup_max_tokens = -2  # set after the config was built
    with pytest.raises(ConfigError, match="lookup_max_tokens"):
        cfg.validate()
    cfg.tree_search.lookup_max_tokens = 0
    cfg.tree_search.lookup_min_ngram = 0  # set after the config was built: refused at use
    with pytest.raises(ConfigError, match="lookup_min_ngram"):
        cfg.validate()
