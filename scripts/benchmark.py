"""Benchmark target-only, HF generate, HF assisted generation and treespec chain/tree side by side.

    python scripts/benchmark.py                                   # 20 Spec-Bench prompts, greedy
    python scripts/benchmark.py benchmark.num_prompts=5 benchmark.max_new_tokens=32
    python scripts/benchmark.py benchmark.temperatures=[0.7,1.0]  # sampling (vs target-only and HF sampling)

Prints a table per temperature and writes everything to ${output_dir}/benchmark-<time>.json.
"""

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
import torch  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from models.config import repo_path  # noqa: E402
from speculative_decoder import (SpeculativeDecoder, SpeculativeDecodingConfig, load_model,  # noqa: E402
                                 resolve_model_path)
from training.benchmark import format_table, load_prompts, run_benchmark  # noqa: E402
from training.tracking import start_run  # noqa: E402


def run(cfg: DictConfig) -> dict:
    b = cfg.benchmark
    config = SpeculativeDecodingConfig.from_hydra(cfg)
    decoder = SpeculativeDecoder(config)
    assistant = None
    if "hf_assisted" in b.methods and decoder.draft_model is None and b.get("assistant_model_name"):
        m = config.model  # HF assisted generation needs an HF causal LM: the EAGLE head is not one
        assistant = load_model(resolve_model_path(b.assistant_model_name, m.cache_dir, m.data_dir), m.device, m.dtype,
                               m.attn_implementation)
    prompts = load_prompts(repo_path(cfg.data_dir) / b.prompt_file, b.num_prompts + b.warmup_prompts,
                           list(b.categories) if b.categories else None)
    temperatures = list(b.temperatures) if b.get("temperatures") else [0.0 if config.decoding.greedy else config.decoding.temperature]
    result = dict(assistant=b.assistant_model_name if assistant is not None else None,
                  config=OmegaConf.to_container(cfg, resolve=True), device=str(decoder.device),
                  threads=torch.get_num_threads(), prompts=[p["id"] for p in prompts], runs={})
    tracker = start_run(cfg, job="benchmark")
    for temperature in temperatures:
        decoding = dict(do_sample=temperature > 0, temperature=temperature)
        print(f"\n== temperature {temperature} ({'sampling' if temperature > 0 else 'greedy'}), "
              f"{b.num_prompts} prompts x {b.max_new_tokens} new tokens ==", flush=True)
        out = run_benchmark(decoder, prompts, list(b.methods), b.max_new_tokens, b.max_prompt_tokens,
                            b.warmup_prompts, decoding, assistant=assistant,
                            variants=OmegaConf.to_container(b.variants) if b.get("variants") else None)
        result["runs"][str(temperature)] = out
        print(format_table(out["rows"]), flush=True)
        tracker.log({f"T{temperature}/{m}/{k}": v for m, r in out["rows"].items() for k, v in r.items()
                     if isinstance(v, (int, float))})
    path = repo_path(cfg.output_dir) / f"benchmark-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")
    tracker.finish()
    return result


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    runs = run(cfg)["runs"]
    first = next(iter(runs.values()))["rows"]
    return first.get("tree", first.get("chain", {})).get("speedup_vs_target_only") or 0.0


if __name__ == "__main__":
    main()
