"""Evaluate a draft on Spec-Bench: agreement with the target's greedy text, per-position agreement in a
drafted chain, latency relative to the target, and tau / tokens/s of chain and tree decoding.

    python scripts/eval_draft.py                                        # the default demo draft
    python scripts/eval_draft.py model.draft_model_name=~/.cache/treespec/smollm2-135m-draft-quick
    python scripts/eval_draft.py eval_draft.num_prompts=16 eval_draft.speed_prompts=0   # quicker

The target's greedy continuations of the prompts are written once (fp32 target) and cached in
$TREESPEC_CACHE/evalset-<hash>/. Prints a table and writes ${output_dir}/eval_draft-<time>.json.
"""

import json
import time

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from models.paths import repo_path
from speculative_decoder import SpeculativeDecoder, SpeculativeDecodingConfig
from training.drafts.distill import ensure_config_drafts
from training.drafts.evaluate import chain_agreement, eval_continuations, latency
from training.experiments.benchmark import format_table, load_prompts, run_benchmark
from training.experiments.tracking import start_run
from training.provenance import provenance


def run(cfg: DictConfig) -> dict:
    ensure_config_drafts(cfg)  # demo:draft-lm is made once by training, on first use
    e = cfg.eval_draft
    config = SpeculativeDecodingConfig.from_hydra(cfg)
    decoder = SpeculativeDecoder(config)
    target, drafter = decoder.target_model, decoder.drafter
    if drafter is None:
        raise SystemExit("no draft to evaluate: set model.draft_model_name")
    m = config.model
    parts = set(e.parts)
    result = dict(config=OmegaConf.to_container(cfg, resolve=True), draft=m.draft_model_name,
                  threads=torch.get_num_threads())
    if "agreement" in parts:
        data, groups = eval_continuations(cfg, getattr(drafter, "feature_layers", None))
        t0 = time.time()
        result["agreement"] = chain_agreement(drafter, data, e.chain_depth, decoder.device, groups)
        print(f"agreement on {result['agreement']['positions']} positions of {len(data['prompt_lens'])} target "
              f"continuations ({time.time() - t0:.0f} s)", flush=True)
    if "latency" in parts:
        result["latency"] = latency(target, drafter, e.latency_context, e.latency_repeats,
                                    target.get_output_embeddings().weight.shape[0], e.seed)
    print(format_eval(result.get("agreement"), result.get("latency")))
    if "speed" in parts and e.speed_prompts > 0:
        prompts = load_prompts(repo_path(cfg.data_dir) / e.prompt_file, e.speed_prompts + 1)
        speed = run_benchmark(decoder, prompts, ["target_only", "chain", "tree"], e.speed_max_new_tokens,
                              e.max_prompt_tokens, 1, dict(do_sample=False))
        result["speed"] = speed
        print(format_table(speed["rows"]))
    tracker = start_run(cfg, job="eval_draft")
    tracker.log({f"{part}/{k}": v for part in ("agreement", "latency") for k, v in (result.get(part) or {}).items()
                 if isinstance(v, (int, float))})
    tracker.finish()
    result["provenance"] = provenance(cfg, device=decoder.device)  # config, git commit, versions, machine
    path = repo_path(cfg.output_dir) / f"eval_draft-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {path}")
    return result


def format_eval(agree: dict | None, lat: dict | None) -> str:
    lines = ["metric | value", "--- | ---"]
    if agree:
        lines += [f"top-1 agreement (first drafted token) | {agree['top1']:.3f}",
                  f"top-4 agreement | {agree['top4']:.3f}",
                  "chain: P(token k right given 1..k-1 right), k=1.. | "
                  + " ".join(f"{v:.3f}" for v in agree["chain_conditional"]),
                  "chain: P(tokens 1..k all right) | " + " ".join(f"{v:.3f}" for v in agree["chain_all_right"]),
                  f"chain: expected tokens per target forward | {agree['chain_expected_tokens']:.2f}"]
        lines += [f"top-1 agreement, {g} ({v['positions']} positions) | {v['top1']:.3f}"
                  for g, v in agree.get("top1_by_group", {}).items()]
    if lat:
        lines += [f"target forward, 1 token (ms) | {lat['target_ms']:.1f}",
                  f"draft forward, 1 token (ms) | {lat['draft_ms']:.2f}",
                  f"draft forward, 3-node frontier (ms) | {lat['draft_frontier3_ms']:.2f}",
                  f"draft / target latency | {lat['draft_over_target']:.3f}"]
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    return (run(cfg).get("agreement") or {}).get("top1", 0.0)


if __name__ == "__main__":
    main()
