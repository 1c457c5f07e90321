"""The draft-design study: at an equal parameter budget, shallow-and-wide or deep-and-narrow drafts?

Seed claim (Yan et al., "Decoding Speculative Decoding", arXiv 2402.01528): a draft's *latency*
matters more than its *accuracy* for the end-to-end speedup, latency grows with depth, so at equal
size a shallow-and-wide draft beats a deep-and-narrow one. This module tests the claim on the demo
pair: it trains independent small drafts of several depths and widths, same recipe and same budget
each, from the existing teacher shards (``training/drafts/teacher_data.py``), then measures per draft the
draft latency, the agreement with the target on Spec-Bench, tau and tokens/s of tree decoding (one
run, every draft interleaved with the target alone on every prompt).

The drafts (``shapes``): HF causal LMs of the target's architecture whose decoder layers are fresh
(seeded random init) and whose token embeddings, final norm and lm_head are the target's, frozen
(tied in the demo, as the target has them). The hidden size stays the target's (the embedding space
is shared), so *width* is the layers' inner width: attention heads (x the target's head size) and
MLP size. Equal budget means equal decoder-layer parameters: halving the inner width while doubling
the depth keeps them equal (``param_tolerance`` bounds the spread; the embedding and lm_head are the
same matrices in every draft). Every draft learns the full-vocabulary next-token distribution of the
target (KL, as ``training/draft_distill``) at the answer positions of the teacher shards, computed
from the stored target hidden states through the target's lm_head: no target forward per step.
Training is resumable per draft (a finished draft is kept, an unfinished one resumes from its last
saved step); the drafts live in ``$TREESPEC_CACHE/draft-study-<hash of recipe>/<name>/``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from models.checkpoint import atomic_dir
from models.errors import ConfigError, ModelLoadError
from models.io.demo_pair import recipe_dict
from training.drafts.distill import _batches, distill

log = logging.getLogger(__name__)

MARKER = "treespec_study_draft.json"


@dataclasses.dataclass(frozen=True)
class Shape:
    """One draft design: ``layers`` decoder layers with ``heads`` attention heads and an MLP of
    ``intermediate_size`` (the hidden size and head size are the target's)."""
    name: str
    layers: int
    heads: int
    intermediate_size: int


def read_shapes(items) -> list[Shape]:
    """Shapes from config entries (mappings with name, layers, heads, intermediate_size), checked."""
    shapes = []
    for i, item in enumerate(items or []):
        item = dict(item)
        missing = [k for k in ("name", "layers", "heads", "intermediate_size") if k not in item]
        if missing:
            raise ConfigError(f"draft_study.shapes[{i}] lacks {missing} (has {sorted(item)})")
        for k in ("layers", "heads", "intermediate_size"):
            v = item[k]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"draft_study.shapes[{i}].{k} must be a positive integer, got {v!r}")
        name = str(item["name"])
        if not name or any(c in name for c in "/\\ ") or name.startswith("."):
            raise ConfigError(f"draft_study.shapes[{i}].name {name!r} must be a plain folder name")
        shapes.append(Shape(name, item["layers"], item["heads"], item["intermediate_size"]))
    if len(shapes) < 2:
        raise ConfigError(f"draft_study.shapes needs at least two draft designs to compare, got {len(shapes)}")
    names = [s.name for s in shapes]
    if len(set(names)) != len(names):
        raise ConfigError(f"draft_study.shapes has repeated names: {names}")
    return shapes


def _study_config(target_config, shape: Shape):
    """The target's config with the shape's depth and inner width (Llama-family attribute names)."""
    cfg = copy.deepcopy(target_config)
    for attr in ("num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_size"):
        if not hasattr(cfg, attr):
            raise ConfigError(f"the draft study builds drafts of the target's architecture and needs config.{attr}; "
                              f"{type(target_config).__name__} has none")
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cfg.num_hidden_layers = shape.layers
    cfg.num_attention_heads = shape.heads
    cfg.num_key_value_heads = shape.heads
    cfg.head_dim = head_dim
    cfg.intermediate_size = shape.intermediate_size
    if getattr(cfg, "layer_types", None):  # per-layer attention kinds: keep the target's pattern
        kinds = list(cfg.layer_types)
        cfg.layer_types = [kinds[i % len(kinds)] for i in range(shape.layers)]
    return cfg


def layer_params(target, shape: Shape) -> int:
    """Parameters of the shape's decoder layers (built on the meta device: nothing is allocated)."""

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_study_config(target.config, shape))
    return sum(p.numel() for p in model.base_model.layers.parameters())


def check_equal_budget(target, shapes: list[Shape], tolerance: float) -> dict[str, int]:
    """Decoder-layer parameters per shape; ConfigError when they spread more than ``tolerance``."""
    counts = {s.name: layer_params(target, s) for s in shapes}
    lo, hi = min(counts.values()), max(counts.values())
    if hi > lo * (1 + tolerance):
        raise ConfigError(f"draft_study.shapes are not of about equal size: decoder-layer parameters {counts} "
                          f"spread {hi / lo - 1:.1%} > draft_study.param_tolerance={tolerance}; halve the heads "
                          "and intermediate_size when doubling the layers")
    return counts


def make_study_draft(target, shape: Shape, seed: int):
    """A draft of ``shape``: fresh seeded decoder layers; the target's embeddings, final norm and lm_head."""

    torch.manual_seed(seed)
    draft = AutoModelForCausalLM.from_config(_study_config(target.config, shape), dtype=target.dtype)
    source = target.state_dict()
    shared = {n: source[n] for n, t in draft.state_dict().items()
              if ".layers." not in n and n in source and source[n].shape == t.shape}
    draft.load_state_dict(shared, strict=False)
    with torch.no_grad():  # each layer starts as the identity on the residual stream (zero output projections):
        for layer in draft.base_model.layers:  # the draft begins as the target's embedding -> norm -> lm_head
            for proj in (getattr(layer.self_attn, "o_proj", None), getattr(getattr(layer, "mlp", None), "down_proj", None)):
                if proj is not None:
                    proj.weight.zero_()
    if getattr(draft.config, "tie_word_embeddings", False):
        draft.tie_weights()
    draft.generation_config = copy.deepcopy(target.generation_config)
    return draft.eval()


# ---------------------------------------------------------------------- data from teacher shards
def study_sequences(data: dict, max_seq_len: int) -> tuple[list[tuple[list[int], int]], list[torch.Tensor]]:
    """``(seqs, states)``: each teacher sequence as ``(ids, first answer index)`` (the oldest prompt
    tokens dropped beyond ``max_seq_len``) and the target's stored hidden states at its answer-
    predicting positions (``start - 1 .. len - 2``), in the order ``_batches``' ``sel`` visits them."""
    seqs, states = [], []
    for s in range(len(data["prompt_lens"])):
        a, b = int(data["offsets"][s]), int(data["offsets"][s + 1])
        p = int(data["prompt_lens"][s])
        cut = max(0, (b - a) - max_seq_len)
        if p - cut < 1:  # an answer longer than the window: keep the prompt's last token and what fits
            cut = p - 1
        lo, hi = a + cut, min(b, a + cut + max_seq_len)
        start = p - cut
        if hi - lo - start < 1:
            continue
        seqs.append((data["input_ids"][lo:hi].tolist(), start))
        states.append(data["hidden"][lo + start - 1:hi - 1])
    return seqs, states


def training_batches(seqs, states, cfg, pad_id: int) -> list[tuple]:
    """``cfg.steps`` batches of ``cfg.batch_size`` sequences (passes over the data, reshuffled per pass),
    each ``(ids, sel, rows)``; the same list for every draft (equal budget, equal data order)."""
    need = cfg.steps * cfg.batch_size
    if not seqs:
        raise ConfigError("the teacher shards hold no usable sequence for the draft study")
    out, epoch = [], 0
    while len(out) < cfg.steps:
        out += _batches(seqs, cfg.batch_size, pad_id, cfg.seed + epoch, with_index=True)
        epoch += 1
    log.info("draft study data: %d sequences, %d steps x %d = %.2f passes", len(seqs), cfg.steps, cfg.batch_size,
             need / len(seqs))
    return out[:cfg.steps]


def teacher_logits_from_states(lm_head: torch.Tensor, states: list[torch.Tensor]):
    """``teacher(ids, sel, rows)`` for ``distill``: the target's logits from its stored hidden states."""
    weight = lm_head.detach().float()

    def teacher(ids, sel, rows):
        h = torch.cat([states[r] for r in rows]).float()
        if h.shape[0] != int(sel.sum()):
            raise RuntimeError(f"teacher states ({h.shape[0]}) do not match the selected positions ({int(sel.sum())})")
        return h @ weight.t()

    return teacher


# ---------------------------------------------------------------------- training every shape
def study_dir(cache: Path, target_name: str, recipe: dict, teacher_name: str) -> Path:
    digest = hashlib.sha256(json.dumps([target_name, teacher_name, recipe], sort_keys=True).encode()).hexdigest()[:10]
    return cache / f"draft-study-{digest}"


def train_shape(target, tokenizer, shape: Shape, batches, teacher, cfg, root: Path, meta: dict,
                progress: bool = True) -> tuple[Path, dict]:
    """Train (or reuse, or resume) the draft of ``shape``; returns its directory and record."""
    out = root / shape.name
    marker = out / MARKER
    if marker.is_file():
        try:
            record = json.loads(marker.read_text())
        except json.JSONDecodeError as exc:
            raise ModelLoadError(f"{marker} is corrupt ({exc}); delete {out} to retrain that draft") from exc
        log.info("draft %s: reusing %s", shape.name, out)
        return out, record
    draft = make_study_draft(target, shape, cfg.seed)
    root.mkdir(parents=True, exist_ok=True)
    state = root / f".{shape.name}.state.pt"
    t0 = time.perf_counter()
    losses = distill(draft, teacher, batches, cfg, progress=progress, state_path=state, save_every=cfg.save_every)
    record = dict(meta, shape=dataclasses.asdict(shape), layer_params=sum(
        p.numel() for p in draft.base_model.layers.parameters()), steps=len(losses),
        train_seconds_last_run=round(time.perf_counter() - t0, 1),
        train_positions=int(sum(int(b[1].sum()) for b in batches)),
        kl_first10=round(sum(losses[:10]) / max(1, min(10, len(losses))), 4),
        kl_last10=round(sum(losses[-10:]) / max(1, min(10, len(losses))), 4),
        kl_curve=[round(sum(losses[i:i + 10]) / len(losses[i:i + 10]), 4) for i in range(0, len(losses), 10)])
    with atomic_dir(out) as tmp:
        draft.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(record, indent=1) + "\n")
    state.unlink(missing_ok=True)
    return out, record


def train_all(target, tokenizer, data: dict, shapes: list[Shape], cfg, root: Path, meta: dict,
              progress: bool = True) -> dict[str, tuple[Path, dict]]:
    """Every shape on the same batches from the same teacher; ``{name: (dir, record)}``."""
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    seqs, states = study_sequences(data, cfg.max_seq_len)
    batches = training_batches(seqs, states, cfg, pad_id)
    teacher = teacher_logits_from_states(target.get_output_embeddings().weight, states)
    return {s.name: train_shape(target, tokenizer, s, batches, teacher, cfg, root, meta, progress) for s in shapes}


# ---------------------------------------------------------------------- reading the results
def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None when undefined."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(v):
            j = i
            while j + 1 < len(v) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    if len(x) < 3:
        return None
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return None if sx == 0 or sy == 0 else cov / (sx * sy)


def verdict(rows: list[dict]) -> dict:
    """What the measurements say about the claim (numbers only; the wording states what was compared).

    The designs are split by depth into a shallower and a deeper half (the middle one, for an odd
    count, left out). ``claim_holds``: the shallower half is faster end to end (mean tokens/s) and
    tokens/s falls with depth (Spearman < 0). The paper's *mechanism* is latency, so the verdict also
    gives how much draft latency and agreement differ between the halves: on a machine where depth
    hardly costs latency, a holding claim means the shallow drafts won on accuracy instead."""
    rows = sorted(rows, key=lambda r: r["layers"])
    depth = [r["layers"] for r in rows]
    get = lambda k, rs=rows: [r[k] for r in rs]  # noqa: E731
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    fastest = max(rows, key=lambda r: r["tokens_per_s"])
    most_accurate = max(rows, key=lambda r: r["top1"])
    lowest_latency = min(rows, key=lambda r: r["draft_ms"])
    rho = {k: spearman(depth, get(k)) for k in ("draft_ms", "top1", "tau", "tokens_per_s")}
    half = len(rows) // 2
    shallow, deep = rows[:half], rows[len(rows) - half:]
    halves = {name: {k: mean(get(k, part)) for k in ("tokens_per_s", "draft_ms", "top1", "tau")}
              for name, part in (("shallow", shallow), ("deep", deep))}
    ratio = {k: halves["shallow"][k] / halves["deep"][k] if halves["deep"][k] else None for k in halves["shallow"]}
    holds = bool(shallow) and halves["shallow"]["tokens_per_s"] > halves["deep"]["tokens_per_s"] and \
        (rho["tokens_per_s"] is None or rho["tokens_per_s"] < 0)
    latency_spread = max(get("draft_ms")) / min(get("draft_ms")) - 1
    names = lambda part: "+".join(r["name"] for r in part)  # noqa: E731
    summary = (f"shallower half ({names(shallow)}) vs deeper half ({names(deep)}): tokens/s x{ratio['tokens_per_s']:.3f}, "
               f"draft latency x{ratio['draft_ms']:.3f}, top-1 agreement x{ratio['top1']:.3f}, tau x{ratio['tau']:.3f}; "
               f"draft latency spans {latency_spread:.1%} over all designs; fastest end to end: {fastest['name']} "
               f"({fastest['tokens_per_s']:.2f} tok/s, {fastest['speedup_vs_target_only']:.2f}x target); "
               f"the shallow-and-wide claim {'holds' if holds else 'does not hold'} here")
    return {"fastest": fastest["name"], "most_accurate": most_accurate["name"], "lowest_latency": lowest_latency["name"],
            "fastest_is_shallowest": fastest["layers"] == depth[0], "spearman_depth_vs": rho,
            "shallow_vs_deep": halves, "shallow_over_deep": ratio, "latency_spread": latency_spread,
            "claim_holds": holds, "summary": summary}


def plot_study(rows: list[dict], path: Path, title: str = "") -> Path:
    """Two panels: tau vs tokens/s (the study's plot) and draft latency vs top-1 agreement."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in rows:
        a.scatter(r["tau"], r["tokens_per_s"], s=40 + 12 * r["layers"])
        a.annotate(r["name"], (r["tau"], r["tokens_per_s"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
        b.scatter(r["draft_ms"], r["top1"], s=40 + 12 * r["layers"])
        b.annotate(r["name"], (r["draft_ms"], r["top1"]), textcoords="offset points", xytext=(6, 4), fontsize=8)
    base = rows[0].get("target_tokens_per_s")
    if base:
        a.axhline(base, color="grey", ls="--", lw=1)
        a.text(a.get_xlim()[0], base, " target alone", va="bottom", fontsize=8, color="grey")
    a.set_xlabel("tau (tokens per target forward)")
    a.set_ylabel("tokens/s (tree decoding)")
    a.set_title("tau vs throughput")
    b.set_xlabel("draft forward, 1 token (ms)")
    b.set_ylabel("top-1 agreement on Spec-Bench")
    b.set_title("draft latency vs accuracy")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def format_rows(rows: list[dict]) -> str:
    cols = ["draft", "layers", "heads", "mlp", "layer params (M)", "KL end", "draft ms", "frontier-3 ms",
            "top-1", "chain E[tokens]", "tau", "tok/s", "x target", "identical"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        lines.append(" | ".join([
            r["name"], str(r["layers"]), str(r["heads"]), str(r["intermediate_size"]),
            f"{r['layer_params'] / 1e6:.2f}", "-" if r.get("kl_last10") is None else f"{r['kl_last10']:.3f}",
            f"{r['draft_ms']:.2f}", f"{r['draft_frontier3_ms']:.2f}", f"{r['top1']:.3f}",
            f"{r['chain_expected_tokens']:.2f}", f"{r['tau']:.2f}", f"{r['tokens_per_s']:.2f}",
            f"{r['speedup_vs_target_only']:.2f}", f"{r['identical']}/{r['prompts']}"]))
    return "\n".join(lines)


def recipe_of(cfg) -> dict:
    """The parts of ``cfg.draft_study`` that decide the trained weights (the study folder's key)."""
    r = recipe_dict(cfg)
    keep = ("shapes", "teacher_shards", "steps", "batch_size", "max_seq_len", "lr", "warmup_steps", "weight_decay",
            "student_bf16", "seed")
    return {k: r[k] for k in keep if k in r}
