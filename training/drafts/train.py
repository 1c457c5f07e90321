"""The draft-training pipeline behind scripts/train_draft.py: teacher shards -> trained draft.

    teacher   the target's greedy answers + hidden states + top-k, once per teacher recipe, cached in
              $TREESPEC_CACHE/teacher-<hash of the teacher settings>/ (resumable shards)
    train     the draft family's trainer, resumable from $TREESPEC_CACHE/runs/<tag>/last.pt
    output    $TREESPEC_CACHE/smollm2-135m-draft-<tag>/ (or ``out_dir``), usable as model.draft_model_name

Families: ``eagle`` (training/drafts/eagle.py: a feature-conditioned head on the target's hidden
states). The independent small causal LM family is ``configs/draft/quick.yaml`` (training/drafts/distill.py,
scripts/make_draft.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from omegaconf import OmegaConf

from models.config import default_config
from models.errors import ConfigError
from models.paths import cache_root, repo_path
from speculative_decoder import load_model, load_tokenizer, resolve_model_path
from training.drafts import teacher_data
from training.drafts.distill import EVAL_SETS
from training.drafts.eagle import train_eagle
from training.drafts.precision import resolve_dtype
from training.provenance import provenance

log = logging.getLogger(__name__)


def teacher_dir(root: Path, target_name: str, tcfg, prefix: str = "teacher") -> Path:
    """Cache folder of a teacher recipe; ``num_prompts`` is not part of the key (more prompts extend it),
    nor an unset ``feature_layers`` (recipes from before that key keep their folder)."""
    key = {k: v for k, v in OmegaConf.to_container(tcfg, resolve=True).items()
           if k != "num_prompts" and not (k == "feature_layers" and not v)}
    digest = hashlib.sha256(json.dumps([target_name, key], sort_keys=True).encode()).hexdigest()[:10]
    return root / f"{prefix}-{digest}"


def ensure_teacher(target_dir: Path, target_name: str, tcfg, data_dir: Path, cache: Path, device: str,
                   prefix: str = "teacher", forbid=EVAL_SETS, progress: bool = True,
                   cpu_linear: str | None = None) -> list[Path]:
    """All teacher shards of ``tcfg`` (made where missing). ``cpu_linear``: the target's CPU linear
    kernel while it answers (``model.cpu_linear``; only float rounding differs between kernels,
    so it is not part of the folder's key; None: the model group's default)."""
    cpu_linear = default_config().model.cpu_linear if cpu_linear is None else cpu_linear
    # auto -> the dtype it means here, before it keys the folder (bf16 and fp32 teachers differ slightly)
    tcfg = OmegaConf.merge(tcfg, {"dtype": resolve_dtype(tcfg.dtype, device, "draft.teacher.dtype")})
    out = teacher_dir(cache, target_name, tcfg, prefix)
    prompts = teacher_data.read_prompts(data_dir, list(tcfg.files), tcfg.seed, forbid=forbid)
    prompts = prompts[:tcfg.num_prompts]
    n = (len(prompts) + tcfg.shard_prompts - 1) // tcfg.shard_prompts
    paths = [teacher_data.shard_path(out, i) for i in range(n)]
    if all(p.is_file() for p in paths):
        return paths

    model, tok = load_model(target_dir, device, tcfg.dtype, "sdpa", cpu_linear), load_tokenizer(target_dir)
    log.info("teacher data -> %s (%d prompts, %d shards)", out, len(prompts), n)
    return teacher_data.build_shards(model, tok, prompts, out, tcfg,
                                     {"target": target_name, "dtype": tcfg.dtype}, progress=progress)


def train_draft(cfg, tracker=None) -> Path:
    """Run the whole pipeline for ``cfg.draft``; returns the draft directory."""
    dcfg = cfg.draft
    if dcfg.get("family") not in ("eagle", "eagle3"):
        raise ConfigError(f"scripts/train_draft.py trains draft.family=eagle or eagle3 (got {dcfg.get('family')!r}); "
                          "the small-LM family is made by scripts/make_draft.py draft=quick")
    cache = cache_root(cfg.model.cache_dir)
    target_dir = resolve_model_path(cfg.model.target_model_name, cfg.model.cache_dir)
    t0 = time.time()
    shards = ensure_teacher(target_dir, cfg.model.target_model_name, dcfg.teacher, repo_path(cfg.data_dir), cache,
                            cfg.model.device, cpu_linear=cfg.model.cpu_linear)
    teacher_s = time.time() - t0
    data = teacher_data.load_shards(shards)

    target = load_model(target_dir, cfg.model.device, "float32", "sdpa", "mkl")  # frozen teacher for the head
    out = repo_path(cfg.out_dir) if cfg.get("out_dir") else cache / f"smollm2-135m-draft-{dcfg.tag}"
    teacher = dict(teacher_shards=len(shards), teacher_dir=str(shards[0].parent.name),
                   teacher_answer_tokens=sum(m["answer_tokens"] for m in data["meta"]),
                   teacher_seconds_this_run=round(teacher_s, 1), target=cfg.model.target_model_name,
                   provenance=provenance(cfg, device=cfg.model.device))
    train_eagle(target, data, dcfg, cache / "runs" / dcfg.tag, out, tracker, meta=teacher)
    return out
