"""Measure a ``CostModel`` with a decoder's real target and drafter, and cache it per machine and pair.

    profile_costs(decoder)                  # measure now (median of ``repeats`` timed calls per point)
    load_or_profile(decoder, cache_dir)     # the cached profile for this exact machine + pair, else measure

verify: the target forward over a random tree of N nodes (root included) after ``context`` cached
tokens, through ``SpeculativeDecoder._target_tree_forward`` itself (token/position tensors, the
chain check and the 4-D tree mask are built inside the timed call, as in decoding; hidden states
are asked for when the drafter reads them, as in decoding). The KV cache is cropped back to
``context`` after every call, so each call sees the same prefix.

draft: one ``drafter.propose(tree, frontier)`` over F nodes at depth 1 under the root, after the
drafter was prefilled with the same ``context`` tokens (an EAGLE head gets the target's hidden
states of that prefill, as in decoding) and proposed the root. Each timed call starts from a fresh
``prefill`` so it sees exactly ``context + 1`` cached entries, and ends with ``commit(tree, [0])``,
which drops the frontier. Only the frontier call is timed. When the models' context window cannot
hold ``context`` plus the largest tree, the context is lowered to fit (the key records what was used).

The cache key (``cost_key``) names the device (CUDA device name, or the CPU model and core count),
dtype, torch threads, torch/transformers versions, the attention implementation, the target's and
draft's fingerprints (config hash + the first weight-signature values), the context and the sizes
measured. A profile file is reused only when its stored key equals the current one exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Sequence

import torch
import transformers

from models.checkpoint import fingerprint
from models.config import default_config
from models.decoding.drafter import target_features
from models.decoding.kv_cache import cache_length, keep_tokens, new_cache
from models.decoding.tree import DraftTree
from models.kernels.fast_linear import linear_kernel
from models.kernels.invariant_gemm import source_digest
from models.paths import cache_root
from models.policy.cost_model import CostModel


def profile_defaults() -> dict:
    """The sizes and repeats of ``configs/profile_costs/default.yaml`` (their one home)."""
    p = default_config().profile_costs
    return dict(node_counts=tuple(p.node_counts), widths=tuple(p.widths), context=int(p.context),
                repeats=int(p.repeats), warmup=int(p.warmup))

SIGNATURE_VALUES = 8  # weight-signature values of each model in the key

__all__ = ["profile_costs", "load_or_profile", "cost_key", "cost_file", "plot_costs", "profile_defaults"]


# ---------------------------------------------------------------------- identity of a measurement
def device_description(device: torch.device) -> dict:
    """What runs the forwards: the CUDA device name, else the CPU model and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device)}
    if device.type != "cpu":
        return {"type": device.type, "name": device.type}
    name = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"type": "cpu", "name": name or platform.processor() or platform.machine(), "cpus": os.cpu_count()}


def _model_identity(module: torch.nn.Module | None, fallback: str | None = None) -> dict | None:
    if module is None:
        return None if fallback is None else {"class": fallback}
    fp = fingerprint(module)
    return {"class": fp["class"], "config_hash": fp["config_hash"], "signature": fp["signature"][:SIGNATURE_VALUES]}


def cost_key(decoder, context: int | None = None, node_counts: Sequence[int] | None = None,
             widths: Sequence[int] | None = None) -> dict:
    """What a profile of ``decoder`` made now would be measured for (JSON-normalised, so it compares
    equal to the key read back from a file). Sizes left None come from ``profile_defaults()``."""
    d = profile_defaults()
    context = d["context"] if context is None else context
    node_counts = d["node_counts"] if node_counts is None else node_counts
    widths = d["widths"] if widths is None else widths
    target, drafter = decoder.target_model, decoder.drafter
    draft_module = drafter.identity_module if drafter is not None else None
    key = {
        "device": device_description(decoder.device),
        "dtype": str(target.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "mkl_cbwr": os.environ.get("MKL_CBWR"),  # MKL's code path (models/__init__.py) changes the curves
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "attn_implementation": getattr(target.config, "_attn_implementation", None),
        "target": _model_identity(target),
        "draft": _model_identity(draft_module, type(drafter).__name__ if drafter is not None else None),
        "context": effective_context(decoder, context, node_counts, widths),
        "node_counts": sorted({int(n) for n in node_counts}),
        "widths": sorted({int(w) for w in widths}) if drafter is not None else [],
    }
    linear = linear_kernel(target)
    if linear:  # packed linear kernels (model.cpu_linear) change the curves
        key["cpu_linear"] = linear
        if linear == "invariant":  # and so does a change to treespec's own kernel
            key["cpu_linear_kernel"] = source_digest()
    return json.loads(json.dumps(key))


def effective_context(decoder, context: int, node_counts: Sequence[int], widths: Sequence[int]) -> int:
    """``context``, lowered when the models' context window cannot hold it plus the largest tree /
    frontier measured (the key and the profile record the context actually used)."""
    new = max(max(node_counts, default=1), 1 + max(widths, default=0) if decoder.drafter is not None else 1)
    room = decoder.context_limit - new
    if room < 1:
        raise ValueError(f"the models' context of {decoder.context_limit} tokens cannot hold {new} new tokens "
                         "after a cached prefix; measure smaller node_counts / widths")
    return min(int(context), room)


def _key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def default_cache_dir(decoder=None) -> Path:
    """$TREESPEC_CACHE/costs (or the decoder's ``model.cache_dir``/costs)."""
    cache_dir = getattr(getattr(getattr(decoder, "config", None), "model", None), "cache_dir", None)
    return cache_root(cache_dir) / "costs"


def cost_file(decoder, cache_dir: str | Path | None = None, context: int | None = None,
              node_counts: Sequence[int] | None = None, widths: Sequence[int] | None = None) -> Path:
    """The JSON file a profile for this key lives in: ``<cache_dir>/costs-<hash of key>.json``."""
    return _path_for(cost_key(decoder, context, node_counts, widths), cache_dir, decoder)


def _path_for(key: dict, cache_dir, decoder) -> Path:
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(decoder)
    return cache_dir / f"costs-{_key_hash(key)}.json"


# ---------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn, setup, cleanup, repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Wall ms of ``fn()`` per call (``setup()`` before and ``cleanup()`` after each, untimed)."""
    times = []
    for i in range(warmup + repeats):
        setup()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t0
        cleanup()
        if i >= warmup:
            times.append(1000.0 * dt)
    return times


def random_tree(n: int, vocab: int, generator: torch.Generator) -> DraftTree:
    """A tree of ``n`` nodes (root included) with random parents and tokens; a real tree (not a
    chain) from 3 nodes on, so the verify forward takes the 4-D mask path as tree decoding does."""
    tree = DraftTree.from_root(int(torch.randint(3, vocab, (1,), generator=generator)))
    for i in range(1, n):
        parent = 0 if i <= 2 else int(torch.randint(0, i, (1,), generator=generator))
        tree.add_children(torch.tensor([parent]), torch.randint(3, vocab, (1,), generator=generator), torch.zeros(1))
    return tree


@torch.no_grad()
def profile_costs(decoder, node_counts: Sequence[int] | None = None, widths: Sequence[int] | None = None,
                  context: int | None = None, repeats: int | None = None, warmup: int | None = None,
                  seed: int = 0) -> CostModel:
    """Measure verify ms per tree size N and draft ms per frontier width F with ``decoder``'s models.

    Medians of ``repeats`` timed calls after ``warmup`` untimed ones per point. A decoder without a
    drafter (target only) gets an empty draft curve. The decoder stays usable (its next ``generate``
    prefills everything afresh). Sizes left None come from ``profile_defaults()``.
    """
    d = profile_defaults()
    node_counts = d["node_counts"] if node_counts is None else node_counts
    widths = d["widths"] if widths is None else widths
    context = d["context"] if context is None else context
    repeats = d["repeats"] if repeats is None else repeats
    warmup = d["warmup"] if warmup is None else warmup
    node_counts = sorted({int(n) for n in node_counts})
    widths = sorted({int(w) for w in widths}) if decoder.drafter is not None else []
    if not node_counts or node_counts[0] < 1 or (widths and widths[0] < 1):
        raise ValueError(f"node_counts and widths must be >= 1, got {node_counts} / {widths}")
    if repeats < 1 or warmup < 0 or context < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, context >= 1 (got {repeats}, {warmup}, {context})")
    context = effective_context(decoder, context, node_counts, widths)
    started = time.time()
    target, drafter, device = decoder.target_model, decoder.drafter, decoder.device
    vocab = target.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, context + 1), generator=g).to(device)
    want_hidden = bool(getattr(drafter, "needs_target_hidden", False))

    # Target prefill of ``context`` tokens (hidden states for an EAGLE head, as the decoder asks for).
    cache = new_cache(target)
    out = target(input_ids=ids[:, :context], past_key_values=cache, use_cache=True, logits_to_keep=1,
                 output_hidden_states=want_hidden)
    hidden = target_features(drafter, out)  # [context, F]: what the drafter reads (None: nothing)
    del out

    samples: dict[str, dict[int, list[float]]] = {"verify": {n: [] for n in node_counts}, "draft": {}}
    trees = {n: random_tree(n, vocab, g) for n in node_counts}
    # Round-robin over the sizes (warm-up rounds first): a slow spell of a shared machine then hits
    # every size alike instead of inflating one point of the curve, which would mislead the policy.
    for r in range(warmup + repeats):
        for n in node_counts:
            t = _time_ms(lambda: decoder._target_tree_forward(trees[n], context, cache, want_hidden),
                         setup=lambda: None, cleanup=lambda: keep_tokens(cache, context, []),
                         repeats=1, warmup=0, device=device)
            if r >= warmup:
                samples["verify"][n] += t
            assert cache_length(cache) == context
    del cache

    root = int(ids[0, context])
    root_hidden = hidden[-1:] if hidden is not None else None  # shape stand-in for the root's true feature
    for w in widths:
        state: dict = {}

        def setup():  # fresh draft cache with ``context`` tokens, then the root: context + 1 entries
            drafter.prefill(ids[:, :context], target_hidden=hidden)
            tree = DraftTree.from_root(root)
            drafter.propose(tree, [0])
            kids = tree.add_children(torch.zeros(w, dtype=torch.long), torch.randint(3, vocab, (w,), generator=g),
                                     torch.zeros(w))
            state.update(tree=tree, kids=kids.tolist())

        samples["draft"][w] = _time_ms(
            lambda: drafter.propose(state["tree"], state["kids"]), setup=setup,
            cleanup=lambda: drafter.commit(state["tree"], [0], target_hidden=root_hidden),
            repeats=repeats, warmup=warmup, device=device)

    median = lambda d: {k: statistics.median(v) for k, v in d.items()}  # noqa: E731
    meta = {"repeats": repeats, "warmup": warmup, "seed": seed, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
            "profile_s": round(time.time() - started, 3), "device": str(device),
            "samples_ms": {kind: {str(k): [round(x, 4) for x in v] for k, v in d.items()}
                           for kind, d in samples.items()}}
    return CostModel(verify_ms=median(samples["verify"]), draft_ms=median(samples["draft"]),
                     key=cost_key(decoder, context, node_counts, widths), meta=meta)


# ---------------------------------------------------------------------- the cache
def load_or_profile(decoder, cache_dir: str | Path | None = None, force: bool = False, **kw) -> CostModel:
    """The cached profile for this exact key (``cost_key``), else a fresh ``profile_costs`` written
    (atomically) to ``cost_file``. ``force=True`` always re-measures. ``kw`` goes to ``profile_costs``
    (``node_counts``, ``widths``, ``context`` are part of the key; ``repeats``/``warmup`` are not)."""
    sizes = {k: kw[k] for k in ("context", "node_counts", "widths") if k in kw}
    key = cost_key(decoder, **sizes)
    path = _path_for(key, cache_dir, decoder)
    if not force and path.is_file():
        try:
            cached = CostModel.load(path)
        except (OSError, ValueError, KeyError, TypeError):
            cached = None  # unreadable or corrupt: measure again
        if cached is not None and cached.key == key:
            return cached
    model = profile_costs(decoder, **kw)
    model.key = key
    model.save(path)
    return model


# ---------------------------------------------------------------------- plot
def plot_costs(model: CostModel, path: str | Path, title: str | None = None) -> Path:
    """PNG: verify ms vs N (left) and draft ms vs frontier width (right), medians with min-max bars."""
    from matplotlib.figure import Figure

    path = Path(path)
    samples = model.meta.get("samples_ms", {})
    fig = Figure(figsize=(10, 4), layout="constrained")
    left, right = fig.subplots(1, 2)
    for ax, curve, kind, xlabel in ((left, model.verify_ms, "verify", "N: tree nodes verified (root included)"),
                                    (right, model.draft_ms, "draft", "F: frontier width of one draft level")):
        xs, ys = list(curve), list(curve.values())
        raw = samples.get(kind, {})
        lo = [max(y - min(raw.get(str(x), [y])), 0.0) for x, y in zip(xs, ys)]  # samples are rounded
        hi = [max(max(raw.get(str(x), [y])) - y, 0.0) for x, y in zip(xs, ys)]
        if xs:
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms (median)")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.set_title(f"{kind}: one {'target' if kind == 'verify' else 'draft'} forward")
    key = model.key or {}
    dev = key.get("device", {})
    fig.suptitle(title or f"{dev.get('name', '?')} | {key.get('dtype', '?')} | {key.get('threads', '?')} threads | "
                 f"context {key.get('context', '?')}", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
