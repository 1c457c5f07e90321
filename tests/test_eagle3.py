"""EAGLE-3 style fused features (teacher.feature_layers): the teacher stores the target's states at
several layers, the head fuses them, the decoder feeds them, and decoding stays lossless."""

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    SEARCHES,
    hf_greedy,
    make_config,
    make_prompts,
    prompts,
    teacher_shards,
    tiny_model,
    tiny_tokenizer,
    train_cfg,
)
from omegaconf import OmegaConf

from models.decoding.drafter import HFDrafter, target_features
from models.drafters.eagle import EagleConfig, EagleDrafter, EagleHead, load_eagle_draft
from models.errors import ConfigError, ModelLoadError
from speculative_decoder import SpeculativeDecoder
from training.drafts import eagle as eagle_draft
from training.drafts import teacher_data
from training.drafts.evaluate import chain_agreement, latency
from training.drafts.train import teacher_dir

LAYERS = [1, 2, 3]
TEACHER = SimpleNamespace(shard_prompts=4, batch_size=3, max_new_tokens=10, max_prompt_tokens=40, top_k=3,
                          feature_layers=LAYERS)


@pytest.fixture(scope="module")
def fused_shards(tmp_path_factory):
    return teacher_shards(tmp_path_factory, TEACHER, layers=4, meta={"t": 3})


def test_layer_features_are_the_targets_hidden_states(fused_shards):
    target, paths = fused_shards
    data = teacher_data.load_shards(paths)
    assert data["features"].shape == (data["hidden"].shape[0], 3 * 32) and data["features"].dtype == torch.bfloat16
    for s in range(len(data["prompt_lens"])):
        a, b = int(data["offsets"][s]), int(data["offsets"][s + 1])
        with torch.no_grad():
            states = target(data["input_ids"][a:b].long().unsqueeze(0), output_hidden_states=True).hidden_states
        want = torch.cat([states[l][0] for l in LAYERS], dim=-1)[:-1]  # the last token is never fed
        torch.testing.assert_close(data["features"][a:b - 1].float(), want, atol=3e-2, rtol=1e-2)
        torch.testing.assert_close(data["hidden"][a:b - 1].float(), states[-1][0][:-1], atol=2e-3, rtol=2e-3)


def test_layer_choice_and_mixed_shards_are_refused(fused_shards, tmp_path):
    target, paths = fused_shards
    bad = SimpleNamespace(**{**vars(TEACHER), "feature_layers": [4]})
    with pytest.raises(ConfigError, match="feature_layers: 4"):
        teacher_data.build_shards(target, tiny_tokenizer(), make_prompts(4), tmp_path / "x", bad, {}, progress=False)
    plain = SimpleNamespace(shard_prompts=4, batch_size=3, max_new_tokens=10, max_prompt_tokens=40, top_k=3)
    other = teacher_data.build_shards(target, tiny_tokenizer(), make_prompts(4), tmp_path / "plain", plain, {},
                                      progress=False)
    with pytest.raises(ModelLoadError, match="with and without layer features"):
        teacher_data.load_shards([paths[0], other[0]])


def test_teacher_folder_of_older_recipes_is_unchanged():
    """Adding the key must not orphan teacher data made before it (its folder name is a hash)."""
    base = dict(files=["a.jsonl"], num_prompts=96, shard_prompts=96, top_k=8, dtype="bfloat16", seed=0)
    root = Path("/cache")
    old = teacher_dir(root, "demo:target", OmegaConf.create(base))
    assert teacher_dir(root, "demo:target", OmegaConf.create({**base, "feature_layers": None})) == old
    assert teacher_dir(root, "demo:target", OmegaConf.create({**base, "feature_layers": [2, 15]})) != old


def fused_cfg(**kw):
    return train_cfg(teacher={"feature_layers": LAYERS}, reg_weight=0.0, cls_weight=1.0, **kw)


def test_fused_head_trains_decodes_losslessly_and_is_measured(fused_shards, tmp_path, default_config):
    target, paths = fused_shards
    data = teacher_data.load_shards(paths)
    summary = eagle_draft.train_eagle(target, data, fused_cfg(), tmp_path / "run", tmp_path / "out", progress=False)
    assert summary["loss_last_mean10"] < summary["loss_first"], summary  # learning itself: agreement below
    head = load_eagle_draft(tmp_path / "out", target)
    assert head.cfg.feature_layers == LAYERS and head.fuse is not None and head.feature_size == 96
    drafter = EagleDrafter(head)
    assert drafter.feature_layers == LAYERS
    with torch.no_grad():
        out = target(torch.tensor([[5, 6, 7]]), output_hidden_states=True)
    feats = target_features(drafter, out)
    assert torch.equal(feats, torch.cat([out.hidden_states[l][0] for l in LAYERS], -1))
    plain = EagleDrafter(EagleHead(EagleConfig.from_target(target, list(range(96))),
                                   target.get_input_embeddings().weight, target.get_output_embeddings().weight))
    assert torch.equal(target_features(plain, out), out.hidden_states[-1][0])  # EAGLE-1/2: the final state
    assert target_features(HFDrafter(tiny_model("llama", seed=1)), out) is None
    with pytest.raises(ValueError, match="width 96"):
        head.encode(out.hidden_states[-1][0])

    # Drafting from the fused features agrees with the target better than an untrained fused head,
    # and the evaluation reads the layer features (the final ones alone are refused).
    trained = chain_agreement(drafter, data, depth=2, device=torch.device("cpu"))
    torch.manual_seed(0)
    fresh = EagleDrafter(EagleHead(head.cfg, target.get_input_embeddings().weight,
                                   target.get_output_embeddings().weight).eval())
    untrained = chain_agreement(fresh, data, depth=2, device=torch.device("cpu"))
    assert trained["top1"] > untrained["top1"] + 0.1, (trained, untrained)
    with pytest.raises(ValueError, match="feature_layers"):
        chain_agreement(drafter, {k: v for k, v in data.items() if k != "features"}, 2, torch.device("cpu"))
    assert latency(target, drafter, context=8, repeats=2, vocab=96)["draft_ms"] > 0

    # Lossless with every search: the head changes which tokens are proposed, never what is accepted.
    target.generation_config.eos_token_id = None
    unpruned = dataclasses.replace(default_config, pruning=dataclasses.replace(default_config.pruning, strategy="none"))
    for search in SEARCHES:  # unpruned: whether nodes get verified must not depend on measured costs
        decoder = SpeculativeDecoder.from_models(target, drafter, None, make_config(unpruned, search))
        for prompt in prompts(2, seed=7):
            got, stats = decoder.generate(torch.tensor([prompt]), max_new_tokens=16)
            assert got[0].tolist() == hf_greedy(target, prompt, 16), search
    assert stats.accepted_tokens > 0  # the trained head's proposals are accepted at times


def test_fused_recipe_needs_fused_teacher_data(fused_shards, tmp_path):
    target, paths = fused_shards
    data = teacher_data.load_shards(paths)
    plain = {k: v for k, v in data.items() if k != "features"}
    with pytest.raises(ConfigError, match="teacher.feature_layers"):
        eagle_draft.train_eagle(target, plain, fused_cfg(), tmp_path / "run", tmp_path / "out", progress=False)


def test_eagle3_family_trains_in_the_engines_layout_and_resumes(fused_shards, tmp_path, default_config):
    """draft.family=eagle3 writes the standard directory (config.json + model.safetensors); it learns,
    decodes losslessly, and a run can start from a finished draft (draft.init_from)."""
    from models.drafters.eagle3 import is_eagle3_draft, load_eagle3_draft
    from models.io.loading import load_draft

    target, paths = fused_shards
    data = teacher_data.load_shards(paths)
    cfg = fused_cfg(family="eagle3", unroll=3)
    summary = eagle_draft.train_eagle(target, data, cfg, tmp_path / "run", tmp_path / "out", progress=False)
    assert summary["loss_last_mean10"] < summary["loss_first"], summary
    assert is_eagle3_draft(tmp_path / "out") and (tmp_path / "out" / "model.safetensors").is_file()
    draft = load_eagle3_draft(tmp_path / "out", target)
    assert draft.cfg.feature_layers == LAYERS and 0 < draft.cfg.draft_vocab_size <= 48  # the data's distinct answer tokens
    trained = chain_agreement(EagleDrafter(draft), data, depth=2, device=torch.device("cpu"))
    torch.manual_seed(0)
    fresh = eagle_draft.new_head(target, cfg, draft.vocab_ids.tolist(), LAYERS).eval()
    assert trained["top1"] > chain_agreement(EagleDrafter(fresh), data, 2, torch.device("cpu"))["top1"] + 0.1

    # A second run of one step from the finished draft starts where it ended, not from scratch.
    again = eagle_draft.train_eagle(target, data, fused_cfg(family="eagle3", unroll=3, max_steps=1,
                                                            init_from=str(tmp_path / "out")),
                                    tmp_path / "run2", tmp_path / "out2", progress=False)
    assert again["loss_first"] < (summary["loss_first"] + summary["loss_last_mean10"]) / 2, (again, summary)
    with pytest.raises(ConfigError, match="init_from"):  # another family
        eagle_draft.train_eagle(target, data, fused_cfg(max_steps=1, init_from=str(tmp_path / "out")),
                                tmp_path / "run3", tmp_path / "out3", progress=False)
    # another vocab_size setting (as other data would) keeps the finished draft's vocabulary
    cont = eagle_draft.train_eagle(target, data, fused_cfg(family="eagle3", unroll=3, max_steps=1, vocab_size=8,
                                                           init_from=str(tmp_path / "out")),
                                   tmp_path / "run4", tmp_path / "out4", progress=False)
    assert load_eagle3_draft(tmp_path / "out4", target).vocab_ids.tolist() == draft.vocab_ids.tolist()
    assert cont["vocab_size"] == draft.cfg.draft_vocab_size

    target.generation_config.eos_token_id = None
    drafter = load_draft(tmp_path / "out", target, default_config.model)
    decoder = SpeculativeDecoder.from_models(target, drafter, None, make_config(default_config, "dynamic"))
    for prompt in prompts(2, seed=7):
        got, _ = decoder.generate(torch.tensor([prompt]), max_new_tokens=16)
        assert got[0].tolist() == hf_greedy(target, prompt, 16)
