"""The core invariant: greedy speculative output == target-only greedy output, token for token."""

import dataclasses

import pytest
import torch
from conftest import (
    ARCHS,
    SEARCHES,
    hf_greedy,
    make_config,
    noisy_copy,
    prompts,
    tiny_model,
)

from models.decoding.kv_cache import cache_length
from speculative_decoder import SpeculativeDecoder


@pytest.mark.parametrize("search", list(SEARCHES))
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_target(arch, search, default_config):
    target = tiny_model(arch, seed=0)
    target.generation_config.eos_token_id = None
    drafts = {"same": target, "noisy": noisy_copy(target, 0.3), "random": tiny_model(arch, seed=7)}
    for name, draft in drafts.items():
        config = make_config(default_config, search)
        decoder = SpeculativeDecoder.from_models(target, draft, None, config)
        for prompt in prompts(3, seed=len(name)):
            want = hf_greedy(target, prompt, 24)
            got, stats = decoder.generate(torch.tensor([prompt]), max_new_tokens=24)
            assert got[0].tolist() == want, (arch, search, name, prompt)
            assert stats.new_tokens == 24 and stats.stop_reason == "max_new_tokens"
            if name == "same":  # a perfect draft is always accepted to full depth
                assert stats.acceptance_rate > 0 and stats.mean_accepted_length > 1


@pytest.mark.parametrize("search", list(SEARCHES))
def test_max_new_tokens_boundaries(search, default_config):
    target = tiny_model("llama")
    target.generation_config.eos_token_id = None
    decoder = SpeculativeDecoder.from_models(target, noisy_copy(target, 0.1), None, make_config(default_config, search))
    prompt = [5, 9, 17]
    full = hf_greedy(target, prompt, 20)
    for n in range(1, 21):
        got, stats = decoder.generate(torch.tensor([prompt]), max_new_tokens=n)
        assert got[0].tolist() == full[: len(prompt) + n]
        assert stats.new_tokens == n


@pytest.mark.parametrize("search", list(SEARCHES))
def test_eos_inside_accepted_path(search, default_config):
    target = tiny_model("qwen2")
    target.generation_config.eos_token_id = None
    prompt = [7, 3, 44, 12]
    free = hf_greedy(target, prompt, 30)[len(prompt):]
    for cut in (0, 1, 5, 11):  # make the token at position `cut` the EOS
        eos = free[cut]
        first = free.index(eos)
        target.generation_config.eos_token_id = eos
        decoder = SpeculativeDecoder.from_models(target, target, None, make_config(default_config, search))
        got, stats = decoder.generate(torch.tensor([prompt]), max_new_tokens=30)
        assert got[0].tolist() == prompt + free[: first + 1]
        assert stats.stop_reason == "eos"
        assert got[0].tolist() == hf_greedy(target, prompt, 30, eos=eos)
    target.generation_config.eos_token_id = None


@pytest.mark.parametrize("search", list(SEARCHES))
def test_stops_at_context_limit(search, default_config):
    target = tiny_model("llama", context=32)
    target.generation_config.eos_token_id = None
    decoder = SpeculativeDecoder.from_models(target, target, None, make_config(default_config, search))
    prompt = list(range(2, 22))  # 20 tokens, 12 positions left
    got, stats = decoder.generate(torch.tensor([prompt]), max_new_tokens=100)
    assert got.shape[1] == 32 and stats.stop_reason == "context"
    assert got[0].tolist() == hf_greedy(target, prompt, 12)


@pytest.mark.parametrize("search", list(SEARCHES))
def test_caches_hold_prefix_plus_accepted(search, default_config):
    """After every step both caches equal a fresh prefill of exactly the committed tokens."""
    from models.decoding.kv_cache import new_cache

    target = tiny_model("llama")
    target.generation_config.eos_token_id = None
    draft = noisy_copy(target, 0.3)
    decoder = SpeculativeDecoder.from_models(target, draft, None, make_config(default_config, search))
    cfg = decoder._decoding({})
    prompt = torch.tensor([[4, 8, 15, 16, 23, 42]])
    committed = prompt[0].tolist()
    steps = decoder._decode(prompt, 30, cfg)
    emitted, _ = next(steps)  # prefill: the first root
    committed += emitted
    checked = 0
    caches = {}

    def spy(tree, prefix, cache, *args):
        caches["target"] = cache
        return real(tree, prefix, cache, *args)

    real = decoder._target_tree_forward
    decoder._target_tree_forward = spy
    for emitted, stats in steps:
        committed += emitted
        if stats.stop_reason:
            break
        # target: everything but the newest root; draft: the same minus its pending tokens
        t_cache, d = caches["target"], decoder.drafter
        assert cache_length(t_cache) == len(committed) - 1
        assert cache_length(d.cache) == len(committed) - 1 - len(d.pending)
        assert d.pending == committed[len(committed) - 1 - len(d.pending): len(committed) - 1]
        for model, cache, n in ((target, t_cache, len(committed) - 1), (draft, d.cache, cache_length(d.cache))):
            fresh = new_cache(model)
            with torch.no_grad():
                model(input_ids=torch.tensor([committed[:n]]), past_key_values=fresh, use_cache=True)
            for a, b in zip(cache.layers, fresh.layers):
                torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(a.values, b.values, atol=1e-5, rtol=1e-5)
        checked += 1
    assert checked >= 3


def test_target_only_method(default_config):
    target = tiny_model("gpt2")
    target.generation_config.eos_token_id = None
    config = dataclasses.replace(default_config, decoding=dataclasses.replace(default_config.decoding, method="target_only"))
    decoder = SpeculativeDecoder.from_models(target, None, None, config)
    got, stats = decoder.generate(torch.tensor([[3, 4, 5]]), max_new_tokens=16)
    assert got[0].tolist() == hf_greedy(target, [3, 4, 5], 16)
    assert stats.target_forwards == 16 and stats.mean_accepted_length == 1.0
