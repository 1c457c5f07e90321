"""Train the alignment on a trace directory (scripts/collect_traces.py) and write a self-describing
checkpoint with metrics.json and plots next to it.

    python scripts/train_alignment.py train_alignment.traces=<trace dir> train_alignment.out_dir=<dir>
    python scripts/train_alignment.py ... train_alignment.fit=sgd          # mini-batch SGD instead of ridge
    python scripts/train_alignment.py ... logger=wandb

Prints R², cosine and the top-1 agreement of the target's head on the aligned state (held-out prompts).
"""

import logging

import hydra
from omegaconf import DictConfig

from training.experiments.tracking import start_run
from training.learned.core import run_train_alignment


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    logging.getLogger("training").setLevel(logging.INFO)
    with start_run(cfg, "train_alignment") as tracker:
        out, metrics = run_train_alignment(cfg, tracker)
    print(f"alignment: {out}")
    for key in ("r2", "cosine", "top1_agreement", "draft_top1_agreement", "identity_r2", "identity_cosine",
                "ridge_lambda", "n_train", "n_heldout"):
        if key in metrics:
            print(f"  {key}: {metrics[key]:.4f}" if isinstance(metrics[key], float) else f"  {key}: {metrics[key]}")
    return metrics["r2"]


if __name__ == "__main__":
    main()
