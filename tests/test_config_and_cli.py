"""Every config composes and validates; the CLI runs end to end (and as a -m sweep) on a tiny pair."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import tiny_model, tiny_tokenizer
from models.config import CONFIG_DIR, SpeculativeDecodingConfig, default_config

ROOT = Path(__file__).resolve().parents[1]
GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "experiment")


def test_default_config_matches_yaml():
    cfg = default_config()
    config = SpeculativeDecodingConfig()
    assert config.tree_search.max_nodes == cfg.tree_search.max_nodes
    assert config.decoding.method == cfg.decoding.method
    assert config.model.target_model_name == "demo:target"


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group):
    for option in sorted((CONFIG_DIR / group).glob("*.yaml")):
        config = SpeculativeDecodingConfig.from_overrides([f"{group}={option.stem}"])
        assert config.to_dict()["decoding"]["method"] in ("target_only", "chain", "tree")


@pytest.fixture(scope="module")
def tiny_pair_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    for name, seed in (("target", 0), ("draft", 1)):
        model = tiny_model("llama", seed=seed)
        model.save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    return root


def run_script(script, *overrides, cwd=ROOT):
    proc = subprocess.run([sys.executable, f"scripts/{script}", *overrides], cwd=cwd, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_generate_cli_and_sweep(tiny_pair_dirs, tmp_path):
    pair = [f"model.target_model_name={tiny_pair_dirs / 'target'}", f"model.draft_model_name={tiny_pair_dirs / 'draft'}",
            "prompt='w5 w6 w7'", "decoding.max_new_tokens=12", f"output_dir={tmp_path}"]
    out = run_script("generate.py", *pair, "decoding.method=chain")
    assert '"method": "chain"' in out and '"new_tokens": 12' in out
    out = run_script("generate.py", "-m", *pair, "decoding.method=tree,target_only", "tree_search=static,dynamic")
    assert out.count('"new_tokens": 12') == 4


def test_benchmark_cli(tiny_pair_dirs, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"p{i}", "category": "c", "prompt": f"w{i + 5} w7"}) for i in range(3)))
    out = run_script("benchmark.py", f"model.target_model_name={tiny_pair_dirs / 'target'}",
                     f"model.draft_model_name={tiny_pair_dirs / 'draft'}", f"data_dir={tmp_path}",
                     "benchmark.prompt_file=prompts.jsonl", "benchmark.num_prompts=2", "benchmark.max_new_tokens=8",
                     "benchmark.temperatures=[0,1.0]", f"output_dir={tmp_path}")
    assert "hf_assisted" in out and "x HF assisted" in out
    result = json.loads(next(tmp_path.glob("benchmark-*.json")).read_text())
    greedy = result["runs"]["0"]["rows"]
    for method in ("target_only", "hf_generate", "hf_assisted", "chain", "tree"):
        assert greedy[method]["identical"] == 2, method  # greedy: every method emits the target's tokens
        assert greedy[method]["new_tokens"] > 0
    assert result["runs"]["1.0"]["rows"]["tree"]["identical"] is None
