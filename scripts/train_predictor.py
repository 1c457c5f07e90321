"""Train the predictor on a trace directory (scripts/collect_traces.py) and write a self-describing
checkpoint with metrics.json and plots next to it.

    python scripts/train_predictor.py train_predictor.traces=<trace dir> train_predictor.out_dir=<dir> \
        train_predictor.alignment=<alignment dir>          # aligned features (optional)
    python scripts/train_predictor.py ... train_predictor.shift_traces=<Spec-Bench trace dir>
    python scripts/train_predictor.py ... logger=wandb

Prints AUROC, Brier and ECE (15 equal-width bins) before/after temperature scaling, next to the
draft-probability and C2T baselines, on held-out prompts (and on the shift traces when given).
"""

import logging

import hydra
from omegaconf import DictConfig

from training.experiments.tracking import start_run
from training.learned.core import run_train_predictor

KEYS = ("auroc", "brier", "ece_uncalibrated", "ece_calibrated", "temperature", "baseline_auroc", "baseline_ece",
        "c2t_auroc", "c2t_ece", "n_train", "n_heldout")


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    logging.getLogger("training").setLevel(logging.INFO)
    with start_run(cfg, "train_predictor") as tracker:
        out, report = run_train_predictor(cfg, tracker)
    print(f"predictor: {out}")
    for name, rep in (("held-out", report), ("shift", report.get("shift"))):
        if rep:
            print(f"  {name}: " + ", ".join(f"{k}={rep[k]:.4f}" if isinstance(rep[k], float) else f"{k}={rep[k]}"
                                            for k in KEYS if k in rep))
    return report["auroc"]


if __name__ == "__main__":
    main()
