"""Side-by-side speed measurement: every method on the same prompts, in one process, after warm-up.

Methods (``benchmark.methods``):
  target_only   our incremental decoding with the target alone (the speedup baseline)
  hf_generate   Hugging Face ``generate`` with the target alone (a sanity check of the baseline)
  hf_assisted   Hugging Face assisted generation, ``generate(assistant_model=...)``: the draft when it
                is an HF causal LM, else ``assistant`` (an EAGLE-style head is not an HF model; the
                script passes ``benchmark.assistant_model_name``, the small-LM demo draft)
  chain, tree   treespec with ``decoding.method`` = chain / tree and ``config.tree_search``
  <variant>     a tree run with some config groups changed (``benchmark.variants``: name -> {group:
                {key: value}}, e.g. ``pred: {tree_search: {rank_by: predictor}}``), so tree shapes,
                rankings and the aligned proposal are compared in the same run
Prompts are interleaved (prompt 1 with every method, then prompt 2, ...) so that drifting machine
load hits all methods alike. Greedy runs also check that every method emitted exactly the
target-only tokens (``identical`` column).
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from speculative_decoder import GenerationStats, SpeculativeDecoder

TREESPEC_METHODS = ("target_only", "chain", "tree")
HF_METHODS = ("hf_generate", "hf_assisted")


def load_prompts(path: Path, num: int, categories=None) -> list[dict]:
    """``num`` rows of a prompt JSONL, taken round-robin over categories (all when ``categories`` is None)."""
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path} (set data_dir=... or benchmark.prompt_file=...)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    by_cat: dict[str, list[dict]] = {}
    for row in rows:
        if categories is None or row.get("category") in categories:
            by_cat.setdefault(row.get("category", ""), []).append(row)
    picked, queues = [], [list(v) for v in by_cat.values()]
    while len(picked) < num and any(queues):
        for q in queues:
            if q and len(picked) < num:
                picked.append(q.pop(0))
    return picked


@dataclass
class MethodTotals:
    new_tokens: int = 0
    time_s: float = 0.0
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    expected: float = 0.0
    nodes_drafted: int = 0
    prompts: int = 0
    identical: int = 0
    phases: dict = field(default_factory=dict)

    def add(self, new_tokens: int, seconds: float, stats: GenerationStats | None) -> None:
        self.new_tokens += new_tokens
        self.time_s += seconds
        self.prompts += 1
        if stats is not None:
            self.steps += stats.steps
            self.drafted += stats.drafted_tokens
            self.accepted += stats.accepted_tokens
            self.expected += stats.expected_accepted
            self.nodes_drafted += stats.nodes_drafted
            for k, v in stats.time_s.items():
                self.phases[k] = self.phases.get(k, 0.0) + v

    def row(self) -> dict:
        tau = (self.new_tokens - self.prompts) / self.steps if self.steps else None
        return dict(prompts=self.prompts, new_tokens=self.new_tokens, time_s=round(self.time_s, 3),
                    tokens_per_s=self.new_tokens / self.time_s if self.time_s else 0.0,
                    tau=tau, acceptance_rate=self.accepted / self.drafted if self.drafted else None,
                    nodes_per_step=self.drafted / self.steps if self.steps else None,
                    drafted_per_step=self.nodes_drafted / self.steps if self.steps else None,
                    pruned_fraction=1 - self.drafted / self.nodes_drafted if self.nodes_drafted else None,
                    accepted_tokens=self.accepted if self.steps else None,
                    expected_accepted=round(self.expected, 2) if self.steps else None,
                    identical=self.identical, phase_share={k: round(v / self.time_s, 3) for k, v in self.phases.items()}
                    if self.phases else None)


def run_benchmark(decoder: SpeculativeDecoder, prompts: list[dict], methods: list[str], max_new_tokens: int,
                  max_prompt_tokens: int, warmup: int, decoding: dict, log=print, assistant=None,
                  variants: dict | None = None) -> dict:
    """Returns {"rows": {method: metrics}, "skipped": [...]} with speedups filled in."""
    variants = dict(variants or {})
    methods = list(methods) + [v for v in variants if v not in methods]
    unknown = set(methods) - set(TREESPEC_METHODS) - set(HF_METHODS) - set(variants)
    if unknown:
        raise ValueError(f"unknown benchmark method(s) {sorted(unknown)}; known: {TREESPEC_METHODS + HF_METHODS} "
                         f"and the names in benchmark.variants")
    assistant = assistant if assistant is not None else decoder.draft_model
    if "hf_assisted" in methods and assistant is None:
        log("skip hf_assisted: the draft is not a Hugging Face causal LM and no assistant model was given")
        methods = [m for m in methods if m != "hf_assisted"]
    encoded, skipped = [], []
    for row in prompts:
        ids = decoder.encode_prompt(row["prompt"])
        if ids.shape[1] > max_prompt_tokens or ids.shape[1] + max_new_tokens > decoder.context_limit:
            skipped.append(row["id"])
            log(f"skip {row['id']}: prompt of {ids.shape[1]} tokens exceeds benchmark.max_prompt_tokens={max_prompt_tokens}")
            continue
        encoded.append((row["id"], ids))
    if not encoded:
        raise ValueError("no prompt left to benchmark")
    greedy = not decoding.get("do_sample") or decoding.get("temperature", 1.0) == 0
    for _, ids in encoded[:warmup]:  # warm-up: allocator, kernels, caches; not timed
        for m in methods:
            _run_one(decoder, m, ids, min(max_new_tokens, 16), decoding, seed=0, assistant=assistant, variants=variants)
    totals = {m: MethodTotals() for m in methods}
    for i, (pid, ids) in enumerate(encoded[warmup:] if len(encoded) > warmup else encoded):
        reference = None
        for m in methods:
            out, seconds, stats = _run_one(decoder, m, ids, max_new_tokens, decoding, seed=i, assistant=assistant,
                                           variants=variants)
            new = out[ids.shape[1]:]
            totals[m].add(len(new), seconds, stats)
            if greedy:
                reference = new if reference is None else reference
                totals[m].identical += int(new == reference)
        log(f"[{i + 1}/{len(encoded) - warmup if len(encoded) > warmup else len(encoded)}] {pid}: " + ", ".join(
            f"{m} {totals[m].row()['tokens_per_s']:.1f} tok/s" for m in methods))
    rows = {m: t.row() for m, t in totals.items()}
    for base in ("target_only", "hf_assisted"):
        if base in rows:
            for r in rows.values():
                r[f"speedup_vs_{base}"] = r["tokens_per_s"] / rows[base]["tokens_per_s"] if rows[base]["tokens_per_s"] else None
    if not greedy:
        for r in rows.values():
            r["identical"] = None
    return {"rows": rows, "skipped": skipped}


def _run_one(decoder: SpeculativeDecoder, method: str, ids: torch.Tensor, max_new: int, decoding: dict, seed: int,
             assistant=None, variants: dict | None = None):
    """(all token ids as a list, seconds, stats or None for HF methods)."""
    if variants and method in variants:
        with variant_config(decoder, variants[method]):
            return _run_one(decoder, "tree", ids, max_new, decoding, seed)
    sample = bool(decoding.get("do_sample")) and decoding.get("temperature", 1.0) > 0
    if method in TREESPEC_METHODS:
        t0 = time.perf_counter()
        out, stats = decoder.generate(ids, max_new, method=method, seed=seed, **decoding)
        return out[0].tolist(), time.perf_counter() - t0, stats
    kwargs = dict(max_new_tokens=max_new, do_sample=sample, attention_mask=torch.ones_like(ids),
                  pad_token_id=decoder.tokenizer.pad_token_id if decoder.tokenizer is not None else None)
    if sample:
        kwargs.update(temperature=decoding["temperature"], top_k=decoding.get("top_k") or None,
                      top_p=decoding.get("top_p", 1.0))
        torch.manual_seed(seed)  # HF generate samples from the global RNG
    if method == "hf_assisted":
        kwargs["assistant_model"] = assistant
    device = decoder.device
    t0 = time.perf_counter()
    with torch.no_grad():
        out = decoder.target_model.generate(ids.to(device), **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out[0].tolist(), time.perf_counter() - t0, None


@contextmanager
def variant_config(decoder: SpeculativeDecoder, changes: dict):
    """Temporarily replace fields of the decoder's config groups (validated at generate)."""
    saved = {}
    try:
        for group, values in changes.items():
            if not hasattr(decoder.config, group):
                raise ValueError(f"benchmark variant changes unknown config group {group!r}")
            saved[group] = getattr(decoder.config, group)
            setattr(decoder.config, group, dataclasses.replace(saved[group], **dict(values)))
        yield
    finally:
        for group, old in saved.items():
            setattr(decoder.config, group, old)


def format_table(rows: dict) -> str:
    cols = ["method", "tok/s", "tau", "accept", "nodes/step", "expected/accepted", "x target", "x HF assisted",
            "identical"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    fmt = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for m, r in rows.items():
        ident = "-" if r["identical"] is None else f"{r['identical']}/{r['prompts']}"
        ratio = r["expected_accepted"] / r["accepted_tokens"] if r.get("accepted_tokens") else None
        lines.append(" | ".join([m, fmt(r["tokens_per_s"]), fmt(r["tau"]), fmt(r["acceptance_rate"], 3),
                                 fmt(r.get("nodes_per_step"), 1), fmt(ratio, 3),
                                 fmt(r.get("speedup_vs_target_only")), fmt(r.get("speedup_vs_hf_assisted")), ident]))
    return "\n".join(lines)
