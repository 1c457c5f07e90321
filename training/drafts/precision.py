"""Training precision that is fast where it runs: ``auto`` -> bf16 only where the hardware computes it.

On CPUs without native bf16 arithmetic (no AVX512_BF16 / AMX: e.g. AVX2-only x86) torch emulates bf16
matrix products by converting to fp32 and back, which is several times *slower* than plain fp32: on
the 2-core AVX2 EPYC (measured 2026-12-07) the small-LM draft's distillation (bf16 teacher + bf16 autocast)
ran at ~25 s per step against ~1 s on the AVX-512 machine. Recipes therefore say ``auto`` where
precision is only a speed choice (``teacher_dtype``, ``student_bf16``, ``teacher.dtype``, ``bf16``).
"""

from __future__ import annotations

import functools
import logging

import torch

from models.errors import ConfigError
from models.kernels import invariant_gemm

log = logging.getLogger(__name__)
DTYPES = ("float32", "bfloat16", "float16")


@functools.lru_cache(maxsize=None)
def fast_bf16(device: str = "cpu") -> bool:
    """Whether ``device`` computes bf16 natively (CUDA with bf16 support; CPUs with AVX512_BF16 or AMX)."""
    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind != "cpu":
        return False

    return invariant_gemm.cpu_has_avx512_bf16() or "amx_bf16" in invariant_gemm._cpu_flags()


def resolve_dtype(value, device: str = "cpu", what: str = "dtype") -> str:
    """``auto`` -> ``bfloat16`` where it is fast, else ``float32``; other names are checked and kept."""
    value = str(value)
    if value == "auto":
        return "bfloat16" if fast_bf16(device) else "float32"
    if value not in DTYPES:
        raise ConfigError(f"{what} must be auto or one of {DTYPES}, got {value!r}")
    _warn_slow(value == "bfloat16", device, what)
    return value


def resolve_bf16(value, device: str = "cpu", what: str = "bf16") -> bool:
    """A bf16-autocast switch: ``auto`` -> on where bf16 is fast; true / false as given."""
    if isinstance(value, str) and value == "auto":
        return fast_bf16(device)
    if not isinstance(value, bool):
        raise ConfigError(f"{what} must be true, false or auto, got {value!r}")
    _warn_slow(value, device, what)
    return value


def _warn_slow(bf16: bool, device: str, what: str) -> None:
    if bf16 and not fast_bf16(device):
        log.warning("%s asks for bf16 on %s, which has no native bf16 arithmetic: torch emulates it, several "
                    "times slower than fp32 (set it to auto)", what, device)
