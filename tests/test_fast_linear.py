"""Packed fp32 CPU linear kernels (model.cpu_linear = onednn / hybrid / invariant): same numbers up to
rounding, greedy decoding still the target's own tokens, autograd and changed weights fall back /
repack. The invariant kernel's own tests: tests/test_invariant_gemm.py."""

import copy

import pytest
import torch
from conftest import (
    SEARCHES,
    hf_greedy,
    make_config,
    noisy_copy,
    prompts,
    tiny_model,
    tiny_tokenizer,
)

from models.errors import ConfigError
from models.kernels import invariant_gemm
from models.kernels.fast_linear import (
    linear_kernel,
    onednn_available,
    set_linear_kernel,
)
from speculative_decoder import SpeculativeDecoder, SpeculativeDecodingConfig

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear kernel")
KERNELS = [pytest.param("onednn", marks=needs_onednn), pytest.param("hybrid", marks=needs_onednn),
           pytest.param("invariant", marks=pytest.mark.skipif(not invariant_gemm.available(),
                                                              reason="no AVX-512 CPU or no C++ compiler here"))]


def packed(model, max_rows=None):
    model = copy.deepcopy(model)
    mode = "hybrid" if max_rows else "onednn"
    assert set_linear_kernel(model, mode) > 0 and linear_kernel(model) == mode
    return model


@needs_onednn
def test_logits_match_mkl_up_to_rounding():
    target = tiny_model("llama")
    fast = packed(target)
    ids = torch.randint(2, 96, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, target(ids).logits, atol=1e-4, rtol=1e-5)
    assert not linear_kernel(target)  # the original is untouched
    assert set_linear_kernel(fast, "onednn") == set_linear_kernel(fast, "onednn")  # idempotent
    assert set_linear_kernel(target, "mkl") == 0 and not hasattr(target.lm_head, "_treespec_route")  # nothing to undo


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("search", list(SEARCHES))
@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_greedy_with_packed_linears_equals_the_target(arch, search, kernel, default_config):
    target = tiny_model(arch, seed=0)
    target.generation_config.eos_token_id = None
    fast_target, fast_draft = copy.deepcopy(target), noisy_copy(target, 0.3)
    assert set_linear_kernel(fast_target, kernel) > 0 and set_linear_kernel(fast_draft, kernel) > 0
    decoder = SpeculativeDecoder.from_models(fast_target, fast_draft, None, make_config(default_config, search))
    for prompt in prompts(3, seed=1):
        want = hf_greedy(target, prompt, 20)  # the plain MKL model, sequential
        assert hf_greedy(fast_target, prompt, 20) == want
        got, _ = decoder.generate(torch.tensor([prompt]), max_new_tokens=20)
        assert got[0].tolist() == want, (arch, search, prompt)


@pytest.mark.parametrize("kernel", KERNELS)
def test_autograd_falls_back_and_changed_weights_are_repacked(kernel):
    lin = torch.nn.Linear(8, 5)
    fast = copy.deepcopy(lin)
    set_linear_kernel(fast, kernel)
    x = torch.randn(3, 4, 8, requires_grad=True)
    fast(x).sum().backward()  # grad mode: plain F.linear, differentiable
    assert fast.weight.grad is not None and x.grad is not None
    with torch.no_grad():
        for rows in (x, x[:1, :1]):  # several rows and one (hybrid: MKL, then oneDNN)
            torch.testing.assert_close(fast(rows), lin(rows))
        fast.weight.mul_(2.0)  # changed in place: the packed copy must follow
        for rows in (x, x[:1, :1]):
            torch.testing.assert_close(fast(rows), torch.nn.functional.linear(rows, fast.weight, fast.bias))
        fast.weight = torch.nn.Parameter(torch.randn(5, 8))  # replaced
        for rows in (x, x[:1, :1]):
            torch.testing.assert_close(fast(rows), torch.nn.functional.linear(rows, fast.weight, fast.bias))
        assert fast(x[:, :0]).shape == (3, 0, 5)  # no rows
        bf = fast.to(torch.bfloat16)  # not fp32: plain path
        assert bf(x.to(torch.bfloat16)).dtype == torch.bfloat16


@needs_onednn
def test_config_key_and_loading(tmp_path):
    with pytest.raises(ConfigError, match="model.cpu_linear"):
        SpeculativeDecodingConfig.from_overrides(["model.cpu_linear=fast"])
    config = SpeculativeDecodingConfig.from_overrides(["model.cpu_linear=onednn"])
    assert config.model.cpu_linear == "onednn"
    config.model.cpu_linear = "bogus"  # set after the config was built: refused at use
    with pytest.raises(ConfigError, match="model.cpu_linear"):
        config.validate()
    from models.io.loading import load_model
    from models.policy.cost_profile import cost_key

    tiny_model("llama").save_pretrained(tmp_path / "t")
    tiny_tokenizer().save_pretrained(tmp_path / "t")
    model = load_model(tmp_path / "t", attn_implementation="sdpa", cpu_linear="onednn")
    assert linear_kernel(model) and not linear_kernel(load_model(tmp_path / "t", attn_implementation="sdpa", cpu_linear="mkl"))
    fast = SpeculativeDecoder.from_models(model, None, None, SpeculativeDecodingConfig.from_overrides(
        ["decoding.method=target_only"]))
    assert cost_key(fast)["cpu_linear"] == "onednn"
    hybrid = load_model(tmp_path / "t", attn_implementation="sdpa", cpu_linear="hybrid")
    assert linear_kernel(hybrid) == "hybrid"
    ids = torch.randint(2, 96, (1, 9))
    with torch.no_grad():  # one row through oneDNN, several through MKL: both equal the plain model's
        torch.testing.assert_close(hybrid(ids[:, :1]).logits, model(ids[:, :1]).logits, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(hybrid(ids).logits, load_model(tmp_path / "t", attn_implementation="sdpa", cpu_linear="mkl")(ids).logits, atol=1e-4, rtol=1e-5)
