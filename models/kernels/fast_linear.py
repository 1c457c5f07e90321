"""Which kernel runs a model's CPU linear layers (``model.cpu_linear``; fp32, and bf16 with ``invariant``).

- ``invariant``: treespec's own batch-invariant kernel (``models/kernels/invariant_gemm.py``; AVX-512, or AVX2 +
  FMA): on the 2-core AMD EPYC test machine with AVX-512 the demo target's forward after 200 cached
  tokens takes 26 ms for 1 token and 36 for 8, against 45 and 66 with ``hybrid``; on the AVX2 one
  52 and 67 against 61 and 138; every row's result is bitwise the same however many rows are
  computed with it.
- ``auto`` (default): ``invariant`` where it can run (AVX-512 or AVX2 + FMA CPU, a C++ compiler), else
  ``hybrid``.
- ``hybrid``: oneDNN's prepacked kernel (``torch.ops.mkldnn._reorder_linear_weight`` +
  ``_linear_pointwise``, what torch.compile's CPU freezing uses) for one-row products, MKL for more.
- ``onednn``: oneDNN for every product. ``mkl``: the model is left alone (torch's default GEMM).

``apply_cpu_linear(model, mode)`` routes every fp32 CPU ``nn.Linear`` of the model: its forward is
swapped for one that dispatches on the module's current route, so a model can be switched between
kernels at any time (the benchmark compares kernels in one run that way). The original weights stay
the model's parameters (state_dict, tying, fingerprints unchanged); packed copies are made on first
use per kernel, remade when the weight changes in place or is replaced, and the plain ``F.linear``
runs whenever autograd needs it (training), the input is not fp32 on the CPU, or the route is MKL.
Results differ from MKL's by float rounding only, so the fp32 contract (greedy tokens identical to
the target alone) holds and is tested with every setting. docs/kernels-and-exactness.md.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F

from models.config import CPU_LINEAR
from models.kernels import invariant_gemm

log = logging.getLogger(__name__)
_warned = False


def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _plain(x: torch.Tensor, w: torch.Tensor, route: str | None) -> bool:
    """True when the product must take torch's own path: MKL route, autograd, not on the CPU, no rows,
    or a dtype the route's kernel lacks (oneDNN: fp32; invariant: fp32, and bf16 on AVX512_BF16 CPUs)."""
    if route is None or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) \
            or x.device.type != "cpu" or w.device.type != "cpu" or x.numel() == 0 or x.dtype != w.dtype:
        return True
    if route == "invariant":
        return not invariant_gemm.supports(x.dtype)
    return x.dtype != torch.float32


def _packed(owner, slot: str, w: torch.Tensor, pack):
    """The packed copy of ``w`` kept in ``owner.<slot>``, remade when ``w`` changed since."""
    entry = getattr(owner, slot, None)
    if entry is None or entry[1] != w._version or entry[2] != w.data_ptr():
        with torch.no_grad():
            entry = pack(w.detach()), w._version, w.data_ptr()
        setattr(owner, slot, entry)
    return entry[0]


def _onednn_pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w, 1)


def _routed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    route, w = self._treespec_route, self.weight
    if _plain(x, w, route):
        return F.linear(x, w, self.bias)
    if route == "invariant":
        return invariant_gemm.linear(x, _packed(self, "_treespec_invariant", w, invariant_gemm.pack), w.shape[0],
                                     self.bias)
    if route == "hybrid" and x.numel() > x.shape[-1]:
        return F.linear(x, w, self.bias)  # hybrid: MKL for products over several rows
    packed = _packed(self, "_treespec_onednn", w, _onednn_pack)
    shape = x.shape
    bias = self.bias.detach() if self.bias is not None else None
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), packed, bias, "none", [], "")
    return y.reshape(*shape[:-1], y.shape[-1])


def frozen_linear(owner: torch.nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for a frozen weight buffer ``W = owner.<name>`` (e.g. the EAGLE head's reduced
    lm_head; the owner's class lists it in ``_treespec_frozen_weights``): on treespec's kernel when the
    owner's linears are routed there, else a plain matmul."""
    w = getattr(owner, name)
    route = getattr(owner, "_treespec_route", None)
    if route != "invariant" or _plain(x, w, route):
        return x @ w.to(x.dtype).t()
    return invariant_gemm.linear(x, _packed(owner, f"_treespec_frozen_{name}", w, invariant_gemm.pack), w.shape[0])


def set_linear_kernel(model: torch.nn.Module, mode: str) -> int:
    """Route every CPU ``nn.Linear`` of ``model`` (fp32; with ``invariant`` also bf16), and the frozen
    weights of modules that declare ``_treespec_frozen_weights``, to ``mode`` (``invariant`` |
    ``hybrid`` | ``onednn`` | ``mkl``, already resolved); returns how many linears. Switching back and forth is cheap: packed copies are kept.
    Raises ``invariant_gemm.KernelUnavailable`` for ``invariant`` where it cannot run; oneDNN modes are
    a no-op (0) on a torch build without oneDNN's linear kernel."""
    if mode == "invariant":
        invariant_gemm.load()
    elif mode in ("hybrid", "onednn") and not onednn_available():
        return 0
    route = None if mode == "mkl" else mode
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype in invariant_gemm.DTYPES \
                and module.weight.device.type == "cpu":
            if not hasattr(module, "_treespec_route"):
                if route is None:
                    continue  # never routed: nothing to undo
                module.forward = types.MethodType(_routed_forward, module)
            module._treespec_route = route
            count += 1
        elif getattr(module, "_treespec_frozen_weights", None):
            module._treespec_route = route
    return count


def linear_kernel(model: torch.nn.Module) -> str | None:
    """The kernel ``model``'s linears are routed to (``"invariant"``, ``"hybrid"`` or ``"onednn"``), or
    None (MKL: never routed, or routed back)."""
    for m in model.modules():
        if type(m) is torch.nn.Linear and hasattr(m, "_treespec_route"):
            return m._treespec_route
    return None


def resolve_cpu_linear(mode: str) -> str:
    """``auto`` -> ``invariant`` where the kernel builds and runs here, else ``hybrid`` (logged once)."""
    if mode not in CPU_LINEAR:
        raise ValueError(f"cpu_linear must be one of {CPU_LINEAR}, got {mode!r}")
    if mode != "auto":
        return mode
    try:
        invariant_gemm.load()
        return "invariant"
    except invariant_gemm.KernelUnavailable as exc:
        global _warned
        if not _warned:
            log.warning("model.cpu_linear=auto: using hybrid (oneDNN/MKL) kernels: %s", exc)
            _warned = True
        return "hybrid"


def apply_cpu_linear(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``model.cpu_linear`` on ``model`` (``auto`` resolved first); returns the model."""
    set_linear_kernel(model, resolve_cpu_linear(mode))
    return model
