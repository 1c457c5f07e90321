"""Time the fp32 CPU linear kernels (``model.cpu_linear``) on the configured target's linear shapes.

    python scripts/bench_kernels.py                                    # mkl, onednn, invariant; 1-32 rows
    python scripts/bench_kernels.py "bench_kernels.kernels=[mkl,invariant,compile]" "bench_kernels.rows=[1,4,8,16]"
    python scripts/bench_kernels.py "bench_kernels.kernels=[invariant@3bf8ca6,invariant]"  # A/B a kernel change

For every distinct (in, out) shape of the target's ``nn.Linear`` layers (read from its config and
modules; weights are random) it times ``copies`` products per call, so weights stream from memory as
in a real forward, at each row count, kernels one after another in this process. Prints one table per
shape (ms per call and GB/s of weights read) and writes ``bench_kernels-<time>.json`` with provenance.
``compile`` is torch.compile with freezing and max-autotune (inductor's C++ GEMM template): it
compiles once per row count, minutes on two cores. Returns the invariant kernel's one-row time over
MKL's for the largest shape (lower is better). ``invariant@<git rev>`` is the invariant kernel built from
that revision's sources (same packed layout, checked), to time a kernel change against its predecessor.
"""

import json
import statistics
import time
from collections import Counter

import hydra
import torch
from omegaconf import DictConfig

from models.errors import ConfigError

KERNELS = ("mkl", "onednn", "invariant", "compile")


def linear_shapes(model) -> Counter:
    """(in_features, out_features) -> how many nn.Linear layers of ``model`` have that shape."""
    return Counter((m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear))


class _Set(torch.nn.Module):
    def __init__(self, k: int, n: int, copies: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(k, n, bias=False) for _ in range(copies))

    def forward(self, x):
        return [layer(x) for layer in self.layers]


def _median_ms(fn, x, repeats: int) -> float:
    for _ in range(2):
        fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def time_kernel(kernel: str, k: int, n: int, copies: int, rows: list[int], repeats: int) -> dict[int, float]:
    from models.kernels.fast_linear import set_linear_kernel

    torch.manual_seed(0)
    module = _Set(k, n, copies).eval().requires_grad_(False)
    library = None
    if kernel.startswith("invariant@"):
        from models.kernels import invariant_gemm

        library = invariant_gemm.build_revision(kernel.split("@", 1)[1])
    if kernel in ("onednn", "invariant") or library is not None:
        set_linear_kernel(module, "invariant" if library is not None else kernel)
    call = module
    if library is not None:
        def call(x):
            with invariant_gemm.use_library(library):
                return module(x)
    out = {}
    with torch.no_grad():
        for m in rows:
            fn = call
            if kernel == "compile":
                import torch._inductor.config as inductor

                inductor.freezing, inductor.max_autotune = True, True
                inductor.max_autotune_gemm_backends = "CPP,ATEN"
                torch._dynamo.reset()
                fn = torch.compile(module, dynamic=False)
            out[m] = _median_ms(fn, torch.randn(m, k), repeats)
    return out


def run(cfg: DictConfig) -> dict:
    from models.kernels import invariant_gemm
    from models.kernels.fast_linear import onednn_available
    from speculative_decoder import load_model, resolve_model_path
    from training.provenance import provenance

    b = cfg.bench_kernels
    kernels, rows = list(b.kernels), sorted({int(r) for r in b.rows})
    if not kernels or {k for k in kernels if not k.startswith("invariant@")} - set(KERNELS):
        raise ConfigError(f"bench_kernels.kernels must be a non-empty list of {KERNELS} or invariant@<git rev>, "
                          f"got {kernels}")
    if not rows or rows[0] < 1:
        raise ConfigError(f"bench_kernels.rows must be positive row counts, got {list(b.rows)}")
    if "onednn" in kernels and not onednn_available():
        print("skip onednn: this torch build has no oneDNN linear kernel")
        kernels.remove("onednn")
    if any(k.startswith("invariant") for k in kernels) and not invariant_gemm.available():
        print("skip invariant: the kernel cannot run here (no AVX-512 or no C++ compiler)")
        kernels = [k for k in kernels if not k.startswith("invariant")]
    m = cfg.model
    target = load_model(resolve_model_path(m.target_model_name, m.cache_dir), "cpu", "float32",
                        m.attn_implementation, "mkl")
    copies = int(b.copies or getattr(target.config, "num_hidden_layers", 1))
    shapes = linear_shapes(target)
    del target
    results = []
    for (k, n), count in sorted(shapes.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
        c = 1 if count == 1 else copies  # a shape used once (the lm_head) is timed once
        megabytes = c * k * n * 4 / 1e6
        print(f"\n[{k} -> {n}] x {c} ({megabytes:.0f} MB of fp32 weights per call; {count} in the target)")
        print(f"{'kernel':>18} " + " ".join(f"{r:>8} rows" for r in rows))
        for kernel in kernels:
            ms = time_kernel(kernel, k, n, c, rows, int(b.repeats))
            print(f"{kernel:>18} " + " ".join(f"{ms[r]:8.2f} ms " for r in rows)
                  + f"  ({megabytes / ms[rows[0]]:.0f} GB/s at {rows[0]} row{'s' if rows[0] > 1 else ''})")
            results.append(dict(shape=[k, n], copies=c, layers_in_target=count, kernel=kernel,
                                ms={str(r): ms[r] for r in rows}))
    from models.paths import repo_path

    out_dir = repo_path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"bench_kernels-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(dict(threads=torch.get_num_threads(), rows=rows, results=results,
                                    provenance=provenance(cfg)), indent=1))
    print(f"\nwrote {path}")
    return dict(results=results, path=path)


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    out = run(cfg)
    first = out["results"][0]
    by = {r["kernel"]: r for r in out["results"] if r["shape"] == first["shape"]}
    one = str(min(int(r) for r in first["ms"]))
    if "invariant" in by and "mkl" in by:
        return by["invariant"]["ms"][one] / by["mkl"]["ms"][one]
    return float("nan")


if __name__ == "__main__":
    main()
