"""How good and how cheap is a draft: agreement with the target on its own greedy text, latency, speed.

All numbers are on evaluation prompts (Spec-Bench by default) that no training recipe may read:
  agreement       top-1 / top-4 of the first drafted token against the target's greedy next token, at
                  every position of the target's greedy continuations (written once by the fp32
                  target, cached as teacher-format shards)
  per position    a greedy chain of ``chain_depth`` tokens drafted from every position (the draft
                  feeding itself, exactly as in decoding through the ``Drafter`` interface):
                  P(token k right | tokens 1..k-1 right) and P(tokens 1..k all right); the sum of
                  the latter + 1 is the chain's expected tokens per target forward
  latency         median wall time of one draft forward (1 token, and a 3-node frontier) and of one
                  target forward (1 token), both after ``latency_context`` cached tokens
  speed           tau and tokens/s of target-only, chain and tree decoding on a few prompts
Works for any draft the decoder can use: an EAGLE-style head or an HF causal LM.
"""

from __future__ import annotations

import statistics
import time

import torch
from omegaconf import OmegaConf

from models.decoding.drafter import Drafter, target_features
from models.decoding.kv_cache import keep_tokens, new_cache
from models.decoding.tree import DraftTree
from models.io.loading import resolve_model_path
from models.paths import cache_root, repo_path
from training.drafts import teacher_data
from training.drafts.train import ensure_teacher
from training.jsonl import read_jsonl


@torch.no_grad()
def chain_agreement(drafter: Drafter, data: dict, depth: int, device, groups: list[str] | None = None) -> dict:
    """Agreement of drafted chains with the target's greedy continuations (see module doc).

    ``groups`` (one label per sequence, e.g. the prompt category) adds top-1 agreement per label."""
    needs_hidden = getattr(drafter, "needs_target_hidden", False)
    key = "features" if getattr(drafter, "feature_layers", None) else "hidden"
    if needs_hidden and key not in data:
        raise ValueError("the draft reads the target's states at several layers (feature_layers) but the "
                         "continuations carry only the final ones: make them with eval_continuations(cfg, "
                         "feature_layers=...)")
    right = [0] * depth  # chains whose first k+1 tokens are all right
    reach = [0] * depth  # chains that drafted token k+1 (tokens 1..k right, and the text goes on)
    avail = [0] * depth  # positions with at least k+1 tokens of text after them
    top1 = top4 = positions = 0
    by_group: dict[str, list[int]] = {}
    for s in range(len(data["prompt_lens"])):
        hits_before, pos_before = top1, positions
        a, b = int(data["offsets"][s]), int(data["offsets"][s + 1])
        ids = data["input_ids"][a:b].long().to(device)
        feats = data[key][a:b].float().to(device)
        p = int(data["prompt_lens"][s])
        drafter.prefill(ids[:p].unsqueeze(0), target_hidden=feats[:p] if needs_hidden else None)
        for i in range(p, len(ids) - 1):  # root x_i (already the target's); the draft guesses x_{i+1}..
            tree = DraftTree.from_root(int(ids[i]))
            logits = drafter.propose(tree, [0])[0]
            top = logits.topk(4).indices
            want = ids[i + 1:i + 1 + depth].tolist()
            top1 += int(top[0] == want[0])
            top4 += int(want[0] in top.tolist())
            positions += 1
            for k in range(len(want)):
                avail[k] += 1
            node, guess = 0, int(top[0])
            for k in range(len(want)):
                reach[k] += 1
                if guess != want[k]:
                    break
                right[k] += 1
                if k + 1 == len(want):
                    break
                node = int(tree.add_children(torch.tensor([node]), torch.tensor([guess]), torch.zeros(1))[0])
                guess = int(drafter.propose(tree, [node])[0].argmax())
            drafter.commit(tree, [0], target_hidden=feats[i:i + 1] if needs_hidden else None)
        if groups is not None:
            g = by_group.setdefault(groups[s], [0, 0])
            g[0] += top1 - hits_before
            g[1] += positions - pos_before
    n = max(positions, 1)
    cumulative = [r / a if a else 0.0 for r, a in zip(right, avail)]
    conditional = [r / c if c else 0.0 for r, c in zip(right, reach)]
    return {"positions": positions, "top1": top1 / n, "top4": top4 / n, "chain_all_right": cumulative,
            "chain_conditional": conditional, "chain_expected_tokens": 1 + sum(cumulative),
            "top1_by_group": {k: {"top1": h / max(t, 1), "positions": t} for k, (h, t) in sorted(by_group.items())}}


def eval_continuations(cfg, feature_layers=None) -> tuple[dict, list[str]]:
    """The fp32 target's greedy continuations of ``cfg.eval_draft``'s prompts (written once, cached as
    teacher-format shards in $TREESPEC_CACHE/evalset-<hash>/) and each sequence's prompt category.
    ``feature_layers`` (an EAGLE-3 style draft's) also stores the target's states at those layers."""

    e, m = cfg.eval_draft, cfg.model
    target_dir = resolve_model_path(m.target_model_name, m.cache_dir)
    tcfg = OmegaConf.create(dict(files=[e.prompt_file], num_prompts=e.num_prompts, shard_prompts=e.num_prompts,
                                 batch_size=e.batch_size, max_new_tokens=e.max_new_tokens,
                                 max_prompt_tokens=e.max_prompt_tokens, top_k=4, dtype="float32", seed=e.seed,
                                 feature_layers=list(feature_layers) if feature_layers else None))
    shards = ensure_teacher(target_dir, m.target_model_name, tcfg, repo_path(cfg.data_dir), cache_root(m.cache_dir),
                            m.device, prefix="evalset", forbid=(), cpu_linear=m.cpu_linear)
    data = teacher_data.load_shards(shards)
    rows = read_jsonl(repo_path(cfg.data_dir) / e.prompt_file, ("id", "prompt"), hint="data_dir, eval_draft.prompt_file")
    category = {r["id"]: r.get("category", "") for r in rows}
    return data, [category.get(pid, "") for meta in data["meta"] for pid in meta["prompt_ids"]]


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@torch.no_grad()
def latency(target, drafter: Drafter, context: int, repeats: int, vocab: int, seed: int = 0) -> dict:
    """Median ms of one target forward (1 token) and draft forwards (1 token; a 3-node frontier)."""
    device = next(target.parameters()).device
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (1, context + 1), generator=g).to(device)
    needs_hidden = getattr(drafter, "needs_target_hidden", False)
    cache = new_cache(target)
    out = target(input_ids=ids[:, :context], past_key_values=cache, use_cache=True, output_hidden_states=needs_hidden)
    hidden = target_features(drafter, out)

    def target_step():
        target(input_ids=ids[:, context:], past_key_values=cache, use_cache=True)
        keep_tokens(cache, context, [])

    target_ms = _median_ms(target_step, repeats)
    drafter.prefill(ids[:, :context], target_hidden=hidden)
    root = int(ids[0, context])
    tree = DraftTree.from_root(root)
    drafter.propose(tree, [0])  # pending prompt pairs fed once; from here on one pair per root
    last = hidden[-1:] if needs_hidden else None
    drafter.commit(tree, [0], target_hidden=last)

    def draft_root():
        t = DraftTree.from_root(root)
        drafter.propose(t, [0])
        drafter.commit(t, [0], target_hidden=last)

    def draft_frontier():
        t = DraftTree.from_root(root)
        drafter.propose(t, [0])
        kids = t.add_children(torch.zeros(3, dtype=torch.long), torch.tensor([5, 6, 7]), torch.zeros(3))
        drafter.propose(t, kids.tolist())
        drafter.commit(t, [0], target_hidden=last)

    # Each draft call above also feeds the previous step's root pair (as in decoding); the context
    # grows by one pair per call, which is negligible next to ``context``.
    root_ms = _median_ms(draft_root, repeats)
    both_ms = _median_ms(draft_frontier, repeats)
    return {"target_ms": target_ms, "draft_ms": root_ms, "draft_frontier3_ms": max(both_ms - root_ms, 0.0),
            "draft_over_target": root_ms / target_ms}
