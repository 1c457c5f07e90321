"""Small verbs on Hugging Face KV caches: layout, length, keep (gather + crop).

Layout (transformers 5.x ``DynamicCache``): ``cache.layers[l].keys`` / ``.values`` are
[batch, kv_heads, seq, head_dim]; the sequence axis is -2. After a tree forward the cache holds
``prefix + tree nodes`` in the order they were fed; committing keeps the prefix plus the accepted
path, moved to be contiguous, and drops the rest. A chain commit is a plain crop.

Sliding-window layers (Mistral, Phi-3, Gemma 2/3, Qwen2 with ``use_sliding_window``) keep full-length
caches too, so cache slot ``j`` always holds position ``j`` of the committed sequence. HF's own
``DynamicSlidingWindowLayer`` drops entries older than the window as soon as new ones are fed: after a
tree forward it may already have discarded prefix entries that the accepted path needs once the
other nodes are cut, and nothing can bring them back. Here the window lives in the masks instead:
HF builds them itself for plain causal forwards (prefill, root, chains: sized from the cache length,
so slot = position), and ``models.decoding.tree.tree_attention_mask`` applies the same rule to tree nodes
(``AttentionLayout.windows``). Entries older than the window are masked, so each query attends to
exactly the keys it attends to with HF's sliding cache; they cost memory and masked attention work,
not exactness.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import get_layer_types_and_kwargs

from models.errors import ConfigError

FULL_ATTENTION, SLIDING_ATTENTION = "full_attention", "sliding_attention"  # transformers' layer type names


@dataclass(frozen=True)
class AttentionLayout:
    """Which keys a model's attention layers see, by the layer type its masks are keyed by.

    ``windows``: layer type -> sliding window (None: full causal attention). A query at position p of
    a ``sliding_attention`` layer sees keys at positions > p - window, itself included (transformers'
    ``masking_utils.sliding_window_overlay``, the rule of every model that uses ``config.sliding_window``).
    A model with one layer type takes one 4-D mask for all layers; a model with both takes a dict
    ``{layer type: 4-D mask}`` (transformers 5.x hybrid models, e.g. Gemma 2/3, Qwen2 with
    ``max_window_layers`` below its depth, index their masks by ``config.layer_types``).
    """

    windows: dict[str, int | None]

    @property
    def sliding(self) -> bool:
        return any(w is not None for w in self.windows.values())


def attention_layout(model) -> AttentionLayout:
    """The model's ``AttentionLayout``; a ``ConfigError`` for attention that tree decoding cannot
    reproduce exactly (chunked, linear/recurrent, shared-KV, bidirectional or index-windowed layers)."""
    config = model.config.get_text_config(decoder=True)
    name = getattr(model.config, "model_type", type(model).__name__)
    if not getattr(config, "is_causal", True) or getattr(config, "use_bidirectional_attention", False):
        raise ConfigError(f"{name} uses bidirectional attention; tree decoding needs a causal LM")
    if "local" in (getattr(config, "attention_layers", None) or ()):
        # GPT-Neo: its local layers take their window from a buffer indexed by cache slot, not by
        # position, so a tree node (slot >= position) would see a shifted window; no mask can undo that.
        raise ConfigError(f"{name} has 'local' attention layers windowed by cache slot rather than position, which "
                          "tree verification cannot mask exactly; use a model without local layers")
    if any(mode == "reuse" for mode in (getattr(config, "kv_sharing_modes", None) or ())):
        raise ConfigError(f"{name} shares KV caches between layers, which tree decoding does not support")
    types, kwargs = get_layer_types_and_kwargs(config)  # what DynamicCache(config=...) builds its layers from
    windows: dict[str, int | None] = {}
    for i, (kind, kw) in enumerate(zip(types, kwargs)):
        if kind not in (FULL_ATTENTION, SLIDING_ATTENTION):
            raise ConfigError(
                f"layer {i} of {name} is a {kind!r} layer, which tree decoding does not support (its cache cannot be "
                "gathered after verification, or its mask is not a sliding window); supported: full-attention and "
                "sliding-window layers")
        window = int(kw["sliding_window"]) if kind == SLIDING_ATTENTION else None
        if windows.setdefault(kind, window) != window:
            raise ConfigError(f"{name} has sliding layers with different windows ({windows[kind]} and {window}); "
                              "tree decoding needs one window per layer type")
    if len(windows) > 1 and getattr(config, "layer_types", None) is None:
        raise ConfigError(f"{name} mixes full and sliding layers without config.layer_types to key their masks by")
    return AttentionLayout(windows)


def new_cache(model) -> DynamicCache:
    """An empty cache for ``model``: a full-length ``DynamicLayer`` per layer, sliding ones included
    (see the module docstring); refuses models ``attention_layout`` refuses."""
    attention_layout(model)
    return DynamicCache()  # no config: every layer a DynamicLayer, created as the model first fills it


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
