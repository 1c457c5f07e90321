"""treespec's models: the tree, drafters, search, pruning, verification, the learned core.

Importing this package (``speculative_decoder`` does) picks MKL's AVX-512 code path for fp32 matrix
products on CPUs that have AVX-512, unless ``MKL_CBWR`` is already set (the user's choice wins;
``TREESPEC_MKL_AVX512=0`` turns this off). MKL otherwise runs a generic path on non-Intel CPUs, on
which a forward over a few tokens costs up to twice one token; on the AVX-512 path it costs about
the same (measured on the 2-core AMD EPYC demo machine, fp32: the target's verify over N = 1, 2, 4,
8 tokens 58, 99, 97, 81 ms without, 59, 58, 55, 61 ms with; docs/kernels-and-exactness.md). MKL reads the
variable at its first call, so it takes effect when treespec is imported before the process's first
matrix product (as in every script here). Target-only decoding gets the same path: baselines are
measured with it too. Results stay deterministic for a given path (MKL's conditional numerical
reproducibility); fp32 losslessness tests run with it.
"""

import os as _os


def _prefer_mkl_avx512() -> None:
    if "MKL_CBWR" in _os.environ or _os.environ.get("TREESPEC_MKL_AVX512", "1") == "0":
        return
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:  # not Linux: leave MKL's own choice
        return
    if " avx512f" in flags:
        _os.environ["MKL_CBWR"] = "AVX512"


_prefer_mkl_avx512()
