"""Teacher shards, EAGLE-head training (learns, resumes bit-for-bit) and the draft evaluation."""

import pytest
import torch
from conftest import (
    TEACHER,
    hf_greedy,
    make_prompts,
    teacher_shards,
    tiny_model,
    tiny_tokenizer,
    train_cfg,
)

from models.decoding.drafter import HFDrafter
from models.drafters.eagle import EagleDrafter, load_eagle_draft
from models.errors import ConfigError, ModelLoadError
from training.drafts import eagle as eagle_draft
from training.drafts import teacher_data
from training.drafts.evaluate import chain_agreement


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return teacher_shards(tmp_path_factory, TEACHER)


def test_teacher_shards_are_the_targets_greedy_text_and_states(shards):
    target, paths = shards
    assert len(paths) == 6 and all(p.is_file() for p in paths)
    data = teacher_data.load_shards(paths)
    assert len(data["prompt_lens"]) == 24
    for s in range(24):
        a, b = int(data["offsets"][s]), int(data["offsets"][s + 1])
        ids = data["input_ids"][a:b].tolist()
        p = int(data["prompt_lens"][s])
        want = hf_greedy(target, ids[:p], TEACHER.max_new_tokens, eos=1)
        assert ids == want[:len(ids)] and (len(ids) == len(want) or ids[-1] == 1)
        with torch.no_grad():
            h = target(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]
        torch.testing.assert_close(data["hidden"][a:b - 1].float(), h[:-1], atol=2e-3, rtol=2e-3)
        assert data["topk_ids"][a + p - 1:b - 1, 0].tolist() == ids[p:]


def test_shards_resume_and_corrupt_shard_is_named(shards, tmp_path):
    target, paths = shards
    out = tmp_path / "t"
    out.mkdir()
    (out / paths[0].name).write_bytes(paths[0].read_bytes())  # one shard already made
    before = (out / paths[0].name).stat().st_mtime_ns
    again = teacher_data.build_shards(target, tiny_tokenizer(), make_prompts(8), out, TEACHER, {"t": 1}, progress=False)
    assert (out / paths[0].name).stat().st_mtime_ns == before  # finished shards are not redone
    again[1].write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="shard-00001"):
        teacher_data.load_shards(again)


def test_eagle_training_learns_and_resumes_exactly(shards, tmp_path, monkeypatch):
    target, paths = shards
    data = teacher_data.load_shards(paths)
    cfg = train_cfg()
    full = eagle_draft.train_eagle(target, data, cfg, tmp_path / "run_a", tmp_path / "out_a", progress=False)
    assert full["loss_last_mean10"] < 0.85 * full["loss_first"], full
    assert full["heldout_vocab_coverage"] > 0.5

    # Interrupt a second run right after its first checkpoint, then rerun: same weights as the first.
    real_save = eagle_draft._save_ckpt

    def save_then_stop(*args, **kw):
        real_save(*args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(eagle_draft, "_save_ckpt", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        eagle_draft.train_eagle(target, data, cfg, tmp_path / "run_b", tmp_path / "out_b", progress=False)
    monkeypatch.setattr(eagle_draft, "_save_ckpt", real_save)
    resumed = eagle_draft.train_eagle(target, data, cfg, tmp_path / "run_b", tmp_path / "out_b", progress=False)
    assert resumed["steps"] == full["steps"]
    a, b = load_eagle_draft(tmp_path / "out_a", target), load_eagle_draft(tmp_path / "out_b", target)
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, msg=k)

    with pytest.raises(ConfigError, match="another recipe"):  # a changed recipe never mixes checkpoints
        eagle_draft.train_eagle(target, data, train_cfg(lr=1e-3), tmp_path / "run_b", tmp_path / "out_c",
                                progress=False)


def test_chain_agreement_of_perfect_and_trained_drafts(shards, tmp_path):
    target, paths = shards
    data = teacher_data.load_shards(paths)
    perfect = chain_agreement(HFDrafter(target), data, depth=3, device=torch.device("cpu"))
    assert perfect["top1"] == 1.0 and perfect["chain_conditional"][:2] == [1.0, 1.0]
    eagle_draft.train_eagle(target, data, train_cfg(), tmp_path / "run", tmp_path / "out", progress=False)
    trained = chain_agreement(EagleDrafter(load_eagle_draft(tmp_path / "out", target)), data, depth=3,
                              device=torch.device("cpu"))
    untrained = chain_agreement(HFDrafter(tiny_model("llama", seed=9)), data, depth=3, device=torch.device("cpu"))
    assert trained["top1"] > untrained["top1"] + 0.1, (trained, untrained)
    assert trained["top4"] >= trained["top1"]
    assert abs(trained["chain_expected_tokens"] - 1 - sum(trained["chain_all_right"])) < 1e-9
