"""Speculative sampling is lossless: emitted tokens are distributed exactly as target-only sampling.

Method. A synthetic pair whose logits are a fixed function of the context (a seeded table, so the
exact target distribution of the next three tokens can be enumerated), the real tree search and the
real verification. For every variant we draw N continuations of three tokens and compare the
empirical joint distribution with the exact one:
- chi-square goodness of fit, accepted when p > 1e-3 (cells with expected count < 5 pooled);
- total variation below a bound derived from N: E[TV] <= 1/2 sum_i sqrt(p_i (1 - p_i) / N), and TV
  moves by at most 1/N per sample, so by McDiarmid P(TV > E[TV] + t) <= exp(-2 N t^2); t is set
  for a 1e-3 false-alarm rate.
A negative control (rejections that skip the residual update) must fail the same test.
"""

import dataclasses

import pytest
import torch
from conftest import (
    P_MIN,
    N,
    Table,
    V,
    exact_distribution,
    goodness_of_fit,
    memoized,
    speculative_sample,
    tiny_model,
)

import models.decoding.verification as verification
from models.decoding.sampling import logits_to_probs
from models.decoding.tree_search import DraftTreeSearch, TreeShape

VARIANTS = {
    # name: (mode, depth, width, branching, max_nodes, child_draw, temperature, top_k, top_p)
    "chain": ("static", 3, 1, [1, 1, 1], 3, "iid", 1.0, 0, 1.0),
    "static-topk": ("static", 2, 2, [2, 2], 6, "topk", 1.0, 0, 1.0),
    "static-iid": ("static", 2, 2, [2, 2], 6, "iid", 0.8, 0, 1.0),
    "static-without_replacement": ("static", 2, 3, [3, 2], 9, "without_replacement", 1.0, 4, 1.0),
    "dynamic-topk": ("dynamic", 3, 2, [2, 2, 2], 5, "topk", 1.0, 0, 0.9),
    "dynamic-iid": ("dynamic", 3, 2, [2, 2, 2], 5, "iid", 1.0, 0, 1.0),
    "dynamic-without_replacement": ("dynamic", 3, 2, [2, 2, 2], 6, "without_replacement", 0.7, 0, 0.95),
    # with the prompt-lookup branch: deterministic nodes after (or below) the drawn ones
    "chain-lookup": ("static", 2, 1, [1, 1], 2, "iid", 1.0, 0, 1.0),
    "dynamic-iid-lookup": ("dynamic", 2, 2, [2, 2], 4, "iid", 1.0, 0, 1.0),
    "static-without_replacement-lookup": ("static", 2, 2, [2, 1], 4, "without_replacement", 0.8, 3, 1.0),
    # copy mode: a 1-token lookup span that doubles (to 2, then 4) while whole copies are accepted
    "dynamic-iid-copy": ("dynamic", 2, 2, [2, 2], 4, "iid", 1.0, 0, 1.0),
}
LOOKUP_TOKENS = 3  # for the *-lookup variants; V = 5 tokens, so the context repeats n-grams often
COPY_SPAN = (1, 4)  # for the *-copy variants: lookup_tokens, lookup_max_tokens


def run_variant(name: str, n: int = N, seed: int = 0, verify=None):
    """N samples of variant ``name`` (one generator seeded with ``seed`` for all of them) and the exact
    law. Under ``torch.inference_mode``: the same operations and draws, less autograd bookkeeping per op
    (the samples are identical to those drawn outside it). ``verify`` replaces ``verify_sampling``."""
    mode, depth, width, branching, max_nodes, draw, temperature, top_k, top_p = VARIANTS[name]
    table = Table(seed=11, noise=1.5)
    to_probs = memoized(lambda logits: logits_to_probs(logits, temperature, top_k, top_p))
    search = DraftTreeSearch(TreeShape(mode, depth, width, max_nodes, branching), to_probs, draw)
    prompt, root = [3, 1, 4], 2
    generator = torch.Generator().manual_seed(seed)
    lookup, lookup_max = (LOOKUP_TOKENS, 0) if name.endswith("-lookup") else COPY_SPAN if name.endswith("-copy") else (0, 0)
    memo = {} if draw == "topk" and not lookup else None  # deterministic trees: grown once per context
    with torch.inference_mode():
        samples = [speculative_sample(table, search, to_probs, prompt, root, generator, lookup, lookup_max,
                                      verify=verify, memo=memo) for _ in range(n)]
    return samples, exact_distribution(table, to_probs, tuple(prompt) + (root,))


@pytest.mark.parametrize("name", list(VARIANTS))
def test_sampling_is_lossless(name):
    samples, probs = run_variant(name)
    pvalue, tv, bound = goodness_of_fit(samples, probs)
    assert pvalue > P_MIN and tv < bound, f"{name}: chi2 p={pvalue:.2e} TV={tv:.4f} bound={bound:.4f}"


@pytest.mark.parametrize("name", ["chain", "dynamic-without_replacement"])
def test_negative_control_has_power(name, monkeypatch):
    """Skipping the residual update after a rejection is biased; the test must catch it."""
    monkeypatch.setattr(verification, "_renormalize", lambda residual, fallback: fallback)
    samples, probs = run_variant(name)
    pvalue, tv, bound = goodness_of_fit(samples, probs)
    assert pvalue < P_MIN, f"negative control passed: chi2 p={pvalue:.2e} TV={tv:.4f} bound={bound:.4f}"


def test_lookup_negative_control_has_power():
    """Treating the lookup branch's deterministic nodes as draws from the draft (ratio test against q)
    is biased; the goodness-of-fit test must catch it, so the point-mass rule is what it verifies."""
    real = verification.verify_sampling

    def ignore_fixed(tree, logits, to_probs, child_draw, generator):
        if tree.fixed is not None:
            for node in tree.parents[tree.fixed].tolist():  # a lookup-only parent gets a uniform q
                tree.draft_probs.setdefault(node, torch.full((V,), 1.0 / V))
            tree.fixed = None
        return real(tree, logits, to_probs, child_draw, generator)

    samples, probs = run_variant("dynamic-iid-lookup", verify=ignore_fixed)
    pvalue, tv, bound = goodness_of_fit(samples, probs)
    assert pvalue < P_MIN, f"negative control passed: chi2 p={pvalue:.2e} TV={tv:.4f} bound={bound:.4f}"


@pytest.mark.parametrize("draft_kind", ["hf", "eagle_reduced_vocab", "eagle3_reduced_vocab", "hf_invariant_kernels"])
def test_decoder_sampling_end_to_end(draft_kind, default_config):
    """The full decoder (caches, prefill sample, generator plumbing, target hidden states for an EAGLE
    head, or the aux-layer states of an EAGLE-3 draft, whose reduced vocabulary leaves q = 0 on some
    tokens) on a real tiny model.

    Three new tokens: the first comes from the prefill, the next step drafts one level under it, so
    (token 2, token 3) is drafted-then-verified output; its exact law is enumerated from the target."""
    from models.drafters.eagle import EagleConfig, EagleDrafter, EagleHead
    from speculative_decoder import SpeculativeDecoder

    # hf_invariant_kernels: target and draft on treespec's batch-invariant linear kernel and attention
    # (head size 16, so the attention kernel runs rather than its SDPA fallback)
    invariant = draft_kind == "hf_invariant_kernels"
    if invariant:
        from models.kernels import invariant_attention, invariant_gemm
        from models.kernels.fast_linear import set_linear_kernel

        if not invariant_gemm.available():
            pytest.skip("no AVX-512 CPU or no C++ compiler here")
    head_dim = 16 if invariant else None
    target = tiny_model("llama", vocab=6, head_dim=head_dim)
    target.generation_config.eos_token_id = None
    with torch.no_grad():
        target.get_output_embeddings().weight.mul_(0.15)  # undo part of the sharpening: spread-out p
    if draft_kind in ("hf", "hf_invariant_kernels"):
        draft = tiny_model("llama", vocab=6, seed=3, head_dim=head_dim)
        if invariant:
            for model in (target, draft):
                set_linear_kernel(model, "invariant")
                model.set_attn_implementation(invariant_attention.register())
    elif draft_kind == "eagle3_reduced_vocab":
        from models.drafters.eagle3 import Eagle3Config, Eagle3Draft

        torch.manual_seed(3)
        head = Eagle3Draft(Eagle3Config.for_target(target, 4, [0, 1, 2]), target.get_input_embeddings().weight)
        head.set_draft_vocab(torch.tensor([0, 2, 3, 5]))
        draft = EagleDrafter(head.eval())
    else:
        torch.manual_seed(3)
        head = EagleHead(EagleConfig.from_target(target, [0, 2, 3, 5]), target.get_input_embeddings().weight,
                         target.get_output_embeddings().weight)
        draft = EagleDrafter(head.eval())
    config = dataclasses.replace(
        default_config,
        decoding=dataclasses.replace(default_config.decoding, method="tree", do_sample=True, temperature=1.0),
        tree_search=dataclasses.replace(default_config.tree_search, mode="dynamic", max_depth=2, max_candidates=2,
                                        max_nodes=4, child_draw="without_replacement"),
        # every drafted node verified: what is tested is the sampling path, whatever this machine's
        # (cached, possibly noisy) cost profile of a tiny model would prune
        pruning=dataclasses.replace(default_config.pruning, strategy="none"))
    decoder = SpeculativeDecoder.from_models(target, draft, None, config)
    prompt = torch.tensor([[2, 3]])
    n = 3000
    samples = []
    with torch.inference_mode():  # the decoder's own code and draws (identical samples), less autograd bookkeeping
        for s in range(n):
            out, stats = decoder.generate(prompt, max_new_tokens=3, seed=s)
            samples.append(tuple(out[0, 3:].tolist()))
            assert stats.drafted_tokens > 0
    with torch.no_grad():
        p1 = torch.softmax(target(prompt).logits[0, -1], -1)
        probs = {(b, c): 0.0 for b in range(6) for c in range(6)}
        for a in range(6):
            p2 = torch.softmax(target(torch.tensor([[2, 3, a]])).logits[0, -1], -1)
            for b in range(6):
                p3 = torch.softmax(target(torch.tensor([[2, 3, a, b]])).logits[0, -1], -1)
                for c in range(6):
                    probs[(b, c)] += float(p1[a] * p2[b] * p3[c])
    pvalue, tv, bound = goodness_of_fit(samples, probs)
    assert pvalue > P_MIN and tv < bound, f"chi2 p={pvalue:.2e} TV={tv:.4f} bound={bound:.4f}"


def test_sampling_is_reproducible_and_greedy_at_temperature_zero(default_config):
    from speculative_decoder import SpeculativeDecoder

    target = tiny_model("llama")
    target.generation_config.eos_token_id = None
    config = dataclasses.replace(default_config, decoding=dataclasses.replace(
        default_config.decoding, method="tree", do_sample=True, temperature=1.0))
    decoder = SpeculativeDecoder.from_models(target, tiny_model("llama", seed=5), None, config)
    prompt = torch.tensor([[4, 5, 6]])
    state = torch.random.get_rng_state()
    a, _ = decoder.generate(prompt, max_new_tokens=20, seed=123)
    b, _ = decoder.generate(prompt, max_new_tokens=20, seed=123)
    c, _ = decoder.generate(prompt, max_new_tokens=20, seed=124)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(state, torch.random.get_rng_state())  # no global RNG side effects
    greedy, _ = decoder.generate(prompt, max_new_tokens=20, temperature=0.0)
    plain, _ = decoder.generate(prompt, max_new_tokens=20, do_sample=False)
    with torch.no_grad():
        want = target.generate(prompt, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(prompt))
    assert greedy.tolist() == plain.tolist() == want.tolist()
