"""Train a draft for the target by distillation from precomputed teacher data (resumable).

    python scripts/train_draft.py draft=eagle                         # the default EAGLE-style head
    python scripts/train_draft.py draft=eagle draft.epochs=1 draft.tag=eagle-short
    python scripts/train_draft.py draft=eagle logger=wandb             # follow it on wandb

Stops lose nothing: teacher shards and training checkpoints are reused on the next run. The draft is
written to $TREESPEC_CACHE/smollm2-135m-draft-<draft.tag>/ (or out_dir=...); pass that folder as
model.draft_model_name, or evaluate it with scripts/eval_draft.py.
"""

import json
import logging

import hydra
from omegaconf import DictConfig

from models.drafters import eagle, eagle3
from training.drafts.train import train_draft
from training.experiments.tracking import start_run


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    """Returns the held-out top-1 agreement of the first drafted token (a sweeper can optimise it)."""
    logging.getLogger("training").setLevel(logging.INFO)
    tracker = start_run(cfg, "train_draft")
    try:
        out = train_draft(cfg, tracker)
    finally:
        tracker.finish()
    meta = json.loads((out / (eagle3.META if eagle3.is_eagle3_draft(out) else eagle.META)).read_text())
    print(f"draft: {out}")
    for key in ("steps", "train_seconds", "train_answer_tokens", "vocab_size", "heldout_vocab_coverage", "heldout"):
        print(f"  {key}: {meta.get(key)}")
    heldout = meta.get("heldout")
    return float(heldout.get("top1", 0.0)) if isinstance(heldout, dict) else 0.0


if __name__ == "__main__":
    main()
