"""oneDNN's packed fp32 linear layers (model.cpu_linear=onednn): same numbers up to rounding, greedy
decoding still the target's own tokens, autograd and changed weights fall back / repack."""

import copy

import pytest
import torch

from conftest import noisy_copy, tiny_model, tiny_tokenizer
from models.errors import ConfigError
from models.fast_linear import onednn_available, use_onednn_linears, uses_onednn
from speculative_decoder import SpeculativeDecoder, SpeculativeDecodingConfig
from test_lossless_greedy import SEARCHES, hf_greedy, make_config, prompts

pytestmark = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN linear kernel")


def packed(model, max_rows=None):
    model = copy.deepcopy(model)
    assert use_onednn_linears(model, max_rows) > 0 and uses_onednn(model) == ("hybrid" if max_rows else "onednn")
    return model


def test_logits_match_mkl_up_to_rounding():
    target = tiny_model("llama")
    fast = packed(target)
    ids = torch.randint(2, 96, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, target(ids).logits, atol=1e-4, rtol=1e-5)
    assert not uses_onednn(target)  # the original is untouched
    assert use_onednn_linears(fast) == use_onednn_linears(fast)  # idempotent


@pytest.mark.parametrize("rows", [None, 1])
@pytest.mark.parametrize("search", list(SEARCHES))
@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt"])
def test_greedy_with_packed_linears_equals_the_target(arch, search, rows, default_config):
    target = tiny_model(arch, seed=0)
    target.generation_config.eos_token_id = None
    fast_target, fast_draft = packed(target, rows), packed(noisy_copy(target, 0.3), rows)
    decoder = SpeculativeDecoder.from_models(fast_target, fast_draft, None, make_config(default_config, search))
    for prompt in prompts(3, seed=1):
        want = hf_greedy(target, prompt, 20)  # the plain MKL model, sequential
        assert hf_greedy(fast_target, prompt, 20) == want
        got, _ = decoder.generate(torch.tensor([prompt]), max_new_tokens=20)
        assert got[0].tolist() == want, (arch, search, prompt)


def test_autograd_falls_back_and_changed_weights_are_repacked():
    lin = torch.nn.Linear(8, 5)
    fast = copy.deepcopy(lin)
    use_onednn_linears(fast)
    x = torch.randn(3, 4, 8, requires_grad=True)
    y = fast(x)  # grad mode: plain F.linear, differentiable
    y.sum().backward()
    assert fast.weight.grad is not None and x.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(fast(x), lin(x))
        fast.weight.mul_(2.0)  # changed in place: the packed copy must follow
        torch.testing.assert_close(fast(x), torch.nn.functional.linear(x, fast.weight, fast.bias))
        fast.weight = torch.nn.Parameter(torch.randn(5, 8))  # replaced
        torch.testing.assert_close(fast(x), torch.nn.functional.linear(x, fast.weight, fast.bias))
        bf = fast.to(torch.bfloat16)  # not fp32: plain path
        assert bf(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_config_key_and_loading(tmp_path):
    with pytest.raises(ConfigError, match="model.cpu_linear"):
        SpeculativeDecodingConfig.from_overrides(["model.cpu_linear=fast"])
    config = SpeculativeDecodingConfig.from_overrides(["model.cpu_linear=onednn"])
    assert config.model.cpu_linear == "onednn"
    config.model.cpu_linear = "bogus"  # set after the config was built: refused at use
    with pytest.raises(ConfigError, match="model.cpu_linear"):
        config.validate()
    from models.cost_profile import cost_key
    from models.loading import load_model

    tiny_model("llama").save_pretrained(tmp_path / "t")
    tiny_tokenizer().save_pretrained(tmp_path / "t")
    model = load_model(tmp_path / "t", cpu_linear="onednn")
    assert uses_onednn(model) and not uses_onednn(load_model(tmp_path / "t"))
    fast = SpeculativeDecoder.from_models(model, None, None, SpeculativeDecodingConfig.from_overrides(
        ["decoding.method=target_only"]))
    assert cost_key(fast)["cpu_linear"] == "onednn"
    hybrid = load_model(tmp_path / "t", cpu_linear="hybrid")
    assert uses_onednn(hybrid) == "hybrid"
    ids = torch.randint(2, 96, (1, 9))
    with torch.no_grad():  # one row through oneDNN, several through MKL: both equal the plain model's
        torch.testing.assert_close(hybrid(ids[:, :1]).logits, model(ids[:, :1]).logits, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(hybrid(ids).logits, load_model(tmp_path / "t")(ids).logits, atol=1e-4, rtol=1e-5)
