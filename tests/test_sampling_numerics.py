"""The documented numerical rules of models/decoding/sampling.py and models/decoding/verification.py."""

import pytest
import torch

from models.decoding.sampling import NumericalError, draw_children, logits_to_probs
from models.decoding.tree import DraftTree
from models.decoding.verification import verify_sampling

inf, nan = float("inf"), float("nan")


def test_temperature_top_k_top_p_in_order():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    p = logits_to_probs(logits, temperature=1.0)
    torch.testing.assert_close(p, torch.softmax(logits, -1))
    p = logits_to_probs(logits, temperature=0.5, top_k=2)
    torch.testing.assert_close(p, torch.cat([torch.softmax(torch.tensor([6.0, 4.0]), -1), torch.zeros(2)]))
    full = torch.softmax(logits, -1)  # [0.644, 0.237, 0.087, 0.032]
    p = logits_to_probs(logits, top_p=0.85)  # 0.644 < 0.85 -> keep the second, then stop
    assert (p > 0).tolist() == [True, True, False, False]
    torch.testing.assert_close(p[:2], full[:2] / full[:2].sum())
    assert logits_to_probs(logits, top_p=0.1).tolist() == [1.0, 0.0, 0.0, 0.0]  # the best always stays


def test_temperature_zero_is_one_hot_argmax():
    assert logits_to_probs(torch.tensor([0.1, 0.7, 0.7]), temperature=0.0).tolist() == [0.0, 1.0, 0.0]


def test_nan_and_inf_rules():
    p = logits_to_probs(torch.tensor([nan, 1.0, 1.0, -inf]))
    assert p.tolist() == [0.0, 0.5, 0.5, 0.0]
    p = logits_to_probs(torch.tensor([inf, 1.0, inf, 5.0]))
    assert p.tolist() == [0.5, 0.0, 0.5, 0.0]
    with pytest.raises(NumericalError):
        logits_to_probs(torch.tensor([nan, -inf]))


def test_draws_never_pick_zero_probability_tokens():
    q = torch.tensor([0.0, 0.5, 0.5, 0.0])
    g = torch.Generator().manual_seed(0)
    assert sorted(draw_children(q, 4, "topk", g).tolist()) == [1, 2]  # capped at the support
    assert sorted(draw_children(q, 4, "without_replacement", g).tolist()) == [1, 2]
    assert set(draw_children(q, 50, "iid", g).tolist()) <= {1, 2}


def one_child_tree(token: int, q: torch.Tensor) -> DraftTree:
    tree = DraftTree.from_root(0)
    tree.add_children(torch.tensor([0]), torch.tensor([token]), torch.tensor([0.0]))
    tree.draft_probs[0] = q
    return tree


def test_identical_p_and_q_always_accept_and_empty_residual_falls_back():
    p = torch.tensor([0.25, 0.25, 0.5])
    logits = p.log().expand(2, 3)
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        path, nxt = verify_sampling(one_child_tree(2, p), logits, lambda l: torch.softmax(l, -1), "iid", g)
        assert path == [0, 1]
    # p == q except for rounding: a rejection would leave max(p - q, 0) ~ 0; the rule falls back to p
    q = p + torch.tensor([1e-9, -1e-9, 0.0])
    path, nxt = verify_sampling(one_child_tree(0, q), logits, lambda l: torch.softmax(l, -1), "iid", g)
    assert 0 <= nxt < 3


def test_zero_q_child_is_never_accepted():
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    q = torch.tensor([0.0, 0.5, 0.5])
    g = torch.Generator().manual_seed(2)
    for _ in range(50):
        path, _ = verify_sampling(one_child_tree(0, q), logits, lambda l: torch.softmax(l, -1), "iid", g)
        assert path == [0]
