"""Where one target forward goes: the linear layers against everything else (norms, rotary, attention,
the KV cache, Python and framework dispatch).

    forward_breakdown(target, new_tokens=[1, 8], context=200, repeats=15, warmup=3)

times a forward over ``n`` new tokens after ``context`` cached tokens (medians, the cache cropped back
after each call), then the same with every ``nn.Linear`` replaced by an empty output of the right
shape: what remains is the forward without its matrix products; the difference is theirs.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager

import torch

from models.decoding.kv_cache import keep_tokens, new_cache


@contextmanager
def linears_skipped(model: torch.nn.Module):
    """Every nn.Linear of ``model`` returns an uninitialised tensor of its output shape (no product)."""
    saved = []
    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            saved.append((module, module.__dict__.get("forward")))
            out = module.out_features
            module.forward = lambda x, out=out: x.new_empty(*x.shape[:-1], out)
    try:
        yield
    finally:
        for module, forward in saved:
            if forward is None:
                del module.forward
            else:
                module.forward = forward


@torch.no_grad()
def _median_ms(model, ids: torch.Tensor, cache, context: int, repeats: int, warmup: int) -> float:
    pos = torch.arange(context, context + ids.shape[1], device=ids.device).unsqueeze(0)
    times = []
    for r in range(warmup + repeats):
        t0 = time.perf_counter()
        model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
        if ids.device.type == "cuda":
            torch.cuda.synchronize()
        if r >= warmup:
            times.append(1000 * (time.perf_counter() - t0))
        keep_tokens(cache, context, [])
    return statistics.median(times)


@torch.no_grad()
def forward_breakdown(target, new_tokens, context: int, repeats: int, warmup: int, seed: int = 0) -> dict:
    """{n: {"forward_ms", "without_linear_ms", "linear_ms", "rest_share"}} for each n in ``new_tokens``."""
    device = next(target.parameters()).device
    vocab = target.get_output_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randint(3, vocab, (1, context), generator=g).to(device)
    cache = new_cache(target)
    target(input_ids=prefix, past_key_values=cache, use_cache=True, logits_to_keep=1)
    out = {}
    for n in new_tokens:
        ids = torch.randint(3, vocab, (1, int(n)), generator=g).to(device)
        full = _median_ms(target, ids, cache, context, repeats, warmup)
        with linears_skipped(target):
            rest = _median_ms(target, ids, cache, context, repeats, warmup)
        out[int(n)] = {"forward_ms": round(full, 3), "without_linear_ms": round(rest, 3),
                       "linear_ms": round(full - rest, 3), "rest_share": round(rest / full, 3) if full else None}
    return out
