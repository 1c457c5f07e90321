"""Training precision: ``auto`` means bf16 only where the hardware computes it (training/drafts/precision.py)."""

import logging

import pytest

from models.errors import ConfigError
from training.drafts import precision


@pytest.fixture
def bf16_hardware(monkeypatch):
    def set_fast(fast: bool):
        monkeypatch.setattr(precision, "fast_bf16", lambda device="cpu": fast)
    return set_fast


@pytest.mark.parametrize("fast", [True, False])
def test_auto_follows_the_hardware(bf16_hardware, fast):
    bf16_hardware(fast)
    assert precision.resolve_dtype("auto") == ("bfloat16" if fast else "float32")
    assert precision.resolve_bf16("auto") is fast


def test_explicit_values_are_kept_and_slow_bf16_is_warned(bf16_hardware, caplog):
    bf16_hardware(False)
    with caplog.at_level(logging.WARNING):
        assert precision.resolve_dtype("float32") == "float32"
        assert precision.resolve_bf16(False) is False
        assert not caplog.records
        assert precision.resolve_dtype("bfloat16", what="draft.teacher.dtype") == "bfloat16"
        assert precision.resolve_bf16(True, what="draft.bf16") is True
    assert "draft.teacher.dtype" in caplog.text and "draft.bf16" in caplog.text and "auto" in caplog.text


@pytest.mark.parametrize("bad", ["fp32", "int8", ""])
def test_bad_dtype_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match="auto or one of"):
        precision.resolve_dtype(bad, what="draft.teacher_dtype")


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_bad_switch_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match="true, false or auto"):
        precision.resolve_bf16(bad, what="draft.student_bf16")


AVX512 = {"avx512f", "avx512vl", "avx512bw", "avx512dq", "fma"}


@pytest.mark.parametrize("flags, fast", [
    (AVX512 | {"avx512_bf16"}, True),  # Zen 4, Cooper Lake: VDPBF16PS
    ({"avx2", "fma", "amx_bf16"}, True),  # AMX tiles (Sapphire Rapids)
    (AVX512, False),  # AVX-512 without its bf16 extension (Skylake-X, Ice Lake): bf16 would be emulated
    ({"avx512_bf16", "fma"}, False),  # the bf16 flag without AVX-512 F/VL/BW/DQ: not usable
    ({"avx2", "fma"}, False),
])
def test_fast_bf16_follows_the_cpu_flags(monkeypatch, flags, fast):
    """``auto`` picks bf16 exactly on CPUs whose flags name native bf16 arithmetic."""
    from models.kernels import invariant_gemm

    def clear():  # the answers are cached per process
        for fn in (invariant_gemm.cpu_has_avx512_bf16, precision.fast_bf16):
            getattr(fn, "cache_clear", lambda: None)()

    monkeypatch.setattr(invariant_gemm, "_cpu_flags", lambda: frozenset(flags))
    clear()
    try:
        assert precision.fast_bf16("cpu") is fast
        assert precision.resolve_dtype("auto", "cpu") == ("bfloat16" if fast else "float32")
        assert precision.resolve_bf16("auto", "cpu") is fast
    finally:
        monkeypatch.undo()
        clear()


def test_this_machine_answers():
    """Here: the answer of /proc/cpuinfo's flags (read by the test itself), and no bf16 on a device kind
    that is neither CPU nor CUDA."""
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    if not flags:
        pytest.skip("no /proc/cpuinfo flags here")
    want = (AVX512 <= flags and "avx512_bf16" in flags) or "amx_bf16" in flags
    assert precision.fast_bf16("cpu") is want
    assert precision.resolve_dtype("auto", "cpu") == ("bfloat16" if want else "float32")
    assert precision.fast_bf16("meta") is False and precision.resolve_dtype("auto", "meta") == "float32"
