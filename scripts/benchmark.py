"""Benchmark target-only, HF generate, HF assisted generation and treespec chain/tree side by side
(and the peers on request: HF prompt lookup, llama.cpp's llama-server).

    python scripts/benchmark.py                                   # 20 Spec-Bench prompts, greedy
    python scripts/benchmark.py benchmark.prompts_per_category=10 # Spec-Bench style: 10 per category
    python scripts/benchmark.py benchmark.num_prompts=5 benchmark.max_new_tokens=32
    python scripts/benchmark.py benchmark.temperatures=[0.7,1.0]  # sampling (vs target-only and HF sampling)
    python scripts/benchmark.py benchmark.drafts='{lm: demo:draft-lm}'  # + the tree with another draft
    python scripts/benchmark.py "benchmark.methods=[target_only,tree,hf_prompt_lookup,llama_cpp]" \
        "benchmark.llama_cpp.spec_types=[none,ngram-simple]"      # the peers (llama_cpp needs llama-server built)

Prints, per temperature, tables overall and per prompt category (speedup, tau) and the time per
phase, and writes ${output_dir}/benchmark-<time>.json (per-prompt records, per-category and overall
aggregates, the resolved config and provenance: git commit, package versions, machine) with three
PNGs next to it (benchmark-<time>-{categories,acceptance_depth,phases}.png). Returns the headline
number (the tree's overall speedup vs target-only at the first temperature; see
``training.experiments.report.headline``), so a Hydra sweeper can optimise it.
"""

import json
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from models.paths import repo_path
from speculative_decoder import (
    SpeculativeDecoder,
    SpeculativeDecodingConfig,
    load_model,
    resolve_model_path,
)
from training.drafts.distill import ensure_config_drafts
from training.experiments.benchmark import (
    category_of,
    draft_decoders,
    run_benchmark,
    select_prompts,
)
from training.experiments.report import (
    headline,
    make_console,
    plot_benchmark,
    print_report,
)
from training.experiments.tracking import start_run
from training.provenance import provenance


def _unique_stem(directory: Path) -> Path:
    """benchmark-<time>, with -2, -3, ... when a run of the same second (a sweep) already wrote one."""
    stem = directory / f"benchmark-{time.strftime('%Y%m%d-%H%M%S')}"
    candidate, k = stem, 1
    while candidate.with_suffix(".json").exists():
        k += 1
        candidate = stem.with_name(f"{stem.name}-{k}")
    return candidate


def run(cfg: DictConfig) -> dict:
    b = cfg.benchmark
    ensure_config_drafts(cfg)  # demo:draft-lm is made once, on first use
    config = SpeculativeDecodingConfig.from_hydra(cfg)
    decoder = SpeculativeDecoder(config)
    variants = OmegaConf.to_container(b.variants) if b.get("variants") else None
    drafts = draft_decoders(decoder, OmegaConf.to_container(b.drafts) if b.get("drafts") else None,
                            list(b.methods) + list(variants or {}))
    llama_cpp = OmegaConf.to_container(b.llama_cpp, resolve=True) if b.get("llama_cpp") else None
    assistant = None
    if "hf_assisted" in b.methods and decoder.draft_model is None and b.get("assistant_model_name"):
        m = config.model  # HF assisted generation needs an HF causal LM: the EAGLE head is not one
        ensure_config_drafts(cfg, b.assistant_model_name)
        assistant = load_model(resolve_model_path(b.assistant_model_name, m.cache_dir), m.device, m.dtype,
                               m.attn_implementation, m.cpu_linear)
    per_category = b.get("prompts_per_category")
    prompts, n_warmup = select_prompts(repo_path(cfg.data_dir) / b.prompt_file, b.num_prompts, b.warmup_prompts,
                                       list(b.categories) if b.categories else None, per_category, split=b.split)
    timed = prompts[n_warmup:] if len(prompts) > n_warmup else prompts
    counts = {}
    for row in timed:
        counts[category_of(row)] = counts.get(category_of(row), 0) + 1
    temperatures = list(b.temperatures) if b.get("temperatures") else [0.0 if config.decoding.greedy else config.decoding.temperature]
    result = dict(assistant=b.assistant_model_name if assistant is not None else None,
                  config=OmegaConf.to_container(cfg, resolve=True), device=str(decoder.device),
                  threads=torch.get_num_threads(), prompts=[p["id"] for p in prompts],
                  selection=dict(split=b.split, prompts_per_category=per_category, num_prompts=None if per_category else b.num_prompts,
                                 timed_per_category=counts, warmup_prompts=[p["id"] for p in prompts[:n_warmup]]),
                  provenance=provenance(device=decoder.device), memory=None, runs={})
    console = make_console()
    with start_run(cfg, job="benchmark") as tracker:  # the run is finished however the block ends
        for temperature in temperatures:
            decoding = dict(do_sample=temperature > 0, temperature=temperature)
            print(f"\n== temperature {temperature} ({'sampling' if temperature > 0 else 'greedy'}), {len(timed)} prompts "
                  f"({', '.join(f'{c} {n}' for c, n in counts.items())}) x {b.max_new_tokens} new tokens ==", flush=True)
            out = run_benchmark(decoder, prompts, list(b.methods), b.max_new_tokens, b.max_prompt_tokens, n_warmup,
                                decoding, assistant=assistant, variants=variants, decoders=drafts,
                                prompt_lookup_num_tokens=b.get("prompt_lookup_num_tokens"), llama_cpp=llama_cpp)
            result["runs"][str(temperature)] = out
            result["memory"] = out["memory"]
            print_report(out, console)
            metrics = {f"T{temperature}/{m}/{k}": v for m, r in out["rows"].items() for k, v in r.items()
                       if isinstance(v, (int, float))}
            metrics.update({f"T{temperature}/{c}/{m}/{k}": v for c, rows in out["categories"].items()
                            for m, r in rows.items() for k, v in r.items() if isinstance(v, (int, float))})
            tracker.log(metrics)
            columns = ["category", "method", "tokens_per_s", "speedup_vs_target_only", "tau", "acceptance_rate", "nodes_per_step"]
            table = [["overall", m, *(r.get(k) for k in columns[2:])] for m, r in out["rows"].items()]
            table += [[c, m, *(r.get(k) for k in columns[2:])] for c, rows in out["categories"].items() for m, r in rows.items()]
            tracker.log_table(f"T{temperature}/table", columns, table)
        result["headline"] = headline(result["runs"])
        stem = _unique_stem(repo_path(cfg.output_dir))
        result["plots"] = plot_benchmark(result["runs"], stem)
        path = stem.with_suffix(".json")
        path.write_text(json.dumps(result, indent=1))
        h = result["headline"]
        print(f"\nheadline: {h['method']} {h['metric']} = {h['value']:.3f} (T={h['temperature']})")
        print(f"wrote {path} and {', '.join(Path(p).name for p in result['plots'].values())}")
        for name, png in result["plots"].items():
            tracker.log_image(f"benchmark/{name}", png)
    return result


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    """The headline metric (``result["headline"]``) for Hydra sweepers."""
    return float(run(cfg)["headline"]["value"])


if __name__ == "__main__":
    main()
