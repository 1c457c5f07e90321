"""treespec's batch-invariant fp32 linear kernel for AVX-512 CPUs (``model.cpu_linear=invariant``).

The C++ source (``models/csrc/invariant_gemm.cpp``, no torch headers) is compiled on first use with
the system C++ compiler (``$CXX``, else ``g++`` / ``c++``) into ``$TREESPEC_CACHE/kernels/`` (about a
second; keyed by the source, the flags and the compiler, written atomically so parallel processes
can share it) and called through ``ctypes`` on the tensors' memory. It links OpenMP by the same
soname as torch's bundled runtime, so it runs on torch's own thread pool.

Why: on the 2-core AMD EPYC test machine MKL's fp32 GEMM streams the weights of a one-token forward
at ~12 GB/s and oneDNN's at ~15; the memory does ~30. This kernel keeps 8-16 accumulators in
registers and reads each packed weight byte once per block of rows, so a product over 1-8 rows
costs about what one row costs and one row costs about a third of MKL's (README, "Speed levers").
Every output is one FMA chain over ``k`` in order, so a row's result does not depend on how many
rows are computed with it: verifying a tree gives the target's linear layers bitwise the numbers
one-token decoding gives.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "invariant_gemm.cpp"
FLAGS = ("-O3", "-std=c++17", "-mavx512f", "-mfma", "-fopenmp", "-shared", "-fPIC")

_lock = threading.Lock()
_lib = None
_error: str | None = None


class KernelUnavailable(RuntimeError):
    """The kernel cannot run here (no AVX-512, no C++ compiler, or the build failed)."""


def cpu_has_avx512() -> bool:
    try:
        if "AVX512" in str(torch.backends.cpu.get_cpu_capability()).upper():
            return True
    except Exception:  # noqa: BLE001 - older torch
        pass
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512f" in flags and " fma" in flags


def compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def source_digest() -> str:
    return hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode()).hexdigest()[:12]


def _library_path(cxx: str, cache_dir) -> Path:
    from models.demo_pair import cache_root
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    digest = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + cxx.encode()
                            + version.encode()).hexdigest()[:12]
    return cache_root(cache_dir) / "kernels" / f"invariant_gemm-{digest}.so"


def _build(cxx: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.so")
    try:
        done = subprocess.run([cxx, *FLAGS, "-o", str(tmp), str(SOURCE)], capture_output=True, text=True,
                              timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"compiling {SOURCE.name} with {cxx} failed: {exc}") from exc
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise KernelUnavailable(f"compiling {SOURCE.name} with {cxx} failed:\n{done.stderr[-2000:]}")
    os.replace(tmp, path)  # atomic: a parallel process sees the old state or the whole library


def load(cache_dir=None):
    """The loaded kernel library (built on first use); raises ``KernelUnavailable`` saying why not."""
    global _lib, _error
    with _lock:
        if _lib is not None:
            return _lib
        if _error is not None:
            raise KernelUnavailable(_error)
        try:
            if not cpu_has_avx512():
                raise KernelUnavailable("this CPU has no AVX-512 (the invariant kernel needs avx512f)")
            cxx = compiler()
            if cxx is None:
                raise KernelUnavailable("no C++ compiler found (set $CXX or install g++)")
            path = _library_path(cxx, cache_dir)
            if not path.is_file():
                _build(cxx, path)
            lib = ctypes.CDLL(str(path))
        except KernelUnavailable as exc:
            _error = str(exc)
            raise
        except OSError as exc:  # a corrupt cached library: rebuild once
            try:
                path.unlink(missing_ok=True)
                _build(cxx, path)
                lib = ctypes.CDLL(str(path))
            except (OSError, KernelUnavailable) as again:
                _error = f"loading the invariant kernel failed: {exc}; rebuilding: {again}"
                raise KernelUnavailable(_error) from again
        ptr, n = ctypes.c_void_p, ctypes.c_long
        lib.treespec_linear.argtypes = [ptr, n, n, ptr, n, ptr, ptr, ctypes.c_int]
        lib.treespec_linear.restype = ctypes.c_int
        lib.treespec_pack.argtypes = [ptr, n, n, ptr]
        lib.treespec_pack.restype = ctypes.c_int
        lib.treespec_packed_floats.argtypes = [n, n]
        lib.treespec_packed_floats.restype = n
        _lib = lib
        return lib


def available(cache_dir=None) -> bool:
    try:
        load(cache_dir)
        return True
    except KernelUnavailable:
        return False


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] fp32 -> the kernel's panel layout (a new 1-D tensor)."""
    lib = load()
    w = weight.detach().contiguous()
    n, k = w.shape
    out = torch.empty(lib.treespec_packed_floats(n, k), dtype=torch.float32)
    lib.treespec_pack(w.data_ptr(), n, k, out.data_ptr())
    return out


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for fp32 CPU tensors, ``packed = pack(W)``; any leading dimensions."""
    lib = _lib if _lib is not None else load()
    shape = x.shape
    k = shape[-1]
    rows = x.reshape(-1, k)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    y = torch.empty(rows.shape[0], out_features, dtype=torch.float32)
    b = None if bias is None else bias.detach().contiguous()
    lib.treespec_linear(rows.data_ptr(), rows.shape[0], k, packed.data_ptr(), out_features,
                        None if b is None else b.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y.reshape(*shape[:-1], out_features)
