"""Fast CPU checks of the quick-draft recipe on a tiny random Llama (seconds, no files needed)."""

from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from models.errors import ConfigError, ModelLoadError
from training.drafts.distill import (
    _read_rows,
    agreement,
    distill,
    kl_loss,
    make_truncated_draft,
    target_argmax,
)


def tiny_target(tie: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=tie)
    return LlamaForCausalLM(config).eval()


def random_batches(n: int, batch: int = 4, length: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 100, (batch, length), generator=g)
        sel = torch.zeros(batch, length, dtype=torch.bool)
        sel[:, length // 3:-1] = True  # "answer" positions
        out.append((ids, sel))
    return out


@pytest.mark.parametrize("tie", [True, False])
def test_truncated_draft_copies_first_layers(tie):
    target = tiny_target(tie)
    draft = make_truncated_draft(target, 2)
    assert draft.config.num_hidden_layers == 2 and len(draft.model.layers) == 2
    assert target.config.num_hidden_layers == 4  # the target's config is left alone
    for name, tensor in draft.state_dict().items():
        assert torch.equal(tensor, target.state_dict()[name]), name
    assert (draft.lm_head.weight is draft.model.embed_tokens.weight) == tie


def test_full_depth_draft_equals_target():
    target = tiny_target()
    draft = make_truncated_draft(target, 4)
    ids = torch.randint(0, 100, (2, 16))
    with torch.no_grad():
        assert torch.equal(draft(ids).logits, target(ids).logits)
    batches = random_batches(2)
    assert agreement(draft, batches, target_argmax(target, batches))["top1"] == 1.0


def test_bad_layer_count_is_a_config_error():
    with pytest.raises(ConfigError):
        make_truncated_draft(tiny_target(), 5)


def test_kl_loss_matches_autograd_kl_div():
    t, s = torch.randn(6, 100), torch.randn(6, 100, requires_grad=True)
    kl_loss(t, s).backward()
    ours = s.grad.clone()
    s.grad = None
    reference = torch.nn.functional.kl_div(s.log_softmax(-1), t.log_softmax(-1),
                                           log_target=True, reduction="batchmean")
    reference.backward()
    assert torch.allclose(kl_loss(t, s), reference, atol=1e-6)
    assert torch.allclose(ours, s.grad, atol=1e-6)


@torch.no_grad()
def mean_kl(student, teacher, batches) -> float:
    from training.drafts.distill import _logits_at
    return sum(kl_loss(_logits_at(teacher, i, s), _logits_at(student, i, s)).item()
               for i, s in batches) / len(batches)


def test_distillation_reduces_kl():
    target = tiny_target()
    draft = make_truncated_draft(target, 1)
    batches = random_batches(4)
    cfg = SimpleNamespace(lr=1e-2, weight_decay=0.0, warmup_steps=1, student_bf16=False)
    before = mean_kl(draft, target, batches)
    frozen = draft.model.embed_tokens.weight.clone()
    torch.manual_seed(0)
    losses = distill(draft, target, batches * 5, cfg, progress=False)
    after = mean_kl(draft, target, batches)
    assert len(losses) == 20 and after < 0.7 * before, (before, after)
    assert torch.equal(draft.model.embed_tokens.weight, frozen)  # embeddings/lm_head frozen


def test_data_errors_name_the_problem(tmp_path):
    files = {"alpaca_train_2k.jsonl": "output"}
    with pytest.raises(ModelLoadError, match="data_dir"):
        _read_rows(tmp_path / "nowhere", files)
    with pytest.raises(ConfigError, match="evaluation set"):
        _read_rows(tmp_path, {"spec_bench.jsonl": "reference"})
    (tmp_path / "t0_train_sample.jsonl").write_text(
        '{"prompt": "Q?", "completion": "A.<|endoftext|>"}\n')
    assert _read_rows(tmp_path, {"t0_train_sample.jsonl": "completion"}) == [[("Q?", "A.")]]
