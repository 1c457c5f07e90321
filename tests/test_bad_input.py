"""The README's bad-input table, row by row: each case gets its documented error class and a message
that names the problem, from the entry point a user meets it at. (test_errors.py has the older
rows: empty / too long prompts, vocabularies, config values, missing model directories.)"""

import dataclasses
import json

import pytest
import torch
from conftest import noisy_copy, tiny_model, tiny_tokenizer

from models.decoding.drafter import Drafter
from models.errors import (
    ConfigError,
    DrafterError,
    InputError,
    ModelLoadError,
    NumericalError,
    TreeSpecError,
)
from models.io.loading import check_device
from speculative_decoder import SpeculativeDecoder, SpeculativeDecodingConfig
from training.jsonl import read_jsonl


def config(*overrides):
    return SpeculativeDecodingConfig.from_overrides(["pruning=none", *overrides])


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("llama")
    target.generation_config.eos_token_id = None
    return target, noisy_copy(target, 0.2)


def test_model_directory_without_tokenizer(tmp_path, pair):
    pair[0].save_pretrained(tmp_path / "target")  # weights and config, no tokenizer files
    cfg = config(f"model.target_model_name={tmp_path / 'target'}", "model.draft_model_name=null",
                 "decoding.method=target_only")
    with pytest.raises(ModelLoadError, match="tokenizer"):
        SpeculativeDecoder(cfg)


def test_draft_and_target_on_different_devices(pair):
    target, draft = pair
    elsewhere = tiny_model("llama", seed=5).to("meta")  # a second device on a CPU-only machine
    with pytest.raises(ConfigError, match="draft is on meta and the target on cpu"):
        SpeculativeDecoder.from_models(target, elsewhere, None, config())
    SpeculativeDecoder.from_models(target, draft, None, config())  # same device: fine


def test_cuda_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        check_device("cuda", "float32")
    with pytest.raises(ConfigError, match="no CUDA GPU"):  # refused before any model is loaded
        SpeculativeDecoder(config("model.device=cuda", "model.target_model_name=/nonexistent"))
    with pytest.raises(ConfigError, match="not a device"):
        check_device("gpu0", "float32")
    assert check_device("cpu", "bfloat16") == torch.device("cpu")


def test_unsupported_dtype_for_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(ConfigError, match="bfloat16 is not supported on Tesla T4"):
        check_device("cuda", "bfloat16")
    with pytest.raises(ConfigError, match="only 1 CUDA device"):
        check_device("cuda:3", "float32")
    check_device("cuda", "float16")
    with pytest.raises(ConfigError, match="model.dtype"):  # a dtype treespec does not run at all
        config("model.dtype=float64")


def test_prompt_file_missing_or_malformed(tmp_path):
    with pytest.raises(InputError, match="prompt file not found"):
        read_jsonl(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    good = json.dumps({"id": "a", "prompt": "hi"})
    bad.write_text(f"{good}\n\n{{\"id\": \"b\", \"prompt\": \n")
    with pytest.raises(InputError, match=r"bad\.jsonl, line 3: not valid JSON"):
        read_jsonl(bad)
    bad.write_text(f"{good}\n{json.dumps({'id': 'b'})}\n")
    with pytest.raises(InputError, match=r"line 2: missing key\(s\) \['prompt'\]"):
        read_jsonl(bad)
    bad.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(InputError, match="line 2: expected a JSON object"):
        read_jsonl(bad)
    bad.write_text(f"{good}\n{json.dumps({'id': 'b', 'prompt': '  '})}\n")
    with pytest.raises(InputError, match="line 2: 'prompt' must be a non-empty string"):
        read_jsonl(bad)
    bad.write_text(f"{good}\n")
    assert read_jsonl(bad) == [{"id": "a", "prompt": "hi"}]


class WrongShapeDrafter(Drafter):
    """Returns logits with one row too many / the wrong vocabulary / NaN, per ``mode``."""

    def __init__(self, vocab, mode):
        self.vocab, self.mode = vocab, mode

    def prefill(self, input_ids, target_hidden=None):
        pass

    def propose(self, tree, frontier):
        if self.mode == "rows":
            return torch.zeros(len(frontier) + 1, self.vocab)
        if self.mode == "vocab":
            return torch.zeros(len(frontier), self.vocab - 1)
        if self.mode == "type":
            return [[0.0] * self.vocab]
        return torch.full((len(frontier), self.vocab), float("nan"))

    def commit(self, tree, path, target_hidden=None):
        pass


@pytest.mark.parametrize("mode,message", [("rows", r"shape \[2, 96\] for a frontier of 1"),
                                          ("vocab", r"shape \[1, 95\]"), ("type", "not a tensor"),
                                          ("nan", "NaN logits")])
def test_drafter_with_wrong_logits(pair, mode, message):
    target = pair[0]
    vocab = target.get_output_embeddings().weight.shape[0]
    assert vocab == 96
    decoder = SpeculativeDecoder.from_models(target, WrongShapeDrafter(vocab, mode), None, config())
    with pytest.raises(DrafterError, match=message):
        decoder.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4)


def test_nan_or_inf_in_target_logits(pair):
    target, draft = pair
    decoder = SpeculativeDecoder.from_models(target, draft, None, config())
    prompt = torch.tensor([[5, 6, 7]])
    head = target.get_output_embeddings()
    for value, name in ((float("nan"), "NaN"), (float("inf"), "inf")):
        for method in ("target_only", "tree"):
            calls = []

            def poison(module, args, out):  # the second target forward: a verify step
                calls.append(1)
                return out if len(calls) < 2 else out.masked_fill(torch.ones_like(out, dtype=torch.bool), value)

            handle = head.register_forward_hook(poison)
            try:
                with pytest.raises(NumericalError, match=f"contain {name} \\(verify step 1"):
                    decoder.generate(prompt, max_new_tokens=6, method=method)
            finally:
                handle.remove()
    out, stats = decoder.generate(prompt, max_new_tokens=6)  # unharmed afterwards
    assert stats.new_tokens == 6


def test_checkpoint_for_another_target(tmp_path, pair):
    from models.learned.affine_alignment import AffineAlignment, save_alignment

    target, draft = pair
    other = tiny_model("llama", seed=9)
    hidden = target.config.hidden_size
    save_alignment(AffineAlignment(hidden, hidden), tmp_path / "align", {}, target=other, draft=draft)
    decoder = SpeculativeDecoder.from_models(target, draft, None, config())
    decoder.config.affine_alignment.alignment_checkpoint = str(tmp_path / "align")
    with pytest.raises(ModelLoadError, match="target"):
        decoder.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4)


def test_max_new_tokens_zero(pair):
    decoder = SpeculativeDecoder.from_models(*pair, tiny_tokenizer(), config())
    with pytest.raises(InputError, match="max_new_tokens must be >= 1, got 0"):
        decoder.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=0)
    with pytest.raises(ConfigError, match="decoding.max_new_tokens"):
        config("decoding.max_new_tokens=0")
    cfg = config()
    cfg.decoding.max_new_tokens = 0  # changed after the config was built: caught at generate
    decoder = SpeculativeDecoder.from_models(*pair, tiny_tokenizer(), cfg)
    with pytest.raises(ConfigError, match="decoding.max_new_tokens"):
        decoder.generate(torch.tensor([[5, 6, 7]]))


def test_every_error_is_a_treespec_error():
    for cls in (ConfigError, DrafterError, InputError, ModelLoadError, NumericalError):
        assert issubclass(cls, TreeSpecError) and issubclass(cls, ValueError)
    assert dataclasses.is_dataclass(SpeculativeDecodingConfig)
