"""EAGLE-style drafter: lossless with any head, cache kept on true target features, checkpoints."""


import pytest
import torch
from conftest import SEARCHES, hf_greedy, make_config, make_head, prompts, tiny_model

from models.drafters.eagle import (
    EagleDrafter,
    load_eagle_draft,
    save_eagle_draft,
)
from models.errors import ModelLoadError, VocabularyMismatchError
from speculative_decoder import SpeculativeDecoder


@pytest.mark.parametrize("search", list(SEARCHES))
@pytest.mark.parametrize("reduced", [False, True])
def test_greedy_equals_target(search, reduced, default_config):
    target = tiny_model("llama", seed=0)
    target.generation_config.eos_token_id = None
    vocab = list(range(0, 96, 2)) if reduced else None
    decoder = SpeculativeDecoder.from_models(target, EagleDrafter(make_head(target, vocab)), None,
                                             make_config(default_config, search))
    for prompt in prompts(3, seed=5):
        want = hf_greedy(target, prompt, 20)
        got, stats = decoder.generate(torch.tensor([prompt]), max_new_tokens=20)
        assert got[0].tolist() == want, (search, reduced, prompt)
        assert stats.new_tokens == 20


def fresh_cache(head, target, ids):
    """The head's cache after feeding every committed pair with the target's true features."""
    with torch.no_grad():
        feats = target(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1]
    head.reset_cache()
    with torch.no_grad():
        head(feats[:, :-1], torch.tensor([ids[1:]]), torch.arange(len(ids) - 1).unsqueeze(0), use_cache=True)
    return head.k_cache.clone(), head.v_cache.clone()


@pytest.mark.parametrize("search", ["chain", "dynamic"])
def test_head_cache_holds_true_features(search, default_config):
    """After every step the head's cache == feeding the committed text with true features, so the
    drafted (predicted) features of rejected and accepted nodes never leak into later steps."""
    target = tiny_model("llama", seed=0)
    target.generation_config.eos_token_id = None
    head = make_head(target)
    drafter = EagleDrafter(head)
    decoder = SpeculativeDecoder.from_models(target, drafter, None, make_config(default_config, search))
    prompt = prompts(1, seed=3)[0]
    steps = 0
    for emitted, _ in decoder._decode(torch.tensor([prompt]), 16, decoder._decoding({})):
        prompt = prompt + emitted
        if steps > 0 and drafter.cached_nodes == []:
            # committed: cache + pending pairs cover the text except its last token's pair
            k, v = head.k_cache.clone(), head.v_cache.clone()
            n = k.shape[2]
            fk, fv = fresh_cache(make_head(target), target, prompt[:n + 1])
            torch.testing.assert_close(k, fk, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(v, fv, rtol=1e-4, atol=1e-5)
            head.k_cache, head.v_cache = k, v
        steps += 1
    assert steps > 3


def test_checkpoint_roundtrip_and_errors(tmp_path):
    target = tiny_model("llama", seed=0)
    head = make_head(target, list(range(10, 60)))
    save_eagle_draft(head, tmp_path / "d", meta={"note": "x"}, dtype=torch.float32)
    back = load_eagle_draft(tmp_path / "d", target)
    for (k, a), (_, b) in zip(head.state_dict().items(), back.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    assert back.vocab_ids.tolist() == list(range(10, 60))
    other = tiny_model("llama", seed=0, vocab=64)
    with pytest.raises(VocabularyMismatchError):
        load_eagle_draft(tmp_path / "d", other)
    (tmp_path / "d" / "eagle_head.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="unreadable"):
        load_eagle_draft(tmp_path / "d", target)
