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


def test_this_machine_answers():
    assert isinstance(precision.fast_bf16("cpu"), bool)
    assert precision.resolve_dtype("auto", "cpu") in ("bfloat16", "float32")
