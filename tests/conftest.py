"""Tiny random Hugging Face models (built from configs, no downloads) shared by the tests."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# Tiny models gain nothing from threads, and oversubscribed threads on a busy 2-core box are slow.
torch.set_num_threads(1)

VOCAB = 96
ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox", "opt")
# Sliding-window attention (``window`` keys): in every layer (mistral, phi3), alternating with full
# layers from a sliding one (gemma2, gemma3), or after the first, full, layer (qwen2_sw: Qwen2 with
# use_sliding_window and max_window_layers=1).
SLIDING_ARCHS = ("mistral", "phi3", "gemma2", "gemma3", "qwen2_sw")


def tiny_model(arch: str = "llama", seed: int = 0, vocab: int = VOCAB, layers: int = 2, context: int = 256,
               attn: str = "sdpa", window: int = 8, head_dim: int | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=context, **common)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=context, head_dim=head_dim, **common)
        cls = LlamaForCausalLM
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=context, **common)
        cls = Qwen2ForCausalLM
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=context, **common)
        cls = GPT2LMHeadModel
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                            max_position_embeddings=context, **common)
        cls = GPTNeoXForCausalLM
    elif arch == "mistral":
        cfg, cls = MistralConfig(sliding_window=window, **small), MistralForCausalLM
    elif arch == "phi3":
        cfg, cls = Phi3Config(sliding_window=window, **small), Phi3ForCausalLM
    elif arch == "qwen2_sw":
        cfg = Qwen2Config(use_sliding_window=True, sliding_window=window, max_window_layers=1, **small)
        cls = Qwen2ForCausalLM
    elif arch in ("gemma2", "gemma3"):
        # sliding, full, sliding, ...; final_logit_softcapping off: tanh-saturated logits would make
        # near-ties of the sharpened head
        kinds = ["full_attention" if i % 2 else "sliding_attention" for i in range(layers)]
        gemma = dict(head_dim=8, sliding_window=window, layer_types=kinds, final_logit_softcapping=None, **small)
        if arch == "gemma2":
            cfg, cls = Gemma2Config(**gemma), Gemma2ForCausalLM
            attn = "eager"  # transformers has no sdpa path for Gemma 2 (attention logit softcapping)
        else:
            cfg, cls = Gemma3TextConfig(**gemma), Gemma3ForCausalLM
    elif arch == "opt":
        cfg = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=layers, num_attention_heads=4,
                        max_position_embeddings=context, word_embed_proj_dim=32, **common)
        cls = OPTForCausalLM
    else:
        raise ValueError(arch)
    cfg._attn_implementation = attn
    model = cls(cfg)
    # Random init gives nearly flat logits; sharpen them so greedy paths are far from ties.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def noisy_copy(model: torch.nn.Module, scale: float, seed: int = 1) -> torch.nn.Module:
    """A draft that agrees with ``model`` often but not always."""
    torch.manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * scale * (p.std() if p.numel() > 1 else 1.0))
    return draft.eval()


@pytest.fixture(scope="session")
def default_config():
    from speculative_decoder import SpeculativeDecodingConfig
    return SpeculativeDecodingConfig()


def tiny_tokenizer(vocab: int = VOCAB):
    """Word-level tokenizer: token i is the word 'w{i}' (ids 0/1 are <s> and </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="</s>")
