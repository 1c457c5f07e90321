"""What a new user runs into first: sampling seeds behave like Hugging Face's, the package imports
from anywhere once installed, and one prompt encoding serves decoding and training alike."""

import subprocess
import sys

import pytest
import torch
from conftest import noisy_copy, tiny_model, tiny_tokenizer

from models.decoding.prompts import exchange_ids, prompt_ids
from speculative_decoder import SpeculativeDecoder, SpeculativeDecodingConfig


@pytest.fixture(scope="module")
def decoder():
    target = tiny_model("llama")
    target.generation_config.eos_token_id = None
    config = SpeculativeDecodingConfig.from_overrides(["decoding=sampling", "decoding.temperature=1.0"])
    return SpeculativeDecoder.from_models(target, noisy_copy(target, 0.3), tiny_tokenizer(), config)


@pytest.mark.parametrize("method", ["target_only", "tree"])
def test_unseeded_sampling_differs_and_seeded_repeats(decoder, method):
    assert decoder.config.decoding.seed is None  # the default
    prompt = torch.tensor([[5, 6, 7]])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    runs = [decoder.generate(prompt, max_new_tokens=24, method=method)[0] for _ in range(2)]
    # 24 tokens from a 96-token vocabulary at temperature 1: equal by chance with negligible probability
    assert not torch.equal(runs[0], runs[1])
    seeded = [decoder.generate(prompt, max_new_tokens=24, method=method, seed=7)[0] for _ in range(2)]
    assert torch.equal(seeded[0], seeded[1])
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched


def test_seed_values_checked(decoder):
    from models.errors import ConfigError

    with pytest.raises(ConfigError, match="decoding.seed"):
        decoder.generate(torch.tensor([[5, 6]]), max_new_tokens=2, seed=-1)
    with pytest.raises(ConfigError, match=r"'decoding'[\s\S]*seed"):
        SpeculativeDecodingConfig.from_overrides(["decoding.seed=abc"])


def test_package_imports_from_anywhere(tmp_path):
    """`pip install -r requirements.txt` installs the project (editable): no sys.path tricks."""
    code = "import speculative_decoder, models.policy.tree_pruner, training.experiments.benchmark; print(speculative_decoder.__file__)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("speculative_decoder.py")


def test_one_prompt_encoding_for_decoding_and_training():
    tok = tiny_tokenizer()
    config = SpeculativeDecodingConfig.from_overrides([])
    target = tiny_model("llama")
    decoder = SpeculativeDecoder.from_models(target, None, tok, SpeculativeDecodingConfig.from_overrides(
        ["decoding.method=target_only"]))
    ids = decoder.encode_prompt("w5 w6")
    assert ids[0].tolist() == prompt_ids(tok, "w5 w6")
    full, start = exchange_ids(tok, "w5 w6", "w7 w8")
    assert full[:start] == prompt_ids(tok, "w5 w6") and full[start:] == tok("w7 w8 </s>", add_special_tokens=False).input_ids
    from training.drafts.teacher_data import chat_ids

    assert chat_ids(tok, "w5 w6") == prompt_ids(tok, "w5 w6")
    assert config.decoding.use_chat_template


def _cbwr_after_import(env_changes: dict) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "TREESPEC_MKL_AVX512")}
    env.update(env_changes)
    proc = subprocess.run([sys.executable, "-c", "import os, models; print(os.environ.get('MKL_CBWR'))"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_mkl_avx512_path_is_chosen_only_where_it_applies():
    from pathlib import Path

    try:
        avx512 = " avx512f" in next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                                    if line.startswith("flags"))
    except (OSError, StopIteration):
        avx512 = False
    assert _cbwr_after_import({}) == ("AVX512" if avx512 else "None")
    assert _cbwr_after_import({"MKL_CBWR": "COMPATIBLE"}) == "COMPATIBLE"  # the user's choice wins
    assert _cbwr_after_import({"TREESPEC_MKL_AVX512": "0"}) == "None"  # opt-out
