"""oneDNN's prepacked fp32 linear layers on CPU (``model.cpu_linear``: ``hybrid`` default, ``mkl``, ``onednn``).

The CPU build of torch runs ``nn.Linear`` in fp32 through MKL's GEMM. oneDNN, shipped in the same
build, has a linear kernel over weights reordered once into its blocked layout
(``torch.ops.mkldnn._reorder_linear_weight`` + ``_linear_pointwise``, the kernels torch.compile's
CPU freezing uses). On the 2-core AMD EPYC test machine it ran the demo target's forward after 200
cached tokens in 41-52 ms for 1 token against MKL's 60-70 ms, but 76-89 against 78-92 ms for 16,
and end to end the tree was slower with it than with MKL. ``hybrid`` therefore uses oneDNN for
one-row products only (token-by-token decoding: the target alone +25% end to end) and MKL for
several rows (tree verification, prefill). README, "Speed levers".

``use_onednn_linears(model)`` swaps the forward of every fp32 CPU ``nn.Linear`` of the model for the
packed kernel. The original weights stay the model's parameters (state_dict, tying, fingerprints
unchanged); the packed copy is remade when the weight changes in place or is replaced, and the
plain ``F.linear`` runs whenever autograd needs it (training), the input is not fp32 on the CPU, or
oneDNN is unavailable. Results differ from MKL's by float rounding only (<= 1e-4 on the demo
target's logits, the size of MKL's own differences between one and several rows), so the fp32
contract (greedy tokens identical to the target alone) holds and is tested with both settings.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

from models.config import CPU_LINEAR



def onednn_available() -> bool:
    return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _pack(weight: torch.Tensor) -> tuple:
    with torch.no_grad():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1), weight._version, weight.data_ptr()


def _packed_forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    if (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)) or x.dtype != torch.float32 \
            or w.dtype != torch.float32 or x.device.type != "cpu" or w.device.type != "cpu" or x.numel() == 0:
        return F.linear(x, w, self.bias)
    if self._treespec_rows_max and x.numel() > self._treespec_rows_max * x.shape[-1]:
        return F.linear(x, w, self.bias)  # hybrid: MKL for products over several rows
    packed, version, ptr = self._treespec_onednn
    if version != w._version or ptr != w.data_ptr():  # the weight changed since it was packed
        self._treespec_onednn = _pack(w)
        packed = self._treespec_onednn[0]
    shape = x.shape
    bias = self.bias.detach() if self.bias is not None else None
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, shape[-1]), packed, bias, "none", [], "")
    return y.reshape(*shape[:-1], y.shape[-1])


def use_onednn_linears(model: torch.nn.Module, max_rows: int | None = None) -> int:
    """Route every fp32 CPU ``nn.Linear`` of ``model`` through oneDNN's packed kernel; returns how many
    (0 when oneDNN is unavailable or nothing qualifies). ``max_rows``: only products over at most that
    many rows (``hybrid`` = 1: one-token decoding on oneDNN, tree verification and prefill on MKL).
    Idempotent (a second call only updates ``max_rows``)."""
    if not onednn_available():
        return 0
    count = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear and module.weight.dtype == torch.float32 \
                and module.weight.device.type == "cpu":
            if not hasattr(module, "_treespec_onednn"):
                module._treespec_onednn = _pack(module.weight)
                module.forward = types.MethodType(_packed_forward, module)
            module._treespec_rows_max = max_rows
            count += 1
    return count


def uses_onednn(model: torch.nn.Module) -> str | None:
    """``"onednn"`` or ``"hybrid"`` when ``use_onednn_linears`` was applied to ``model``, else None."""
    for m in model.modules():
        if hasattr(m, "_treespec_onednn"):
            return "hybrid" if m._treespec_rows_max else "onednn"
    return None


def apply_cpu_linear(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """``model.cpu_linear``: ``mkl`` leaves the model alone; ``onednn`` / ``hybrid`` pack its linears."""
    if mode not in CPU_LINEAR:
        raise ValueError(f"cpu_linear must be one of {CPU_LINEAR}, got {mode!r}")
    if mode != "mkl":
        use_onednn_linears(model, max_rows=1 if mode == "hybrid" else None)
    return model
