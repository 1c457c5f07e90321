"""The quick draft: the target's first k layers, distilled to the target on train-only text.

Why this recipe (measured on 2 CPU cores, see docs/design.md section 8 and docs/drafts.md):
- A truncated target shares the tokenizer, embeddings, final norm and lm_head with the target, so
  it starts as a (poor) draft at no cost and only its k decoder layers need training.
- Distillation (KL from the target's full next-token distribution) gives a dense signal per
  position, far more than next-token cross-entropy on text the target did not write.
- The cost is one teacher forward plus one student forward/backward per token. On a CPU with
  bf16 support the teacher in bf16 is ~2.5x faster than fp32 and its soft labels barely change;
  the agreement we report is always against the fp32 target's argmax.
Everything is deterministic for a given config: seeded init, seeded data order, no dropout.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import random
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from filelock import FileLock
from omegaconf import OmegaConf
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from models.checkpoint import atomic_dir
from models.decoding.prompts import exchange_ids
from models.errors import ConfigError, ModelLoadError
from models.io.demo_pair import (
    DEMO_DRAFT_LM,
    demo_draft_dir,
    draft_is_current,
    ensure_demo_target,
    is_complete,
    recipe_dict,
    write_marker,
)
from models.paths import CONFIG_DIR, repo_path
from training.drafts.precision import resolve_bf16, resolve_dtype
from training.drafts.teacher_data import interleave
from training.jsonl import read_jsonl

log = logging.getLogger(__name__)

# Evaluation prompt sets in the shared data folder: training on them would inflate every reported
# speedup, so a recipe naming one is refused outright.
EVAL_SETS = ("spec_bench", "mt_bench", "humaneval", "gsm8k_test")
# t0 completions carry the source model's end-of-text marker; it is not part of the answer.
STRIP_SUFFIXES = ("<|endoftext|>",)


def make_truncated_draft(target, num_layers: int):
    """A fresh model of the target's architecture keeping only its first ``num_layers`` layers.

    Parameter names of the kept modules are the same in both models (layers are indexed from 0),
    so copying by name works for any HF causal LM (Llama, Qwen2, GPT-2, GPT-NeoX, OPT, ...).
    """

    total = target.config.num_hidden_layers
    if not 1 <= num_layers <= total:
        raise ConfigError(f"draft num_layers={num_layers} must be in [1, {total}] (target layers)")
    config = copy.deepcopy(target.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):  # per-layer attention kinds (Qwen2, Gemma, ...)
        config.layer_types = list(config.layer_types)[:num_layers]
    draft = AutoModelForCausalLM.from_config(config, dtype=target.dtype)
    source = target.state_dict()
    draft.load_state_dict({name: source[name] for name in draft.state_dict()}, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        draft.tie_weights()  # load_state_dict copies values; make sure the tie survives it
    draft.generation_config = copy.deepcopy(target.generation_config)
    return draft


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def _read_rows(data_dir: Path, train_files: Mapping[str, str]) -> list[list[tuple[str, str]]]:
    """(prompt, answer) pairs per train file, in file order."""
    if not data_dir.is_dir():
        raise ModelLoadError(
            f"prompt data folder {data_dir} does not exist. Fix: set the config key `data_dir` "
            "(or $TREESPEC_DATA) to the folder holding alpaca_train_2k.jsonl and friends.")
    per_file = []
    for name, field in train_files.items():
        if any(e in name for e in EVAL_SETS):
            raise ConfigError(f"draft.train_files names {name}, an evaluation set; train on "
                              "train-only files (alpaca_train_2k, gsm8k_train, t0_train_sample)")
        rows = []
        for row in read_jsonl(data_dir / name, ("prompt", field), hint=f"config key `data_dir` = {data_dir}, draft.train_files"):
            answer = str(row[field])
            for suffix in STRIP_SUFFIXES:
                answer = answer.removesuffix(suffix)
            rows.append((row["prompt"], answer.strip()))
        per_file.append(rows)
    return per_file


def _encode(tokenizer, prompt: str, answer: str, max_len: int) -> tuple[list[int], int] | None:
    """Token ids of the chat-formatted exchange and the index of its first answer token.

    The prompt and answer are tokenized apart so the boundary is exact; the draft sees exactly
    the format it drafts in at inference (chat template with the generation prompt)."""
    full, start = exchange_ids(tokenizer, prompt, answer)
    ids = full[:max_len]
    # A prompt that fills the window leaves no answer position to learn from or score: skip it.
    return (ids, start) if len(ids) - start >= 2 else None


def _batches(seqs: list[tuple[list[int], int]], batch_size: int, pad_id: int, seed: int,
             with_index: bool = False):
    """Right-padded batches, grouped by length to waste little compute on padding.

    Right padding needs no attention mask under causal attention (real tokens never see the
    pads after them), so the fast is_causal attention path is kept. ``sel`` marks the positions
    whose next token is an answer token: the only ones a draft is ever asked about. With
    ``with_index`` each batch is ``(ids, sel, rows)``, ``rows`` the index in ``seqs`` of each row
    (so per-position data stored beside the sequences, e.g. teacher states, can follow ``sel``)."""
    group = 16 * batch_size  # sort within windows of the fixed order, then shuffle the batches
    chunks = []
    for g in range(0, len(seqs), group):
        window = sorted(range(g, min(g + group, len(seqs))), key=lambda i: len(seqs[i][0]))
        chunks += [window[i:i + batch_size] for i in range(0, len(window), batch_size)]
    random.Random(seed + 1).shuffle(chunks)
    out = []
    for chunk in chunks:
        width = max(len(seqs[i][0]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        sel = torch.zeros((len(chunk), width), dtype=torch.bool)
        for row, i in enumerate(chunk):
            seq, start = seqs[i]
            ids[row, :len(seq)] = torch.tensor(seq)
            sel[row, start - 1:len(seq) - 1] = True
        out.append((ids, sel, chunk) if with_index else (ids, sel))
    return out


def prepare_data(tokenizer, cfg, data_dir: Path):
    """(train batches, eval batches): eval is a held-out slice of the same train-only text."""
    pool = interleave(_read_rows(Path(data_dir), cfg.train_files), cfg.seed)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded: Iterator = (e for e in (_encode(tokenizer, p, a, cfg.max_seq_len) for p, a in pool)
                         if e is not None)
    eval_seqs, n = [], 0
    while n < cfg.eval_tokens:  # held out first, so the training slice can grow independently
        seq = next(encoded, None)
        if seq is None:
            raise ConfigError(f"draft.eval_tokens={cfg.eval_tokens} exceeds the training text")
        eval_seqs.append(seq)
        n += len(seq[0]) - seq[1]
    train_seqs = [seq for seq, _ in zip(encoded, range(cfg.steps * cfg.batch_size))]
    if len(train_seqs) < cfg.steps * cfg.batch_size:
        log.warning("only %d training sequences for %d steps x %d: fewer steps will run",
                    len(train_seqs), cfg.steps, cfg.batch_size)
    return (_batches(train_seqs, cfg.batch_size, pad_id, cfg.seed),
            _batches(eval_seqs, cfg.batch_size, pad_id, cfg.seed))


# ---------------------------------------------------------------------------------------------
# Distillation and evaluation
# ---------------------------------------------------------------------------------------------

def _logits_at(model, ids: torch.Tensor, sel: torch.Tensor) -> torch.Tensor:
    """Logits only at the selected positions: the lm_head (49152 x 576 for the demo) is the
    largest matmul of a shallow draft, so skipping prompt and padding positions saves most of it."""
    hidden = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    return model.get_output_embeddings()(hidden[sel])


class _KLFromLogProbs(torch.autograd.Function):
    """KL(p || softmax(s)) averaged over rows, with a hand-written backward (softmax(s) - p).

    Autograd's kl_div + log_softmax keep several vocabulary-sized temporaries per position
    (49152 floats each); this keeps one and updates it in place. It cut the loss's share of a
    distillation step by about a third on the 2-core machine."""
    @staticmethod
    def forward(ctx, student_logits, teacher_logp):
        logq = F.log_softmax(student_logits.float(), dim=-1)
        p = teacher_logp.exp()
        loss = torch.linalg.vecdot(p, teacher_logp - logq).mean()
        ctx.save_for_backward(logq, p)
        ctx.dtype = student_logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        logq, p = ctx.saved_tensors
        return logq.exp_().sub_(p).mul_(grad / p.shape[0]).to(ctx.dtype), None


def kl_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) over the full vocabulary, in fp32."""
    with torch.no_grad():
        teacher_logp = F.log_softmax(teacher_logits.float(), dim=-1)
    return _KLFromLogProbs.apply(student_logits, teacher_logp)


def distill(student, teacher, batches, cfg, progress: bool = True, state_path: Path | None = None,
            save_every: int = 0) -> list[float]:
    """Train the student's decoder layers (and final norm) to match the teacher; returns losses.

    ``teacher`` is a model (its logits at each batch's selected positions are the targets) or a
    function ``teacher(*batch) -> logits`` at those positions (e.g. from stored teacher states).
    Embeddings and lm_head stay frozen (tied in the demo): they already are the target's, and
    freezing skips the 49152 x 576 weight-gradient matmul, the largest one of each step.
    ``state_path``: resumable; the student, optimizer and losses are saved there every
    ``save_every`` steps (atomically) and a rerun continues from the last save. The batch order is
    fixed, so a resumed run takes the same steps as an uninterrupted one."""

    teacher_logits = (lambda ids, sel, *_: _logits_at(teacher, ids, sel)) if isinstance(teacher, torch.nn.Module) \
        else teacher
    student.get_input_embeddings().weight.requires_grad_(False)
    student.get_output_embeddings().weight.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps = len(batches)
    warmup = min(cfg.warmup_steps, steps)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%: short runs need both
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    losses: list[float] = []
    if state_path is not None and Path(state_path).is_file():
        try:
            state = torch.load(state_path, map_location="cpu", weights_only=True)
            student.load_state_dict(state["student"])
            opt.load_state_dict(state["opt"])
            sched.load_state_dict(state["sched"])
            losses = list(state["losses"])
        except Exception as exc:
            raise ModelLoadError(f"training state {state_path} is unreadable or belongs to another model ({exc}); "
                                 "delete it to start this training over") from exc
        log.info("resuming %s at step %d of %d", state_path, len(losses), steps)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16,
                              enabled=resolve_bf16(cfg.student_bf16, "cpu", "draft.student_bf16"))
    student.train()
    bar = tqdm(batches, desc="distilling draft", disable=not progress, dynamic_ncols=True, initial=len(losses))
    for step, batch in enumerate(batches):
        if step < len(losses):
            continue
        ids, sel = batch[0], batch[1]
        with torch.no_grad():
            t_logits = teacher_logits(*batch)
        with autocast:
            s_logits = _logits_at(student, ids, sel)
        loss = kl_loss(t_logits, s_logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(kl=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if state_path is not None and save_every and (step + 1) % save_every == 0 and step + 1 < steps:
            tmp = Path(state_path).with_suffix(".tmp")
            torch.save({"student": student.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                        "losses": losses}, tmp)
            tmp.replace(state_path)
    bar.close()
    student.eval()
    return losses


@torch.no_grad()
def target_argmax(target, batches) -> list[torch.Tensor]:
    return [_logits_at(target, ids, sel).argmax(-1) for ids, sel in batches]


@torch.no_grad()
def agreement(draft, batches, reference: list[torch.Tensor], k: int = 4) -> dict[str, float]:
    """How often the target's greedy token is the draft's top-1 / within its top-k."""
    hit1 = hitk = n = 0
    for (ids, sel), ref in zip(batches, reference):
        top = _logits_at(draft, ids, sel).topk(k, dim=-1).indices
        hit1 += (top[:, 0] == ref).sum().item()
        hitk += (top == ref[:, None]).any(-1).sum().item()
        n += ref.numel()
    return {"top1": round(hit1 / n, 4), f"top{k}": round(hitk / n, 4), "positions": n}


def build_quick_draft(target_dir, out_dir, cfg, data_dir, progress: bool = True) -> Path:
    """Make, train, evaluate and save the draft; ``out_dir`` appears only once it is complete."""

    t0 = time.perf_counter()
    target_dir, out_dir = Path(target_dir), Path(out_dir)
    recipe = recipe_dict(cfg)
    cfg = SimpleNamespace(**recipe)  # attribute access for a DictConfig and a plain dict alike
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(target_dir)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    train_batches, eval_batches = prepare_data(tokenizer, cfg, Path(data_dir))
    draft = make_truncated_draft(target, cfg.num_layers)

    reference = target_argmax(target, eval_batches)  # the fp32 target: what decoding will use
    before = agreement(draft, eval_batches, reference)
    log.info("agreement before training: %s", before)
    # The teacher may run in bf16 for speed; a copy keeps the fp32 target intact for evaluation.
    teacher_dtype = resolve_dtype(cfg.teacher_dtype, "cpu", "draft.teacher_dtype")
    teacher = target if teacher_dtype == "float32" else copy.deepcopy(target).to(getattr(torch, teacher_dtype))
    teacher.requires_grad_(False)
    t_train = time.perf_counter()
    losses = distill(draft, teacher, train_batches, cfg, progress=progress)
    train_s = time.perf_counter() - t_train
    after = agreement(draft, eval_batches, reference)
    log.info("agreement after training: %s", after)

    with atomic_dir(out_dir) as tmp:  # an interrupted build never leaves a directory that looks finished
        draft.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        n = len(losses)
        write_marker(tmp, kind="truncated-distilled-draft", target=str(target_dir),
                     recipe=recipe, data_dir=str(data_dir),
                     train_tokens=int(sum(sel.sum() for _, sel in train_batches)),
                     steps_run=n, train_seconds=round(train_s, 1),
                     seconds=round(time.perf_counter() - t0, 1),
                     kl_first=round(sum(losses[:10]) / max(1, min(10, n)), 4),
                     kl_last=round(sum(losses[-10:]) / max(1, min(10, n)), 4),
                     agreement_before=before, agreement_after=after,
                     torch_threads=torch.get_num_threads())
    return out_dir


def ensure_demo_draft(cache_dir: str | os.PathLike | None, draft_cfg, data_dir: str | os.PathLike,
                      force: bool = False) -> Path:
    """Return the directory of the small-LM demo draft (configs/draft/<name>.yaml), making it if needed.

    The quick recipe takes a few minutes on 2 CPU cores. A cached draft whose recorded recipe differs
    from ``draft_cfg`` is rebuilt, so overriding a hyperparameter never silently returns a draft made
    with other settings.
    """

    recipe = recipe_dict(draft_cfg)
    out = demo_draft_dir(cache_dir, recipe)
    if not force and draft_is_current(out, recipe):
        return out
    target = ensure_demo_target(cache_dir)
    with FileLock(str(out) + ".lock"):  # two processes asking at once build it once
        if not force and draft_is_current(out, recipe):
            return out
        if is_complete(out):
            log.warning("rebuilding the cached draft %s (forced, or made with another recipe)", out)
        log.info("making the demo draft in %s (once, a few minutes on CPU)", out)
        return build_quick_draft(target, out, recipe, repo_path(data_dir))


def ensure_named_draft(name: str | None, cache_dir: str | os.PathLike | None, data_dir: str | os.PathLike) -> None:
    """Build ``demo:draft-lm`` on first use; the models layer only finds drafts, it never trains one."""
    if name == DEMO_DRAFT_LM:
        ensure_demo_draft(cache_dir, OmegaConf.load(CONFIG_DIR / "draft" / "quick.yaml"), data_dir)


def ensure_config_drafts(cfg, *extra: str | None) -> None:
    """Build ``demo:draft-lm`` before an entry script loads models, when the composed config's draft
    (for a method that drafts) or one of the ``extra`` names (a benchmark's assistant, ...) is it."""
    m = cfg.model
    names = [m.draft_model_name] if cfg.decoding.method != "target_only" else []
    for name in names + list(extra):
        ensure_named_draft(name, m.cache_dir, cfg.data_dir)
