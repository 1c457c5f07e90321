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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from models.eagle import META  # noqa: E402
from training.tracking import start_run  # noqa: E402
from training.train_draft import train_draft  # noqa: E402


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    logging.getLogger("training").setLevel(logging.INFO)
    tracker = start_run(cfg, "train_draft")
    try:
        out = train_draft(cfg, tracker)
    finally:
        tracker.finish()
    meta = json.loads((out / META).read_text())
    print(f"draft: {out}")
    for key in ("steps", "train_seconds", "train_answer_tokens", "vocab_size", "heldout_vocab_coverage", "heldout"):
        print(f"  {key}: {meta.get(key)}")


if __name__ == "__main__":
    main()
