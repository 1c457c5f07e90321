"""Teacher data, computed once: the target's own greedy answers with its hidden states and top-k.

Every draft family in ``training/`` learns from the same precomputed teacher instead of running the
target inside the training loop (on 2 CPU cores the teacher forward was most of each step):

    <out>/shard-00000.safetensors ...     one per ``shard_prompts`` prompts, written atomically
        input_ids     int32 [T]           chat-formatted prompt + the target's greedy answer,
                                          sequences back to back (offsets below)
        hidden        fp16  [T, H]        the target's final hidden state (after its last norm: the
                                          input of its lm_head) at every position
        features      bf16  [T, k*H]      only with ``teacher.feature_layers`` (EAGLE-3 style drafts):
                                          the target's hidden states ``hidden_states[l]`` (Hugging
                                          Face numbering: the input of decoder layer l) for each of
                                          the k layers, concatenated
        topk_ids      int32 [T, k]        the target's top-k next tokens at every position ...
        topk_logprobs fp16  [T, k]        ... and their log-probs (full-vocabulary softmax)
        offsets       int64 [S+1]         sequence s is rows offsets[s]:offsets[s+1]
        prompt_lens   int64 [S]           the first answer token of sequence s is at prompt_lens[s]
      metadata: json with the prompt ids, the target's identity and the generation settings.

Answers are generated greedily (the style speculative decoding must match), batched with left
padding; the hidden states are captured by a hook on the target's final norm during generation, so
they cost nothing extra. On a CPU with bf16 support the teacher runs in bf16 (``teacher.dtype``):
2.4x the fp32 throughput on the 2-core machine, its greedy tokens agree with fp32 ~98% of the time,
and everything a draft is *scored* on (scripts/eval_draft.py) is the fp32 target's own greedy text. The job is resumable: finished shards are skipped,
and the prompt order is fixed by the seed, so a longer run extends a shorter one.
"""

from __future__ import annotations

import json
import logging
import random
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from models.decoding.prompts import prompt_ids
from models.errors import ConfigError, ModelLoadError
from training.jsonl import read_jsonl

log = logging.getLogger(__name__)

SHARD_GLOB = "shard-*.safetensors"


def shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"shard-{index:05d}.safetensors"


def read_prompts(data_dir: Path, files: list[str], seed: int, forbid: tuple[str, ...] = ()) -> list[dict]:
    """Rows (id, prompt) of ``files``, each shuffled by the seed, then interleaved one per file in
    turn so every file contributes evenly from the first shard on."""
    if not Path(data_dir).is_dir():
        raise ModelLoadError(f"prompt data folder {data_dir} does not exist. Fix: set the config key "
                             "`data_dir` (or $TREESPEC_DATA) to the folder holding the JSONL prompt sets.")
    per_file = []
    for name in files:
        if any(f in name for f in forbid):
            raise ConfigError(f"{name} is an evaluation set; the teacher data for training must come "
                              f"from train-only files")
        rows = read_jsonl(Path(data_dir) / name, ("id", "prompt"), hint=f"config key `data_dir` = {data_dir}")
        per_file.append([{"id": r["id"], "prompt": r["prompt"]} for r in rows])
    return interleave(per_file, seed)


def interleave(per_file: list[list], seed: int) -> list:
    """Shuffle each file's rows (seeded), then take one row from each file in turn: every file
    contributes evenly (GSM8K train alone would otherwise be half the text), order fixed by the seed."""
    rng = random.Random(seed)
    shuffled = [rng.sample(rows, len(rows)) for rows in per_file]
    out = []
    for i in range(max(map(len, shuffled), default=0)):
        out.extend(rows[i] for rows in shuffled if i < len(rows))
    return out


def chat_ids(tokenizer, prompt: str) -> list[int]:
    """The prompt as decoding feeds it (``models.decoding.prompts.prompt_ids``, chat template included)."""
    return prompt_ids(tokenizer, prompt)


class _NormCapture:
    """Forward hook on the target's final norm (or, ``pre=True``, pre-hook on a decoder layer: its
    input hidden states): collects the [B, t, H] tensors of every call."""
    def __init__(self, module: torch.nn.Module, pre: bool = False):
        self.chunks: list[torch.Tensor] = []
        self.handle = (module.register_forward_pre_hook(self._pre_hook, with_kwargs=True) if pre
                       else module.register_forward_hook(self._hook))

    def _hook(self, module, args, output):
        self.chunks.append(output.detach())

    def _pre_hook(self, module, args, kwargs):
        self.chunks.append((args[0] if args else kwargs["hidden_states"]).detach())

    def take(self) -> torch.Tensor:
        out, self.chunks = torch.cat(self.chunks, dim=1), []
        return out

    def close(self) -> None:
        self.handle.remove()


class _LayersCapture:
    """Pre-hooks on the decoder layers ``layers`` (Hugging Face ``hidden_states`` numbering: entry l is
    the input of decoder layer l): ``take()`` gives their states concatenated, [B, t, k*H]."""
    def __init__(self, model, layers: list[int]):
        blocks = decoder_layers(model)
        for l in layers:
            if not 1 <= l < len(blocks):
                raise ConfigError(f"teacher.feature_layers: {l} is not a layer input of this target; use "
                                  f"1 .. {len(blocks) - 1} (Hugging Face hidden_states numbering)")
        self.captures = [_NormCapture(blocks[l], pre=True) for l in layers]

    def take(self) -> torch.Tensor:
        return torch.cat([c.take() for c in self.captures], dim=-1)

    def close(self) -> None:
        for c in self.captures:
            c.close()


def _base_submodule(model, names: tuple[str, ...], kind: type, what: str, needed_by: str):
    """The first of ``names`` on the model's base (or its ``decoder``) that is a ``kind``."""
    base = model.base_model
    for name in names:
        found = getattr(base, name, None)
        if found is None and hasattr(base, "decoder"):
            found = getattr(base.decoder, name, None)
        if isinstance(found, kind):
            return found
    raise ConfigError(f"cannot find the {what} of {type(model).__name__}; {needed_by}")


def decoder_layers(model) -> torch.nn.ModuleList:
    """The target's stack of decoder layers (Llama/Qwen2 ``model.layers``, GPT-2 ``h``, ...)."""
    return _base_submodule(model, ("layers", "h", "blocks"), torch.nn.ModuleList, "decoder layers",
                           "teacher.feature_layers needs them")


def final_norm(model) -> torch.nn.Module:
    """The module whose output feeds the lm_head (Llama/Qwen2 ``model.norm``, GPT-2 ``ln_f``, ...)."""
    return _base_submodule(model, ("norm", "ln_f", "final_layer_norm", "final_layernorm"), torch.nn.Module,
                           "final norm", "teacher hidden states need it")


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, pad_id: int, eos_ids: set[int],
                   top_k: int, capture: _NormCapture, layers: _LayersCapture | None = None) -> list[dict]:
    """Greedy answers for a batch of prompts (left padded) with hidden states and top-k per position
    (and, with ``layers``, the states of those layers)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=pad_id, eos_token_id=sorted(eos_ids))
    hidden = capture.take()  # [B, width + steps, H]: the last generated token was never fed
    multi = layers.take() if layers is not None else None  # [B, width + steps, k*H]
    lm_head = model.get_output_embeddings()
    rows = []
    for row, p in enumerate(prompts):
        answer = out[row, width:].tolist()
        end = next((i + 1 for i, t in enumerate(answer) if t in eos_ids), len(answer))
        answer = answer[:end]
        seq = p + answer
        h = hidden[row, width - len(p):width + len(answer) - 1]  # positions 0 .. len(seq)-2
        h = torch.cat([h, h.new_zeros(1, h.shape[1])])  # the last token's state is never needed
        logits = h[len(p) - 1:-1].float() @ lm_head.weight.float().t()  # fp32 scores of the stored states
        top = torch.topk(torch.log_softmax(logits, dim=-1), top_k, dim=-1)
        # Sanity against misaligned capture (which would disagree almost everywhere); a few near-ties
        # may flip between the batched low-precision matmul of generation and this one.
        mismatch = int((top.indices[:, 0] != torch.tensor(answer)).sum())
        if mismatch > max(3, len(answer) // 4):
            raise RuntimeError(f"captured hidden states disagree with generation on {mismatch}/{len(answer)} tokens")
        topk_ids = torch.zeros(len(seq), top_k, dtype=torch.int32)
        topk_lp = torch.zeros(len(seq), top_k, dtype=torch.float16)
        topk_ids[len(p) - 1:-1] = top.indices.int()
        topk_lp[len(p) - 1:-1] = top.values.half()
        row_out = {"ids": seq, "prompt_len": len(p), "hidden": h.half(), "topk_ids": topk_ids,
                   "topk_logprobs": topk_lp}
        if multi is not None:
            f = multi[row, width - len(p):width + len(answer) - 1]
            row_out["features"] = torch.cat([f, f.new_zeros(1, f.shape[1])]).to(torch.bfloat16)
        rows.append(row_out)
    return rows


def build_shards(model, tokenizer, prompts: list[dict], out_dir: Path, cfg, meta: dict,
                 progress: bool = True) -> list[Path]:
    """Generate the teacher shards for ``prompts`` (resumable). Returns every shard path."""

    out_dir.mkdir(parents=True, exist_ok=True)
    eos_ids = {int(t) for t in ([model.generation_config.eos_token_id] if isinstance(
        model.generation_config.eos_token_id, int) else model.generation_config.eos_token_id or [])}
    if tokenizer.eos_token_id is not None:
        eos_ids.add(int(tokenizer.eos_token_id))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids)
    n_shards = (len(prompts) + cfg.shard_prompts - 1) // cfg.shard_prompts
    paths = [shard_path(out_dir, i) for i in range(n_shards)]
    todo = [i for i in range(n_shards) if not paths[i].is_file()]
    capture = _NormCapture(final_norm(model))
    layer_ids = getattr(cfg, "feature_layers", None)
    layers = _LayersCapture(model, list(layer_ids)) if layer_ids else None
    bar = tqdm(total=len(todo) * cfg.shard_prompts, desc="teacher answers", unit="prompt", disable=not progress)
    try:
        for i in todo:
            chunk = prompts[i * cfg.shard_prompts:(i + 1) * cfg.shard_prompts]
            encoded = [(r, chat_ids(tokenizer, r["prompt"])) for r in chunk]
            encoded = [(r, e) for r, e in encoded if len(e) <= cfg.max_prompt_tokens]
            encoded.sort(key=lambda x: len(x[1]))  # little padding inside a batch
            t0, rows = time.time(), []
            for b in range(0, len(encoded), cfg.batch_size):
                batch = encoded[b:b + cfg.batch_size]
                rows += generate_batch(model, [e for _, e in batch], cfg.max_new_tokens, pad_id, eos_ids,
                                       cfg.top_k, capture, layers)
                bar.update(len(batch))
            _save_shard(paths[i], rows, [r["id"] for r, _ in encoded], meta, time.time() - t0)
            bar.update(len(chunk) - len(encoded))
    finally:
        capture.close()
        if layers is not None:
            layers.close()
        bar.close()
    return paths


def _save_shard(path: Path, rows: list[dict], ids: list[str], meta: dict, seconds: float) -> None:
    lens = [len(r["ids"]) for r in rows]
    offsets = torch.tensor([0] + lens).cumsum(0)
    hidden = torch.cat([r["hidden"] for r in rows])
    if not torch.isfinite(hidden).all():
        raise RuntimeError("teacher hidden states overflow fp16; store them in a wider type")
    tensors = {
        "input_ids": torch.tensor([t for r in rows for t in r["ids"]], dtype=torch.int32),
        "hidden": hidden.contiguous(),
        "topk_ids": torch.cat([r["topk_ids"] for r in rows]).contiguous(),
        "topk_logprobs": torch.cat([r["topk_logprobs"] for r in rows]).contiguous(),
        "offsets": offsets,
        "prompt_lens": torch.tensor([r["prompt_len"] for r in rows], dtype=torch.int64),
    }
    if rows and "features" in rows[0]:
        tensors["features"] = torch.cat([r["features"] for r in rows]).contiguous()
        if not torch.isfinite(tensors["features"]).all():
            raise RuntimeError("teacher layer features are not finite")
    answer_tokens = int(sum(len(r["ids"]) - r["prompt_len"] for r in rows))
    info = dict(meta, prompt_ids=ids, answer_tokens=answer_tokens, seconds=round(seconds, 1))
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"treespec": json.dumps(info)})
    tmp.replace(path)
    log.info("%s: %d sequences, %d answer tokens, %.0f s (%.0f tok/s)", path.name, len(rows), answer_tokens,
             seconds, answer_tokens / max(seconds, 1e-9))


def load_shards(paths: list[Path]) -> dict[str, torch.Tensor | list]:
    """Concatenate shards into one dict (offsets rebased); metadata per shard under ``meta``."""
    parts, metas = [], []
    for p in paths:
        try:
            with safe_open(str(p), framework="pt") as fh:
                parts.append({k: fh.get_tensor(k) for k in fh.keys()})
                metas.append(json.loads(fh.metadata()["treespec"]))
        except Exception as exc:  # corrupt / truncated file: say which and how to fix
            raise ModelLoadError(f"teacher shard {p} is unreadable ({exc}); delete it and rerun to remake it") from exc
    if not parts:
        raise ModelLoadError("no teacher shards to load")
    keys = ["input_ids", "hidden", "topk_ids", "topk_logprobs"]
    with_features = ["features" in part for part in parts]
    if any(with_features):
        if not all(with_features):
            raise ModelLoadError("teacher shards mix files with and without layer features; they come from "
                                 "different recipes (teacher.feature_layers)")
        keys.append("features")
    out = {k: torch.cat([part[k] for part in parts]) for k in keys}
    offsets, prompt_lens, base = [torch.zeros(1, dtype=torch.int64)], [], 0
    for part in parts:
        offsets.append(part["offsets"][1:] + base)
        prompt_lens.append(part["prompt_lens"])
        base += int(part["offsets"][-1])
    out["offsets"] = torch.cat(offsets)
    out["prompt_lens"] = torch.cat(prompt_lens)
    out["meta"] = metas
    return out
