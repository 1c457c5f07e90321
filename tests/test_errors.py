"""Bad input gets a clear, documented error (a TreeSpecError subclass), never a deep torch trace."""

import pytest
import torch
from conftest import tiny_model, tiny_tokenizer

from models.errors import (
    ConfigError,
    InputError,
    ModelLoadError,
    TreeSpecError,
    VocabularyMismatchError,
)
from speculative_decoder import (
    SpeculativeDecoder,
    SpeculativeDecodingConfig,
    load_model,
    resolve_model_path,
)


@pytest.fixture()
def decoder(default_config):
    target = tiny_model("llama", context=64)
    return SpeculativeDecoder.from_models(target, tiny_model("llama", seed=3, context=64), tiny_tokenizer(), default_config)


def test_empty_prompt(decoder):
    with pytest.raises(InputError, match="empty prompt"):
        decoder.generate(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(InputError, match="empty prompt"):
        decoder.generate_text("   ")


def test_prompt_longer_than_context(decoder):
    with pytest.raises(InputError, match="context of 64 tokens"):
        decoder.generate(torch.full((1, 64), 5))
    with pytest.raises(InputError, match="context"):
        decoder.generate_text(" ".join(["w5"] * 80))


def test_batch_larger_than_one(decoder):
    with pytest.raises(InputError, match="batch size 2"):
        decoder.generate(torch.full((2, 5), 5))


def test_ids_outside_vocabulary(decoder):
    with pytest.raises(InputError, match="outside the vocabulary"):
        decoder.generate(torch.tensor([[5, 96]]))


def test_vocabulary_mismatch(default_config):
    with pytest.raises(VocabularyMismatchError, match="differs"):
        SpeculativeDecoder.from_models(tiny_model("llama"), tiny_model("llama", vocab=80), None, default_config)


@pytest.mark.parametrize("override, message", [
    ("decoding.method=beam", "decoding.method"),
    ("tree_search.max_depth=-1", "tree_search.max_depth"),
    ("tree_search.max_nodes=0", "node budget"),
    ("tree_search.mode=wide", "tree_search.mode"),
    ("tree_search.child_draw=best", "tree_search.child_draw"),
    ("decoding.top_p=0", "decoding.top_p"),
    ("decoding.temperature=-1", "decoding.temperature"),
    ("tree_search.max_depth=abc", "tree_search"),
    ("model.dtype=float8", "model.dtype"),
])
def test_invalid_config_values(override, message):
    with pytest.raises(ConfigError, match=message):
        SpeculativeDecodingConfig.from_overrides([override])


def test_static_tree_over_budget():
    with pytest.raises(ConfigError, match="more than tree_search.max_nodes"):
        SpeculativeDecodingConfig.from_overrides(["tree_search=static", "tree_search.branching=[4,4,4]"])


def test_unknown_generate_option(decoder):
    with pytest.raises(ConfigError, match="unknown decoding option"):
        decoder.generate(torch.tensor([[5, 6]]), beams=3)
    with pytest.raises(ConfigError, match="decoding.method"):
        decoder.generate(torch.tensor([[5, 6]]), method="beam")


def test_method_needs_a_draft(default_config):
    with pytest.raises(ConfigError, match="needs a draft"):
        SpeculativeDecoder.from_models(tiny_model("llama"), None, None, default_config)


def test_missing_path_and_hub_id():
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path("/nonexistent/model/dir")
    with pytest.raises(ModelLoadError, match="hub id"):
        resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_directory_without_model(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        resolve_model_path(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load"):
        load_model(tmp_path)


def test_errors_are_value_errors():
    assert issubclass(TreeSpecError, ValueError)


def test_text_api_and_stream(decoder):
    text = decoder.generate_text("w5 w6 w7", max_new_tokens=8)
    pieces = list(decoder.stream("w5 w6 w7", max_new_tokens=8))
    assert "".join(pieces) == text and len(pieces) >= 2
    assert decoder.last_stats.new_tokens <= 8
