"""Loading models for decoding: local directories, the demo names, checkpoints; pair checks.

Kept apart from the decode loop (``speculative_decoder``), which imports these names. The demo
names resolve through ``models.io.demo_pair`` (which converts the demo target once; the small-LM
draft ``demo:draft-lm`` is made by training, ``python scripts/make_draft.py``, and only found here).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.config import default_config
from models.decoding.drafter import Drafter
from models.drafters.eagle import META, EagleDrafter, is_eagle_draft, load_eagle_draft
from models.drafters.eagle3 import is_eagle3_draft, load_eagle3_draft
from models.errors import ConfigError, ModelLoadError, VocabularyMismatchError
from models.io import demo_pair
from models.kernels.fast_linear import apply_cpu_linear
from models.kernels.invariant_attention import register as register_invariant_attention

__all__ = ["resolve_model_path", "resolve_checkpoint", "load_model", "load_draft", "load_tokenizer", "check_device", "module_device",
           "check_same_vocabulary", "context_length", "eos_token_ids"]

log = logging.getLogger(__name__)


def resolve_model_path(name: str, cache_dir: str | None = None) -> Path:
    """A local model directory for ``name``; the demo target is converted on first use.

    ``demo:draft``     the shipped default draft for the demo target: the EAGLE-style head in
                       models/checkpoints/smollm2-135m-eagle (made by scripts/train_draft.py draft=eagle)
    ``demo:draft-more`` the same head trained on wider teacher data (translation and summarization
                       prompts too): models/checkpoints/smollm2-135m-eagle-more (draft=eagle_more)
    ``demo:draft-eagle3`` an EAGLE-3 draft in the serving engines' layout (models/drafters/eagle3.py):
                       models/checkpoints/smollm2-135m-eagle3 (draft=eagle3)
    ``demo:draft-lm``  an independent small causal LM draft (the target's first layers, distilled;
                       configs/draft/quick.yaml, built once by scripts/make_draft.py); Hugging
                       Face assisted generation can use it, as it is a plain HF model
    """
    if name == demo_pair.DEMO_TARGET:
        return demo_pair.ensure_demo_target(cache_dir)
    if name in demo_pair.SHIPPED_DRAFTS:
        shipped, remake = demo_pair.SHIPPED_DRAFTS[name]
        if not (is_eagle_draft(shipped) or is_eagle3_draft(shipped)):
            raise ModelLoadError(f"the shipped demo draft {shipped} ({name}) is missing; remake it with "
                                 f"`{remake}` or use model.draft_model_name=demo:draft-lm")
        return shipped
    if name == demo_pair.DEMO_DRAFT_LM:
        return demo_pair.find_demo_draft_lm(cache_dir)
    path = Path(name).expanduser()
    if not path.exists():
        hint = (" It looks like a hub id; treespec loads models from local directories only (no hub downloads), so download the model elsewhere "
                "and pass its local directory." if "/" in name and not name.startswith((".", "/", "~")) else "")
        raise ModelLoadError(f"model path does not exist: {name!r}.{hint}")
    if not (path / "config.json").is_file() and not is_eagle_draft(path):
        raise ModelLoadError(f"{path} is neither a Hugging Face model directory (no config.json) nor an "
                             f"EAGLE draft (no {META})")
    return path


def resolve_checkpoint(name: str, kind: str, draft_name: str | None) -> Path:
    """``demo:alignment`` / ``demo:predictor`` -> the shipped checkpoint for the configured demo
    draft; anything else is a local checkpoint directory (checked when loaded)."""
    if name == f"demo:{kind}":
        return demo_pair.shipped_checkpoint(kind, draft_name)
    return Path(name).expanduser()


def load_model(path: str | Path, device: str | None = None, dtype: str | None = None,
               attn_implementation: str | None = None, cpu_linear: str | None = None):
    """An HF causal LM in eval mode on ``device``; arguments left None take the ``model`` group's
    defaults (configs/model/demo.yaml). ``cpu_linear`` routes its CPU linear layers to a kernel
    (``models.kernels.fast_linear``); ``attn_implementation`` is transformers' (``sdpa``, ``eager``, ...) or
    ``invariant``: treespec's batch-invariant attention (``models/kernels/invariant_attention.py``; an
    architecture that cannot take it is loaded with ``sdpa``, logged)."""
    d = default_config().model
    device = d.device if device is None else device
    dtype = d.dtype if dtype is None else dtype
    attn_implementation = d.attn_implementation if attn_implementation is None else attn_implementation
    cpu_linear = d.cpu_linear if cpu_linear is None else cpu_linear
    requested = attn_implementation
    if attn_implementation == "invariant":  # treespec's batch-invariant attention (models/kernels/invariant_attention.py)
        attn_implementation = register_invariant_attention()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype), local_files_only=True,
                                                     attn_implementation=attn_implementation)
    except (OSError, ValueError) as e:
        if requested == "invariant" and "attn" in str(e).lower():  # an architecture without the attention interface
            log.warning("%s cannot use the invariant attention (%s); loading it with sdpa", path, e)
            return load_model(path, device, dtype, "sdpa", cpu_linear)
        raise ModelLoadError(f"could not load a causal LM from {path}: {e}") from None
    return apply_cpu_linear(model.to(device).eval(), cpu_linear)


def load_draft(path: Path, target, m) -> "torch.nn.Module | Drafter":
    """An EAGLE-style head (a directory with eagle_head.json) or an EAGLE-3 draft in the engines' layout
    (config.json naming LlamaForCausalLMEagle3) as a Drafter, else an HF causal LM."""
    if is_eagle_draft(path):
        return EagleDrafter(apply_cpu_linear(load_eagle_draft(path, target), m.cpu_linear))
    if is_eagle3_draft(path):
        return EagleDrafter(apply_cpu_linear(load_eagle3_draft(path, target), m.cpu_linear))
    return load_model(path, m.device, m.dtype, m.attn_implementation, m.cpu_linear)


def load_tokenizer(path: str | Path):
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"could not load a tokenizer from {path}: {e}") from None


def check_same_vocabulary(target, draft) -> None:
    tv = target.get_output_embeddings().weight.shape[0]
    dv = draft.get_output_embeddings().weight.shape[0]
    if tv != dv:
        raise VocabularyMismatchError(
            f"draft vocabulary ({dv} tokens) differs from the target's ({tv}); speculative decoding needs a draft "
            "that shares the target's tokenizer")


def context_length(model) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(cfg, key, None)
        if value:
            return int(value)
    return 1 << 30


def eos_token_ids(model, tokenizer) -> set[int]:
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if ids is None and tokenizer is not None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return set()
    return set(ids) if isinstance(ids, (list, tuple)) else {int(ids)}


def check_device(device: str, dtype: str) -> torch.device:
    """``model.device`` / ``model.dtype`` as torch objects, refused with a ConfigError before any
    model is loaded when this machine cannot run them (no GPU, no bf16 on the GPU, ...)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"model.device={device!r} is not a device torch knows ({e}); e.g. cpu, cuda, cuda:1") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"model.device={device!r} but no CUDA GPU is visible to torch (torch.cuda.is_available() "
                              f"is False; torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                              "use model.device=cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"model.device={device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        if dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"model.dtype=bfloat16 is not supported on {torch.cuda.get_device_name(dev)}; "
                              "use model.dtype=float16 or float32")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ConfigError(f"model.device={device!r} but the MPS backend is not available on this machine")
    elif dev.type != "cpu":
        raise ConfigError(f"model.device={device!r}: treespec runs on cpu, cuda or mps")
    return dev


def module_device(model) -> torch.device | None:
    """Where a module's (or a Drafter's identity module's) first parameter lives; None if it has none."""
    module = model if isinstance(model, torch.nn.Module) else getattr(model, "identity_module", None)
    if module is None:
        return None
    try:
        return next(module.parameters()).device
    except StopIteration:
        return None
