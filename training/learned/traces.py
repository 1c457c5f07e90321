"""Verification traces: every drafted node as it looked before verification, and what the target said.

The verify pass computes the target's logits at *every* node, so every drafted node gets a
conditional label, P(accepted | its parent's path accepted), not only the nodes of the accepted path:

    greedy    1 iff the node's token is the target's argmax at its parent
    sampling  min(1, p[x] / q[x]) for independently drawn children (iid / without_replacement;
              for the first draw of a group), p[x] for deterministic top-k children (q = point mass)

and every expanded node u gives an alignment pair (the draft's hidden state its children were
drafted from, the target's final hidden state at the same position).

    <out>/shard-00000.safetensors ...   one per ``shard_prompts`` prompts, written atomically
        features     f32 [M, F]   node features (models/learned/node_features.py; aligned columns 0: they are
                                  recomputed from h_draft with whichever alignment is being studied)
        label        f32 [M]      conditional label (above)
        accepted     u8  [M]      1 iff the node is on the accepted path of its step
        token        i64 [M]      the node's token
        parent_pair  i64 [M]      row of the node's parent in the pair tensors below
        prompt       i64 [M]      index of the prompt (in the shard) the node was drafted for
        h_draft      f16 [P, Hd]  draft hidden state at each expanded node
        h_target     f16 [P, Ht]  the target's final hidden state (input of its lm_head) there
        target_next  i64 [P]      the target's argmax there (its greedy next token)
        draft_next   i64 [P]      the draft's argmax there
      metadata: json (pair identity, feature-spec version, trace config, prompt ids, label kind).

Resumable shard by shard: finished shards are skipped; a shard is written to a temporary file and
renamed, so an interrupted run never leaves a corrupt finished shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from models.checkpoint import fingerprint
from models.config import SpeculativeDecodingConfig
from models.errors import ConfigError, ModelLoadError
from models.learned.node_features import FEATURE_NAMES, FEATURE_SPEC_VERSION
from models.paths import cache_root, repo_path
from speculative_decoder import SpeculativeDecoder
from training.drafts.distill import EVAL_SETS, ensure_named_draft
from training.drafts.teacher_data import read_prompts

log = logging.getLogger(__name__)

TRACE_VERSION = 1
_NODE_KEYS = ("features", "label", "accepted", "token", "parent_pair", "prompt")
# a shard whose trees had no drafted node keeps every key's dtype (indices stay integer)
_EMPTY_NODES = {"features": lambda: torch.zeros(0, len(FEATURE_NAMES)), "label": lambda: torch.zeros(0),
                "accepted": lambda: torch.zeros(0, dtype=torch.uint8), "token": lambda: torch.zeros(0, dtype=torch.long),
                "parent_pair": lambda: torch.zeros(0, dtype=torch.long), "prompt": lambda: torch.zeros(0, dtype=torch.long)}
_PAIR_KEYS = ("h_draft", "h_target", "target_next", "draft_next")


class TraceRecorder:
    """``on_step`` observer for ``SpeculativeDecoder.generate``: collects nodes and pairs."""

    def __init__(self, child_draw: str = "topk"):
        self.child_draw = child_draw
        self.prompt = 0
        self.rows: dict[str, list] = {k: [] for k in _NODE_KEYS + _PAIR_KEYS}
        self.num_pairs = 0

    def __call__(self, rec) -> None:
        tree = rec.tree
        if tree.num_drafted == 0:
            return
        if tree.features is None:
            raise RuntimeError("trace collection needs node features: the decoder was not asked to score nodes")
        logits = rec.target_logits.float()  # [N, V]
        parents = tree.parents[1:].cpu()  # [M]
        tokens = tree.tokens[1:].cpu()
        amax = logits.argmax(-1).cpu()  # [N]
        if rec.to_probs is None:
            label = (tokens == amax[parents]).float()
        else:
            label = torch.empty(len(tokens))
            for j, (u, x) in enumerate(zip(parents.tolist(), tokens.tolist())):
                p = rec.to_probs(logits[u])[x]
                if self.child_draw == "topk":
                    label[j] = p
                else:
                    label[j] = torch.clamp(p / tree.draft_probs[u][x].clamp(min=1e-30), max=1.0)
        on_path = torch.zeros(len(tree), dtype=torch.uint8)
        on_path[rec.path] = 1
        # Alignment pairs: one per expanded node that was verified (the target saw it).
        row_of = {}
        if rec.target_hidden is not None:
            for u, exp in sorted(tree.expansions.items()):
                if exp.hidden is None:
                    continue
                row_of[u] = self.num_pairs + len(row_of)
                self.rows["h_draft"].append(exp.hidden.detach().float().cpu().half())
                self.rows["h_target"].append(rec.target_hidden[u].detach().float().cpu().half())
                self.rows["target_next"].append(int(amax[u]))
                self.rows["draft_next"].append(exp.argmax)
        self.num_pairs += len(row_of)
        self.rows["features"].append(tree.features[1:].float())
        self.rows["label"].append(label)
        self.rows["accepted"].append(on_path[1:])
        self.rows["token"].append(tokens)
        self.rows["parent_pair"].append(torch.tensor([row_of.get(u, -1) for u in parents.tolist()], dtype=torch.long))
        self.rows["prompt"].append(torch.full((len(tokens),), self.prompt, dtype=torch.long))

    def tensors(self) -> dict[str, torch.Tensor]:
        r = self.rows
        out = {k: torch.cat(r[k]) if r[k] else _EMPTY_NODES[k]() for k in _NODE_KEYS}
        if r["h_draft"]:
            out["h_draft"], out["h_target"] = torch.stack(r["h_draft"]), torch.stack(r["h_target"])
        else:
            out["h_draft"] = out["h_target"] = torch.zeros(0, 1, dtype=torch.float16)
        out["target_next"] = torch.tensor(r["target_next"], dtype=torch.long)
        out["draft_next"] = torch.tensor(r["draft_next"], dtype=torch.long)
        return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------- collection
def trace_identity(decoder) -> dict:
    return {"target_identity": fingerprint(decoder.target_model),
            "draft_identity": fingerprint(decoder.drafter.identity_module)}


def cache_key(identity: dict, settings: dict) -> str:
    """Shards are reusable across runs with the same pair and settings (``num_prompts`` excluded:
    raising it extends the data)."""
    keyed = {k: v for k, v in settings.items() if k != "num_prompts"}
    blob = json.dumps([identity["target_identity"]["config_hash"], identity["target_identity"]["signature"][:8],
                       identity["draft_identity"]["config_hash"], identity["draft_identity"]["signature"][:8], keyed],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def shard_path(out_dir: Path, index: int) -> Path:
    return out_dir / f"shard-{index:05d}.safetensors"


def collect(decoder, prompts: list[dict], out_dir: Path, settings: dict, shard_prompts: int,
            max_new_tokens: int, max_prompt_tokens: int, progress: bool = True, tracker=None) -> list[Path]:
    """Run ``decoder`` over ``prompts`` (rows with id, prompt) and write trace shards to ``out_dir``.

    Finished shards are kept (resume); returns every shard path, finished ones included.
    """


    if decoder.config.tree_search.lookup_tokens:
        raise ConfigError("traces record what the draft proposes and how verification decides it; the "
                          "prompt-lookup branch would add nodes the draft never drafted. Fix: set "
                          "tree_search.lookup_tokens=0 for trace collection (configs/collect_traces does)")
    out_dir.mkdir(parents=True, exist_ok=True)
    identity = trace_identity(decoder)
    greedy = decoder.config.decoding.greedy
    meta = {"trace_version": TRACE_VERSION, "feature_spec_version": FEATURE_SPEC_VERSION,
            "feature_names": list(FEATURE_NAMES), "label": "greedy" if greedy else "sampling",
            "settings": settings, **identity}
    chunks = [prompts[i:i + shard_prompts] for i in range(0, len(prompts), shard_prompts)]
    paths = [shard_path(out_dir, i) for i in range(len(chunks))]
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    bar = tqdm(total=len(prompts), initial=(len(chunks) - len(todo)) * shard_prompts if todo else len(prompts),
               desc="collecting traces", unit="prompt", disable=not progress)
    try:
        for i in todo:
            t0 = time.perf_counter()
            recorder = TraceRecorder(decoder.config.tree_search.child_draw)
            ids, skipped, new_tokens, steps = [], 0, 0, 0
            for k, row in enumerate(chunks[i]):
                input_ids = decoder.encode_prompt(row["prompt"])
                if input_ids.shape[1] > max_prompt_tokens:
                    skipped += 1
                    bar.update(1)
                    continue
                recorder.prompt = len(ids)
                ids.append(row["id"])
                _, stats = decoder.generate(input_ids, max_new_tokens=max_new_tokens, on_step=recorder)
                new_tokens += stats.new_tokens
                steps += stats.steps
                bar.update(1)
            tensors = recorder.tensors()
            seconds = time.perf_counter() - t0
            info = dict(meta, prompt_ids=ids, skipped_long_prompts=skipped, nodes=int(tensors["label"].numel()),
                        pairs=int(tensors["target_next"].numel()), new_tokens=new_tokens, steps=steps,
                        seconds=round(seconds, 1))
            tmp = paths[i].with_suffix(".tmp")
            save_file(tensors, str(tmp), metadata={"treespec": json.dumps(info)})
            tmp.replace(paths[i])
            log.info("%s: %d prompts, %d nodes (%.1f%% positive), %d pairs, %.0f s", paths[i].name, len(ids),
                     info["nodes"], 100 * float(tensors["label"].mean()) if info["nodes"] else 0, info["pairs"], seconds)
            if tracker is not None:
                tracker.log({"traces/shard": i, "traces/nodes": info["nodes"], "traces/pairs": info["pairs"],
                             "traces/positive_rate": float(tensors["label"].mean()) if info["nodes"] else 0.0,
                             "traces/seconds": seconds})
    finally:
        bar.close()
    return paths


def load_traces(paths: list[Path] | Path) -> dict:
    """Concatenate trace shards (a directory or a list of files): node tensors, pair tensors with
    ``parent_pair`` rebased, ``prompt`` made globally unique, and ``meta`` (the first shard's, plus
    the prompt ids of all). Refuses corrupt shards and shards of different pairs or spec versions."""
    if isinstance(paths, (str, Path)):
        d = Path(paths)
        if not d.is_dir():
            raise ModelLoadError(f"trace directory {d} does not exist: run scripts/collect_traces.py first")
        paths = sorted(d.glob("shard-*.safetensors"))
    if not paths:
        raise ModelLoadError("no trace shards found: run scripts/collect_traces.py first")
    nodes = {k: [] for k in _NODE_KEYS}
    pairs = {k: [] for k in _PAIR_KEYS}
    meta, prompt_ids, pair_base, prompt_base = None, [], 0, 0
    for p in paths:
        try:
            with safe_open(str(p), framework="pt") as fh:
                part = {k: fh.get_tensor(k) for k in fh.keys()}
                info = json.loads(fh.metadata()["treespec"])
        except Exception as exc:
            raise ModelLoadError(f"trace shard {p} is unreadable ({exc}); delete it and rerun "
                                 "scripts/collect_traces.py to remake it") from exc
        if info.get("feature_spec_version") != FEATURE_SPEC_VERSION or info.get("trace_version") != TRACE_VERSION:
            raise ModelLoadError(f"trace shard {p} has feature-spec/trace version {info.get('feature_spec_version')}/"
                                 f"{info.get('trace_version')}; this treespec uses {FEATURE_SPEC_VERSION}/{TRACE_VERSION}")
        if meta is None:
            meta = info
        elif (info["target_identity"]["config_hash"], info["draft_identity"]["config_hash"]) != \
                (meta["target_identity"]["config_hash"], meta["draft_identity"]["config_hash"]):
            raise ModelLoadError(f"trace shard {p} was made for another model pair than {paths[0]}")
        for k in _NODE_KEYS:
            nodes[k].append(part[k])
        nodes["parent_pair"][-1] = torch.where(part["parent_pair"] >= 0, part["parent_pair"] + pair_base, -1)
        nodes["prompt"][-1] = part["prompt"] + prompt_base
        for k in _PAIR_KEYS:
            pairs[k].append(part[k])
        pair_base += int(part["target_next"].numel())
        prompt_base += len(info["prompt_ids"])
        prompt_ids += info["prompt_ids"]
    out = {k: torch.cat(v) for k, v in {**nodes, **pairs}.items()}
    out["meta"] = dict(meta, prompt_ids=prompt_ids, shards=len(paths))
    return out


def read_prompt_rows(data_dir: Path, files: list[str], seed: int, allow_eval: bool) -> list[dict]:
    """Prompt rows of ``files`` (interleaved, seeded); evaluation sets only with ``allow_eval``."""
    if not files:
        raise ConfigError("collect_traces.files is empty: name at least one JSONL prompt file in data_dir")
    return read_prompts(data_dir, list(files), seed, forbid=() if allow_eval else EVAL_SETS)


def split_by_prompt(prompt: torch.Tensor, fractions: tuple[float, ...], seed: int) -> list[torch.Tensor]:
    """Boolean masks [M] splitting rows by their prompt (never one prompt in two splits): the last
    split takes the rest. Splitting by prompt keeps near-duplicate neighbouring nodes apart."""
    ids = torch.unique(prompt)
    g = torch.Generator().manual_seed(seed)
    ids = ids[torch.randperm(len(ids), generator=g)]
    masks, start = [], 0
    for i, f in enumerate(fractions):
        end = len(ids) if i == len(fractions) - 1 else start + max(1, round(f * len(ids)))
        masks.append(torch.isin(prompt, ids[start:end]))
        start = end
    return masks


def _search_settings(tree_search) -> dict:
    """The trace run's tree search as it enters the cache key; the prompt-lookup keys only when the
    lookup is on, so trace folders made before those keys existed keep their names."""

    d = OmegaConf.to_container(tree_search)
    if not d.get("lookup_tokens"):
        d = {k: v for k, v in d.items() if not k.startswith("lookup_")}
    return d


def run_collect(cfg, tracker=None) -> Path:
    """The pipeline behind scripts/collect_traces.py: decoder with the trace tree, prompts, shards."""

    ensure_named_draft(cfg.model.draft_model_name, cfg.model.cache_dir, cfg.data_dir)
    t = cfg.collect_traces
    merged = OmegaConf.merge(cfg, {"tree_search": OmegaConf.to_container(t.tree_search),
                                   "decoding": {"method": "tree", **OmegaConf.to_container(t.decoding)},
                                   "pruning": OmegaConf.to_container(t.get("pruning") or {"strategy": "none"})})
    decoder = SpeculativeDecoder(SpeculativeDecodingConfig.from_hydra(merged))
    settings = {"files": list(t.files), "seed": int(t.seed), "max_new_tokens": int(t.max_new_tokens),
                "max_prompt_tokens": int(t.max_prompt_tokens), "shard_prompts": int(t.shard_prompts),
                "num_prompts": int(t.num_prompts), "tree_search": _search_settings(merged.tree_search),
                "decoding": OmegaConf.to_container(merged.decoding), "model": OmegaConf.to_container(merged.model),
                "pruning": OmegaConf.to_container(merged.pruning)}
    if t.out_dir:
        out_dir = repo_path(t.out_dir)
    else:
        out_dir = cache_root(cfg.model.cache_dir) / f"traces-{t.tag}-{cache_key(trace_identity(decoder), settings)}"
    rows = read_prompt_rows(repo_path(cfg.data_dir), list(t.files), int(t.seed), bool(t.allow_eval))[: int(t.num_prompts)]
    log.info("tracing %d prompts into %s", len(rows), out_dir)
    collect(decoder, rows, out_dir, settings, int(t.shard_prompts), int(t.max_new_tokens), int(t.max_prompt_tokens),
            tracker=tracker)
    return out_dir
