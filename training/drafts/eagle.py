"""Train the EAGLE-style head (models/drafters/eagle.py) on precomputed teacher shards (training/drafts/teacher_data.py).

Per sequence of target-written text with the target's final hidden states f_0 .. f_{L-1}:
    input pair t   (f_t, x_{t+1}) at position t, t = 0 .. L-2
    prediction     f_{t+1} (smooth-L1 regression) and the target's next-token distribution at t+1,
                   softmax(W_r f_{t+1}) over the reduced vocabulary (soft cross-entropy)
    loss positions those whose prediction is an answer token (what a draft is asked at inference);
                   the prompt pairs are still fed, so attention sees the context it sees at inference.
``unroll`` > 1 adds EAGLE-3's "training-time test": the head's own predictions are fed back as the
features of a second pass, so it learns to draft from its own features as it must at depth >= 2.
With ``teacher.feature_layers`` (EAGLE-3's fused features) the first pass reads the target's states
at those layers (the shards' ``features``) through the head's ``fuse`` projection instead of f_t;
the regression target stays f_{t+1} (``reg_weight: 0`` drops it, as EAGLE-3 does).

The reduced vocabulary is the ``vocab_size`` most frequent target answer tokens of the training shards
(its coverage of held-out target text is measured and recorded). Everything is deterministic for a
seed; checkpoints every ``save_every`` steps make a stopped run resume where it was.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file
from tqdm import tqdm

from models.drafters.eagle import EagleConfig, EagleHead, is_eagle_draft, load_eagle_draft, save_eagle_draft
from models.drafters.eagle3 import Eagle3Config, Eagle3Draft, is_eagle3_draft, load_eagle3_draft, save_eagle3_draft
from models.errors import ConfigError
from training.drafts.precision import resolve_bf16
from training.drafts.teacher_data import final_norm

log = logging.getLogger(__name__)


def answer_tokens(data: dict, seqs: list[tuple[int, int, int]]) -> torch.Tensor:
    """All answer tokens of ``seqs`` (see ``sequences``), concatenated."""
    return torch.cat([data["input_ids"][a + p:b] for a, b, p in seqs]).long()


def select_vocab(data: dict, seqs: list, size: int, always: tuple[int, ...] = ()) -> list[int]:
    """The ``size`` most frequent answer tokens of ``seqs`` (ties by id), plus ``always`` (e.g. EOS)."""
    counts = Counter(answer_tokens(data, seqs).tolist())
    vocab = [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    vocab = list(dict.fromkeys(list(always) + vocab))[:size]
    return sorted(vocab)


def coverage(data: dict, seqs: list, vocab: list[int]) -> float:
    """Share of the answer tokens of ``seqs`` inside the reduced vocabulary (a ceiling on agreement)."""
    ans = answer_tokens(data, seqs)
    return float(torch.isin(ans, torch.tensor(vocab)).float().mean()) if len(ans) else 0.0


def sequences(data: dict, max_len: int) -> list[tuple[int, int, int]]:
    """(start row, end row, first answer index within the crop) per sequence; long prompts are cropped
    from the left (RoPE is relative, so only the visible context changes)."""
    out = []
    for s in range(len(data["prompt_lens"])):
        a, b = int(data["offsets"][s]), int(data["offsets"][s + 1])
        p = int(data["prompt_lens"][s])
        if b - a - p < 2:  # fewer than two answer tokens: no pair predicts an answer token
            continue
        start = max(a, b - max_len)
        out.append((start, b, max(a + p - start, 1)))
    return out


def make_batch(data: dict, seqs: list[tuple[int, int, int]], device: torch.device, key: str = "hidden"):
    """Right-padded tensors for a list of sequences: input feats [B, T, F] (``data[key]``: the final
    states, or the layer ``features``), tokens [B, T], positions [B, T], target feats [B, T, H], loss
    mask [B, T] (T = longest length - 1)."""
    width = max(b - a for a, b, _ in seqs) - 1
    hdim = data["hidden"].shape[1]
    feats = torch.zeros(len(seqs), width, data[key].shape[1])
    target = torch.zeros(len(seqs), width, hdim)
    tokens = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for row, (a, b, p) in enumerate(seqs):
        n = b - a - 1
        h = data["hidden"][a:b].float()
        feats[row, :n] = data[key][a:b - 1].float()
        tokens[row, :n] = data["input_ids"][a + 1:b].long()
        target[row, :n - 1] = h[1:-1]  # f_{t+1}; the last pair (t = n-1) has no target state
        mask[row, max(p - 2, 0):n - 1] = True  # pair t predicts x_{t+2}: an answer token iff t+2 >= p
    pos = torch.arange(width).expand(len(seqs), width)
    return feats.to(device), tokens.to(device), pos.to(device), target.to(device), mask.to(device)


def feature_key(feature_layers) -> str:
    """The teacher-shard tensor a head with ``feature_layers`` reads as its input features."""
    return "features" if feature_layers else "hidden"


def batches(seqs: list, batch_tokens: int, seed: int, epoch: int) -> list[list]:
    """Length-grouped batches of about ``batch_tokens`` tokens, order fixed by (seed, epoch)."""
    rng = random.Random(seed * 1000 + epoch)
    order = rng.sample(seqs, len(seqs))
    out = []
    for g in range(0, len(order), 256):
        window = sorted(order[g:g + 256], key=lambda s: s[1] - s[0])
        cur, longest = [], 0
        for s in window:
            longest2 = max(longest, s[1] - s[0])
            if cur and longest2 * (len(cur) + 1) > batch_tokens:
                out.append(cur)
                cur, longest2 = [], s[1] - s[0]
            cur.append(s)
            longest = longest2
        if cur:
            out.append(cur)
    rng.shuffle(out)
    return out


def loss_fn(head, feats, tokens, pos, target, mask, cfg, teacher_w: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Regression + soft cross-entropy over ``cfg.unroll`` passes (later passes read predictions).
    ``teacher_w`` [V_r, H]: the target's lm_head rows of the draft vocabulary (the soft labels)."""
    total, stats = 0.0, {}
    inp = feats = head.encode(feats)  # the target's features in the head's input space
    with torch.no_grad(), torch.autocast(target.device.type, enabled=False):  # exact soft labels
        teacher = F.softmax(target[mask].float() @ teacher_w.float().t(), dim=-1)
    for k in range(cfg.unroll):
        out = head(inp, tokens, pos)
        pred = out[mask]
        reg = F.smooth_l1_loss(pred.float(), target[mask])
        logq = F.log_softmax(head.logits(pred).float(), dim=-1)
        cls = -(teacher * logq).sum(-1).mean()
        weight = cfg.unroll_decay ** k
        total = total + weight * (cfg.reg_weight * reg + cfg.cls_weight * cls)
        if k == 0:
            stats = {"reg": float(reg.detach()), "cls": float(cls.detach()),
                     "top1": float((logq.argmax(-1) == teacher.argmax(-1)).float().mean())}
        else:
            stats[f"top1_unroll{k + 1}"] = float((logq.argmax(-1) == teacher.argmax(-1)).float().mean())
        if k + 1 < cfg.unroll:  # pair t+1 now carries the prediction made at t (true features at t=0)
            inp = torch.cat([feats[:, :1], out[:, :-1]], dim=1)
            # training-time test: only positions whose input came from a prediction are scored again
    return total, stats


@torch.no_grad()
def agreement(head, data: dict, seqs: list, device, batch_tokens: int = 4096) -> dict:
    """Top-1 / top-4 agreement of the first drafted token (true features) with the target's next token."""
    vocab_ids = head.vocab_ids
    hit1 = hit4 = total = 0
    for batch in batches(seqs, batch_tokens, 0, 0):
        feats, tokens, pos, target, mask = make_batch(data, batch, device, feature_key(head.cfg.feature_layers))
        out = head(head.encode(feats.to(head.fc.weight.dtype)), tokens, pos)
        top = head.logits(out[mask]).topk(4, dim=-1).indices
        want = torch.cat([tokens[r, 1:][mask[r, :-1]] for r in range(len(batch))])  # x_{t+2}
        got = vocab_ids[top]
        hit1 += int((got[:, 0] == want).sum())
        hit4 += int((got == want[:, None]).any(-1).sum())
        total += len(want)
    return {"top1": hit1 / max(total, 1), "top4": hit4 / max(total, 1), "tokens": total}


def train_eagle(target, data: dict, cfg, run_dir: Path, out_dir: Path, tracker=None, progress: bool = True,
                meta: dict | None = None) -> dict:
    """Train (or resume) the head; write the fp16 draft to ``out_dir`` with the summary plus ``meta``
    (e.g. where the teacher data came from) in its json. Returns the summary dict."""

    torch.manual_seed(cfg.seed)
    device = next(target.parameters()).device
    seqs = sequences(data, cfg.max_seq_len)
    if len(seqs) <= cfg.eval_sequences:
        raise ConfigError(f"only {len(seqs)} teacher sequences; need more than eval_sequences={cfg.eval_sequences}")
    held, train = seqs[-cfg.eval_sequences:], seqs[:-cfg.eval_sequences]
    eos = target.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    # a run that continues a finished draft keeps its vocabulary (the data of this run may differ)
    vocab = draft_vocab(Path(cfg.init_from).expanduser()) if cfg.get("init_from") else \
        select_vocab(data, train, cfg.vocab_size, tuple(eos))
    held_cov = coverage(data, held, vocab)
    layers = list((cfg.get("teacher") or {}).get("feature_layers") or [])
    key = feature_key(layers)
    if key not in data:
        raise ConfigError(f"the recipe reads the target's states at layers {layers} (teacher.feature_layers) but "
                          "the teacher shards carry only the final ones: they come from another teacher recipe")
    head = new_head(target, cfg, vocab, layers).to(device)
    teacher_w = target.get_output_embeddings().weight.detach()[torch.tensor(vocab, device=device)]
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    plan = [batches(train, cfg.batch_tokens, cfg.seed, e) for e in range(cfg.epochs)]
    total_steps = sum(map(len, plan))
    if cfg.get("max_steps"):
        total_steps = min(total_steps, int(cfg.max_steps))
    step, history, elapsed, losses = 0, [], 0.0, []
    ckpt = run_dir / "last.pt"
    recipe = json.loads(json.dumps(_plain(cfg)))
    if ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=False)
        if state["recipe"] != recipe or state["vocab"] != vocab:
            raise ConfigError(f"checkpoint {ckpt} was made with another recipe or data; delete {run_dir} "
                              "or pass another run name to start over")
        head.load_state_dict(state["head"])
        opt.load_state_dict(state["opt"])
        step, history, elapsed, losses = state["step"], state["history"], state["elapsed"], state["losses"]
        log.info("resuming from %s at step %d", ckpt, step)
    elif cfg.get("init_from"):  # a finished draft (e.g. the committed one) as the starting point
        start_from(head, Path(cfg.init_from).expanduser(), target, vocab)

    def lr_at(s: int) -> float:
        if s < cfg.warmup_steps:
            return cfg.lr * (s + 1) / cfg.warmup_steps
        frac = (s - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))

    flat = [b for epoch in plan for b in epoch][:total_steps]
    bf16 = resolve_bf16(cfg.bf16, device.type, "draft.bf16")
    bar = tqdm(total=total_steps, initial=step, desc="eagle head", unit="step", disable=not progress)
    t0 = time.time()
    head.train()
    while step < total_steps:
        feats, tokens, pos, target_f, mask = make_batch(data, flat[step], device, key)
        if cfg.feature_noise > 0:  # robustness to the head's own (noisy) features at depth >= 2
            g = torch.Generator(device="cpu").manual_seed(cfg.seed * 100003 + step)
            feats = feats + (torch.rand(feats.shape, generator=g).to(device) - 0.5) * 2 * cfg.feature_noise
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, stats = loss_fn(head, feats, tokens, pos, target_f, mask, cfg, teacher_w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", top1=f"{stats['top1']:.3f}")
        losses.append(round(loss.item(), 5))
        if tracker is not None:
            tracker.log({"train/loss": loss.item(), **{f"train/{k}": v for k, v in stats.items()},
                         "train/lr": lr_at(step - 1)}, step=step)
        if step % cfg.eval_every == 0 or step == total_steps:
            head.eval()
            ev = agreement(head, data, held, device)
            head.train()
            history.append({"step": step, "seconds": round(elapsed + time.time() - t0, 1), **ev})
            log.info("step %d: held-out top-1 %.3f top-4 %.3f", step, ev["top1"], ev["top4"])
            if tracker is not None:
                tracker.log({"eval/top1": ev["top1"], "eval/top4": ev["top4"]}, step=step)
        if step % cfg.save_every == 0 or step == total_steps:
            _save_ckpt(ckpt, head, opt, step, history, elapsed + time.time() - t0, recipe, vocab, losses)
    bar.close()
    elapsed += time.time() - t0
    head.eval()
    summary = {"recipe": recipe, "steps": step, "train_seconds": round(elapsed, 1),
               "train_sequences": len(train), "train_answer_tokens": int(sum(b - a - p for a, b, p in train)),
               "vocab_size": len(vocab), "heldout_vocab_coverage": round(held_cov, 4),
               "history": history, "heldout": history[-1] if history else None,
               "loss_first": losses[0] if losses else None,
               "loss_last_mean10": round(sum(losses[-10:]) / len(losses[-10:]), 5) if losses else None}
    if isinstance(head, Eagle3Draft):
        save_eagle3_draft(head, out_dir, meta={**summary, **(meta or {})})
    else:
        save_eagle_draft(head, out_dir, meta={**summary, **(meta or {})})
    return summary


def new_head(target, cfg, vocab: list[int], layers: list[int]):
    """A fresh head of ``cfg.family``: ``eagle`` (treespec's EAGLE-style head) or ``eagle3`` (the engines'
    EAGLE-3 layout; its lm_head and norm start as the target's rows of the draft vocabulary and final norm)."""
    if cfg.get("family", "eagle") == "eagle3":
        if not layers:
            raise ConfigError("draft.family=eagle3 reads the target's states at three layers: set teacher.feature_layers")
        head = Eagle3Draft(Eagle3Config.for_target(target, len(vocab), layers), target.get_input_embeddings().weight)
        head.set_draft_vocab(torch.tensor(vocab))
        with torch.no_grad():
            head.lm_head.weight.copy_(target.get_output_embeddings().weight[torch.tensor(vocab)])
            head.norm.weight.copy_(final_norm(target).weight)
        return head
    return EagleHead(EagleConfig.from_target(target, vocab, cfg.get("intermediate_size"), layers,
                                             bool(cfg.get("feature_norm", False))),
                     target.get_input_embeddings().weight, target.get_output_embeddings().weight)


def draft_vocab(path: Path) -> list[int]:
    """The target ids a finished draft (either family) can propose."""
    if is_eagle3_draft(path):
        d2t = load_file(str(path / "model.safetensors"))["d2t"]
        return (torch.arange(len(d2t)) + d2t).tolist()
    if is_eagle_draft(path):
        return list(json.loads((path / "eagle_head.json").read_text())["config"]["draft_vocab"])
    raise ConfigError(f"draft.init_from={path} is not a finished draft directory")


def start_from(head, path: Path, target, vocab: list[int]) -> None:
    """Copy the weights of the finished draft in ``path`` into ``head`` (same family, vocabulary and shape)."""
    family = "eagle3" if isinstance(head, Eagle3Draft) else "eagle"
    if (is_eagle3_draft(path), is_eagle_draft(path)) != (family == "eagle3", family == "eagle"):
        raise ConfigError(f"draft.init_from={path} is not a finished draft of family {family}")
    done = load_eagle3_draft(path, target) if family == "eagle3" else load_eagle_draft(path, target)
    if done.vocab_ids.tolist() != list(vocab):
        raise ConfigError(f"draft.init_from={path} has another draft vocabulary than this run's data gives; "
                          "start from scratch (init_from=null) or use the same teacher data")
    try:
        head.load_state_dict(done.state_dict(), strict=True)
    except RuntimeError as e:
        raise ConfigError(f"draft.init_from={path} does not fit this recipe's head: {e}") from None
    log.info("starting from the weights of %s", path)


def _save_ckpt(path: Path, head, opt, step, history, elapsed, recipe, vocab, losses) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "step": step, "history": history,
                "elapsed": elapsed, "recipe": recipe, "vocab": vocab, "losses": losses}, tmp)
    tmp.replace(path)


def _plain(cfg) -> dict:

    return OmegaConf.to_container(cfg, resolve=True) if OmegaConf.is_config(cfg) else dict(cfg)
