"""Tree-masked target logits equal sequential decoding, on stock HF models (no forked code)."""

import pytest
import torch
from conftest import ARCHS, example_tree, sequential_logits, tiny_model

from models.decoding.kv_cache import keep_tokens, new_cache


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_tree_logits_match_sequential(arch, attn):
    model = tiny_model(arch, attn=attn)
    prefix = torch.randint(2, 96, (11,), generator=torch.Generator().manual_seed(0)).tolist()
    tree = example_tree(96)
    cache = new_cache(model)
    with torch.no_grad():
        model(input_ids=torch.tensor([prefix]), past_key_values=cache, use_cache=True)
        out = model(input_ids=tree.tokens[None], position_ids=tree.position_ids(len(prefix)),
                    attention_mask=tree.attention_mask(len(prefix)), past_key_values=cache, use_cache=True)
    for node in range(len(tree)):
        path = tree.path_to(node)
        want = sequential_logits(model, prefix, tree.tokens[path].tolist())
        torch.testing.assert_close(out.logits[0, node], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_gathered_cache_equals_fresh_prefill(arch):
    """After keeping prefix + one root->leaf path, the cache equals a prefill of those tokens."""
    model = tiny_model(arch)
    prefix = list(range(10, 20))
    tree = example_tree(96)
    path = tree.path_to(8)  # root, b, f, h: non-contiguous node indices
    cache = new_cache(model)
    with torch.no_grad():
        model(input_ids=torch.tensor([prefix]), past_key_values=cache, use_cache=True)
        model(input_ids=tree.tokens[None], position_ids=tree.position_ids(len(prefix)),
              attention_mask=tree.attention_mask(len(prefix)), past_key_values=cache, use_cache=True)
        keep_tokens(cache, len(prefix), path)
        fresh = new_cache(model)
        model(input_ids=torch.tensor([prefix + tree.tokens[path].tolist()]), past_key_values=fresh, use_cache=True)
    assert cache.get_seq_length() == fresh.get_seq_length() == len(prefix) + len(path)
    for a, b in zip(cache.layers, fresh.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)


def test_select_is_closed_under_ancestors_and_keeps_origin():
    tree = example_tree(96)
    sub, old = tree.select([7])  # g: needs d and a
    assert old.tolist() == [0, 1, 4, 7]
    assert sub.parents.tolist() == [-1, 0, 1, 2]
    assert sub.depth.tolist() == [0, 1, 2, 3]
    sub2, _ = sub.select([1])
    assert sub2.grown_index([0, 1]) == [0, 1]
    assert sub.grown_index([3]) == [7]


def test_mask_and_positions():
    tree = example_tree(96)
    mask = tree.attention_mask(4)
    assert mask.shape == (1, 1, len(tree), 4 + len(tree))
    visible = mask[0, 0] == 0
    assert visible[:, :4].all()
    assert visible[7, 4:].nonzero().flatten().tolist() == [0, 1, 4, 7]
    assert tree.position_ids(4).tolist() == [[4 + d for d in tree.depth.tolist()]]
