"""EAGLE-3 drafts in the layout the serving engines load (vLLM ``method: eagle3``, SGLang ``EAGLE3``,
llama.cpp ``--spec-type draft-eagle3``; SpecForge and the EAGLE authors publish it).

A checkpoint is a directory with
    config.json          ``architectures: ["LlamaForCausalLMEagle3"]``, a one-layer Llama config over the
                         draft hidden size, ``vocab_size`` (the target's), ``draft_vocab_size``,
                         ``target_hidden_size``, and ``eagle_config.eagle_aux_hidden_state_layer_ids``:
                         the target layers whose states the draft reads
    model.safetensors    fc.weight [H, 3 Ht]              the fused target states -> draft hidden
                         midlayer.hidden_norm.weight [H]  midlayer.input_layernorm.weight [H]
                         midlayer.self_attn.{q,k,v}_proj.weight [nh d | nkv d, 2H]   (reads [embed; hidden])
                         midlayer.self_attn.o_proj.weight [H, nh d]
                         midlayer.post_attention_layernorm.weight [H]
                         midlayer.mlp.{gate,up}_proj.weight [I, H], midlayer.mlp.down_proj.weight [H, I]
                         norm.weight [H]                  lm_head.weight [Vd, H]
                         d2t [Vd] (target id = draft id + d2t[draft id])   t2d [V] (bool: in the draft vocab)
                         embed_tokens.weight [V, H]       optional: the target's embeddings when absent
    treespec.json        treespec's own metadata beside it (how it was trained, its evaluation)

One step, for the pair (h_t, x_{t+1}) at position t (h_t: the target's states at the aux layers,
concatenated, for committed tokens; the draft's own previous output for drafted ones):
    g  = fc(h_t) if h_t comes from the target else h_t                       # [.., H]
    a  = attn(cat(input_layernorm(embed(x_{t+1})), hidden_norm(g)))           # RoPE at position t
    r  = g + a;  out = r + mlp(post_attention_layernorm(r))                  # fed back to the next step
    logits over the draft vocabulary = lm_head(norm(out)), token = id + d2t[id]

Aux layer ``l`` means the input of target decoder layer ``l`` (the output of layer l - 1): Hugging
Face ``hidden_states[l]``, as vLLM collects them. The engines' default for a target of L layers is
(2, L // 2, L - 3). ``Eagle3Draft`` exposes the same small interface as ``EagleHead`` (``encode``,
``forward``, ``logits``, the cache verbs), so ``EagleDrafter`` drives both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from models.drafters.eagle import LayerCache, _RMSNorm, cached_rope_attention
from models.errors import ModelLoadError, VocabularyMismatchError

ARCHITECTURE = "LlamaForCausalLMEagle3"
ARCHITECTURES = (ARCHITECTURE, "Eagle3LlamaForCausalLM", "LlamaForCausalLMEagle3")  # names the engines accept
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
META = "treespec.json"


def default_aux_layers(num_target_layers: int) -> list[int]:
    """The engines' default aux layers for a target of ``num_target_layers`` decoder layers."""
    return [2, num_target_layers // 2, num_target_layers - 3]


@dataclass
class Eagle3Config:
    hidden_size: int  # H, the draft's
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int  # V, the target's
    draft_vocab_size: int  # Vd
    target_hidden_size: int  # Ht
    feature_layers: list[int]  # the aux layers (eagle_aux_hidden_state_layer_ids)
    rope_theta: float
    rms_eps: float
    max_position_embeddings: int

    @classmethod
    def for_target(cls, target, draft_vocab_size: int, feature_layers: list[int] | None = None) -> "Eagle3Config":
        """A draft with the target's own layer shape (the published recipe for Llama targets)."""
        c = target.config
        heads = c.num_attention_heads
        rope = getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        return cls(hidden_size=c.hidden_size, num_heads=heads, num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                   intermediate_size=c.intermediate_size, vocab_size=target.get_output_embeddings().weight.shape[0],
                   draft_vocab_size=int(draft_vocab_size), target_hidden_size=c.hidden_size,
                   feature_layers=list(feature_layers or default_aux_layers(c.num_hidden_layers)),
                   rope_theta=float(rope), rms_eps=float(getattr(c, "rms_norm_eps", 1e-5)),
                   max_position_embeddings=int(getattr(c, "max_position_embeddings", 2048)))

    def to_hf(self, dtype: str) -> dict:
        """config.json as the engines read it."""
        return {
            "architectures": [ARCHITECTURE], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "num_hidden_layers": 1, "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta, "max_position_embeddings": self.max_position_embeddings,
            "vocab_size": self.vocab_size, "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size, "tie_word_embeddings": False,
            "torch_dtype": dtype,
            # vLLM reads the top-level key first, llama.cpp only it, SGLang only eagle_config's: both, equal
            "eagle_aux_hidden_state_layer_ids": list(self.feature_layers),
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(self.feature_layers), "use_aux_hidden_state": True},
        }

    @classmethod
    def from_hf(cls, c: dict, num_target_layers: int | None = None) -> "Eagle3Config":
        heads = int(c["num_attention_heads"])
        eagle = c.get("eagle_config") or {}
        layers = c.get("eagle_aux_hidden_state_layer_ids") or eagle.get("eagle_aux_hidden_state_layer_ids")
        if not layers:
            if num_target_layers is None:
                raise KeyError("eagle_config.eagle_aux_hidden_state_layer_ids")
            layers = default_aux_layers(num_target_layers)
        rope = c.get("rope_theta") or (c.get("rope_scaling") or {}).get("rope_theta") or \
            (c.get("rope_parameters") or {}).get("rope_theta") or 10000.0
        return cls(hidden_size=int(c["hidden_size"]), num_heads=heads,
                   num_kv_heads=int(c.get("num_key_value_heads") or heads),
                   head_dim=int(c.get("head_dim") or int(c["hidden_size"]) // heads),
                   intermediate_size=int(c["intermediate_size"]), vocab_size=int(c["vocab_size"]),
                   draft_vocab_size=int(c.get("draft_vocab_size") or c["vocab_size"]),
                   target_hidden_size=int(c.get("target_hidden_size") or c["hidden_size"]),
                   feature_layers=[int(x) for x in layers], rope_theta=float(rope),
                   rms_eps=float(c.get("rms_norm_eps", 1e-5)),
                   max_position_embeddings=int(c.get("max_position_embeddings", 2048)))


class _Attention(nn.Module):
    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(2 * h, cfg.num_heads * d, bias=False)
        self.k_proj = nn.Linear(2 * h, cfg.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * h, cfg.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=False)


class _MLP(nn.Module):
    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _MidLayer(nn.Module):
    def __init__(self, cfg: Eagle3Config):
        super().__init__()
        self.hidden_norm = _RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.input_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.self_attn = _Attention(cfg)
        self.post_attention_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_eps)
        self.mlp = _MLP(cfg)


class Eagle3Draft(LayerCache, nn.Module):
    """The EAGLE-3 draft module; its ``state_dict`` names are exactly the standard checkpoint's."""

    def __init__(self, cfg: Eagle3Config, embed_weight: torch.Tensor):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.fc = nn.Linear(len(cfg.feature_layers) * cfg.target_hidden_size, h, bias=False)
        self.midlayer = _MidLayer(cfg)
        self.norm = _RMSNorm(h, cfg.rms_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))
        # the target's embeddings unless the checkpoint carries its own (then loaded into this buffer)
        self.register_buffer("embed_tokens", embed_weight.detach(), persistent=False)
        d = cfg.head_dim
        self.register_buffer("inv_freq", 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)),
                             persistent=False)
        self.reset_cache()

    # ------------------------------------------------------------------ vocabulary
    def set_draft_vocab(self, target_ids: torch.Tensor) -> None:
        """Draft id i proposes target id ``target_ids[i]`` (sorted, distinct): fills d2t and t2d."""
        ids = torch.as_tensor(target_ids, dtype=torch.long, device=self.d2t.device)
        if ids.numel() != self.cfg.draft_vocab_size or bool((ids[1:] <= ids[:-1]).any()):
            raise ValueError(f"the draft vocabulary needs {self.cfg.draft_vocab_size} sorted distinct target ids")
        self.d2t.copy_(ids - torch.arange(len(ids), device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True

    @property
    def vocab_ids(self) -> torch.Tensor:
        """[Vd] the target id of each draft id."""
        return torch.arange(self.cfg.draft_vocab_size, device=self.d2t.device) + self.d2t

    @property
    def embed(self) -> torch.Tensor:
        return self.embed_tokens

    # ------------------------------------------------------------------ forward
    @property
    def feature_size(self) -> int:
        return len(self.cfg.feature_layers) * self.cfg.target_hidden_size

    def encode(self, target_feats: torch.Tensor) -> torch.Tensor:
        """The target's aux states, concatenated [..., k Ht] -> the draft's hidden [..., H] (``fc``)."""
        if target_feats.shape[-1] != self.feature_size:
            raise ValueError(f"the draft reads target states of width {self.feature_size} (layers "
                             f"{self.cfg.feature_layers} x {self.cfg.target_hidden_size}), got {target_feats.shape[-1]}")
        return self.fc(target_feats)

    def forward(self, feats: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor,
                mask: torch.Tensor | None = None, use_cache: bool = False) -> torch.Tensor:
        """The midlayer's output [B, T, H] (before ``norm``; fed back as the next step's hidden) for
        pairs (feats [B, T, H] in the draft's space, tokens [B, T]); caching as ``EagleHead.forward``."""
        cfg, layer = self.cfg, self.midlayer
        b, t, _ = feats.shape
        emb = F.embedding(tokens, self.embed_tokens).to(feats.dtype)
        x = torch.cat([layer.input_layernorm(emb), layer.hidden_norm(feats)], dim=-1)  # [B, T, 2H]
        att = layer.self_attn
        q = att.q_proj(x).view(b, t, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = att.k_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        v = att.v_proj(x).view(b, t, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
        a = cached_rope_attention(self, q, k, v, positions, mask, use_cache)
        r = feats + att.o_proj(a.transpose(1, 2).reshape(b, t, -1))
        return r + layer.mlp(layer.post_attention_layernorm(r))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scores over the draft vocabulary [..., Vd]."""
        return self.lm_head(self.norm(hidden))


# ---------------------------------------------------------------------- checkpoints
def is_eagle3_draft(path: str | Path) -> bool:
    """A directory whose config.json names an EAGLE-3 architecture."""
    f = Path(path) / CONFIG
    if not f.is_file():
        return False
    try:
        archs = json.loads(f.read_text()).get("architectures") or []
    except (OSError, ValueError):
        return False
    return any(a in ARCHITECTURES for a in archs)


def save_eagle3_draft(draft: Eagle3Draft, out_dir: str | Path, meta: dict | None = None,
                      dtype: torch.dtype = torch.float16) -> Path:
    """The standard directory (config.json + model.safetensors; weights in ``dtype``, d2t/t2d as
    int64/bool) plus treespec.json with ``meta``. The target's embeddings are not stored."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v if k in ("d2t", "t2d") else v.to(dtype)).detach().contiguous().cpu()
               for k, v in draft.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    name = str(dtype).replace("torch.", "")
    (out / CONFIG).write_text(json.dumps(draft.cfg.to_hf(name), indent=2) + "\n")
    (out / META).write_text(json.dumps({"family": "eagle3", **(meta or {})}, indent=1) + "\n")
    return out


def load_eagle3_draft(path: str | Path, target, dtype: torch.dtype | None = None) -> Eagle3Draft:
    """The EAGLE-3 draft in ``path`` (made here or elsewhere), checked against ``target``: hidden size,
    vocabulary, aux layers, and every tensor's name and shape; clear errors otherwise."""
    path = Path(path)
    try:
        hf = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"EAGLE-3 draft {path}: config.json is unreadable ({e})") from None
    n_layers = int(getattr(target.config, "num_hidden_layers", 0)) or None
    try:
        cfg = Eagle3Config.from_hf(hf, n_layers)
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"EAGLE-3 draft {path}: config.json lacks or garbles {e}") from None
    emb = target.get_input_embeddings().weight
    vocab, target_hidden = target.get_output_embeddings().weight.shape[0], emb.shape[1]
    if cfg.target_hidden_size != target_hidden:
        raise VocabularyMismatchError(f"EAGLE-3 draft {path} reads target states of size {cfg.target_hidden_size} "
                                      f"(target_hidden_size), but this target's hidden size is {target_hidden}")
    if cfg.vocab_size != vocab:
        raise VocabularyMismatchError(f"EAGLE-3 draft {path} was made for a vocabulary of {cfg.vocab_size} tokens; "
                                      f"this target has {vocab}")
    if n_layers is not None and not all(0 <= l <= n_layers for l in cfg.feature_layers):
        raise ModelLoadError(f"EAGLE-3 draft {path} reads target layers {cfg.feature_layers}, but the target has "
                             f"{n_layers} decoder layers")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"EAGLE-3 draft {path} holds no .safetensors weights")
    state = {}
    try:
        for f in files:
            with safe_open(str(f), framework="pt") as sf:
                state.update({k: sf.get_tensor(k) for k in sf.keys()})
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise ModelLoadError(f"EAGLE-3 draft {path}: unreadable weights ({e})") from None
    state = {k.removeprefix("model."): v for k, v in state.items()}  # some exports prefix the layer names
    own_embed = state.pop("embed_tokens.weight", None)
    if own_embed is not None and own_embed.shape[0] != vocab:
        raise VocabularyMismatchError(f"EAGLE-3 draft {path} carries embeddings for {own_embed.shape[0]} tokens; "
                                      f"this target has {vocab}")
    draft = Eagle3Draft(cfg, emb if own_embed is None or own_embed.shape[1] != cfg.hidden_size else own_embed.to(emb))
    if "d2t" not in state:  # a draft over the full vocabulary may omit the mapping
        if cfg.draft_vocab_size != vocab:
            raise ModelLoadError(f"EAGLE-3 draft {path} has a draft vocabulary of {cfg.draft_vocab_size} but no d2t")
        state["d2t"] = torch.zeros(vocab, dtype=torch.long)
    if "t2d" not in state:
        t2d = torch.zeros(vocab, dtype=torch.bool)
        t2d[torch.arange(cfg.draft_vocab_size) + state["d2t"].long()] = True
        state["t2d"] = t2d
    state["d2t"], state["t2d"] = state["d2t"].long(), state["t2d"].bool()
    try:
        draft.load_state_dict({k: v if k in ("d2t", "t2d") else v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise ModelLoadError(f"EAGLE-3 draft {path}: weights do not match its config.json: {e}") from None
    ids = draft.vocab_ids
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ModelLoadError(f"EAGLE-3 draft {path}: d2t maps draft ids outside the target vocabulary")
    return draft.to(device=emb.device, dtype=dtype or emb.dtype).eval()
