"""Draw the draft tree of one decode step as a PNG: drafted, verified, pruned and accepted nodes.

    python scripts/show_tree.py prompt="Why is the sky blue?" step=3 output=tree.png
    python scripts/show_tree.py step=1 pruning=budget pruning.max_verify_nodes=4        # pruned nodes greyed
    python scripts/show_tree.py step=2 acceptance_predictor=demo affine_alignment=demo  # + predicted acceptance

Generates on `prompt` with the configured pair and decoding (decoding.max_new_tokens caps the run)
and draws decode step `step` (1-based: 1 = the first draft tree, right after the prefill). Nodes show
their text, the draft probability q(token | parent) and, with a predictor, its predicted acceptance
a; pruned nodes (drafted, cut before verification) are grey and dashed; the accepted path is green
and the target's own next token (the bonus token) orange. The PNG goes to `output` (relative paths:
from the repo root), by default ${output_dir}/tree-step<step>.png. Drawing: training/experiments/tree_plot.py.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from models.paths import repo_path
from speculative_decoder import SpeculativeDecoder, SpeculativeDecodingConfig
from training.drafts.distill import ensure_config_drafts
from training.experiments.tree_plot import (
    StepNotReached,
    capture_step,
    draw_tree,
    step_view,
)


def run(cfg: DictConfig) -> Path:
    ensure_config_drafts(cfg)  # demo:draft-lm is made once by training, on first use
    config = SpeculativeDecodingConfig.from_hydra(cfg)
    if config.decoding.method == "target_only":
        raise SystemExit("decoding.method=target_only drafts no tree: use tree or chain")
    step = int(cfg.step)
    decoder = SpeculativeDecoder(config)
    try:
        record, drafted, stats, steps = capture_step(decoder, cfg.prompt, step)
    except StepNotReached as e:
        raise SystemExit(f"step={step}: {e}") from None
    view = step_view(record, drafted, decoder.tokenizer, step=step, steps=steps, stats=stats, prompt=cfg.prompt)
    out = repo_path(cfg.output) if cfg.get("output") else repo_path(cfg.output_dir) / f"tree-step{step}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    draw_tree(view).savefig(out, dpi=120)
    path = " ".join(view.labels[i] for i in view.accepted) + f" + {view.bonus}"
    print(f"step {step} of {steps}: {view.num_drafted} nodes drafted, {view.num_verified} verified, "
          f"{len(view.accepted) - 1} accepted ({path}); run tau {stats.mean_accepted_length:.2f}")
    for note in view.notes:
        print("note:", note)
    print(f"wrote {out}")
    return out


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
