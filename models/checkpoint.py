"""Self-describing checkpoints for the learned parts (alignment, acceptance predictor). No pickle.

A checkpoint is a directory with ``<kind>.safetensors`` (tensors) and ``<kind>.json`` (metadata:
the pair it was made for, feature-spec version, training config, metrics). ``load_checkpoint``
refuses with a ``ModelLoadError`` naming the problem: a missing or corrupt/truncated file, a
checkpoint of another kind, an unknown feature-spec version, a checkpoint made for another pair.

Model identity (``fingerprint``) is a config digest plus a *weight signature*: 64 parameter values
at fixed positions. Signatures are compared with a tolerance, so one checkpoint serves a target
loaded in fp32, bf16 or fp16, while another model of the same architecture (other weights) is told
apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from models.errors import ModelLoadError

FORMAT_VERSION = 1
SIGNATURE_SIZE = 64
_CONFIG_KEYS = ("model_type", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "vocab_size",
                "num_attention_heads", "intermediate_size")


def fingerprint(module: torch.nn.Module) -> dict:
    """Identity of a model or draft head: class, config digest, parameter count, weight signature."""
    cfg = getattr(module, "config", None) or getattr(module, "cfg", None)
    if cfg is not None and not isinstance(cfg, dict):
        cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(vars(cfg))
    config = {k: cfg[k] for k in _CONFIG_KEYS if cfg and cfg.get(k) is not None}
    params = [p for _, p in sorted(module.named_parameters(), key=lambda kv: kv[0])]
    n = sum(p.numel() for p in params)
    sig = []
    with torch.no_grad():
        for p in params[: SIGNATURE_SIZE // 8] + params[-(SIGNATURE_SIZE // 8):]:
            flat = p.detach().reshape(-1)
            idx = (torch.arange(4, device=flat.device) * (flat.numel() - 1)) // 3  # exact integers
            sig += flat[idx].float().cpu().tolist()
    digest = hashlib.sha256(json.dumps([type(module).__name__, config, n], sort_keys=True).encode()).hexdigest()[:16]
    return {"class": type(module).__name__, "config": config, "num_parameters": n,
            "config_hash": digest, "signature": [round(v, 6) for v in sig]}


def identity_mismatch(expected: dict, found: dict) -> str | None:
    """Why ``found`` (a live model's fingerprint) is not the model ``expected`` describes, or None."""
    for key in ("class", "config", "num_parameters"):
        if expected.get(key) != found.get(key):
            return f"{key} {expected.get(key)!r} != {found.get(key)!r}"
    a = torch.tensor(expected.get("signature", []))
    b = torch.tensor(found.get("signature", []))
    if a.shape != b.shape or not torch.allclose(a, b, rtol=2e-2, atol=2e-3):
        return "same architecture but different weights (weight signature differs)"
    return None


def save_checkpoint(out_dir: str | Path, kind: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write ``<kind>.safetensors`` + ``<kind>.json`` atomically (a crash never leaves a half file)."""

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    info = {"kind": kind, "format_version": FORMAT_VERSION, **meta}
    _atomic(out / f"{kind}.safetensors", lambda p: save_file(tensors, str(p)))
    _atomic(out / f"{kind}.json", lambda p: Path(p).write_text(json.dumps(info, indent=1) + "\n"))
    return out


def load_checkpoint(path: str | Path, kind: str, spec_versions: tuple[int, ...] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, meta) of the ``kind`` checkpoint in ``path`` (a directory or its json/safetensors)."""

    path = Path(path).expanduser()
    if path.is_file():
        path = path.parent
    meta_file, weights = path / f"{kind}.json", path / f"{kind}.safetensors"
    if not path.is_dir():
        raise ModelLoadError(f"{kind} checkpoint not found: {path} does not exist")
    if not meta_file.is_file() or not weights.is_file():
        raise ModelLoadError(f"{path} is not a {kind} checkpoint: it needs {meta_file.name} and {weights.name}")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{kind} checkpoint metadata {meta_file} is corrupt or truncated: {e}") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        raise ModelLoadError(f"{meta_file} describes a {meta.get('kind') if isinstance(meta, dict) else '?'!r} "
                             f"checkpoint, not a {kind!r} one")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ModelLoadError(f"{kind} checkpoint {path} has format version {meta.get('format_version')!r}; "
                             f"this treespec reads version {FORMAT_VERSION}")
    if spec_versions is not None and meta.get("feature_spec_version") not in spec_versions:
        raise ModelLoadError(f"{kind} checkpoint {path} uses feature-spec version {meta.get('feature_spec_version')!r}; "
                             f"this treespec knows {list(spec_versions)}: retrain it with this version")
    try:
        tensors = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise ModelLoadError(f"{kind} weights {weights} are corrupt or truncated: {e}") from None
    return tensors, meta


def check_pair(meta: dict, path: str | Path, kind: str, target: torch.nn.Module | None,
               draft: torch.nn.Module | None) -> None:
    """Refuse a checkpoint whose recorded target/draft identity differs from the models in use."""
    for side, module in (("target", target), ("draft", draft)):
        expected = meta.get(f"{side}_identity")
        if module is None or expected is None:
            continue
        why = identity_mismatch(expected, fingerprint(module))
        if why:
            raise ModelLoadError(f"{kind} checkpoint {path} was made for another {side} model ({why}); "
                                 f"retrain it for this pair (scripts/collect_traces.py, then scripts/train_{kind}.py)")


def tensor_or_error(tensors: dict, name: str, path, kind: str, shape: tuple | None = None) -> torch.Tensor:
    if name not in tensors:
        raise ModelLoadError(f"{kind} checkpoint {path} lacks the tensor {name!r}")
    t = tensors[name]
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ModelLoadError(f"{kind} checkpoint {path}: tensor {name!r} has shape {tuple(t.shape)}, "
                             f"its metadata says {tuple(shape)}")
    if not torch.isfinite(t.float()).all():
        raise ModelLoadError(f"{kind} checkpoint {path}: tensor {name!r} holds NaN or inf")
    return t


@contextmanager
def atomic_dir(dest: str | Path):
    """``with atomic_dir(dest) as tmp:`` fill ``tmp``, a fresh folder beside ``dest``; when the block
    ends without error it replaces ``dest``, otherwise it is removed. An interrupted write never
    leaves a folder that looks finished (model directories, drafts, the converted demo target)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".tmp-{dest.name}-"))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _atomic(dest: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; checkpoints are shared artefacts
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
