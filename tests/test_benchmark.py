"""scripts/benchmark.py, Spec-Bench style: prompts per category, per-category and overall aggregates that
are sums of the per-prompt records, per-depth acceptance, provenance, plots and the headline number."""

import importlib.util
import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import ROOT, noisy_copy, run_script, tiny_model, tiny_tokenizer

from models.decoding.tree import DraftTree
from models.errors import ConfigError, InputError
from speculative_decoder import GenerationStats, SpeculativeDecoder
from training.experiments.benchmark import PHASE_KEYS, load_prompts, select_prompts

CATEGORIES = ("alpha", "beta")


def write_prompts(path, per_category: dict[str, int]) -> list[dict]:
    rows = [{"id": f"{cat}-{i}", "category": cat, "prompt": f"w{i + 5} w{7 + 2 * j} w{i + 11}"}
            for j, (cat, n) in enumerate(per_category.items()) for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return rows


@pytest.fixture(scope="module")
def noisy_pair_dirs(tmp_path_factory):
    """A tiny target and a noisy copy of it as the draft (accepts some tokens, rejects others)."""
    root = tmp_path_factory.mktemp("noisy_pair")
    target = tiny_model("llama", seed=0)
    for name, model in (("target", target), ("draft", noisy_copy(target, 0.3))):
        model.save_pretrained(root / name)
        tiny_tokenizer().save_pretrained(root / name)
    return root


# ---------------------------------------------------------------------- prompt selection
def test_select_prompts_per_category(tmp_path):
    path = tmp_path / "p.jsonl"
    write_prompts(path, {"alpha": 5, "beta": 3, "gamma": 1})
    logged = []
    prompts, n_warm = select_prompts(path, num=99, warmup=2, per_category=2, log=logged.append)
    ids = [p["id"] for p in prompts]
    # warm-up: the next prompts of the file, round-robin; then the first 2 of each category, interleaved
    assert n_warm == 2 and ids[:2] == ["alpha-2", "beta-2"]
    assert ids[2:] == ["alpha-0", "beta-0", "gamma-0", "alpha-1", "beta-1"]
    assert any("gamma" in m for m in logged)  # fewer prompts than asked: said, not hidden
    # categories filter; no spare prompt left for warm-up: timed ones warm up too
    prompts, n_warm = select_prompts(path, 99, 1, categories=["beta"], per_category=3)
    assert [p["id"] for p in prompts] == ["beta-0", "beta-0", "beta-1", "beta-2"] and n_warm == 1
    # null: num_prompts + warmup round-robin, exactly as before
    prompts, n_warm = select_prompts(path, 4, 1)
    assert prompts == load_prompts(path, 5) and n_warm == 1
    with pytest.raises(ValueError, match="unknown prompt category"):
        select_prompts(path, 4, 1, categories=["alpha", "nope"], per_category=2)
    with pytest.raises(ValueError, match="prompts_per_category"):
        select_prompts(path, 4, 1, per_category=0)
    with pytest.raises(InputError, match="prompt file not found"):
        select_prompts(tmp_path / "nope.jsonl", 4, 1, per_category=2)


# ---------------------------------------------------------------------- per-depth counts
def test_depth_counts_on_a_hand_built_tree():
    tree = DraftTree.from_root(10)
    tree.add_children(torch.tensor([0, 0]), torch.tensor([11, 12]), torch.zeros(2))  # 1, 2 at depth 1
    tree.add_children(torch.tensor([1]), torch.tensor([13]), torch.zeros(1))  # 3 at depth 2
    tree.add_children(torch.tensor([3]), torch.tensor([14]), torch.zeros(1))  # 4 at depth 3
    stats = GenerationStats(method="tree")
    record = partial(stats.record_step, tree)  # the decoder's per-step bookkeeping

    def counts():
        return stats.verified_per_depth, stats.reachable_per_depth, stats.accepted_per_depth

    record([0, 1, 3], [11, 13, 99], 0.0)  # accepts depth 1, 2; node 3's child rejected
    assert counts() == ([1, 1, 1], [1, 1, 1], [1, 1])
    record([0, 2], [12, 99], 0.0)  # node 2 has no child: depth 2 was not reachable
    assert counts()[1:] == ([2, 1, 1], [2, 1])
    record([0], [99], 0.0)  # depth 1 rejected
    assert counts()[1:] == ([3, 1, 1], [2, 1])
    record([0, 1, 3, 4], [11], 0.0)  # EOS at depth 1: what follows was not reached
    assert counts() == ([4, 4, 4], [4, 1, 1], [3, 1])


# ---------------------------------------------------------------------- the script end to end
def test_benchmark_cli_per_category(noisy_pair_dirs, tmp_path):
    write_prompts(tmp_path / "two.jsonl", {"alpha": 3, "beta": 3})  # 2 timed + 1 warm-up each
    out = run_script("benchmark.py", f"model.target_model_name={noisy_pair_dirs / 'target'}",
                     f"model.draft_model_name={noisy_pair_dirs / 'draft'}", f"data_dir={tmp_path}",
                     f"output_dir={tmp_path}", f"model.cache_dir={tmp_path / 'cache'}", "pruning=none",
                     "benchmark.prompt_file=two.jsonl", "benchmark.split=all", "benchmark.prompts_per_category=2",
                     "benchmark.num_prompts=1", "benchmark.max_new_tokens=8", "benchmark.temperatures=[0]",
                     "logger=wandb", "logger.mode=offline")
    assert "speedup vs target_only by category" in out and "time per phase" in out
    assert "alpha" in out and "beta" in out and "x HF assisted" in out
    [path] = tmp_path.glob("benchmark-*.json")
    result = json.loads(path.read_text())

    # provenance, config, memory, selection
    prov = result["provenance"]
    assert set(prov) >= {"git", "packages", "machine", "time", "argv"}
    assert set(prov["git"]) >= {"commit", "dirty"}
    assert prov["packages"]["pinned"]["torch"]["installed"] == torch.__version__
    assert {"python", "pinned", "mismatched"} <= set(prov["packages"])
    assert prov["machine"]["cpu"] and prov["machine"]["torch_threads"] >= 1
    assert result["config"]["benchmark"]["prompts_per_category"] == 2
    assert result["memory"]["unit"] == "bytes" and result["memory"]["measure"] in (
        "linux_peak_rss_vmhwm", "ru_maxrss_since_process_start", "cuda_max_memory_allocated")
    assert result["selection"]["timed_per_category"] == {"alpha": 2, "beta": 2}
    assert result["selection"]["warmup_prompts"] == ["alpha-2"]  # num_prompts is ignored

    run = result["runs"]["0"]
    assert set(run) >= {"rows", "categories", "per_prompt", "skipped", "warmup", "memory"}
    methods = list(run["rows"])
    assert methods == ["target_only", "hf_generate", "hf_assisted", "chain", "tree"]
    assert list(run["categories"]) == list(CATEGORIES)
    records = run["per_prompt"]
    assert len(records) == 4 * len(methods) and "alpha-2" not in {r["id"] for r in records}
    assert {r["id"] for r in records} == {"alpha-0", "alpha-1", "beta-0", "beta-1"}

    def check(row, recs, name):
        """``row`` must be exactly what ``recs`` (one method's per-prompt records) add up to."""
        n, new, secs = len(recs), sum(r["new_tokens"] for r in recs), sum(r["time_s"] for r in recs)
        assert row["prompts"] == n and row["new_tokens"] == new, name
        assert row["time_s"] == pytest.approx(secs, abs=2e-3), name
        assert row["tokens_per_s"] == pytest.approx(new / secs), name
        assert row["identical"] == n, name  # greedy: every method emits the target's tokens
        assert row["peak_memory_bytes"] == max(r["peak_memory_bytes"] for r in recs) > 0, name
        phases = row["phase_ms_per_token"]
        assert sum(phases.values()) == pytest.approx(1000 * secs / new, rel=1e-6), name  # phases cover the wall time
        if recs[0]["steps"] is None:  # HF methods: no step statistics
            assert row["tau"] is None and row["acceptance_per_depth"] is None and set(phases) == {"outside"}, name
            return
        assert set(phases) == set(PHASE_KEYS), name
        steps = sum(r["steps"] for r in recs)
        assert row["steps"] == steps and row["tau"] == pytest.approx((new - n) / steps), name
        accepted, drafted = sum(r["accepted_tokens"] for r in recs), sum(r["drafted_tokens"] for r in recs)
        assert row["accepted_tokens"] == accepted == sum(row["accepted_per_depth"]), name
        assert row["acceptance_rate"] == (pytest.approx(accepted / drafted) if drafted else None), name
        acc, reach, ver = row["accepted_per_depth"], row["reachable_per_depth"], row["verified_per_depth"]
        for key in ("accepted_per_depth", "reachable_per_depth", "verified_per_depth"):
            total = [0] * max(len(r[key]) for r in recs)
            for r in recs:
                for d, v in enumerate(r[key]):
                    total[d] += v
            assert row[key] == total, (name, key)
        assert len(acc) <= len(reach) <= len(ver) and (not ver or ver[0] <= steps), name
        for d, (r, v) in enumerate(zip(reach, ver)):
            a = acc[d] if d < len(acc) else 0
            assert a <= r <= v, name
            assert row["acceptance_per_depth"][d] == (pytest.approx(a / r) if r else None), name

    for m in methods:
        mine = [r for r in records if r["method"] == m]
        check(run["rows"][m], mine, m)
        for cat in CATEGORIES:
            check(run["categories"][cat][m], [r for r in mine if r["category"] == cat], f"{cat}/{m}")
        # overall = the sum of the categories
        for key in ("new_tokens", "prompts", "steps", "accepted_tokens"):
            cats = [run["categories"][c][m][key] for c in CATEGORIES]
            assert run["rows"][m][key] == (None if cats[0] is None else sum(cats)), (m, key)
    for rows in [run["rows"], *run["categories"].values()]:
        for m in methods:
            for base in ("target_only", "hf_assisted"):
                assert rows[m][f"speedup_vs_{base}"] == pytest.approx(rows[m]["tokens_per_s"] / rows[base]["tokens_per_s"])
    assert run["rows"]["target_only"]["tau"] == 1.0 and run["rows"]["target_only"]["accepted_per_depth"] == []
    for m in ("chain", "tree"):  # the noisy draft is right sometimes: depth 1 is reached and accepted
        assert run["rows"][m]["accepted_tokens"] > 0 and run["rows"][m]["acceptance_per_depth"][0] > 0

    # headline and plots
    h = result["headline"]
    assert (h["method"], h["metric"]) == ("tree", "speedup_vs_target_only")
    assert h["value"] == run["rows"]["tree"]["speedup_vs_target_only"]
    assert set(result["plots"]) == {"categories", "acceptance_depth", "phases"}
    for png in map(Path, result["plots"].values()):
        assert png.parent == tmp_path and png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert png.name.startswith(path.stem + "-")

    # the wandb run (offline): per-method and per-category metrics, the table, the plots
    from training.experiments.tracking import offline_runs, read_offline_run

    [run_dir] = offline_runs(tmp_path)
    logged = read_offline_run(run_dir)
    assert logged["job_type"] == "benchmark" and logged["config"]["benchmark"]["prompts_per_category"] == 2
    summary = logged["summary"]
    assert summary["T0/tree/tokens_per_s"] == pytest.approx(run["rows"]["tree"]["tokens_per_s"])
    assert summary["T0/alpha/tree/tau"] == pytest.approx(run["categories"]["alpha"]["tree"]["tau"])
    assert summary["T0/table"]["_type"] == "table-file" and summary["T0/table"]["nrows"] == len(methods) * 3
    assert {f"benchmark/{name}" for name in result["plots"]} <= set(summary)


def test_benchmark_main_returns_the_headline(noisy_pair_dirs, tmp_path):
    """The Hydra main returns the number a sweeper optimises (and writes the JSON with it)."""
    from hydra import compose, initialize_config_dir

    write_prompts(tmp_path / "two.jsonl", {"alpha": 1, "beta": 1})
    spec = importlib.util.spec_from_file_location("benchmark_script", ROOT / "scripts" / "benchmark.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"model.target_model_name={noisy_pair_dirs / 'target'}", f"model.draft_model_name={noisy_pair_dirs / 'draft'}",
            f"data_dir={tmp_path}", f"output_dir={tmp_path}", f"model.cache_dir={tmp_path / 'cache'}", "pruning=none",
            "benchmark.prompt_file=two.jsonl", "benchmark.split=all", "benchmark.prompts_per_category=1", "benchmark.warmup_prompts=0",
            "benchmark.max_new_tokens=4", "benchmark.methods=[target_only,tree]", "benchmark.temperatures=[0]"])
    value = script.main(cfg)
    [path] = tmp_path.glob("benchmark-*.json")
    result = json.loads(path.read_text())
    assert isinstance(value, float) and math.isfinite(value)
    assert value == result["headline"]["value"] == result["runs"]["0"]["rows"]["tree"]["speedup_vs_target_only"]
    assert result["selection"]["warmup_prompts"] == [] and len(result["runs"]["0"]["per_prompt"]) == 4


def test_first_divergence_names_the_token_and_the_targets_margin():
    from conftest import tiny_model

    from speculative_decoder import SpeculativeDecodingConfig
    from training.experiments.benchmark import first_divergence

    target = tiny_model("llama")
    target.generation_config.eos_token_id = None
    decoder = SpeculativeDecoder.from_models(target, None, None, SpeculativeDecodingConfig.from_overrides(
        ["decoding.method=target_only"]))
    ids = torch.tensor([[5, 6, 7]])
    reference = decoder.generate(ids, max_new_tokens=6)[0][0, 3:].tolist()
    other = reference[:3] + [(reference[3] + 1) % 96] + reference[4:]
    d = first_divergence(decoder, ids, reference, other)
    assert (d["index"], d["reference_token"], d["token"]) == (3, reference[3], other[3])
    with torch.no_grad():
        logits = target(torch.tensor([[5, 6, 7, *reference[:3]]])).logits[0, -1]
    top = torch.topk(logits, 2).values
    assert d["margin"] == pytest.approx(float(top[0] - top[1]), rel=1e-5) and d["margin"] >= 0
    shorter = first_divergence(decoder, ids, reference, reference[:4])  # stopped early: no margin
    assert shorter["index"] == 4 and shorter["margin"] is None and shorter["token"] is None


def test_tune_and_test_splits_are_disjoint_and_cover_every_category(tmp_path):
    """The held-out protocol: within each category prompts alternate tune / test in file order, so the
    halves are disjoint, cover every category alike, and a prompt's half never depends on the selection."""
    from training.experiments.splits import split_rows

    rows = [{"id": f"{c}{i}", "category": c, "prompt": "x"} for i in range(5) for c in ("a", "b")]
    tune, test = split_rows(rows, "tune"), split_rows(rows, "test")
    assert [r["id"] for r in tune] == ["a0", "b0", "a2", "b2", "a4", "b4"]
    assert [r["id"] for r in test] == ["a1", "b1", "a3", "b3"]
    assert split_rows(rows, "all") == rows
    with pytest.raises(ConfigError, match="benchmark.split"):
        split_rows(rows, "train")
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompts, n_warm = select_prompts(path, 99, 1, per_category=2, split="test")
    assert {r["id"] for r in prompts} <= {r["id"] for r in test} and n_warm == 1
    prompts, _ = select_prompts(path, 3, 0, split="tune")
    assert [r["id"] for r in prompts] == ["a0", "b0", "a2"]
