"""Small verbs on Hugging Face KV caches: length, keep (gather + crop), check.

Layout (transformers 5.x ``DynamicCache``): ``cache.layers[l].keys`` / ``.values`` are
[batch, kv_heads, seq, head_dim]; the sequence axis is -2. After a tree forward the cache holds
``prefix + tree nodes`` in the order they were fed; committing keeps the prefix plus the accepted
path, moved to be contiguous, and drops the rest. A chain commit is a plain crop.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from models.errors import ConfigError


def new_cache(model) -> DynamicCache:
    """An empty dynamic cache for ``model`` (layer types from its config)."""
    cache = DynamicCache(config=model.config)
    check_supported(cache)
    return cache


def check_supported(cache) -> None:
    """Tree commits need full-attention layers we can gather; sliding windows are refused."""
    for layer in getattr(cache, "layers", []):
        if type(layer) is not DynamicLayer:
            raise ConfigError(
                f"KV cache layer type {type(layer).__name__} is not supported by tree decoding "
                "(only full-attention DynamicLayer caches can be gathered after verification); "
                "use a model without sliding-window or linear-attention layers")


def cache_length(cache) -> int:
    return 0 if cache is None else cache.get_seq_length()


def keep_tokens(cache, prefix_len: int, keep: torch.Tensor | list[int]) -> None:
    """Keep cache positions ``[0, prefix_len)`` plus ``prefix_len + keep`` (in that order); drop the rest.

    ``keep`` holds offsets into the entries after the prefix, ascending. In place.
    """
    keep = torch.as_tensor(keep, dtype=torch.long)
    total = cache_length(cache)
    new_len = prefix_len + len(keep)
    contiguous = len(keep) == 0 or bool((keep == torch.arange(len(keep))).all())
    for layer in cache.layers:
        if not layer.is_initialized or layer.keys.numel() == 0:
            continue
        if not contiguous:
            idx = (prefix_len + keep).to(layer.keys.device)
            # keys: [B, H, S, D]; move the accepted entries to sit right after the prefix
            layer.keys[:, :, prefix_len:new_len] = layer.keys.index_select(2, idx)
            layer.values[:, :, prefix_len:new_len] = layer.values.index_select(2, idx)
        layer.keys = layer.keys[:, :, :new_len]
        layer.values = layer.values[:, :, :new_len]
    assert total >= new_len, (total, new_len)
