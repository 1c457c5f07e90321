"""Batch-invariant attention (model.attn_implementation=invariant) with the invariant linear kernel:
each query row's output is bitwise independent of the other queries and of masked-out keys, so a
model's logits over several new tokens (a chain or a tree) are bitwise the logits of one-token
decoding, in fp32 and bf16, and bf16 speculative decoding reproduces bf16 target-only decoding
token for token. Anything the kernel does not cover falls back to SDPA."""

import copy

import pytest
import torch
from conftest import SEARCHES, hf_greedy, make_config, prompts
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from models.kernels import invariant_attention, invariant_gemm
from models.kernels.fast_linear import set_linear_kernel
from speculative_decoder import SpeculativeDecoder

pytestmark = pytest.mark.skipif(not invariant_gemm.available(), reason="no AVX-512 CPU or no C++ compiler here")
DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not invariant_gemm.cpu_has_avx512_bf16(), reason="this CPU has no AVX512_BF16"))]


def reference(q, k, v, allowed, scale):
    """fp64 attention: q [H, N, D], k/v [KVH, L, D], allowed [N, L] bool -> [N, H, D]."""
    rep = q.shape[0] // k.shape[0]
    kk, vv = k.double().repeat_interleave(rep, 0), v.double().repeat_interleave(rep, 0)
    s = torch.einsum("hnd,hld->hnl", q.double(), kk) * scale
    s = s.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hnl,hld->nhd", torch.softmax(s, -1), vv)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 2, 16), (9, 3, 64), (2, 2, 128), (3, 1, 32)])
def test_kernel_matches_attention_and_rows_are_invariant(heads, kv_heads, dim, dtype):
    torch.manual_seed(dim + heads)
    n, length = 6, 37
    q = torch.randn(heads, n, dim).to(dtype)
    k, v = torch.randn(kv_heads, length, dim).to(dtype), torch.randn(kv_heads, length, dim).to(dtype)
    scale = dim ** -0.5
    causal = torch.arange(n)[:, None] + length - n >= torch.arange(length)[None]
    out = invariant_gemm.attention(q, k, v, None, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.dtype == dtype and out.shape == (n, heads, dim)
    assert (out.double() - reference(q, k, v, causal, scale)).abs().max() < tol
    # a tree-like mask: row i sees the prefix and a few of the new keys
    allowed = causal.clone()
    allowed[3, length - n + 1] = False
    allowed[5, length - n + 2:length - 1] = False
    mask = torch.zeros(n, length).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    tree = invariant_gemm.attention(q, k, v, mask, scale)
    assert (tree.double() - reference(q, k, v, allowed, scale)).abs().max() < tol
    for i in range(n):  # each row alone, over exactly the keys it sees, in cache order: bitwise equal
        seen = allowed[i].nonzero()[:, 0]
        alone = invariant_gemm.attention(q[:, i:i + 1], k[:, seen], v[:, seen], None, scale)
        assert torch.equal(alone[0], tree[i]), i
    strided = q.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other strides
    assert torch.equal(invariant_gemm.attention(strided, k, v, mask, scale), tree)
    nothing = torch.full((1, length), float("-inf"))
    assert torch.equal(invariant_gemm.attention(q[:, :1], k, v, nothing, scale), torch.zeros(1, heads, dim, dtype=dtype))


def test_kernel_refuses_shapes_it_cannot_do():
    with pytest.raises(ValueError, match="unsupported shape"):
        invariant_gemm.attention(torch.randn(4, 1, 8), torch.randn(2, 5, 8), torch.randn(2, 5, 8), None, 0.3)
    with pytest.raises(ValueError, match="contiguous"):
        invariant_gemm.attention(torch.randn(4, 1, 32)[:, :, ::2], torch.randn(2, 5, 16), torch.randn(2, 5, 16), None, 0.3)


def invariant_model(arch: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A tiny model with head size 16 on the invariant linears and attention."""
    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cfg, cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                "mistral": (MistralConfig, MistralForCausalLM)}[arch]
    extra = dict(sliding_window=6) if arch == "mistral" else {}
    model = cls(cfg(**common, **extra, attn_implementation=invariant_attention.register()))
    with torch.no_grad():  # sharper logits than the default init, so greedy paths are not all ties
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None
    set_linear_kernel(model, "invariant")
    return model


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_several_new_tokens_give_bitwise_the_logits_of_one_at_a_time(arch, dtype, monkeypatch):
    model = invariant_model(arch, dtype)
    calls = []
    real = invariant_gemm.attention
    monkeypatch.setattr(invariant_gemm, "attention", lambda *a: (calls.append(a[0].shape[1]), real(*a))[1])
    torch.manual_seed(1)
    prefix, new = torch.randint(2, 96, (1, 20)), torch.randint(2, 96, (1, 7))

    def run(chunks):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(prefix, past_key_values=cache, use_cache=True)
            outs, start = [], 0
            for c in chunks:
                outs.append(model(new[:, start:start + c], past_key_values=cache, use_cache=True).logits[0])
                start += c
        return torch.cat(outs)

    one = run([1] * 7)
    assert torch.equal(run([7]), one) and torch.equal(run([3, 4]), one)
    assert calls and set(calls) >= {1, 3, 4, 7}  # the kernel ran (not the SDPA fallback)
    if dtype == torch.float32:  # and it computes the model's attention (causal, sliding window for mistral)
        reference = copy.deepcopy(model)
        reference.set_attn_implementation("sdpa")
        set_linear_kernel(reference, "mkl")
        model = reference
        torch.testing.assert_close(one, run([1] * 7), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(one, run([7]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("search", list(SEARCHES))
@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_bf16_speculative_decoding_equals_bf16_target_decoding(arch, search, default_config):
    if not invariant_gemm.cpu_has_avx512_bf16():
        pytest.skip("this CPU has no AVX512_BF16")
    target = invariant_model(arch, torch.bfloat16)
    draft = copy.deepcopy(target)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * 0.05 * p.float().std().to(p.dtype))
    set_linear_kernel(draft, "invariant")
    decoder = SpeculativeDecoder.from_models(target, draft, None, make_config(default_config, search))
    accepted = 0
    for prompt in prompts(4, seed=3):
        want = hf_greedy(target, prompt, 24)  # bf16, one token per forward
        got, stats = decoder.generate(torch.tensor([prompt]), max_new_tokens=24)
        assert got[0].tolist() == want, (arch, search, prompt)
        accepted += stats.accepted_tokens
    assert accepted > 0  # drafts were accepted: the verification path, not only the bonus token, was exercised


def test_what_the_kernel_does_not_cover_falls_back_to_sdpa(monkeypatch):
    model = invariant_model("llama", torch.float32)
    used = []
    real = invariant_gemm.attention
    monkeypatch.setattr(invariant_gemm, "attention", lambda *a: (used.append("kernel"), real(*a))[1])
    ids = torch.randint(2, 96, (1, invariant_attention.MAX_QUERIES + 1))
    with torch.no_grad():
        plain = copy.deepcopy(model)
        plain.set_attn_implementation("sdpa")
        out = model(ids).logits  # a prefill longer than MAX_QUERIES: SDPA
        assert not used
        torch.testing.assert_close(out, plain(ids).logits)
        model(torch.randint(2, 96, (2, 5)))  # a batch: SDPA
        assert not used
        model(ids[:, :5])
        assert used == ["kernel"] * model.config.num_hidden_layers
    used.clear()
    out = model(ids[:, :5]).logits  # grad enabled (training): SDPA, differentiable
    assert not used and out.requires_grad


def test_gemma2_softcapping_falls_back_to_its_eager_attention():
    """Gemma 2's attention soft-capping has no SDPA path: the fallback is the model's own eager one."""
    from conftest import tiny_model

    eager = tiny_model("gemma2", attn="eager")
    fast = copy.deepcopy(eager)
    fast.config.attn_logit_softcapping = eager.config.attn_logit_softcapping or 50.0
    eager.config.attn_logit_softcapping = fast.config.attn_logit_softcapping
    fast.set_attn_implementation(invariant_attention.register())
    ids = torch.randint(2, 96, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, eager(ids).logits)
