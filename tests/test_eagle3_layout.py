"""EAGLE-3 drafts in the engines' layout: exact tensor names, round trip, lossless decoding, clear errors."""

import json

import pytest
import torch
from conftest import SEARCHES, hf_greedy, make_config, prompts, tiny_model
from safetensors.torch import load_file, save_file

from models.drafters.eagle import EagleDrafter
from models.drafters.eagle3 import Eagle3Config, Eagle3Draft, is_eagle3_draft, load_eagle3_draft, save_eagle3_draft
from models.errors import ModelLoadError, VocabularyMismatchError
from models.io.loading import load_draft, resolve_model_path
from speculative_decoder import SpeculativeDecoder

LAYERS = [1, 2, 4]  # aux layers of a 4-layer tiny target (hidden_states numbering: 0 = embeddings)


def make_eagle3(target, vocab=None, seed=0) -> Eagle3Draft:
    full = target.get_output_embeddings().weight.shape[0]
    ids = torch.tensor(vocab if vocab is not None else list(range(full)))
    torch.manual_seed(seed)
    draft = Eagle3Draft(Eagle3Config.for_target(target, len(ids), LAYERS), target.get_input_embeddings().weight)
    with torch.no_grad():
        for p in draft.parameters():
            p.normal_(0, 0.2)  # random but not degenerate: norms' weights away from 1, scores spread out
    draft.set_draft_vocab(ids)
    return draft.eval()


@pytest.fixture(scope="module")
def target():
    model = tiny_model("llama", seed=0, layers=4)
    model.generation_config.eos_token_id = None
    return model


STANDARD = {  # name -> shape, for H = 32, Ht = 32, 4 heads / 2 kv heads of 8, I = 64, V = 96, Vd = 48
    "fc.weight": (32, 96), "midlayer.hidden_norm.weight": (32,), "midlayer.input_layernorm.weight": (32,),
    "midlayer.self_attn.q_proj.weight": (32, 64), "midlayer.self_attn.k_proj.weight": (16, 64),
    "midlayer.self_attn.v_proj.weight": (16, 64), "midlayer.self_attn.o_proj.weight": (32, 32),
    "midlayer.post_attention_layernorm.weight": (32,), "midlayer.mlp.gate_proj.weight": (64, 32),
    "midlayer.mlp.up_proj.weight": (64, 32), "midlayer.mlp.down_proj.weight": (32, 64), "norm.weight": (32,),
    "lm_head.weight": (48, 32), "d2t": (48,), "t2d": (96,),
}


def test_checkpoint_is_the_standard_layout(target, tmp_path):
    vocab = list(range(0, 96, 2))
    save_eagle3_draft(make_eagle3(target, vocab), tmp_path / "d", meta={"note": "tiny"})
    state = load_file(str(tmp_path / "d" / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in state.items()} == STANDARD
    assert state["d2t"].dtype == torch.int64 and state["t2d"].dtype == torch.bool
    assert (torch.arange(48) + state["d2t"]).tolist() == vocab and state["t2d"].nonzero().flatten().tolist() == vocab
    cfg = json.loads((tmp_path / "d" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["num_hidden_layers"] == 1
    assert (cfg["vocab_size"], cfg["draft_vocab_size"], cfg["target_hidden_size"]) == (96, 48, 32)
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == cfg["eagle_aux_hidden_state_layer_ids"] == LAYERS
    assert json.loads((tmp_path / "d" / "treespec.json").read_text())["note"] == "tiny"
    assert is_eagle3_draft(tmp_path / "d") and resolve_model_path(str(tmp_path / "d")) == tmp_path / "d"


def test_round_trip_keeps_every_output(target, tmp_path):
    draft = make_eagle3(target, list(range(0, 96, 3)))
    save_eagle3_draft(draft, tmp_path / "d", dtype=torch.float32)
    back = load_eagle3_draft(tmp_path / "d", target)
    feats = torch.randn(1, 5, 96)
    toks, pos = torch.randint(0, 96, (1, 5)), torch.arange(5).unsqueeze(0)
    with torch.no_grad():
        a = draft.logits(draft(draft.encode(feats), toks, pos))
        b = back.logits(back(back.encode(feats), toks, pos))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(draft.vocab_ids, back.vocab_ids)


@pytest.mark.parametrize("search", list(SEARCHES))
@pytest.mark.parametrize("reduced", [False, True])
def test_greedy_equals_target(target, search, reduced, tmp_path, default_config):
    """Loaded from its directory as any user's draft would be: output identical to the target alone."""
    save_eagle3_draft(make_eagle3(target, list(range(0, 96, 2)) if reduced else None), tmp_path / "d")
    drafter = load_draft(tmp_path / "d", target, default_config.model)
    assert isinstance(drafter, EagleDrafter) and drafter.feature_layers == LAYERS
    decoder = SpeculativeDecoder.from_models(target, drafter, None, make_config(default_config, search))
    for prompt in prompts(3, seed=7):
        got, stats = decoder.generate(torch.tensor([prompt]), max_new_tokens=20)
        assert got[0].tolist() == hf_greedy(target, prompt, 20), (search, reduced, prompt)
        assert stats.new_tokens == 20 and stats.drafted_tokens > 0


def test_drafter_reads_the_aux_states_and_feeds_back_its_output(target):
    """The root's scores come from fc over the target's states at the aux layers (pairs (h_t, x_{t+1})
    at position t); a child's from the midlayer's own pre-norm output at its parent, one position on."""
    from models.decoding.drafter import target_features
    from models.decoding.tree import DraftTree

    draft = make_eagle3(target, list(range(0, 96, 2)))
    drafter = EagleDrafter(draft)
    prompt = prompts(1, seed=4)[0]
    with torch.no_grad():
        out = target(torch.tensor([prompt]), output_hidden_states=True)
        feats = target_features(drafter, out)  # [T, 3 Ht]
        torch.testing.assert_close(feats, torch.cat([out.hidden_states[l][0] for l in LAYERS], -1))
        drafter.prefill(torch.tensor([prompt]), target_hidden=feats)
        root, child = 7, 11
        tree = DraftTree.from_root(root)
        got_root = drafter.propose(tree, [0])[0]
        tree.add_children(torch.tensor([0]), torch.tensor([child]), torch.zeros(1))
        got_child = drafter.propose(tree, [1])[0]

        draft.reset_cache()
        g = draft.encode(feats).unsqueeze(0)  # [1, T, H]
        toks = torch.tensor([prompt[1:] + [root]])
        h = draft(g, toks, torch.arange(len(prompt)).unsqueeze(0))[:, -1:]  # [1, 1, H]
        want_root = draft.logits(h[0, 0])
        draft.reset_cache()
        full = draft(torch.cat([g, h], 1), torch.tensor([prompt[1:] + [root, child]]),
                     torch.arange(len(prompt) + 1).unsqueeze(0))
        want_child = draft.logits(full[0, -1])
    ids = draft.vocab_ids
    torch.testing.assert_close(got_root[ids], want_root, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_child[ids], want_child, rtol=1e-5, atol=1e-5)
    outside = torch.ones(96, dtype=torch.bool)
    outside[ids] = False
    assert torch.isinf(got_root[outside]).all()  # tokens outside the draft vocabulary are never proposed


def test_checkpoint_with_embeddings_and_without_vocabulary_map(target, tmp_path):
    """Exports that carry their own embed_tokens (SpecForge) or omit d2t/t2d (full vocabulary) load."""
    draft = make_eagle3(target)
    save_eagle3_draft(draft, tmp_path / "d", dtype=torch.float32)
    state = load_file(str(tmp_path / "d" / "model.safetensors"))
    del state["d2t"], state["t2d"]
    state["embed_tokens.weight"] = target.get_input_embeddings().weight.detach() * 2
    save_file(state, str(tmp_path / "d" / "model.safetensors"))
    back = load_eagle3_draft(tmp_path / "d", target)
    torch.testing.assert_close(back.embed, target.get_input_embeddings().weight * 2)
    assert back.vocab_ids.tolist() == list(range(96))


def _broken(tmp_path, target, change_config=None, change_state=None):
    save_eagle3_draft(make_eagle3(target, list(range(0, 96, 2))), tmp_path / "d")
    if change_config:
        cfg = json.loads((tmp_path / "d" / "config.json").read_text())
        change_config(cfg)
        (tmp_path / "d" / "config.json").write_text(json.dumps(cfg))
    if change_state:
        state = load_file(str(tmp_path / "d" / "model.safetensors"))
        change_state(state)
        save_file(state, str(tmp_path / "d" / "model.safetensors"))
    return tmp_path / "d"


@pytest.mark.parametrize("case, error, match", [
    ("target_hidden", VocabularyMismatchError, "target_hidden_size"),
    ("vocab", VocabularyMismatchError, "vocabulary of 1000"),
    ("layers", ModelLoadError, "decoder layers"),
    ("missing_tensor", ModelLoadError, "do not match"),
    ("wrong_shape", ModelLoadError, "do not match"),
    ("d2t_out_of_range", ModelLoadError, "outside the target vocabulary"),
    ("no_heads", ModelLoadError, "num_attention_heads"),
])
def test_foreign_or_broken_drafts_are_refused_clearly(target, tmp_path, case, error, match):
    edits = {
        "target_hidden": dict(change_config=lambda c: c.update(target_hidden_size=64)),
        "vocab": dict(change_config=lambda c: c.update(vocab_size=1000)),
        "layers": dict(change_config=lambda c: c.update(eagle_aux_hidden_state_layer_ids=[1, 2, 9])),
        "missing_tensor": dict(change_state=lambda s: s.pop("midlayer.hidden_norm.weight")),
        "wrong_shape": dict(change_state=lambda s: s.update({"fc.weight": torch.zeros(32, 64)})),
        "d2t_out_of_range": dict(change_state=lambda s: s.update({"d2t": s["d2t"] + 500})),
        "no_heads": dict(change_config=lambda c: c.pop("num_attention_heads")),
    }[case]
    with pytest.raises(error, match=match):
        load_eagle3_draft(_broken(tmp_path, target, **edits), target)


def test_corrupt_weights_are_refused(target, tmp_path):
    path = _broken(tmp_path, target)
    (path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="unreadable weights"):
        load_eagle3_draft(path, target)
    (path / "config.json").write_text("{broken")
    with pytest.raises(ModelLoadError, match="config.json is unreadable"):
        load_eagle3_draft(path, target)
