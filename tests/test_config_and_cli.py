"""Every config composes and validates; the CLI runs end to end (and as a -m sweep) on a tiny pair."""

import json

import pytest
import torch
from conftest import run_script, script_result, tiny_model, tiny_tokenizer

from models.config import SpeculativeDecodingConfig, default_config
from models.paths import CONFIG_DIR

GROUPS = sorted(p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and p.name != "experiment")


def _yaml(path):
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def _plain(value) -> bool:
    """A literal YAML value (not an interpolation such as ${data_dir}, which Hydra resolves)."""
    return not (isinstance(value, str) and "${" in value)


def test_default_config_matches_yaml():
    """SpeculativeDecodingConfig() holds the values written in configs/: read here with a plain YAML
    parser from config.yaml's defaults list and each chosen group file (not through default_config())."""
    choices = {}
    for entry in _yaml(CONFIG_DIR / "config.yaml")["defaults"]:
        if isinstance(entry, dict):
            choices.update(entry)
    config = SpeculativeDecodingConfig().to_dict()

    def group_file(group, option) -> dict:  # the option's own defaults list (same group) first, then itself
        own = _yaml(CONFIG_DIR / group / f"{option}.yaml")
        merged = {}
        for entry in own.pop("defaults", []):
            assert isinstance(entry, str), (group, option, entry)
            if entry != "_self_":
                merged.update(group_file(group, entry))
        return {**merged, **own}

    checked = 0
    for group, values in config.items():
        written = group_file(group, choices[group])
        for key, value in written.items():
            assert key in values, f"{group}.{key} is in the YAML but not in the config"
            if _plain(value):
                assert values[key] == value, (group, key, values[key], value)
                checked += 1
    assert checked >= 20
    assert config["model"]["target_model_name"] == "demo:target" and config["tree_search"]["mode"] == "dynamic"
    assert default_config().tree_search.max_nodes == config["tree_search"]["max_nodes"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group):
    for option in sorted((CONFIG_DIR / group).glob("*.yaml")):
        config = SpeculativeDecodingConfig.from_overrides([f"{group}={option.stem}"])
        assert config.to_dict()["decoding"]["method"] in ("target_only", "chain", "tree")


def test_generate_cli_and_sweep(tiny_pair_dirs, tmp_path):
    pair = [f"model.target_model_name={tiny_pair_dirs / 'target'}", f"model.draft_model_name={tiny_pair_dirs / 'draft'}",
            "prompt='w5 w6 w7'", "decoding.max_new_tokens=12", f"output_dir={tmp_path}"]
    # The one real subprocess of the CLI tests: `python scripts/generate.py ...` as users type it (the other
    # script runs go through the same __main__ and Hydra entry in-process, see helpers.script_result).
    out = run_script("generate.py", *pair, "decoding.method=chain", in_process=False)
    assert "12 new tokens in" in out and "tok/s (chain)" in out and "tau " in out and "time: prefill" in out
    written = list((tmp_path / "hydra").glob("*/generate.json"))
    assert len(written) == 1
    result = json.loads(written[0].read_text())
    assert result["summary"]["new_tokens"] == 12 and result["stats"]["method"] == "chain" and result["compare"] is None
    assert result["text"] and result["config"]["decoding"]["method"] == "chain"
    out = run_script("generate.py", *pair, "compare=true", "hydra.run.dir=" + str(tmp_path / "cmp"))
    assert "target alone:" in out and "speedup" in out and "identical to the target alone" in out
    cmp = json.loads((tmp_path / "cmp" / "generate.json").read_text())["compare"]
    assert cmp["identical"] is True and cmp["speedup"] > 0 and cmp["target_only_stats"]["method"] == "target_only"
    out = run_script("generate.py", *pair, "compare=true", "decoding=sampling", "hydra.run.dir=" + str(tmp_path / "smp"))
    assert "sampled: not compared token by token" in out
    out = run_script("generate.py", "-m", *pair, "decoding.method=tree,target_only", "tree_search=static,dynamic")
    assert out.count("12 new tokens in") == 4


def test_bench_kernels_cli(tiny_pair_dirs, tmp_path):
    """scripts/bench_kernels.py times each kernel on the target's own linear shapes."""
    out = run_script("bench_kernels.py", f"model.target_model_name={tiny_pair_dirs / 'target'}",
                     f"output_dir={tmp_path}", "bench_kernels.rows=[1,3]", "bench_kernels.repeats=2",
                     "bench_kernels.copies=2")
    result = json.loads(next(tmp_path.glob("bench_kernels-*.json")).read_text())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_pair_dirs / "target")
    shapes = {(m.in_features, m.out_features) for m in model.modules() if isinstance(m, torch.nn.Linear)}
    assert {tuple(r["shape"]) for r in result["results"]} == shapes
    assert {r["kernel"] for r in result["results"]} >= {"mkl"}
    assert all(set(r["ms"]) == {"1", "3"} and min(r["ms"].values()) > 0 for r in result["results"])
    assert "rows" in out and "GB/s" in out and result["provenance"]["git"]
    code, _, err = script_result("bench_kernels.py", f"model.target_model_name={tiny_pair_dirs / 'target'}",
                                 f"output_dir={tmp_path}", "bench_kernels.kernels=[fastest]")
    assert code != 0 and "bench_kernels.kernels" in err


def test_benchmark_cli(tiny_pair_dirs, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"id": f"p{i}", "category": "c", "prompt": f"w{i + 5} w7"}) for i in range(3)))
    out = run_script("benchmark.py", f"model.target_model_name={tiny_pair_dirs / 'target'}",
                     f"model.draft_model_name={tiny_pair_dirs / 'draft'}", f"data_dir={tmp_path}",
                     "benchmark.prompt_file=prompts.jsonl", "benchmark.split=all", "benchmark.num_prompts=2", "benchmark.max_new_tokens=8",
                     "benchmark.temperatures=[0,1.0]", f"output_dir={tmp_path}")
    assert "hf_assisted" in out and "x HF assisted" in out
    result = json.loads(next(tmp_path.glob("benchmark-*.json")).read_text())
    greedy = result["runs"]["0"]["rows"]
    for method in ("target_only", "hf_generate", "hf_assisted", "chain", "tree"):
        assert greedy[method]["identical"] == 2, method  # greedy: every method emits the target's tokens
        assert greedy[method]["new_tokens"] > 0
    assert result["runs"]["1.0"]["rows"]["tree"]["identical"] is None


def test_train_draft_then_eval_draft_then_benchmark_cli(tiny_pair_dirs, tmp_path):
    """The draft pipeline end to end on the tiny pair: teacher shards -> EAGLE head -> evaluation ->
    decoding and benchmarking with it (HF assisted falls back to the assistant model)."""
    rows = lambda name, n: "\n".join(json.dumps({"id": f"{name}-{i}", "category": "c", "prompt": f"w{i % 90 + 5} w{i % 7 + 3} w9"})  # noqa: E731
                                     for i in range(n))
    (tmp_path / "train.jsonl").write_text(rows("train", 16))
    (tmp_path / "spec_bench.jsonl").write_text(rows("eval", 4))
    cache, head = tmp_path / "cache", tmp_path / "head"
    common = [f"model.target_model_name={tiny_pair_dirs / 'target'}", f"data_dir={tmp_path}", f"output_dir={tmp_path}",
              f"model.cache_dir={cache}"]
    out = run_script("train_draft.py", *common, "draft=eagle", "draft.teacher.files=[train.jsonl]",
                     "draft.teacher.num_prompts=16", "draft.teacher.shard_prompts=8", "draft.teacher.batch_size=4",
                     "draft.teacher.max_new_tokens=8", "draft.teacher.dtype=float32", "draft.vocab_size=40",
                     "draft.epochs=2", "draft.batch_tokens=64", "draft.eval_sequences=2", "draft.bf16=false",
                     f"out_dir={head}")
    assert (head / "eagle_head.safetensors").is_file() and "heldout_vocab_coverage" in out
    info = json.loads((head / "eagle_head.json").read_text())
    assert info["provenance"]["git"]["commit"] and info["teacher_shards"] == 2  # where the head came from
    assert len(list(cache.glob("teacher-*/shard-*.safetensors"))) == 2
    again = run_script("train_draft.py", *common, "draft=eagle", "draft.teacher.files=[train.jsonl]",  # resumes: no work
                       "draft.teacher.num_prompts=16", "draft.teacher.shard_prompts=8", "draft.teacher.batch_size=4",
                       "draft.teacher.max_new_tokens=8", "draft.teacher.dtype=float32", "draft.vocab_size=40",
                       "draft.epochs=2", "draft.batch_tokens=64", "draft.eval_sequences=2", "draft.bf16=false",
                       f"out_dir={head}")
    assert "steps:" in again
    head3 = tmp_path / "eagle3"  # the engines' EAGLE-3 layout, trained the same way (the 2-layer target's one inner layer, thrice)
    out = run_script("train_draft.py", *common, "draft=eagle3", "draft.teacher.files=[train.jsonl]",
                     "draft.teacher.num_prompts=16", "draft.teacher.shard_prompts=8", "draft.teacher.batch_size=4",
                     "draft.teacher.max_new_tokens=8", "draft.teacher.dtype=float32", "draft.teacher.feature_layers=[1,1,1]",
                     "draft.vocab_size=40", "draft.epochs=2", "draft.batch_tokens=64", "draft.eval_sequences=2",
                     "draft.bf16=false", f"out_dir={head3}")
    assert (head3 / "config.json").is_file() and (head3 / "model.safetensors").is_file() and "heldout" in out
    assert json.loads((head3 / "treespec.json").read_text())["family"] == "eagle3"
    out = run_script("eval_draft.py", *common, f"model.draft_model_name={head}", "eval_draft.num_prompts=4",
                     "eval_draft.max_new_tokens=8", "eval_draft.speed_prompts=2", "eval_draft.speed_max_new_tokens=8",
                     "eval_draft.latency_repeats=3", "eval_draft.latency_context=16", "eval_draft.batch_size=2")
    assert "top-1 agreement" in out and "draft / target latency" in out
    result = json.loads(next(tmp_path.glob("eval_draft-*.json")).read_text())
    assert 0 <= result["agreement"]["top1"] <= result["agreement"]["top4"] <= 1
    assert result["speed"]["rows"]["tree"]["identical"] == 2  # greedy with the head: the target's tokens
    out = run_script("benchmark.py", *common, f"model.draft_model_name={head}",
                     f"benchmark.assistant_model_name={tiny_pair_dirs / 'draft'}", "benchmark.prompt_file=spec_bench.jsonl",
                     "benchmark.split=all", "benchmark.num_prompts=2", "benchmark.max_new_tokens=8", "benchmark.warmup_prompts=0",
                     f"benchmark.drafts={{lm: '{tiny_pair_dirs / 'draft'}', e3: '{head3}'}}")  # + the other drafts' trees
    result = json.loads(next(tmp_path.glob("benchmark-*.json")).read_text())
    rows = next(iter(result["runs"].values()))["rows"]
    assert rows["lm"]["tau"] > 0 and rows["e3"]["tau"] > 0
    assert all(r["identical"] == 2 for r in rows.values())
    assert result["assistant"] == str(tiny_pair_dirs / "draft")
    code, _, err = script_result("benchmark.py", *common, f"model.draft_model_name={head}",
                                 "benchmark.drafts={tree: demo:draft-lm}")
    assert code != 0 and "already a method" in err


def test_benchmark_variants_run_in_the_same_run(default_config):
    """benchmark.variants: extra tree runs with changed config groups, restored afterwards."""
    from speculative_decoder import SpeculativeDecoder
    from training.experiments.benchmark import run_benchmark

    target = tiny_model("llama")
    decoder = SpeculativeDecoder.from_models(target, tiny_model("llama", seed=1), tiny_tokenizer(), default_config)
    before = decoder.config.tree_search.max_nodes, decoder.config.pruning.strategy
    prompts = [{"id": f"p{i}", "prompt": f"w{i + 5} w7"} for i in range(3)]
    out = run_benchmark(decoder, prompts, ["target_only", "tree"], 10, 64, 1, {"do_sample": False}, log=lambda *_: None,
                        variants={"big": {"tree_search": {"max_nodes": 12, "max_depth": 4}},
                                  "pruned": {"pruning": {"strategy": "budget", "max_verify_nodes": 2}}})
    rows = out["rows"]
    assert set(rows) == {"target_only", "tree", "big", "pruned"}
    assert all(r["identical"] == 2 for r in rows.values())
    assert rows["pruned"]["nodes_per_step"] <= 2
    assert (decoder.config.tree_search.max_nodes, decoder.config.pruning.strategy) == before


def test_benchmark_variants_switch_kernels_and_methods(default_config, monkeypatch):
    """A variant can run another method (e.g. target_only) and another model.cpu_linear kernel on the
    same loaded models: the kernel is switched for that run and restored afterwards."""
    import models.kernels.fast_linear as fl
    from models.errors import ConfigError
    from speculative_decoder import SpeculativeDecoder
    from training.experiments.benchmark import run_benchmark

    base = "invariant" if fl.resolve_cpu_linear("auto") == "invariant" else "onednn"
    if base == "onednn" and not fl.onednn_available():
        pytest.skip("no packed kernel to switch from on this machine")
    target, draft = tiny_model("llama"), tiny_model("llama", seed=1)
    fl.set_linear_kernel(target, base)
    fl.set_linear_kernel(draft, base)
    seen = []
    switch = fl.set_linear_kernel
    monkeypatch.setattr(fl, "set_linear_kernel", lambda m, mode: (seen.append((m, mode)), switch(m, mode))[1])
    decoder = SpeculativeDecoder.from_models(target, draft, tiny_tokenizer(), default_config)
    prompts = [{"id": f"p{i}", "prompt": f"w{i + 5} w7"} for i in range(3)]
    variants = {"target_mkl": {"method": "target_only", "model": {"cpu_linear": "mkl"}},
                "tree_mkl": {"model": {"cpu_linear": "mkl"}}}
    out = run_benchmark(decoder, prompts, ["target_only", "tree"], 10, 64, 1, {"do_sample": False},
                        log=lambda *_: None, variants=variants)
    rows = out["rows"]
    assert set(rows) == {"target_only", "tree", "target_mkl", "tree_mkl"}
    assert all(r["identical"] == 2 for r in rows.values())
    assert rows["target_mkl"]["tau"] == pytest.approx(1.0)  # ran as the target alone
    assert (target, "mkl") in seen and (draft, "mkl") in seen and (target, base) in seen  # switched and back
    assert fl.linear_kernel(target) == base and fl.linear_kernel(draft) == base
    assert decoder.config.model.cpu_linear == default_config.model.cpu_linear
    with pytest.raises(ConfigError, match="method must be one of"):
        run_benchmark(decoder, prompts, ["tree"], 4, 64, 0, {"do_sample": False}, log=lambda *_: None,
                      variants={"x": {"method": "fastest"}})
    with pytest.raises(ConfigError, match="only model.cpu_linear"):
        run_benchmark(decoder, prompts, ["tree"], 4, 64, 0, {"do_sample": False}, log=lambda *_: None,
                      variants={"x": {"model": {"dtype": "bfloat16"}}})
    assert fl.linear_kernel(target) == base


def test_benchmark_drafts_share_the_target(tiny_pair_dirs, default_config):
    """benchmark.drafts: each named draft becomes a decoder on the same target with the same config."""
    from models.errors import ConfigError
    from speculative_decoder import SpeculativeDecoder
    from training.experiments.benchmark import draft_decoders

    decoder = SpeculativeDecoder.from_models(tiny_model("llama"), tiny_model("llama", seed=2), tiny_tokenizer(),
                                             default_config)
    out = draft_decoders(decoder, {"lm": str(tiny_pair_dirs / "draft")}, ["target_only", "tree"])
    other = out["lm"]
    assert other.target_model is decoder.target_model and other.draft_model is not decoder.draft_model
    assert other.config.model.draft_model_name == str(tiny_pair_dirs / "draft")
    assert other.config.tree_search == decoder.config.tree_search
    assert decoder.config.model.draft_model_name == default_config.model.draft_model_name  # untouched
    with pytest.raises(ConfigError, match="already a method"):
        draft_decoders(decoder, {"tree": str(tiny_pair_dirs / "draft")}, ["target_only", "tree"])
    with pytest.raises(ConfigError, match="draft directory or a demo name"):
        draft_decoders(decoder, {"x": 3}, ["tree"])
    with pytest.raises(Exception, match="does not exist"):
        draft_decoders(decoder, {"x": "/no/such/draft"}, ["tree"])


@pytest.mark.parametrize("preset", sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes(preset):
    """Each preset composes into a valid config that carries the decoder settings the preset writes."""
    config = SpeculativeDecodingConfig.from_overrides([f"experiment={preset}"])
    config.validate()  # raises ConfigError on a bad value
    values = config.to_dict()
    for group, written in _yaml(CONFIG_DIR / "experiment" / f"{preset}.yaml").items():
        if group in values and isinstance(written, dict):
            for key, value in written.items():
                if _plain(value):
                    assert values[group][key] == value, (preset, group, key, values[group][key], value)
