"""EAGLE-style feature-conditioned draft: a one-layer head over the target's own hidden states.

The head reads pairs (f_t, x_{t+1}): the target's final hidden state at position t (the input of its
lm_head) and the embedding of the token that followed, and predicts f_{t+1}. A reduced-vocabulary
slice of the target's lm_head scores the prediction, so drafting costs one small layer plus a
[V_r, H] matmul instead of a whole model and a [V, H] one. Deeper tree levels feed the head's own
predicted features back in (EAGLE's autoregression at the feature level).

EAGLE-3 style fused features (``EagleConfig.feature_layers``, set by the teacher recipe's
``teacher.feature_layers``): instead of the final hidden state alone, the head reads the target's
hidden states at several layers (Hugging Face ``hidden_states[l]``, e.g. a low, a middle and a high
one), concatenated and mapped to the hidden size by a learned ``fuse`` projection; deeper levels feed
back the head's own output in that fused space (trained so by the "training-time test" unroll).

    EagleHead          the trainable module (fc over [embed ; feature], one pre-norm decoder layer
                       with RoPE and grouped-query attention, its own tiny KV cache)
    EagleDrafter       the ``Drafter`` the decoder drives; needs the target's hidden states, which the
                       decoder asks the target for in its prefill and verify passes
    load_eagle_draft / save_eagle_draft   checkpoints: safetensors (fp16 by default) + json metadata;
                       the frozen embedding and lm_head rows are *not* stored, they come from the target

The layer is written here (about sixty lines) rather than borrowed from a Hugging Face modeling file:
its cache is two tensors that the drafter crops in place, and per-call overhead matters when one
forward should cost a few milliseconds.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from models.decoding.drafter import Drafter
from models.decoding.tree import DraftTree
from models.errors import ModelLoadError, VocabularyMismatchError
from models.kernels.fast_linear import frozen_linear

WEIGHTS = "eagle_head.safetensors"
META = "eagle_head.json"
FAMILY = "eagle"


@dataclass
class EagleConfig:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int  # the target's full vocabulary
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    draft_vocab: list[int] = field(default_factory=list)  # full-vocabulary ids the head can propose
    feature_layers: list[int] = field(default_factory=list)  # [] = the final hidden state (EAGLE-1/2)
    feature_norm: bool = False  # RMS-normalize each fused layer's state before ``fuse`` (see EagleHead)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_target(cls, target, draft_vocab: list[int], intermediate_size: int | None = None,
                    feature_layers=None, feature_norm: bool = False) -> "EagleConfig":
        c = target.config
        heads = c.num_attention_heads
        return cls(hidden_size=c.hidden_size, num_heads=heads,
                   num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                   intermediate_size=intermediate_size or getattr(c, "intermediate_size", 4 * c.hidden_size),
                   vocab_size=target.get_output_embeddings().weight.shape[0],
                   rope_theta=float(getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)),
                   rms_eps=float(getattr(c, "rms_norm_eps", 1e-5)), draft_vocab=list(map(int, draft_vocab)),
                   feature_layers=[int(l) for l in (feature_layers or [])],
                   feature_norm=bool(feature_norm and feature_layers))


class _RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class LayerCache:
    """The KV cache of a draft head's one attention layer (``k_cache`` / ``v_cache`` [1, nkv, L, d]),
    filled by ``cached_rope_attention``; the drafter crops it to what was committed."""

    k_cache: torch.Tensor | None = None
    v_cache: torch.Tensor | None = None

    def reset_cache(self) -> None:
        self.k_cache = self.v_cache = None

    def cache_length(self) -> int:
        return 0 if self.k_cache is None else self.k_cache.shape[2]

    def crop_cache(self, length: int) -> None:
        if self.k_cache is not None:
            self.k_cache = self.k_cache[:, :, :length]
            self.v_cache = self.v_cache[:, :, :length]


def cached_rope_attention(layer, q, k, v, positions, mask, use_cache: bool) -> torch.Tensor:
    """RoPE + grouped-query attention of a draft head's one layer, with its own KV cache.

    q [B, nh, T, d], k / v [B, nkv, T, d], positions [B, T]; ``layer`` holds ``inv_freq`` and the cache
    (``k_cache`` / ``v_cache`` [B, nkv, L, d]). Without cache: causal among the T rows (training).
    With cache: the rows see every cached entry plus what ``mask`` [T, L + T] (bool, True = visible)
    allows; ``mask`` None means causal among the new rows. Returns [B, nh, T, d].
    """
    t = q.shape[2]
    ang = positions.float().unsqueeze(-1) * layer.inv_freq  # [B, T, d/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1).unsqueeze(1).to(q.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).unsqueeze(1).to(q.dtype)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    if not use_cache:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    if layer.k_cache is not None:
        k = torch.cat([layer.k_cache, k], dim=2)
        v = torch.cat([layer.v_cache, v], dim=2)
    layer.k_cache, layer.v_cache = k, v
    past = k.shape[2] - t
    if mask is None:
        mask = torch.ones(t, past + t, dtype=torch.bool, device=q.device).tril(past)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


class EagleHead(LayerCache, nn.Module):
    """fc([embed(x_{t+1}); f_t]) -> one decoder layer -> predicted f_{t+1}; logits over ``draft_vocab``.
    ``forward`` takes features in the head's space; ``encode`` maps the target's (fused) features there."""
    _treespec_frozen_weights = ("lm_head",)  # model.cpu_linear's kernel also runs the reduced lm_head

    def __init__(self, cfg: EagleConfig, embed_weight: torch.Tensor, lm_head_weight: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.hidden_size, cfg.head_dim
        self.fc = nn.Linear(2 * h, h, bias=True)
        # EAGLE-3: the target's states at len(feature_layers) layers -> one feature of the hidden size
        self.fuse = nn.Linear(len(cfg.feature_layers) * h, h, bias=False) if cfg.feature_layers else None
        # Inner layers' states carry a few "massive activation" channels (demo target, layer 15: median
        # |x| 2, two channels averaging 250 and 87, peaks of 24960): without a per-layer RMSNorm the
        # fused input, hence the first logits, are huge and training crawls (EAGLE-3 normalizes too).
        self.feature_norms = (nn.ModuleList(_RMSNorm(h, cfg.rms_eps) for _ in cfg.feature_layers)
                              if cfg.feature_layers and cfg.feature_norm else None)
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)
        self.post_attn_norm = _RMSNorm(h, cfg.rms_eps)
        self.gate_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(h, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, h, bias=False)
        # Frozen, borrowed from the target (never saved): token embeddings and the reduced lm_head.
        ids = torch.tensor(cfg.draft_vocab, dtype=torch.long)
        self.register_buffer("embed", embed_weight.detach(), persistent=False)
        self.register_buffer("lm_head", lm_head_weight.detach()[ids].clone(), persistent=False)
        self.register_buffer("vocab_ids", ids, persistent=False)
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.reset_cache()

    # ------------------------------------------------------------------ forward
    @property
    def feature_size(self) -> int:
        """Width of the target features the head reads: k*H for fused layers, else H."""
        return max(len(self.cfg.feature_layers), 1) * self.cfg.hidden_size

    def encode(self, target_feats: torch.Tensor) -> torch.Tensor:
        """The target's features [..., feature_size] -> the head's input space [..., H]."""
        if target_feats.shape[-1] != self.feature_size:
            raise ValueError(f"the head reads target features of width {self.feature_size} "
                             f"(feature_layers={self.cfg.feature_layers}), got {target_feats.shape[-1]}")
        if self.fuse is None:
            return target_feats
        if self.feature_norms is not None:
            parts = target_feats.split(self.cfg.hidden_size, dim=-1)
            target_feats = torch.cat([norm(x) for norm, x in zip(self.feature_norms, parts)], dim=-1)
        return self.fuse(target_feats)

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor | None = None, use_cache: bool = False) -> torch.Tensor:
        """Predicted next features [B, T, H] for pairs (feats [B, T, H], tokens [B, T]).

        Without cache: causal attention over the T pairs (training). With cache: the pairs attend
        to every cached entry plus what ``mask`` [T, L_cache + T] (bool, True = visible) allows;
        ``mask`` None means causal among the new pairs.
        """
        cfg = self.cfg
        b, t, _ = feats.shape
        x = self.fc(torch.cat([F.embedding(tokens, self.embed).to(feats.dtype), feats], dim=-1))
        q = self.q_proj(x).view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        attn = cached_rope_attention(self, q, k, v, positions, mask, use_cache)
        x = x + self.o_proj(attn.transpose(1, 2).reshape(b, t, -1))
        y = self.post_attn_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(y)) * self.up_proj(y))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over the reduced vocabulary [..., V_r]."""
        return frozen_linear(self, "lm_head", hidden)



# ---------------------------------------------------------------------- checkpoints
def save_eagle_draft(head: EagleHead, out_dir: str | Path, meta: dict | None = None,
                     dtype: torch.dtype = torch.float16) -> Path:

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to(dtype).contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS))
    info = {"family": FAMILY, "config": asdict(head.cfg), **(meta or {})}
    (out / META).write_text(json.dumps(info, indent=1) + "\n")
    return out


def is_eagle_draft(path: str | Path) -> bool:
    return (Path(path) / META).is_file()


def load_eagle_draft(path: str | Path, target, dtype: torch.dtype | None = None) -> EagleHead:
    """The head saved in ``path``, wired to ``target``'s embedding and lm_head. Clear errors for a
    corrupt file or a head made for another target (hidden size / vocabulary)."""

    path = Path(path)
    try:
        info = json.loads((path / META).read_text())
        cfg = EagleConfig(**info["config"])
        state = load_file(str(path / WEIGHTS))
    except Exception as exc:
        raise ModelLoadError(f"EAGLE draft checkpoint in {path} is unreadable or incomplete ({exc}); "
                             "remake it with scripts/train_draft.py") from exc
    emb = target.get_input_embeddings().weight
    head_w = target.get_output_embeddings().weight
    if emb.shape[1] != cfg.hidden_size or head_w.shape[0] != cfg.vocab_size:
        raise VocabularyMismatchError(
            f"EAGLE draft in {path} was made for hidden size {cfg.hidden_size} / vocabulary {cfg.vocab_size}; "
            f"this target has {emb.shape[1]} / {head_w.shape[0]}")
    if cfg.draft_vocab and max(cfg.draft_vocab) >= cfg.vocab_size:
        raise ModelLoadError(f"EAGLE draft in {path} names token ids outside the vocabulary")
    dtype = dtype or emb.dtype
    head = EagleHead(cfg, emb, head_w)
    try:
        head.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(f"EAGLE draft weights in {path} do not match its config: {exc}") from exc
    return head.to(device=emb.device, dtype=dtype).eval()


# ---------------------------------------------------------------------- the drafter
class EagleDrafter(Drafter):
    """Drives an ``EagleHead`` for the decoder.

    Head cache layout: one entry per pair (f_t, x_{t+1}) at position t. Committed pairs always use
    the target's true features; tree nodes use the head's own predictions and are dropped at commit
    (the accepted tokens are re-fed with true features in front of the next root, as in EAGLE).
    """

    needs_target_hidden = True

    def __init__(self, head: EagleHead):
        self.head = head
        self.full_vocab = head.cfg.vocab_size
        self.pending_feats: list[torch.Tensor] = []  # committed pairs not yet fed: features ...
        self.pending_tokens: list[int] = []  # ... and the tokens that followed them
        self.last_feat: torch.Tensor | None = None  # feature of the last committed token
        self.tree_base = 0
        self.cached_nodes: list[int] = []
        self.node_feats: dict[int, torch.Tensor] = {}  # predicted feature after each proposed node

    @property
    def device(self) -> torch.device:
        return self.head.embed.device

    @property
    def identity_module(self) -> torch.nn.Module:
        return self.head

    @property
    def feature_layers(self) -> list[int]:
        """The target layers whose hidden states the head reads ([]: the final one; models.decoding.drafter.target_features)."""
        return list(self.head.cfg.feature_layers)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, target_hidden: torch.Tensor | None = None) -> None:
        if target_hidden is None:
            raise ValueError("EagleDrafter.prefill needs the target's hidden states of the prompt")
        feats = self.head.encode(target_hidden.reshape(-1, target_hidden.shape[-1]).to(self.device, self.head.embed.dtype))
        ids = input_ids.reshape(-1).tolist()
        self.head.reset_cache()
        self.pending_feats = list(feats[:-1].unbind(0))
        self.pending_tokens = ids[1:]
        self.last_feat = feats[-1]
        self.cached_nodes, self.node_feats = [], {}

    def _expand(self, scores: torch.Tensor) -> torch.Tensor:
        """Reduced-vocabulary scores [F, V_r] -> full-vocabulary logits [F, V] (-inf elsewhere)."""
        full = scores.new_full((scores.shape[0], self.full_vocab), float("-inf"))
        full[:, self.head.vocab_ids] = scores
        return full

    @torch.no_grad()
    def propose(self, tree: DraftTree, nodes: list[int]) -> torch.Tensor:
        head = self.head
        if nodes == [0]:
            feats = torch.stack(self.pending_feats + [self.last_feat]).unsqueeze(0)  # [1, P+1, H]
            toks = torch.tensor([self.pending_tokens + [int(tree.tokens[0])]], device=self.device)
            start = head.cache_length()
            pos = torch.arange(start, start + toks.shape[1], device=self.device).unsqueeze(0)
            out = head(feats, toks, pos, use_cache=True)[0, -1:]  # [1, H]
            self.tree_base = start + len(self.pending_tokens)
            self.pending_feats, self.pending_tokens = [], []
            self.cached_nodes, self.node_feats = [0], {0: out[0]}
            self.last_hidden = out  # [1, H] predicted target feature: what the logits come from
            return self._expand(head.logits(out)).float()
        keys = self.cached_nodes + nodes
        node_idx = torch.tensor(nodes)
        visible = tree.visibility(nodes, keys).to(self.device)  # [F, K]
        prefix = torch.ones(len(nodes), self.tree_base, dtype=torch.bool, device=self.device)
        mask = torch.cat([prefix, visible], dim=1)
        parents = tree.parents[node_idx].tolist()
        feats = torch.stack([self.node_feats[p] for p in parents]).unsqueeze(0)  # [1, F, H]
        toks = tree.tokens[node_idx].unsqueeze(0).to(self.device)
        pos = (self.tree_base + tree.depth[node_idx]).unsqueeze(0).to(self.device)
        out = head(feats, toks, pos, mask=mask, use_cache=True)[0]  # [F, H]
        self.cached_nodes = keys
        self.node_feats.update(zip(nodes, out.unbind(0)))
        self.last_hidden = out  # [F, H]
        return self._expand(head.logits(out)).float()

    @torch.no_grad()
    def commit(self, tree: DraftTree, path: list[int], target_hidden: torch.Tensor | None = None) -> None:
        if target_hidden is None:
            raise ValueError("EagleDrafter.commit needs the target's hidden states of the accepted path")
        feats = self.head.encode(target_hidden.reshape(len(path), -1).to(self.device, self.head.embed.dtype))
        tokens = tree.tokens[path].tolist()
        if self.cached_nodes:  # the root pair (true feature) stays; drafted nodes go
            self.head.crop_cache(self.tree_base + 1)
        else:  # nothing drafted this step: the root pair was never fed
            self.pending_feats.append(self.last_feat)
            self.pending_tokens.append(tokens[0])
        self.pending_feats += list(feats[:-1].unbind(0))
        self.pending_tokens += tokens[1:]
        self.last_feat = feats[-1]
        self.cached_nodes, self.node_feats = [], {}
