"""Make (or find) the small-LM demo draft (demo:draft-lm): the target's first layers distilled to it.

    python scripts/make_draft.py                    # reuse the cached draft when it is complete
    python scripts/make_draft.py force=true         # rebuild it
    python scripts/make_draft.py draft.steps=200 draft.tag=longer   # another recipe, another dir

The recipe lives in configs/draft/quick.yaml; the draft goes to
$TREESPEC_CACHE (default ~/.cache/treespec)/smollm2-135m-draft-<draft.tag>.
"""

import json
import logging

import hydra
from omegaconf import DictConfig

from models.io.demo_pair import MARKER
from training.drafts.distill import ensure_demo_draft


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> None:
    logging.getLogger("training").setLevel(logging.INFO)
    out = ensure_demo_draft(cfg.model.cache_dir, cfg.draft, cfg.data_dir,
                            force=bool(cfg.get("force", False)))
    meta = json.loads((out / MARKER).read_text())
    print(f"draft: {out}")
    for key in ("agreement_before", "agreement_after", "seconds", "train_seconds", "train_tokens",
                "kl_first", "kl_last"):
        print(f"  {key}: {meta.get(key)}")


if __name__ == "__main__":
    main()
