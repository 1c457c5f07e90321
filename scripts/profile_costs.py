"""Profile what a decode step costs on this machine with the configured pair (the tree policy's cost model).

    python scripts/profile_costs.py                                   # the demo pair; cached per machine + pair
    python scripts/profile_costs.py profile_costs.force=true          # measure again
    python scripts/profile_costs.py "profile_costs.node_counts=[1,8,16]" profile_costs.repeats=15

Prints the table (verify ms per tree size N, draft ms per frontier width F), writes the profile to
$TREESPEC_CACHE/costs/costs-<hash of machine, threads, dtype, pair, sizes>.json (reused while that key
holds) and a PNG plot next to it. Returns verify(16) / verify(1).
"""


import hydra
from omegaconf import DictConfig

from models.policy.cost_profile import cost_file, load_or_profile, plot_costs
from speculative_decoder import SpeculativeDecoder, SpeculativeDecodingConfig
from training.drafts.distill import ensure_config_drafts
from training.experiments.tracking import start_run


def verify_ratio(model) -> float:
    """verify(16) / verify(1): how much more a 16-token tree costs the target than one token."""
    one = model.verify(1)
    return model.verify(16) / one if one > 0 else float("nan")


def run(cfg: DictConfig):
    ensure_config_drafts(cfg)  # demo:draft-lm is made once by training, on first use
    p = cfg.profile_costs
    decoder = SpeculativeDecoder(SpeculativeDecodingConfig.from_hydra(cfg))
    sizes = dict(context=int(p.context), node_counts=[int(n) for n in p.node_counts],
                 widths=[int(w) for w in p.widths])
    path = cost_file(decoder, p.cache_dir, **sizes)
    before = path.stat().st_mtime_ns if path.is_file() else None
    model = load_or_profile(decoder, p.cache_dir, force=bool(p.force), repeats=int(p.repeats), warmup=int(p.warmup),
                            **sizes)
    reused = before is not None and path.stat().st_mtime_ns == before
    print(model.table())
    png = plot_costs(model, path.with_suffix(".png"))
    print(f"\n{'reused (profile_costs.force=true measures again)' if reused else 'wrote'} {path}\nplot {png}")
    tracker = start_run(cfg, job="profile_costs")
    tracker.log({**{f"verify_ms/{n}": v for n, v in model.verify_ms.items()},
                 **{f"draft_ms/{w}": v for w, v in model.draft_ms.items()},
                 "verify16_over_verify1": verify_ratio(model)})
    tracker.log_image("profile_costs/plot", png)
    tracker.finish()
    return model, path


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    model, _ = run(cfg)
    return verify_ratio(model)


if __name__ == "__main__":
    main()
