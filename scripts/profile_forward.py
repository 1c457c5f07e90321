"""Where one forward of the configured target goes: linear layers against the rest.

    python scripts/profile_forward.py                                  # the demo target, the configured kernels
    python scripts/profile_forward.py model.cpu_linear=mkl model.attn_implementation=sdpa
    python scripts/profile_forward.py "profile_forward.new_tokens=[1,4,8,16]"

Prints a table (ms per forward of n new tokens after profile_forward.context cached ones, with and without
the matrix products) and writes profile_forward-<time>.json (with provenance) into output_dir.
"""

import json
import time

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from models.paths import repo_path
from speculative_decoder import load_model, resolve_model_path
from training.experiments.forward_profile import forward_breakdown
from training.provenance import provenance


def run(cfg: DictConfig) -> dict:
    m, p = cfg.model, cfg.profile_forward
    target = load_model(resolve_model_path(m.target_model_name, m.cache_dir), m.device, m.dtype,
                        m.attn_implementation, m.cpu_linear)
    rows = forward_breakdown(target, list(p.new_tokens), int(p.context), int(p.repeats), int(p.warmup))
    print(f"target forward after {p.context} cached tokens ({m.dtype}, cpu_linear={m.cpu_linear}, "
          f"attention={m.attn_implementation}, {torch.get_num_threads()} threads), medians of {p.repeats}:")
    print(f"{'new tokens':>10} {'forward ms':>11} {'no linear ms':>13} {'linear ms':>10} {'rest share':>11}")
    for n, r in rows.items():
        print(f"{n:>10} {r['forward_ms']:>11.2f} {r['without_linear_ms']:>13.2f} {r['linear_ms']:>10.2f} "
              f"{r['rest_share']:>11.0%}")
    result = {"rows": rows, "config": OmegaConf.to_container(cfg, resolve=True), "provenance": provenance(cfg, device=m.device)}
    out = repo_path(cfg.output_dir) / f"profile_forward-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    rows = run(cfg)["rows"]
    return float(next(iter(rows.values()))["rest_share"])


if __name__ == "__main__":
    main()
