"""Sliding-window models (Mistral, Phi-3, Gemma 2/3, Qwen2 with use_sliding_window) decode losslessly.

Caches stay full length and the window lives in the masks (``models.decoding.kv_cache``): tree-masked logits
equal sequential decoding with the model's own masks, the plain causal paths equal HF's own sliding
cache, and greedy chain / static / dynamic tree decoding equals target-only decoding and HF
``generate`` of the target, with prompt + generation well past the window (8 keys; 3 in the mask tests,
below the depth of the tree). Unsupported attention is refused with a ``ConfigError``.
"""

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    SEARCHES,
    SLIDING_ARCHS,
    example_tree,
    hf_greedy,
    make_config,
    noisy_copy,
    sequential_logits,
    tiny_model,
)
from transformers import DynamicCache, GPTNeoConfig, GPTNeoForCausalLM

from models.decoding.kv_cache import attention_layout, keep_tokens, new_cache
from models.errors import ConfigError
from speculative_decoder import SpeculativeDecoder

LAYERS = 3  # gemma2 / gemma3: sliding, full, sliding; qwen2_sw: full, sliding, sliding


def unpruned_config(base, search, method=None):
    """``make_config`` with the trees unpruned, whatever the default pruning (no cost profiling)."""
    made = make_config(base, search)
    decoding = made.decoding if method is None else dataclasses.replace(made.decoding, method=method)
    return dataclasses.replace(made, decoding=decoding, pruning=dataclasses.replace(made.pruning, strategy="none"))


def attns(arch):
    return ["eager"] if arch == "gemma2" else ["sdpa", "eager"]  # transformers: no sdpa for Gemma 2


def tree_logits(model, prefix, tree, windows):
    cache = new_cache(model)
    with torch.no_grad():
        model(input_ids=torch.tensor([prefix]), past_key_values=cache, use_cache=True)
        out = model(input_ids=tree.tokens[None], position_ids=tree.position_ids(len(prefix)),
                    attention_mask=tree.attention_mask(len(prefix), windows=windows), past_key_values=cache,
                    use_cache=True)
    return out.logits[0], cache


@pytest.mark.parametrize("window", [3, 8])
@pytest.mark.parametrize("arch", SLIDING_ARCHS)
def test_tree_logits_match_sequential(arch, window):
    """Every node sees what it would see decoded sequentially: prefix keys in its window + ancestors.
    The prefix (11) is longer than the window, and window 3 is shorter than the deepest path (4 nodes)."""
    prefix = torch.randint(2, 96, (11,), generator=torch.Generator().manual_seed(0)).tolist()
    tree = example_tree(96)
    for attn in attns(arch):
        model = tiny_model(arch, layers=LAYERS, window=window, attn=attn)
        layout = attention_layout(model)
        mixed = arch in ("gemma2", "gemma3", "qwen2_sw")  # full and sliding layers: a mask per layer type
        assert layout.sliding and (None in layout.windows.values()) == mixed
        logits, _ = tree_logits(model, prefix, tree, layout.windows)
        want = torch.stack([sequential_logits(model, prefix, tree.tokens[tree.path_to(n)].tolist())
                            for n in range(len(tree))])
        torch.testing.assert_close(logits, want, atol=1e-5, rtol=1e-5)
        # the window, and its exact edge, matter here: a window one key wider (or none) is wrong
        for wrong in ({k: None for k in layout.windows}, {k: w and w + 1 for k, w in layout.windows.items()}):
            assert not torch.allclose(tree_logits(model, prefix, tree, wrong)[0], want, atol=1e-3)


@pytest.mark.parametrize("arch", SLIDING_ARCHS)
def test_gathered_cache_decodes_like_hf_sliding_cache(arch):
    """Keep prefix + one path after a tree forward, then decode on: the logits equal HF's own sliding
    cache fed the same tokens sequentially. The prefix fills the window, so HF's own cache would
    have dropped entries the kept path needs (the trap full-length caches avoid)."""
    model = tiny_model(arch, layers=LAYERS)
    prefix = list(range(10, 20))
    tree = example_tree(96)
    path = tree.path_to(8)  # root, b, f, h: non-contiguous node indices
    _, cache = tree_logits(model, prefix, tree, attention_layout(model).windows)
    keep_tokens(cache, len(prefix), path)
    kept = prefix + tree.tokens[path].tolist()
    hf = DynamicCache(config=model.config)
    assert any(layer.is_sliding for layer in hf.layers)
    with torch.no_grad():
        model(input_ids=torch.tensor([kept]), past_key_values=hf, use_cache=True)
        for token in (5, 17, 33, 2, 71, 40, 9, 64, 23, 11):  # past the window again
            ours = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True).logits[0, -1]
            want = model(input_ids=torch.tensor([[token]]), past_key_values=hf, use_cache=True).logits[0, -1]
            torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", SLIDING_ARCHS)
def test_causal_paths_match_hf_sliding_cache(arch):
    """Prefill, one-token steps and multi-token chains (HF builds the masks: no custom mask) give the
    same logits on a full-length cache as on HF's own sliding cache."""
    for attn in attns(arch):
        model = tiny_model(arch, layers=LAYERS, attn=attn)
        ids = torch.randint(2, 96, (1, 30), generator=torch.Generator().manual_seed(1))
        ours, hf = new_cache(model), DynamicCache(config=model.config)
        start = 0
        for size in (6, 1, 1, 4, 1, 3, 1, 5, 1, 1, 6):  # ends at 30, far past the window (8)
            chunk = ids[:, start:start + size]
            pos = torch.arange(start, start + size).unsqueeze(0)
            with torch.no_grad():
                a = model(input_ids=chunk, position_ids=pos, past_key_values=ours, use_cache=True).logits
                b = model(input_ids=chunk, position_ids=pos, past_key_values=hf, use_cache=True).logits
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            start += size
        assert ours.get_seq_length() == 30 and all(layer.keys.shape[-2] == 30 for layer in ours.layers)


@pytest.mark.parametrize("search", list(SEARCHES))
@pytest.mark.parametrize("arch", SLIDING_ARCHS)
def test_greedy_equals_target_and_hf(arch, search, default_config):
    target = tiny_model(arch, layers=LAYERS)
    target.generation_config.eos_token_id = None
    drafts = {"same": target, "noisy": noisy_copy(target, 0.3), "other": tiny_model(arch, seed=7, layers=2)}
    only = SpeculativeDecoder.from_models(target, None, None, unpruned_config(default_config, search, "target_only"))
    wants = {}
    for prompt in ((5, 9, 17), tuple(range(20, 32))):  # 3 and 12 tokens; + 24 new = 27 and 36 > window 8
        wants[prompt] = hf_greedy(target, list(prompt), 24)
        assert only.generate(torch.tensor([prompt]), max_new_tokens=24)[0][0].tolist() == wants[prompt]
    for name, draft in drafts.items():
        decoder = SpeculativeDecoder.from_models(target, draft, None, unpruned_config(default_config, search))
        for prompt, want in wants.items():
            got, stats = decoder.generate(torch.tensor([prompt]), max_new_tokens=24)
            assert got[0].tolist() == want, (arch, search, name, prompt)
            assert stats.new_tokens == 24
            if name == "same" and SEARCHES[search]["tree_search"].get("mode") != "dynamic":  # chain, static: the argmax path is drafted to full depth, and
                # the draft's own tree masks are exact, so every step accepts it all (24 = 1 + steps * (depth + 1))
                depth = SEARCHES[search]["tree_search"]["max_depth"]
                assert stats.steps == math.ceil(23 / (depth + 1)), (stats.steps, stats.accepted_per_depth)
            elif name == "same":
                assert stats.mean_accepted_length > 1


@pytest.mark.parametrize("arch", SLIDING_ARCHS)
def test_window_changes_the_output(arch):
    """The tests above are not vacuous: without its window the same model generates other tokens."""
    model = tiny_model(arch, layers=LAYERS)
    model.generation_config.eos_token_id = None
    full = tiny_model(arch, layers=LAYERS, window=256)  # same weights (same seed), window never reached
    full.generation_config.eos_token_id = None
    prompt = list(range(20, 32))
    assert hf_greedy(model, prompt, 24) != hf_greedy(full, prompt, 24)


def _config_only(config):
    return SimpleNamespace(config=config)  # attention_layout reads nothing but model.config


@pytest.mark.parametrize("layer_types", [["full_attention", "chunked_attention"],
                                         ["linear_attention", "full_attention"], ["full_attention", "moe"]])
def test_refuses_other_attention(layer_types):
    from transformers import Qwen2Config
    config = Qwen2Config(num_hidden_layers=2, layer_types=layer_types)
    config.attention_chunk_size = 4  # what a chunked layer's cache is sized by (Llama 4)
    with pytest.raises(ConfigError, match="not support"):
        attention_layout(_config_only(config))


def test_refuses_gpt_neo_local_layers(default_config):
    """GPT-Neo windows its local layers by cache slot, not position: refused, not silently inexact."""
    config = GPTNeoConfig(vocab_size=96, hidden_size=32, num_layers=2, num_heads=4, window_size=4,
                          attention_types=[[["global", "local"], 1]], max_position_embeddings=64)
    model = GPTNeoForCausalLM(config).eval()
    with pytest.raises(ConfigError, match="local"):
        SpeculativeDecoder.from_models(model, model, None, default_config)
    with pytest.raises(ConfigError, match="local"):
        new_cache(model)
    config.attention_layers = ["global", "global"]
    assert attention_layout(model).windows == {"full_attention": None}


def test_refuses_bidirectional_and_shared_kv():
    from transformers import Gemma3TextConfig
    config = Gemma3TextConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    assert attention_layout(_config_only(config)).windows == {"sliding_attention": config.sliding_window,
                                                              "full_attention": None}
    config.use_bidirectional_attention = True
    with pytest.raises(ConfigError, match="bidirectional"):
        attention_layout(_config_only(config))
    shared = Gemma3TextConfig(num_hidden_layers=2, layer_types=["sliding_attention", "full_attention"])
    shared.kv_sharing_modes = ["store", "reuse"]
    with pytest.raises(ConfigError, match="shares KV"):
        attention_layout(_config_only(shared))
