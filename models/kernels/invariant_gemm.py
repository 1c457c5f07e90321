"""treespec's batch-invariant kernels for x86 CPUs: linear layers in fp32 (AVX-512 or AVX2 + FMA) and bf16
(AVX512_BF16) (``model.cpu_linear=invariant``), and decode-time attention (``models/kernels/invariant_attention.py``).

The C++ source (``models/kernels/csrc/invariant_gemm.cpp`` and its AVX2 half ``invariant_gemm_avx2.inc``, no torch
headers) is compiled on first use with the system C++ compiler (``$CXX``, else ``g++`` / ``c++``) for the
CPU's best ISA (``isa()``) into ``$TREESPEC_CACHE/kernels/`` (about a second; keyed by the source, the
flags and the compiler, written atomically so parallel processes can share it) and called through
``ctypes`` on the tensors' memory. It links OpenMP by the same soname as torch's bundled runtime, so it
runs on torch's own thread pool.

Why: on the 2-core AMD EPYC test machine MKL's fp32 GEMM streams the weights of a one-token forward
at ~12 GB/s and oneDNN's at ~15; the memory does ~30. This kernel keeps 8-16 accumulators in
registers and reads each packed weight byte once per block of rows, so a product over 1-8 rows
costs about what one row costs and one row costs about a third of MKL's (docs/kernels-and-exactness.md).
Every output is one FMA chain over ``k`` in order, so a row's result does not depend on how many
rows are computed with it: verifying a tree gives the target's linear layers bitwise the numbers
one-token decoding gives. The AVX2 build computes the same chains in 8-lane halves, so its linear
outputs equal the AVX-512 build's bitwise (its attention sums in another, equally fixed, order).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from models.paths import REPO_ROOT, cache_root

SOURCE = Path(__file__).parent / "csrc" / "invariant_gemm.cpp"
SOURCES = (SOURCE, SOURCE.with_name("invariant_gemm_avx2.inc"))  # what the build reads
_COMMON_FLAGS = ("-O3", "-std=c++17", "-fopenmp", "-shared", "-fPIC")
ISA_FLAGS = {
    # AVX-512 F/VL/BW/DQ (every AVX-512 CPU since Skylake-SP) and BF16 (the bf16 functions run only
    # where the CPU has it: cpu_has_avx512_bf16)
    "avx512": ("-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mavx512bf16", "-mfma"),
    # Haswell / Zen 1 and later without AVX-512: fp32 linear and attention (invariant_gemm_avx2.inc)
    "avx2": ("-mavx2", "-mfma"),
}

_lock = threading.Lock()
_lib = None
_error: str | None = None


class KernelUnavailable(RuntimeError):
    """The kernel cannot run here (no AVX-512, no C++ compiler, or the build failed)."""


@functools.lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_avx512() -> bool:
    """AVX-512 F/VL/BW/DQ + FMA (torch's own "AVX512" capability level means the same)."""
    flags = _cpu_flags()
    if flags:
        return {"avx512f", "avx512vl", "avx512bw", "avx512dq", "fma"} <= flags
    try:
        return "AVX512" in str(torch.backends.cpu.get_cpu_capability()).upper()
    except Exception:  # noqa: BLE001 - older torch, no /proc
        return False


def cpu_has_avx2() -> bool:
    """AVX2 + FMA (torch's "AVX2" capability level means the same)."""
    flags = _cpu_flags()
    if flags:
        return {"avx2", "fma"} <= flags
    try:
        return str(torch.backends.cpu.get_cpu_capability()).upper() in ("AVX2", "AVX512")
    except Exception:  # noqa: BLE001 - older torch, no /proc
        return False


def isa() -> str | None:
    """The instruction set the kernels are built for here: ``avx512``, ``avx2`` or None (neither)."""
    return "avx512" if cpu_has_avx512() else "avx2" if cpu_has_avx2() else None


def flags() -> tuple[str, ...]:
    """The compiler flags of this CPU's build (``isa()``; the AVX-512 ones where there is none)."""
    return _COMMON_FLAGS + ISA_FLAGS[isa() or "avx512"]


@functools.lru_cache(maxsize=1)
def cpu_has_avx512_bf16() -> bool:
    """The bf16 kernels' VDPBF16PS / VCVTNEPS2BF16 (AVX512_BF16: Cooper Lake, Sapphire Rapids, Zen 4+)."""
    return cpu_has_avx512() and "avx512_bf16" in _cpu_flags()


def compiler() -> str | None:
    for candidate in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    return None


def source_digest() -> str:
    """What the kernels' numbers depend on: the source and the flags (cost-profile keys record it)."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in SOURCES) + " ".join(flags()).encode()).hexdigest()[:12]


def _library_path(cxx: str, cache_dir) -> Path:
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    digest = hashlib.sha256((source_digest() + cxx + version).encode()).hexdigest()[:12]
    return cache_root(cache_dir) / "kernels" / f"invariant_gemm-{digest}.so"


def _build(cxx: str, path: Path, source: Path = SOURCE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.{threading.get_ident()}.tmp.so")
    try:
        done = subprocess.run([cxx, *flags(), "-o", str(tmp), str(source)], capture_output=True, text=True,
                              timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelUnavailable(f"compiling {source.name} with {cxx} failed: {exc}") from exc
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise KernelUnavailable(f"compiling {source.name} with {cxx} failed:\n{done.stderr[-2000:]}")
    os.replace(tmp, path)  # atomic: a parallel process sees the old state or the whole library


def _declare(lib) -> None:
    """The entry points' C signatures (ctypes needs them for 64-bit longs and pointers)."""
    ptr, n = ctypes.c_void_p, ctypes.c_long
    lib.treespec_linear.argtypes = [ptr, n, n, ptr, n, ptr, ptr, ctypes.c_int]
    lib.treespec_linear.restype = ctypes.c_int
    lib.treespec_pack.argtypes = [ptr, n, n, ptr]
    lib.treespec_pack.restype = ctypes.c_int
    lib.treespec_packed_floats.argtypes = [n, n]
    lib.treespec_packed_floats.restype = n
    lib.treespec_linear_bf16.argtypes = [ptr, n, n, ptr, n, ptr, ptr, ptr, ctypes.c_int]
    lib.treespec_linear_bf16.restype = ctypes.c_int
    lib.treespec_pack_bf16.argtypes = [ptr, n, n, ptr]
    lib.treespec_pack_bf16.restype = ctypes.c_int
    lib.treespec_packed_bf16.argtypes = [n, n]
    lib.treespec_packed_bf16.restype = n
    for name in ("treespec_attention_f32", "treespec_attention_bf16"):
        fn = getattr(lib, name)
        fn.argtypes = [ptr, n, n, ptr, n, n, ptr, n, n, ptr, n, ptr, n, n, n, n, n, ctypes.c_float, ctypes.c_int]
        fn.restype = ctypes.c_int


def load(cache_dir=None):
    """The loaded kernel library (built on first use); raises ``KernelUnavailable`` saying why not."""
    global _lib, _error
    with _lock:
        if _lib is not None:
            return _lib
        if _error is not None:
            raise KernelUnavailable(_error)
        try:
            if isa() is None:
                raise KernelUnavailable("this CPU has neither AVX-512 nor AVX2 + FMA (the invariant kernel "
                                        "needs one of them)")
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
        _declare(lib)
        _lib = lib
        return lib


def build_revision(rev: str, cache_dir=None):
    """The kernel library as built from git revision ``rev``'s sources (for A/B timing of kernel
    changes: ``scripts/bench_kernels.py`` kernel ``invariant@<rev>``). Raises ``KernelUnavailable``
    when the revision has no such sources or its packed layout differs from this checkout's."""
    texts = []
    for src in SOURCES:
        rel = src.relative_to(REPO_ROOT).as_posix()
        for where in (rel, f"models/csrc/{src.name}"):  # revisions before the kernels moved into models/kernels/
            try:
                done = subprocess.run(["git", "-C", str(REPO_ROOT), "show", f"{rev}:{where}"], capture_output=True,
                                      timeout=60)
            except (OSError, subprocess.SubprocessError) as exc:
                raise KernelUnavailable(f"reading {rel} at revision {rev!r} with git failed: {exc}") from exc
            if done.returncode == 0:
                break
        if done.returncode != 0:
            raise KernelUnavailable(f"git revision {rev!r} has no {rel}: {done.stderr.decode()[-300:].strip()}")
        texts.append(done.stdout)
    cxx = compiler()
    if cxx is None or isa() is None:
        raise KernelUnavailable("no C++ compiler or no AVX2/AVX-512 here")
    digest = hashlib.sha256(b"".join(texts) + " ".join(flags()).encode()).hexdigest()[:12]
    out = cache_root(cache_dir) / "kernels" / f"invariant_gemm-rev-{digest}.so"
    if not out.is_file():
        src_dir = out.with_suffix("")
        src_dir.mkdir(parents=True, exist_ok=True)
        for src, text in zip(SOURCES, texts):
            (src_dir / src.name).write_bytes(text)
        _build(cxx, out, src_dir / SOURCE.name)
    lib = ctypes.CDLL(str(out))
    _declare(lib)
    here = load()
    for n, k in ((576, 576), (49, 130), (33, 1536)):
        if lib.treespec_packed_floats(n, k) != here.treespec_packed_floats(n, k):
            raise KernelUnavailable(f"revision {rev}'s kernel packs weights differently: not comparable")
    return lib


class use_library:
    """``with use_library(lib):`` route every kernel call to ``lib`` (from ``build_revision``)."""

    def __init__(self, lib):
        self.lib = lib

    def __enter__(self):
        global _lib
        load()
        self.saved, _lib = _lib, self.lib
        return self.lib

    def __exit__(self, *exc):
        global _lib
        _lib = self.saved


def available(cache_dir=None) -> bool:
    try:
        load(cache_dir)
        return True
    except KernelUnavailable:
        return False


DTYPES = (torch.float32, torch.bfloat16)


def supports(dtype: torch.dtype) -> bool:
    """Whether the kernels run ``dtype`` on this CPU (fp32: AVX-512 or AVX2 + FMA; bf16: AVX512_BF16)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_avx512_bf16())


def pack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [N, K] (fp32 or bf16) -> the kernel's panel layout (a new 1-D tensor, same dtype)."""
    lib = load()
    w = weight.detach().contiguous()
    n, k = w.shape
    if w.dtype == torch.bfloat16:
        out = torch.empty(lib.treespec_packed_bf16(n, k), dtype=torch.bfloat16)
        lib.treespec_pack_bf16(w.data_ptr(), n, k, out.data_ptr())
        return out
    if w.dtype != torch.float32:
        raise TypeError(f"the invariant kernel packs fp32 or bf16 weights, not {w.dtype}")
    out = torch.empty(lib.treespec_packed_floats(n, k), dtype=torch.float32)
    lib.treespec_pack(w.data_ptr(), n, k, out.data_ptr())
    return out


def linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for CPU tensors of ``packed``'s dtype, ``packed = pack(W)``; any leading
    dimensions. bf16: fp32 accumulation, rounded to bf16 once per output (``supports(torch.bfloat16)``)."""
    lib = _lib if _lib is not None else load()
    shape = x.shape
    k = shape[-1]
    rows = x.reshape(-1, k)
    if not rows.is_contiguous():
        rows = rows.contiguous()
    m = rows.shape[0]
    y = torch.empty(m, out_features, dtype=x.dtype)
    b = None if bias is None else bias.detach().to(x.dtype).contiguous()
    bptr = None if b is None else b.data_ptr()
    if x.dtype == torch.bfloat16:
        pairs = torch.empty(max(1, m * ((k + 1) // 2)), dtype=torch.int32)
        lib.treespec_linear_bf16(rows.data_ptr(), m, k, packed.data_ptr(), out_features, bptr, y.data_ptr(),
                                 pairs.data_ptr(), torch.get_num_threads())
    else:
        lib.treespec_linear(rows.data_ptr(), m, k, packed.data_ptr(), out_features, bptr, y.data_ptr(),
                            torch.get_num_threads())
    return y.reshape(*shape[:-1], out_features)


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
              scale: float) -> torch.Tensor:
    """Batch-invariant attention for one sequence: ``query`` [H, N, D], ``key``/``value`` [KVH, L, D]
    (D contiguous, a multiple of 16, at most 256; H a multiple of KVH), ``mask`` None (causal: query i
    at position L - N + i) or an additive fp32 [N, L] (<= -1e30: not visible). Returns [N, H, D].
    Each row's result is bitwise independent of the other queries and of masked-out keys."""
    lib = _lib if _lib is not None else load()
    h, n, d = query.shape
    kvh, length, _ = key.shape
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.stride(-1) != 1:
            raise ValueError(f"attention: {name}'s last dimension must be contiguous")
    out = torch.empty(n, h, d, dtype=query.dtype)
    mptr, msn = None, 0
    if mask is not None:
        mask = mask.to(torch.float32)
        if mask.stride(-1) != 1:
            mask = mask.contiguous()
        mptr, msn = mask.data_ptr(), mask.stride(0)
    fn = lib.treespec_attention_bf16 if query.dtype == torch.bfloat16 else lib.treespec_attention_f32
    rc = fn(query.data_ptr(), query.stride(0), query.stride(1), key.data_ptr(), key.stride(0), key.stride(1),
            value.data_ptr(), value.stride(0), value.stride(1), mptr, msn, out.data_ptr(), h, kvh, n, length, d,
            float(scale), torch.get_num_threads())
    if rc != 0:
        raise ValueError(f"attention: unsupported shape (heads {h}, kv heads {kvh}, head dim {d})")
    return out
