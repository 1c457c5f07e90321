"""treespec's batch-invariant linear kernel (AVX-512 or AVX2 + FMA builds) (model.cpu_linear=invariant): the numbers of an fp32
product up to rounding, each row bitwise the same however many rows are computed with it, greedy
decoding still the target's own tokens (tests/test_fast_linear.py, with the other kernels); building, caching, corrupt libraries and the fallback."""

import copy
import ctypes
import subprocess

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from models.kernels import invariant_gemm
from models.kernels.fast_linear import (
    apply_cpu_linear,
    linear_kernel,
    resolve_cpu_linear,
    set_linear_kernel,
)
from speculative_decoder import SpeculativeDecoder, SpeculativeDecodingConfig

needs_kernel = pytest.mark.skipif(not invariant_gemm.available(), reason="no AVX-512 CPU or no C++ compiler here")


@needs_kernel
@pytest.mark.parametrize("k,n", [(576, 576), (37, 5), (130, 49), (64, 1000), (1536, 33)])
def test_products_are_right_and_batch_invariant(k, n):
    torch.manual_seed(k + n)
    w, b = torch.randn(n, k), torch.randn(n)
    packed = invariant_gemm.pack(w)
    x = torch.randn(41, k)
    for bias in (None, b):
        y = invariant_gemm.linear(x, packed, n, bias)
        ref = x.double() @ w.double().t() + (0 if bias is None else bias.double())
        assert y.dtype == torch.float32 and y.shape == (41, n)
        assert (y.double() - ref).abs().max().item() < 2e-6 * k ** 0.5 * 16
        for start, rows in [(0, 1), (3, 2), (5, 3), (7, 4), (4, 5), (6, 6), (11, 7), (0, 8), (2, 9), (1, 16), (9, 17), (0, 33)]:
            part = invariant_gemm.linear(x[start:start + rows], packed, n, bias)
            assert torch.equal(part, y[start:start + rows]), (rows, start)  # bitwise, not close
    three_d = invariant_gemm.linear(x[:12].reshape(3, 4, k), packed, n)
    assert torch.equal(three_d.reshape(12, n), invariant_gemm.linear(x[:12], packed, n))
    strided = x[:10, :].t().contiguous().t()  # same values, column-major
    assert torch.equal(invariant_gemm.linear(strided, packed, n), invariant_gemm.linear(x[:10], packed, n))


@needs_kernel
def test_model_logits_match_mkl_and_rows_do_not_depend_on_the_batch():
    target = tiny_model("llama")
    fast = copy.deepcopy(target)
    assert set_linear_kernel(fast, "invariant") > 0 and linear_kernel(fast) == "invariant"
    assert not linear_kernel(target)
    ids = torch.randint(2, 96, (2, 17))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, target(ids).logits, atol=1e-4, rtol=1e-5)
        lin = fast.lm_head
        h = torch.randn(9, lin.in_features)
        assert torch.equal(lin(h)[4:5], lin(h[4:5]))
    assert set_linear_kernel(fast, "invariant") == set_linear_kernel(fast, "invariant")  # idempotent
    set_linear_kernel(fast, "onednn")  # switching kernels back and forth keeps one route per module
    assert linear_kernel(fast) == "onednn"
    set_linear_kernel(fast, "mkl")  # routed back to torch's own GEMM: the very same numbers
    assert linear_kernel(fast) is None
    with torch.no_grad():
        assert torch.equal(fast(ids).logits, target(ids).logits)
    set_linear_kernel(fast, "invariant")
    assert linear_kernel(fast) == "invariant"
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, target(ids).logits, atol=1e-4, rtol=1e-5)


@pytest.fixture
def fresh_kernel_state(monkeypatch, tmp_path):
    """A process-wide kernel state that is restored afterwards, with its own cache directory."""
    monkeypatch.setattr(invariant_gemm, "_lib", None)
    monkeypatch.setattr(invariant_gemm, "_error", None)
    monkeypatch.setenv("TREESPEC_CACHE", str(tmp_path))
    return tmp_path


def test_no_compiler_is_a_clear_error_and_auto_falls_back(fresh_kernel_state, monkeypatch, caplog):
    monkeypatch.setattr(invariant_gemm, "compiler", lambda: None)
    monkeypatch.setattr(invariant_gemm, "cpu_has_avx512", lambda: True)
    with pytest.raises(invariant_gemm.KernelUnavailable, match="no C\\+\\+ compiler"):
        invariant_gemm.load()
    with pytest.raises(invariant_gemm.KernelUnavailable, match="no C\\+\\+ compiler"):
        set_linear_kernel(torch.nn.Linear(4, 4), "invariant")  # explicit `invariant`: refused, saying why
    import models.kernels.fast_linear as fl
    monkeypatch.setattr(fl, "_warned", False)
    with caplog.at_level("WARNING"):
        assert resolve_cpu_linear("auto") == "hybrid"
    assert "no C++ compiler" in caplog.text
    model = apply_cpu_linear(torch.nn.Sequential(torch.nn.Linear(4, 4)), "auto")
    assert linear_kernel(model) in ("hybrid", None)  # None where this torch has no oneDNN kernel
    with pytest.raises(ValueError, match="cpu_linear"):
        resolve_cpu_linear("fast")


def test_no_simd_isa_is_a_clear_error(fresh_kernel_state, monkeypatch):
    monkeypatch.setattr(invariant_gemm, "cpu_has_avx512", lambda: False)
    monkeypatch.setattr(invariant_gemm, "cpu_has_avx2", lambda: False)
    with pytest.raises(invariant_gemm.KernelUnavailable, match="neither AVX-512 nor AVX2"):
        invariant_gemm.load()
    assert not invariant_gemm.available()


def test_the_build_targets_the_best_isa_here(monkeypatch):
    monkeypatch.setattr(invariant_gemm, "cpu_has_avx512", lambda: False)
    monkeypatch.setattr(invariant_gemm, "cpu_has_avx2", lambda: True)
    avx2 = (invariant_gemm.isa(), invariant_gemm.flags(), invariant_gemm.source_digest())
    assert avx2[0] == "avx2" and "-mavx2" in avx2[1] and not any("avx512" in f for f in avx2[1])
    monkeypatch.setattr(invariant_gemm, "cpu_has_avx512", lambda: True)
    avx512 = (invariant_gemm.isa(), invariant_gemm.flags(), invariant_gemm.source_digest())
    assert avx512[0] == "avx512" and "-mavx512f" in avx512[1]
    assert avx2[2] != avx512[2]  # each ISA's build (and the cost profiles keyed by it) has its own key


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
def test_both_isa_builds_compile(isa, tmp_path):
    """Whatever this CPU runs, both halves of the source must keep compiling (CI may lack AVX-512)."""
    cxx = invariant_gemm.compiler()
    if cxx is None:
        pytest.skip("no C++ compiler here")
    out = tmp_path / f"k-{isa}.so"
    done = subprocess.run([cxx, *invariant_gemm._COMMON_FLAGS, *invariant_gemm.ISA_FLAGS[isa], "-o", str(out),
                           str(invariant_gemm.SOURCE)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lib = ctypes.CDLL(str(out))  # loading runs none of its vector code
    for fn in ("treespec_linear", "treespec_pack", "treespec_packed_floats", "treespec_linear_bf16",
               "treespec_pack_bf16", "treespec_packed_bf16", "treespec_attention_f32", "treespec_attention_bf16"):
        assert hasattr(lib, fn), fn


@needs_kernel
def test_build_is_cached_and_a_corrupt_library_is_rebuilt(fresh_kernel_state):
    path = invariant_gemm._library_path(invariant_gemm.compiler(), None)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a shared library")  # e.g. an interrupted copy of the cache
    lib = invariant_gemm.load()  # rebuilt instead of failing
    assert path.stat().st_size > 1000 and not list(path.parent.glob("*.tmp.so"))
    assert list(path.parent.iterdir()) == [path]
    assert invariant_gemm.load() is lib  # loaded once per process
    w = torch.randn(7, 19)
    x = torch.randn(3, 19)
    torch.testing.assert_close(invariant_gemm.linear(x, invariant_gemm.pack(w), 7), x @ w.t())
    invariant_gemm._lib = None  # a new process: the cached library is reused, not rebuilt
    stamp = path.stat().st_mtime_ns
    invariant_gemm.load()
    assert path.stat().st_mtime_ns == stamp


def test_broken_compiler_output_is_reported(fresh_kernel_state, monkeypatch, tmp_path):
    if invariant_gemm.isa() is None:
        pytest.skip("the build is only attempted on AVX-512 or AVX2 CPUs")
    fake = tmp_path / "fake-cxx"
    fake.write_text("#!/bin/sh\necho 'fatal: cannot compile' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    with pytest.raises(invariant_gemm.KernelUnavailable, match="cannot compile"):
        invariant_gemm.load()
    with pytest.raises(invariant_gemm.KernelUnavailable, match="cannot compile"):
        invariant_gemm.load()  # remembered: not rebuilt on every call


@needs_kernel
def test_config_and_loading(tmp_path):
    config = SpeculativeDecodingConfig.from_overrides(["model.cpu_linear=invariant"])
    assert config.model.cpu_linear == "invariant"
    assert resolve_cpu_linear("auto") == "invariant"
    from models.io.loading import load_model
    from models.policy.cost_profile import cost_key

    tiny_model("llama").save_pretrained(tmp_path / "t")
    tiny_tokenizer().save_pretrained(tmp_path / "t")
    for mode in ("invariant", "auto"):
        model = load_model(tmp_path / "t", attn_implementation="sdpa", cpu_linear=mode)
        assert linear_kernel(model) == "invariant"
    fast = SpeculativeDecoder.from_models(model, None, None, SpeculativeDecodingConfig.from_overrides(
        ["decoding.method=target_only"]))
    assert cost_key(fast)["cpu_linear"] == "invariant"


@needs_kernel
def test_a_revisions_kernel_builds_and_takes_over_the_calls(tmp_path):
    """bench_kernels' invariant@<rev>: the kernel as built from a git revision's sources, swapped in."""
    import shutil
    if shutil.which("git") is None or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                                                    cwd=invariant_gemm.SOURCE.parent).returncode != 0:
        pytest.skip("not a git checkout")
    lib = invariant_gemm.build_revision("HEAD", cache_dir=tmp_path)
    w, x = torch.randn(40, 70), torch.randn(9, 70)
    packed = invariant_gemm.pack(w)
    with invariant_gemm.use_library(lib) as used:
        assert invariant_gemm._lib is used is lib
        there = invariant_gemm.linear(x, packed, 40)
    assert invariant_gemm._lib is not lib
    assert (there.double() - x.double() @ w.double().t()).abs().max() < 1e-4
    with pytest.raises(invariant_gemm.KernelUnavailable, match="no-such-revision"):
        invariant_gemm.build_revision("no-such-revision", cache_dir=tmp_path)


@needs_kernel
def test_frozen_weights_of_a_head_run_on_the_kernel_too():
    from models.drafters.eagle import EagleConfig, EagleHead
    from models.kernels.fast_linear import frozen_linear

    torch.manual_seed(0)
    cfg = EagleConfig(hidden_size=32, num_heads=2, num_kv_heads=1, intermediate_size=48, vocab_size=50,
                      draft_vocab=list(range(0, 50, 2)))
    head = EagleHead(cfg, torch.randn(50, 32), torch.randn(50, 32)).eval()
    h = torch.randn(5, 32)
    with torch.no_grad():
        plain = head.logits(h)
        set_linear_kernel(head, "invariant")
        assert head._treespec_route == "invariant" and not hasattr(head, "_treespec_frozen_lm_head")
        fast = head.logits(h)
        assert hasattr(head, "_treespec_frozen_lm_head")  # packed on first use
        torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
        assert torch.equal(head.logits(h[2:3]), fast[2:3])  # batch invariant like every linear
        head.lm_head.mul_(2)  # changed in place: repacked
        torch.testing.assert_close(head.logits(h), 2 * plain, atol=1e-5, rtol=1e-5)
        set_linear_kernel(head, "onednn")  # another kernel: back to a plain matmul
        assert head._treespec_route == "onednn"
        torch.testing.assert_close(frozen_linear(head, "lm_head", h), 2 * plain, atol=1e-5, rtol=1e-5)
