"""llama.cpp's own converter reads a draft trained by treespec: every tensor of the GGUF is ours.

The converter comes from the pinned llama-cpp-python sdist (training/experiments/llama_cpp.py), downloaded
once from the package registry into the cache; the test is skipped, with the reason, where that fails.
"""

import io
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import teacher_shards, train_cfg
from safetensors.torch import load_file

from training.drafts import eagle as eagle_draft
from training.drafts import teacher_data
from training.experiments.llama_cpp import LlamaCppUnavailable, convert_to_gguf, llama_cpp_source

LAYERS = [1, 2, 3]
TEACHER = SimpleNamespace(shard_prompts=4, batch_size=3, max_new_tokens=10, max_prompt_tokens=40, top_k=3,
                          feature_layers=LAYERS)


@pytest.fixture(scope="module")
def converter_source():
    try:
        return llama_cpp_source()
    except LlamaCppUnavailable as e:
        pytest.skip(f"llama.cpp's sources are not available: {e}")


def sentencepiece_model(vocab: int) -> bytes:
    """A tokenizer.model of ``vocab`` pieces: llama.cpp's converter reads the target's tokenizer (a
    SentencePiece one needs no pre-tokenizer fingerprint, unlike a BPE tokenizer.json)."""
    import sentencepiece as spm

    text = ["a draft proposes a tree of tokens and the target verifies the whole tree in one pass",
            "the quick brown fox jumps over the lazy dog while speculative decoding keeps every output"] * 30
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_writer=out, vocab_size=vocab,
                                   hard_vocab_limit=False, model_type="bpe", character_coverage=1.0, minloglevel=2)
    return out.getvalue()


def llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The row order llama.cpp gives q/k projections for its RoPE kernel (conversion/llama.py: permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"fc.weight": "fc.weight", "midlayer.hidden_norm.weight": "blk.0.attn_norm_2.weight",
              "midlayer.input_layernorm.weight": "blk.0.attn_norm.weight",
              "midlayer.self_attn.q_proj.weight": "blk.0.attn_q.weight",
              "midlayer.self_attn.k_proj.weight": "blk.0.attn_k.weight",
              "midlayer.self_attn.v_proj.weight": "blk.0.attn_v.weight",
              "midlayer.self_attn.o_proj.weight": "blk.0.attn_output.weight",
              "midlayer.post_attention_layernorm.weight": "blk.0.ffn_norm.weight",
              "midlayer.mlp.gate_proj.weight": "blk.0.ffn_gate.weight", "midlayer.mlp.up_proj.weight": "blk.0.ffn_up.weight",
              "midlayer.mlp.down_proj.weight": "blk.0.ffn_down.weight", "norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight", "d2t": "d2t"}


def test_llama_cpp_converts_a_trained_eagle3_draft(converter_source, tmp_path_factory, tmp_path):
    import gguf

    target, paths = teacher_shards(tmp_path_factory, TEACHER, layers=4, meta={"t": 5})
    data = teacher_data.load_shards(paths)
    cfg = train_cfg(teacher={"feature_layers": LAYERS}, reg_weight=0.0, cls_weight=1.0, family="eagle3", unroll=3,
                    epochs=4)
    summary = eagle_draft.train_eagle(target, data, cfg, tmp_path / "run", tmp_path / "draft", progress=False)
    assert summary["loss_last_mean10"] < summary["loss_first"]  # trained, not random
    target_dir = tmp_path / "target"  # what the converter reads of the target: config.json and a tokenizer
    target.config.save_pretrained(target_dir)
    (target_dir / "tokenizer.model").write_bytes(sentencepiece_model(target.config.vocab_size))

    out = convert_to_gguf(tmp_path / "draft", tmp_path / "draft.gguf", "f32", target_dir=target_dir)
    reader = gguf.GGUFReader(str(out))
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    ours = load_file(str(tmp_path / "draft" / "model.safetensors"))
    heads, kv_heads = target.config.num_attention_heads, target.config.num_key_value_heads
    assert set(tensors) == {GGUF_NAMES[k] for k in ours if k != "t2d"}  # t2d is unused by every engine
    for name, theirs in tensors.items():
        hf = next(k for k, v in GGUF_NAMES.items() if v == name)
        want = ours[hf].float() if hf != "d2t" else torch.arange(len(ours["d2t"])) + ours["d2t"]  # GGUF: absolute ids
        if hf.endswith("q_proj.weight"):
            want = llama_permute(want, heads)
        elif hf.endswith("k_proj.weight"):
            want = llama_permute(want, kv_heads)
        got = torch.from_numpy(theirs.copy()).reshape(want.shape).to(want.dtype)
        assert torch.equal(got, want), name
    fields = {k: v.parts[v.data[-1]].tolist() if v.data else None for k, v in reader.fields.items()}
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "eagle3"
    layers = reader.fields["eagle3.target_layers"]
    assert [int(layers.parts[i][0]) for i in layers.data] == LAYERS
    assert fields["eagle3.target_hidden_size"] == [target.config.hidden_size]
    assert fields["eagle3.vocab_size"] == [target.config.vocab_size]
