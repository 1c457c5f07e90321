"""Generate text with tree speculative decoding; print it and a short summary of the run.

    python scripts/generate.py                                  # the demo pair, default prompt
    python scripts/generate.py compare=true                     # also the target alone: speedup, identical?
    python scripts/generate.py prompt="Write a haiku" decoding.method=chain
    python scripts/generate.py decoding=sampling decoding.temperature=1.0 tree_search=static

Writes ``generate.json`` (text, summary, stats, config, provenance) into the Hydra run directory
(``${output_dir}/hydra/<time>/``, or the job's directory of a ``-m`` sweep) and returns tokens/s
(a sweeper can optimise it).
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from speculative_decoder import (
    GenerationStats,
    SpeculativeDecoder,
    SpeculativeDecodingConfig,
)
from training.drafts.distill import ensure_config_drafts
from training.experiments.tracking import start_run
from training.provenance import provenance


def summary(stats: GenerationStats) -> dict:
    """The few numbers a reader wants from one run."""
    d = stats.as_dict()
    steps = max(stats.steps, 1)
    return dict(method=stats.method, new_tokens=stats.new_tokens, seconds=round(stats.total_time_s, 3),
                tokens_per_s=round(d["tokens_per_s"], 3), tau=round(d["mean_accepted_length"], 3),
                acceptance_rate=round(d["acceptance_rate"], 4),
                nodes_verified_per_step=round(stats.drafted_tokens / steps, 2),
                nodes_drafted_per_step=round(stats.nodes_drafted / steps, 2),
                pruned_fraction=round(d["pruned_fraction"], 4), accepted_tokens=stats.accepted_tokens,
                expected_accepted=round(stats.expected_accepted, 2), stop_reason=stats.stop_reason,
                lookup_nodes_per_step=round(stats.lookup_nodes / steps, 2), lookup_accepted=stats.lookup_accepted,
                time_share={k: round(v / stats.total_time_s, 3) if stats.total_time_s else 0.0
                            for k, v in stats.time_s.items() if v > 0})


def format_summary(s: dict, compare: dict | None = None) -> str:
    lines = [f"{s['new_tokens']} new tokens in {s['seconds']:.2f} s: {s['tokens_per_s']:.2f} tok/s ({s['method']})"]
    if s["method"] != "target_only":
        lines.append(f"tau {s['tau']:.2f} tokens per target forward | acceptance {100 * s['acceptance_rate']:.0f}% | "
                     f"verified {s['nodes_verified_per_step']:.1f} of {s['nodes_drafted_per_step']:.1f} drafted nodes "
                     f"per step ({100 * s['pruned_fraction']:.0f}% pruned) | {s['accepted_tokens']} draft tokens "
                     f"accepted, {s['expected_accepted']:.1f} expected")
        if s["lookup_nodes_per_step"]:
            lines.append(f"prompt lookup: {s['lookup_nodes_per_step']:.1f} nodes per step added, "
                         f"{s['lookup_accepted']} tokens accepted that only it proposed")
    lines.append("time: " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in s["time_share"].items()))
    if compare is not None:
        same = compare["identical"]
        verdict = ("identical to the target alone" if same else "differs from the target alone") if same is not None \
            else "sampled: not compared token by token (each is a sample of the target's distribution)"
        lines.append(f"target alone: {compare['tokens_per_s']:.2f} tok/s -> speedup {compare['speedup']:.2f}x; "
                     f"output {verdict}")
    return "\n".join(lines)


def run(cfg: DictConfig, out_dir: Path | None = None) -> dict:
    ensure_config_drafts(cfg)  # demo:draft-lm is made once by training, on first use
    config = SpeculativeDecodingConfig.from_hydra(cfg)
    decoder = SpeculativeDecoder(config)
    with start_run(cfg, "generate") as tracker:
        input_ids = decoder.encode_prompt(cfg.prompt)
        if cfg.compare:  # warm both paths up first so neither timing pays one-off costs
            decoder.generate(input_ids, max_new_tokens=8)
            decoder.generate(input_ids, max_new_tokens=8, method="target_only")
        print(f"prompt: {cfg.prompt}\n", flush=True)
        pieces = []
        for piece in decoder.stream(cfg.prompt):
            pieces.append(piece)
            print(piece, end="", flush=True)
        stats, ids = decoder.last_stats, decoder.last_ids
        result = dict(prompt=cfg.prompt, text="".join(pieces), summary=summary(stats), stats=stats.as_dict())
        compare = None
        if cfg.compare:
            ref, ref_stats = decoder.generate(input_ids, method="target_only")
            compare = dict(tokens_per_s=round(ref_stats.tokens_per_s, 3),
                           speedup=round(stats.tokens_per_s / ref_stats.tokens_per_s, 3) if ref_stats.tokens_per_s else 0.0,
                           # sampled outputs are draws, not expected to match token by token
                           identical=bool(ids.shape == ref.shape and (ids == ref).all()) if config.decoding.greedy else None,
                           target_only_stats=ref_stats.as_dict())
        result["compare"] = compare
        print("\n\n" + format_summary(result["summary"], compare), flush=True)
        result["config"] = OmegaConf.to_container(cfg, resolve=True)
        result["provenance"] = provenance(device=decoder.device)  # git commit, package versions, machine
        tracker.log({f"generate/{k}": v for k, v in result["summary"].items() if isinstance(v, (int, float))})
        if compare is not None:
            tracker.log({"generate/speedup": compare["speedup"]})
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "generate.json").write_text(json.dumps(result, indent=1, default=str))
    return result


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    return run(cfg, Path(HydraConfig.get().runtime.output_dir))["summary"]["tokens_per_s"]


if __name__ == "__main__":
    main()
