"""SpeculativeDecoder: lossless tree speculative decoding for any pair of HF causal LMs.

    from speculative_decoder import SpeculativeDecoder, SpeculativeDecodingConfig
    decoder = SpeculativeDecoder(SpeculativeDecodingConfig())        # the demo pair
    ids, stats = decoder.generate(input_ids, max_new_tokens=128)     # ids: [1, prompt + new]
    text = decoder.generate_text("Why is the sky blue?")
    for piece in decoder.stream("Tell me a story"): print(piece, end="")

One decode step (``_decode``), as in DESIGN.md section 2:
  0. prefill the target and the draft; the target's last logits give the first root token
  1. draft a tree under the root (one draft forward per level, tree mask, draft KV cache)
  2. align + predict, inside the search as nodes are drafted (``NodeScorer``): node features, the
     aligned distribution, P(accept | parent accepted); ``rank_by=predictor`` ranks nodes by it
  3. prune: ``TreePruner`` keeps the nodes worth verifying (closed under ancestors)
  4. verify: one target forward over root + nodes (4-D mask + position_ids); greedy or rejection sampling
  5. commit: both caches keep prefix + accepted path; the emitted next token becomes the new root
  6. stop on EOS inside the emitted tokens, at max_new_tokens exactly, or at the context limit
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator

import torch

from models.config import SpeculativeDecodingConfig
from models.decoding.drafter import Drafter, HFDrafter, target_features
from models.decoding.kv_cache import (
    attention_layout,
    cache_length,
    keep_tokens,
    new_cache,
)
from models.decoding.lookup import PromptLookup, add_lookup_branch, next_lookup_span
from models.decoding.prompts import prompt_ids
from models.decoding.sampling import logits_to_probs
from models.decoding.tree import DraftTree
from models.decoding.tree_search import DraftTreeSearch, TreeShape
from models.decoding.verification import verify_greedy, verify_sampling
from models.errors import ConfigError, InputError, ModelLoadError, NumericalError
from models.io.loading import (  # noqa: F401
    check_device,
    check_same_vocabulary,
    context_length,
    eos_token_ids,
    load_draft,
    load_model,
    load_tokenizer,
    module_device,
    resolve_checkpoint,
    resolve_model_path,
)
from models.decoding.context import StepContext
from models.learned.node_scorer import NodeScorer

__all__ = ["SpeculativeDecoder", "SpeculativeDecodingConfig", "GenerationStats", "load_model", "load_tokenizer"]

PHASES = ("prefill", "draft", "score", "prune", "verify", "commit", "other")


@dataclass
class GenerationStats:
    """What one ``generate`` call did. ``as_dict()`` adds the derived metrics (DESIGN.md section 7)."""

    method: str
    prompt_tokens: int = 0
    new_tokens: int = 0
    target_forwards: int = 0  # prefill included
    steps: int = 0  # verify forwards (each emits accepted drafts + one target token)
    drafted_tokens: int = 0  # tree nodes sent to verification, roots excluded
    nodes_drafted: int = 0  # tree nodes the draft proposed, before pruning
    accepted_tokens: int = 0  # drafted tokens the target kept
    draft_forwards: int = 0
    lookup_nodes: int = 0  # verified nodes the prompt-lookup branch added (tree_search.lookup_tokens)
    lookup_accepted: int = 0  # accepted tokens that only the lookup branch proposed
    # Sum over verified nodes of their path probability (predicted when a predictor is loaded, else
    # the draft's own): what the tree policy expected to be accepted; compare with accepted_tokens.
    expected_accepted: float = 0.0
    # Per depth d = 1, 2, ... (index d - 1), counted over verify steps: steps that accepted a token
    # at d (a path cut by EOS counts up to the EOS); steps whose accepted path reached d - 1 and
    # whose node there had a verified child (the target could accept at d); steps that verified a
    # node at d. acceptance at depth d = accepted / reachable.
    accepted_per_depth: list[int] = field(default_factory=list)
    reachable_per_depth: list[int] = field(default_factory=list)
    verified_per_depth: list[int] = field(default_factory=list)
    time_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    stop_reason: str = ""

    @property
    def total_time_s(self) -> float:
        return sum(self.time_s.values())

    @property
    def mean_accepted_length(self) -> float:
        """tau: tokens emitted per verify step, the target's own token counted (1.0 for target-only)."""
        return (self.new_tokens - 1) / self.steps if self.steps else 1.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else 0.0

    @property
    def pruned_fraction(self) -> float:
        """Share of drafted nodes the pruner cut before verification (the prompt-lookup branch's own nodes,
        verified but never drafted, are not counted)."""
        return 1 - (self.drafted_tokens - self.lookup_nodes) / self.nodes_drafted if self.nodes_drafted else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_time_s if self.total_time_s > 0 else 0.0

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(mean_accepted_length=self.mean_accepted_length, acceptance_rate=self.acceptance_rate,
                 pruned_fraction=self.pruned_fraction,
                 tokens_per_s=self.tokens_per_s, total_time_s=self.total_time_s)
        return d


@dataclass
class StepRecord:
    """What one verification saw, for observers (``generate(..., on_step=...)``; trace collection).

    tree: the verified tree (features when scored); target_logits [N, V] and target_hidden [N, Ht]
    at every node; path / next_token: what verification decided; to_probs: the sampling processor
    (None when greedy); drafted: the tree as drafted, before pruning (``tree`` itself when nothing
    was pruned; ``tree.origin`` maps verified nodes back to it).
    """

    tree: DraftTree
    target_logits: torch.Tensor
    target_hidden: torch.Tensor | None
    path: list[int]
    next_token: int
    to_probs: object
    context: StepContext
    drafted: DraftTree | None = None


class _Timer:
    """Accumulates wall time per phase; synchronises CUDA so that GPU time lands in its phase."""

    def __init__(self, stats: GenerationStats, device: torch.device):
        self.stats, self.cuda = stats, device.type == "cuda"
        self.t = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.stats.time_s[phase] += now - self.t
        self.t = now

    def move(self, src: str, dst: str, seconds: float) -> None:
        """Re-book ``seconds`` already counted in phase ``src`` to phase ``dst``."""
        self.stats.time_s[src] -= seconds
        self.stats.time_s[dst] += seconds

    def pause_until_resumed(self) -> None:
        """Call after a ``yield``: the consumer's time (e.g. detokenizing a stream) is not ours."""
        self.t = time.perf_counter()


def _finite(logits: torch.Tensor, where: str) -> torch.Tensor:
    """The target's logits, refused when any is NaN or inf: greedy would pick an arbitrary token
    and sampling would fail somewhere less clear."""
    if not bool(torch.isfinite(logits).all()):
        bad = "NaN" if bool(torch.isnan(logits).any()) else "inf"
        raise NumericalError(f"the target's logits contain {bad} ({where}, dtype {logits.dtype}); usually an "
                             "overflow in reduced precision: try model.dtype=bfloat16 or float32")
    return logits


class SpeculativeDecoder:
    def __init__(self, config: SpeculativeDecodingConfig | None = None):
        """Load ``config.model.*`` (the demo pair by default) and build the decoder."""
        config = config or SpeculativeDecodingConfig()
        m = config.model
        check_device(m.device, m.dtype)  # before loading anything
        target_path = resolve_model_path(m.target_model_name, m.cache_dir)
        tokenizer = load_tokenizer(target_path)
        target = load_model(target_path, m.device, m.dtype, m.attn_implementation, m.cpu_linear)
        draft = None
        if m.draft_model_name and config.decoding.method != "target_only":
            draft = load_draft(resolve_model_path(m.draft_model_name, m.cache_dir), target, m)
        self._setup(target, draft, tokenizer, config)

    @classmethod
    def from_models(cls, target, draft, tokenizer=None, config: SpeculativeDecodingConfig | None = None) -> "SpeculativeDecoder":
        """Wrap already-loaded models. ``draft`` is an HF causal LM, a ``Drafter``, or None (target only)."""
        self = cls.__new__(cls)
        self._setup(target, draft, tokenizer, config or SpeculativeDecodingConfig())
        return self

    def _setup(self, target, draft, tokenizer, config: SpeculativeDecodingConfig) -> None:
        self.config = config
        self.target_model = target.eval()
        self.target_layout = attention_layout(target)  # windows for tree masks; refuses what we cannot mask
        self.tokenizer = tokenizer
        self.draft_model = draft.eval() if isinstance(draft, torch.nn.Module) else None
        self.drafter: Drafter | None = HFDrafter(self.draft_model) if self.draft_model is not None else draft
        if config.decoding.method != "target_only" and self.drafter is None:
            raise ConfigError(f"decoding.method={config.decoding.method!r} needs a draft model "
                              "(model.draft_model_name, or a draft passed to from_models)")
        if self.draft_model is not None:
            check_same_vocabulary(target, self.draft_model)
        self.device = next(target.parameters()).device
        head = target.get_output_embeddings()
        self.vocab_size = int(head.weight.shape[0]) if head is not None else int(target.config.vocab_size)
        draft_device = module_device(self.drafter) if self.drafter is not None else None
        if draft_device is not None and draft_device != self.device:
            raise ConfigError(f"the draft is on {draft_device} and the target on {self.device}: both must be on one "
                              "device (model.device; or .to() both before from_models)")
        self.context_limit = min(context_length(target), context_length(self.draft_model)) if self.draft_model is not None \
            else context_length(target)
        self.eos_ids = eos_token_ids(target, tokenizer)
        self.last_stats: GenerationStats | None = None
        self.last_ids: torch.Tensor | None = None  # stream(): the ids of the last call
        self._learned_key, self._learned_cache = None, {}
        self._sync_learned()

    def _sync_learned(self) -> None:
        """(Re)load the alignment and predictor when the config names others than those loaded
        (configs are changed in place; null unloads)."""
        key = (self.config.affine_alignment.alignment_checkpoint, self.config.acceptance_predictor.checkpoint,
               self.config.model.draft_model_name)
        if key != self._learned_key:
            self.alignment, self.predictor = self._load_learned(self.config)
            self._learned_key = key

    def _load_learned(self, config: SpeculativeDecodingConfig):
        """The alignment and acceptance predictor named in the config, checked against this pair."""
        from models.learned.acceptance_predictor import load_predictor
        from models.learned.affine_alignment import load_alignment

        if self.drafter is None:
            return None, None
        loaded = {}
        for kind, name, load in (("alignment", config.affine_alignment.alignment_checkpoint, load_alignment),
                                 ("predictor", config.acceptance_predictor.checkpoint, load_predictor)):
            if not name:
                loaded[kind] = None
                continue
            path = resolve_checkpoint(name, kind, config.model.draft_model_name)
            if (kind, path) not in self._learned_cache:  # loaded once per decoder, checked against the pair
                self._learned_cache[kind, path] = load(path, target=self.target_model,
                                                       draft=self.drafter.identity_module, device=self.device)
            loaded[kind] = self._learned_cache[kind, path]
        if loaded["predictor"] is not None and loaded["predictor"].uses_alignment and loaded["alignment"] is None:
            raise ConfigError(f"the acceptance predictor {config.acceptance_predictor.checkpoint} reads aligned "
                              "features: also set affine_alignment.alignment_checkpoint (e.g. affine_alignment=demo)")
        return loaded["alignment"], loaded["predictor"]

    # ------------------------------------------------------------------ public API
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int | None = None, on_step=None,
                 **overrides) -> tuple[torch.Tensor, GenerationStats]:
        """Generate up to ``max_new_tokens`` after ``input_ids`` [1, T] (or [T]).

        Returns ``(ids [1, T + new], stats)``. ``overrides`` replace ``config.decoding`` fields for
        this call (``method``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``).
        ``on_step`` (optional) is called with a ``StepRecord`` after every verification.
        """
        for ids, self.last_stats in self._run(input_ids, max_new_tokens, overrides, on_step):
            pass
        return ids, self.last_stats

    def generate_text(self, prompt: str, max_new_tokens: int | None = None, **overrides) -> str:
        """The new text only (chat template applied when the tokenizer has one and the config says so)."""
        return "".join(self.stream(prompt, max_new_tokens, **overrides))

    def stream(self, prompt: str, max_new_tokens: int | None = None, **overrides) -> Iterator[str]:
        """Yield text pieces as tokens are committed (incremental detokenization)."""
        input_ids = self.encode_prompt(prompt)
        start, shown = input_ids.shape[1], ""
        for ids, self.last_stats in self._run(input_ids, max_new_tokens, overrides):
            self.last_ids = ids  # prompt + everything committed so far, [1, T + new]
            text = self.tokenizer.decode(ids[0, start:], skip_special_tokens=True)
            if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the rest
                continue
            if len(text) > len(shown):
                yield text[len(shown):]
                shown = text
        text = self.tokenizer.decode(ids[0, start:], skip_special_tokens=True)
        if len(text) > len(shown):  # whatever was held back at the very end
            yield text[len(shown):]

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Prompt text -> input_ids [1, T], through the chat template when there is one."""
        if self.tokenizer is None:
            raise ConfigError("text generation needs a tokenizer (pass one to from_models)")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError("empty prompt: give at least one non-whitespace character")
        ids = prompt_ids(self.tokenizer, prompt, self.config.decoding.use_chat_template)
        return torch.tensor([ids], dtype=torch.long)

    # ------------------------------------------------------------------ the decode loop
    def _run(self, input_ids, max_new_tokens, overrides, on_step=None) -> Iterator[tuple[torch.Tensor, GenerationStats]]:
        self.config.validate()  # configs are changed in place: check at use, not only when built
        self._sync_learned()
        cfg = self._decoding(overrides)
        max_new = cfg.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if max_new < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new}")
        input_ids = self._check_input(input_ids)
        prompt = input_ids[0].tolist()
        out = list(prompt)
        for emitted, stats in self._decode(input_ids, max_new, cfg, on_step):
            out += emitted
            yield torch.tensor([out], dtype=torch.long), stats

    def _decode(self, input_ids: torch.Tensor, max_new: int, cfg, on_step=None) -> Iterator[tuple[list[int], GenerationStats]]:
        """Yields (tokens emitted by this step, running stats) until a stop condition."""
        stats = GenerationStats(method=cfg.method, prompt_tokens=input_ids.shape[1])
        pruner = self._pruner() if cfg.method == "tree" else None  # may profile costs once: before the clock
        timer = _Timer(stats, self.device)
        generator = None
        to_probs = None
        if not cfg.greedy:
            generator = torch.Generator(device=self.device)  # its own: the global RNG is untouched
            if cfg.seed is None:
                generator.seed()  # fresh, non-deterministic randomness per call (as HF generate)
            else:
                generator.manual_seed(cfg.seed)
            to_probs = partial(logits_to_probs, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
        search = self._search(cfg, to_probs, features=on_step is not None) if cfg.method != "target_only" else None
        scored = search is not None and search.scorer is not None
        if pruner is not None:
            # Stop drafting deeper once the pruner would cut (or not pay for) every node of the next level.
            search.stop_rule = lambda tree, frontier, widths: pruner.stop_drafting(
                tree, frontier, pruner.cost.draft_total(widths) if pruner.cost is not None else 0.0, search.random_draws)
        limit = min(max_new, self.context_limit - input_ids.shape[1])  # new tokens we may emit
        t = self.config.tree_search
        lookup_tokens = t.lookup_tokens if search is not None else 0
        lookup = PromptLookup(input_ids[0].tolist(), t.lookup_max_ngram, t.lookup_min_ngram) if lookup_tokens else None
        span = lookup_tokens  # copy mode: grows while whole copies are accepted (tree_search.lookup_max_tokens)

        # 0. Prefill: the target's last logits give the first token (the first root).
        cache = new_cache(self.target_model)
        # A feature-conditioned draft (EAGLE style) reads the target's final hidden states.
        want_hidden = search is not None and (getattr(self.drafter, "needs_target_hidden", False) or on_step is not None)
        with torch.no_grad():
            out = self.target_model(input_ids=input_ids.to(self.device), past_key_values=cache, use_cache=True,
                                    logits_to_keep=1, output_hidden_states=want_hidden)
        logits = _finite(out.logits[0, -1], "prefill")  # [V]
        root = int(logits.argmax()) if to_probs is None else int(torch.multinomial(to_probs(logits), 1, generator=generator))
        context = self._context(logits, to_probs, 0) if scored else None
        if search is not None:  # [T, F]: what the drafter reads of the target (None for an independent draft)
            self.drafter.prefill(input_ids.to(self.device), target_hidden=target_features(self.drafter, out))
        del out
        at_limit = "max_new_tokens" if max_new <= self.context_limit - input_ids.shape[1] else "context"
        first, stats.stop_reason = self._truncate([root], 0, limit, at_limit)
        if lookup is not None:
            lookup.extend(first)
        stats.target_forwards, stats.new_tokens = 1, 1
        timer.lap("prefill")
        yield first, stats
        timer.pause_until_resumed()
        while not stats.stop_reason:
            # 1. Draft a tree under the root; never deeper than what may still be emitted.
            room = limit - stats.new_tokens - 1  # draft tokens that could still be emitted
            depth = min(search.shape.max_depth, room) if search is not None else 0
            if depth > 0:
                scored_s = search.scorer.seconds if scored else 0.0
                tree = search.grow(self.drafter, root, depth, generator, context)
                stats.draft_forwards += search.levels_run
                timer.lap("draft")
                if scored:  # 2. align + predict ran inside the search: book it as its own phase
                    timer.move("draft", "score", search.scorer.seconds - scored_s)
            else:
                tree = DraftTree.from_root(root)
                timer.lap("draft")
            # 3. Prune: the sub-tree worth verifying (closed under ancestors).
            drafted = tree
            stats.nodes_drafted += tree.num_drafted
            if pruner is not None and tree.num_drafted:
                draft_ms = pruner.cost.draft_total(search.level_widths) if pruner.cost is not None else 0.0
                pruned = pruner.prune(tree, search.random_draws, draft_ms)
                tree, expected = pruned.tree, pruned.expected
                timer.lap("prune")
            else:  # what the verified nodes are expected to yield: the sum of their path probabilities
                expected = float(tree.path_probs()[1:].sum()) if tree.num_drafted else 0.0
            policy_nodes = len(tree)  # the nodes the policy chose; a lookup branch is appended after them
            copy = []
            if lookup is not None and room > 0:
                copy = lookup.propose(min(span, room))
                added = add_lookup_branch(tree, copy)
                stats.lookup_nodes += added
                timer.lap("draft")
            # 4. Verify: one target forward over root + nodes.
            prefix = cache_length(cache)
            logits, hidden, feats = self._target_tree_forward(tree, prefix, cache, want_hidden)  # [N, V], [N, H], [N, F]
            _finite(logits, f"verify step {stats.steps + 1}")
            if to_probs is None:
                path, nxt = verify_greedy(tree, logits)
            else:
                path, nxt = verify_sampling(tree, logits, to_probs, search.child_draw if search else "topk", generator)
            timer.lap("verify")
            policy_accepted = sum(1 for n in path[1:] if n < policy_nodes)
            if pruner is not None and policy_nodes > 1:
                pruner.observe(expected, policy_accepted, search.random_draws)
            step_context = context
            if scored:  # what the next step's features know: the target's distribution here
                context = self._context(logits[path[-1]], to_probs, len(path) - 1)
            if on_step is not None:
                on_step(StepRecord(tree, logits, hidden, path, nxt, to_probs, step_context, drafted))
            # 5. Commit: both caches keep prefix + accepted path; nxt is the next root.
            keep_tokens(cache, prefix, path)
            if search is not None:
                self.drafter.commit(tree, path, target_hidden=feats[path] if feats is not None else None)
            timer.lap("commit")
            emitted = tree.tokens[path[1:]].tolist() + [nxt]
            # 6. Stop conditions (truncate after EOS or at the limit), then record.
            emitted, stats.stop_reason = self._truncate(emitted, stats.new_tokens, limit, at_limit)
            self._record(stats, tree, path, emitted, expected)
            if lookup is not None:
                stats.lookup_accepted += min(len(path) - 1, len(emitted)) - min(policy_accepted, len(emitted))
                lookup.extend(emitted)
                span = next_lookup_span(span, copy, tree.tokens[path[1:]].tolist(), lookup_tokens, t.lookup_max_tokens)
            root = nxt
            timer.lap("other")
            yield emitted, stats
            timer.pause_until_resumed()

    def _target_tree_forward(self, tree: DraftTree, prefix: int, cache, want_hidden: bool = False):
        ids = tree.tokens.unsqueeze(0).to(self.device)  # [1, N]
        pos = tree.position_ids(prefix).to(self.device)  # [1, N]
        chain = bool((tree.parents[1:] == torch.arange(len(tree) - 1)).all())
        # A chain gets HF's own causal (sliding-window) mask: the cache holds every position.
        mask = None if chain else tree.attention_mask(prefix, self.target_model.dtype, self.target_layout.windows,
                                                      self.device)
        with torch.no_grad():
            out = self.target_model(input_ids=ids, position_ids=pos, attention_mask=mask,
                                    past_key_values=cache, use_cache=True, output_hidden_states=want_hidden)
        if not want_hidden:
            return out.logits[0], None, None
        return out.logits[0], out.hidden_states[-1][0], target_features(self.drafter, out)  # [N, V], [N, H], [N, F]

    def _truncate(self, emitted: list[int], produced: int, limit: int, at_limit: str) -> tuple[list[int], str]:
        """Cut ``emitted`` after the first EOS or where ``produced + kept`` reaches ``limit``.

        Returns the tokens to keep and the stop reason ("" to go on).
        """
        if self.eos_ids and self.config.decoding.stop_on_eos:
            hit = next((i for i, t in enumerate(emitted) if t in self.eos_ids), None)
            if hit is not None and produced + hit + 1 <= limit:
                return emitted[: hit + 1], "eos"
        if produced + len(emitted) >= limit:
            return emitted[: limit - produced], at_limit
        return emitted, ""

    def _record(self, stats: GenerationStats, tree: DraftTree, path: list[int], emitted: list[int],
                expected: float) -> None:
        stats.steps += 1
        stats.target_forwards += 1
        stats.new_tokens += len(emitted)
        stats.drafted_tokens += tree.num_drafted
        stats.expected_accepted += expected
        accepted = min(len(path) - 1, len(emitted))
        stats.accepted_tokens += accepted
        reachable = accepted
        if accepted == len(path) - 1 and bool((tree.parents == path[-1]).any()):
            reachable += 1  # the target rejected every verified child of the last accepted node
        for counts, depth in ((stats.accepted_per_depth, accepted), (stats.reachable_per_depth, reachable),
                              (stats.verified_per_depth, tree.max_depth)):
            counts.extend([0] * (depth - len(counts)))
            for d in range(depth):
                counts[d] += 1

    # ------------------------------------------------------------------ helpers
    def _decoding(self, overrides: dict):
        cfg = self.config.decoding
        if overrides:
            unknown = set(overrides) - set(asdict(cfg))
            if unknown:
                raise ConfigError(f"unknown decoding option(s) {sorted(unknown)}; known: {sorted(asdict(cfg))}")
            cfg = type(cfg)(**{**asdict(cfg), **overrides})
        if cfg.method != "target_only" and self.drafter is None:
            raise ConfigError(f"decoding.method={cfg.method!r} needs a draft model")
        return cfg

    def _search(self, cfg, to_probs, features: bool = False) -> DraftTreeSearch:
        """The tree search for this call; it scores nodes when a predictor/alignment is in use or
        ``features`` is asked for (trace collection)."""
        t = self.config.tree_search
        if cfg.method == "chain":
            shape = TreeShape("static", t.max_depth, 1, t.max_depth, [1] * t.max_depth)
        else:
            shape = TreeShape(t.mode, t.max_depth, t.max_candidates, t.max_nodes, list(t.branching))
        scorer = None
        from_aligned = self.config.affine_alignment.draft_from_aligned
        if self.predictor is not None or features or from_aligned:
            lm_head = self.target_model.get_output_embeddings().weight
            scorer = NodeScorer(self.alignment, self.predictor, lm_head, from_aligned)
        rank_by = t.rank_by if cfg.method == "tree" else "draft"
        search = DraftTreeSearch(shape, to_probs, t.child_draw, scorer, rank_by)
        search.vocab_size = self.vocab_size
        return search

    def _pruner(self):
        """A fresh TreePruner per generate call (its adaptive state starts over, so a seeded call
        is reproducible); the cost profile is loaded or measured once per decoder."""
        from models.policy.tree_pruner import TreePruner

        p = self.config.pruning
        if p.strategy == "none":
            return None
        cost = None
        if p.strategy == "cost_aware":
            cost = self._cost_model(p.cost_profile)
        return TreePruner(p, cost)

    def _cost_model(self, path: str | None):
        from models.kernels.fast_linear import linear_kernel

        key = ("cost", path, linear_kernel(self.target_model))  # the kernel changes the curves
        if key not in self._learned_cache:
            from models.policy.cost_model import CostModel
            from models.policy.cost_profile import NODE_COUNTS, WIDTHS, load_or_profile

            if path:
                try:
                    self._learned_cache[key] = CostModel.load(Path(path).expanduser())
                except (OSError, ValueError, KeyError, TypeError) as e:
                    raise ModelLoadError(f"cost profile {path} is unreadable: {e}; remake it with "
                                         "scripts/profile_costs.py") from None
            else:
                from models.paths import cache_root

                # sizes that fit a short context window beside a cached prefix (the curves extrapolate)
                room = max(1, self.context_limit // 2)
                sizes = dict(node_counts=[n for n in NODE_COUNTS if n <= room] or [1],
                             widths=[w for w in WIDTHS if w + 1 <= room] or [1])
                self._learned_cache[key] = load_or_profile(self, cache_root(self.config.model.cache_dir) / "costs", **sizes)
        return self._learned_cache[key]

    @staticmethod
    def _context(logits: torch.Tensor, to_probs, accepted: int) -> StepContext:
        """Step context from the target's logits [V] at the position that produced the next root."""
        p = torch.softmax(logits.float(), dim=-1) if to_probs is None else to_probs(logits)
        return StepContext.from_probs(p, accepted)

    def _check_input(self, input_ids) -> torch.Tensor:
        input_ids = torch.as_tensor(input_ids)
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be [1, T], got shape {tuple(input_ids.shape)}")
        if input_ids.shape[0] != 1:
            raise InputError(f"batch size {input_ids.shape[0]} is not supported yet: pass one sequence [1, T]")
        if input_ids.shape[1] == 0:
            raise InputError("empty prompt: input_ids has no tokens")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise InputError(f"input_ids must be integer token ids, got {input_ids.dtype}")
        vocab = self.target_model.get_output_embeddings().weight.shape[0]
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise InputError(f"input_ids hold ids outside the vocabulary [0, {vocab})")
        if input_ids.shape[1] >= self.context_limit:
            raise InputError(f"prompt of {input_ids.shape[1]} tokens leaves no room in the context of "
                             f"{self.context_limit} tokens; shorten it to at most {self.context_limit - 1}")
        return input_ids.long()
