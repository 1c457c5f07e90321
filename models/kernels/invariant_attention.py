"""Batch-invariant attention for Hugging Face models (``model.attn_implementation=invariant``).

Registered with transformers' ``AttentionInterface`` (and its mask interface, as SDPA's mask) under
``treespec_invariant``. Forwards over at most ``MAX_QUERIES`` new tokens of one sequence (decode
steps, tree verification) run ``models.kernels.invariant_gemm.attention``: each query row scans the keys it
may see in cache order with every sum in a fixed order, so its output is bitwise the same whether it
is computed alone (one-token decoding) or among the nodes of a tree, whatever masked-out siblings
share the call. With ``model.cpu_linear=invariant`` the linear layers are batch invariant too, and the
target's logits during tree verification are then bitwise the logits one-token decoding computes,
in fp32 and in bf16 (docs/kernels-and-exactness.md, "Exactness per dtype"). Anything else (prefill, batches, training,
other devices or dtypes, head sizes that are not a multiple of 16, soft-capping, sinks, per-head
masks) takes transformers' SDPA path (the model's eager attention where SDPA cannot serve:
soft-capping, sinks), so the implementation is always safe to select.
"""

from __future__ import annotations

import sys

import torch

from models.kernels import invariant_gemm

NAME = "treespec_invariant"  # the attn_implementation transformers sees
MAX_QUERIES = 64  # longer forwards (prefill) use SDPA: same for every decoding method, so no invariance needed
_registered = False
_EAGER_ONLY = ("softcap", "s_aux", "sinks")  # attention features SDPA and the kernel lack: the model's eager path


def _fallback(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA; the model's own eager attention where SDPA cannot serve (soft-capping,
    attention sinks: Gemma 2, gpt-oss), with SDPA's boolean mask turned additive for it."""
    if any(kwargs.get(k) is not None for k in _EAGER_ONLY):
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            n, length = query.shape[2], key.shape[2]
            if attention_mask is None and n > 1:  # SDPA's mask skips plain causal masks; eager needs one
                attention_mask = torch.arange(n)[:, None] + length - n >= torch.arange(length)[None, :]
                attention_mask = attention_mask[None, None].to(query.device)
            if attention_mask is not None and attention_mask.dtype == torch.bool:
                attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device) \
                    .masked_fill_(~attention_mask, torch.finfo(query.dtype).min)
            kwargs.pop("is_causal", None)
            return eager(module, query, key, value, attention_mask, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _mask_rows(attention_mask, n: int, length: int) -> torch.Tensor | None | bool:
    """The [N, L] additive fp32 mask rows, None for causal, False when this mask cannot be used."""
    if attention_mask is None:
        return None
    if attention_mask.dim() != 4 or attention_mask.shape[0] != 1 or attention_mask.shape[1] != 1 \
            or attention_mask.shape[2] != n or attention_mask.shape[3] < length:
        return False
    rows = attention_mask[0, 0, :, :length]
    if rows.dtype == torch.bool:  # True = may attend
        return torch.zeros(rows.shape, dtype=torch.float32).masked_fill_(~rows, float("-inf"))
    return rows.to(torch.float32)


def invariant_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                scaling: float | None = None, is_causal: bool | None = None, **kwargs):
    """transformers' attention-function signature: query [1, H, N, D], key/value [1, KVH, L, D] (the
    cache after this step's update); returns ([1, N, H, D], None)."""
    n, d = query.shape[2], query.shape[3]
    usable = (query.shape[0] == 1 and n <= MAX_QUERIES and query.device.type == "cpu"
              and invariant_gemm.supports(query.dtype) and key.dtype == query.dtype and value.dtype == query.dtype
              and d % 16 == 0 and d <= 256 and value.shape[-1] == d and query.shape[1] % key.shape[1] == 0
              and not (module.training and dropout) and not torch.is_grad_enabled()
              and all(kwargs.get(k) is None for k in _EAGER_ONLY + ("position_bias",)) and not kwargs.get("output_attentions", False)
              and invariant_gemm.available())
    rows = _mask_rows(attention_mask, n, key.shape[2]) if usable else False
    if rows is False:
        return _fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                         is_causal=is_causal, **kwargs)
    if rows is None and is_causal is False:  # bidirectional with no mask: every key visible
        rows = torch.zeros(n, key.shape[2], dtype=torch.float32)
    scale = scaling if scaling is not None else d ** -0.5
    out = invariant_gemm.attention(query[0], key[0], value[0], rows, scale)  # [N, H, D]
    return out.unsqueeze(0), None


def register() -> str:
    """Make ``treespec_invariant`` a transformers attention implementation; returns the name."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(NAME, invariant_attention_forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
    return NAME
