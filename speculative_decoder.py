"""SpeculativeDecoder: lossless tree speculative decoding for any pair of HF causal LMs.

    from speculative_decoder import SpeculativeDecoder, SpeculativeDecodingConfig
    decoder = SpeculativeDecoder(SpeculativeDecodingConfig())        # the demo pair
    ids, stats = decoder.generate(input_ids, max_new_tokens=128)     # ids: [1, prompt + new]
    text = decoder.generate_text("Why is the sky blue?")
    for piece in decoder.stream("Tell me a story"): print(piece, end="")

The decode loop (``_decode``) reads as numbered steps (docs/design.md section 2); everything else
lives beside it: loading (``models.io.loading``), the alignment / predictor / cost model
(``models.io.resources``), the prompt-lookup branch (``models.decoding.lookup.CopyBranch``), stats and
the phase clock (``models.decoding.stats``).
"""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from typing import Iterator

import torch

from models.config import SpeculativeDecodingConfig
from models.decoding.context import StepContext
from models.decoding.drafter import Drafter, HFDrafter, target_features
from models.decoding.kv_cache import attention_layout, cache_length, keep_tokens, new_cache
from models.decoding.lookup import CopyBranch
from models.decoding.prompts import prompt_ids
from models.decoding.sampling import logits_to_probs
from models.decoding.stats import PHASES, GenerationStats, PhaseTimer, StepRecord
from models.decoding.tree import DraftTree
from models.decoding.tree_search import DraftTreeSearch, TreeShape
from models.decoding.verification import verify_greedy, verify_sampling
from models.errors import ConfigError, InputError, NumericalError
from models.io.loading import (check_device, check_same_vocabulary, context_length, eos_token_ids, load_draft,
                               load_model, load_tokenizer, module_device, resolve_model_path)
from models.io.resources import DecoderResources
from models.learned.node_scorer import NodeScorer
from models.policy.tree_pruner import TreePruner

__all__ = ["SpeculativeDecoder", "SpeculativeDecodingConfig", "GenerationStats", "StepRecord", "PHASES",
           "load_model", "load_tokenizer", "load_draft", "resolve_model_path"]


class SpeculativeDecoder:
    # ------------------------------------------------------------------ construction
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
        self.resources, self._learned_key = DecoderResources(), None
        self.alignment = self.predictor = None
        self.prepare()

    def prepare(self) -> None:
        """Load what the config names beside the models: the alignment and predictor (again when the
        config, changed in place, names others; null unloads) and, for the cost-aware pruner, its cost
        model (measured once per machine and pair: seconds to a minute). ``generate`` does the same before
        its clock starts; call it yourself after changing the config to pay that cost up front."""
        self._sync_learned()
        if self.drafter is not None and self.config.pruning.strategy == "cost_aware":
            self.resources.cost_model(self)

    def _sync_learned(self) -> None:
        """The alignment and predictor the config names now (loaded once each by ``resources``)."""
        key = (self.config.affine_alignment.alignment_checkpoint, self.config.acceptance_predictor.checkpoint,
               self.config.model.draft_model_name)
        if key != self._learned_key:
            self.alignment, self.predictor = self.resources.learned(self.config, self.target_model, self.drafter,
                                                                    self.device)
            self._learned_key = key

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
        cfg = self._decoding(overrides)
        self._sync_learned()  # the cost model: by the pruner, also before the clock starts
        max_new = cfg.max_new_tokens if max_new_tokens is None else int(max_new_tokens)
        if max_new < 1:
            raise InputError(f"max_new_tokens must be >= 1, got {max_new}")
        input_ids = self._check_input(input_ids)
        out = input_ids[0].tolist()
        for emitted, stats in self._decode(input_ids, max_new, cfg, on_step):
            out += emitted
            yield torch.tensor([out], dtype=torch.long), stats

    def _decode(self, input_ids: torch.Tensor, max_new: int, cfg, on_step=None) -> Iterator[tuple[list[int], GenerationStats]]:
        """Yields (tokens emitted by this step, running stats) until a stop condition."""
        stats = GenerationStats(method=cfg.method, prompt_tokens=input_ids.shape[1])
        generator, to_probs = self._sampler(cfg)  # both None when greedy
        search = self._search(cfg, to_probs, features=on_step is not None) if cfg.method != "target_only" else None
        pruner = self._pruner(search) if cfg.method == "tree" else None
        scored = search is not None and search.scorer is not None
        t = self.config.tree_search
        copying = CopyBranch(input_ids[0].tolist(), t) if search is not None and t.lookup_tokens else None
        limit = min(max_new, self.context_limit - input_ids.shape[1])  # new tokens we may emit
        at_limit = "max_new_tokens" if max_new <= self.context_limit - input_ids.shape[1] else "context"
        # A feature-conditioned draft (EAGLE style) reads the target's hidden states; so do observers.
        want_hidden = search is not None and (getattr(self.drafter, "needs_target_hidden", False) or on_step is not None)
        timer = PhaseTimer(stats, self.device)

        # 0. Prefill the target (and the draft); the target's last logits give the first root.
        cache = new_cache(self.target_model)
        with torch.no_grad():
            out = self.target_model(input_ids=input_ids.to(self.device), past_key_values=cache, use_cache=True,
                                    logits_to_keep=1, output_hidden_states=want_hidden)
        logits = _finite(out.logits[0, -1], "prefill")  # [V]
        root = _pick(logits, to_probs, generator)
        context = self._context(logits, to_probs, 0) if scored else None
        if search is not None:  # [T, F]: what the drafter reads of the target (None for an independent draft)
            self.drafter.prefill(input_ids.to(self.device), target_hidden=target_features(self.drafter, out))
        del out
        first, stats.stop_reason = self._truncate([root], 0, limit, at_limit)
        if copying is not None:
            copying.lookup.extend(first)
        stats.target_forwards, stats.new_tokens = 1, 1
        timer.lap("prefill")
        yield first, stats
        timer.pause_until_resumed()
        while not stats.stop_reason:
            room = limit - stats.new_tokens - 1  # draft tokens that could still be emitted
            # 1. Draft a tree under the root, never deeper than what may still be emitted;
            # 2. score its nodes (align + predict) inside the search, booked as their own phase.
            tree = self._draft(search, root, min(search.shape.max_depth, room) if search else 0, generator, context,
                               stats, timer)
            drafted = tree
            # 3. Prune: the sub-tree worth verifying (closed under ancestors) and its expected yield.
            if pruner is not None and tree.num_drafted:
                pruned = pruner.prune(tree, search.random_draws, _draft_ms(pruner, search.level_widths))
                tree, expected = pruned.tree, pruned.expected
                timer.lap("prune")
            else:
                expected = float(tree.path_probs()[1:].sum()) if tree.num_drafted else 0.0
            policy_nodes = len(tree)  # the nodes the policy chose; the copy branch is appended after them
            # 4. Add the copy branch (prompt lookup): tokens copied from the text so far, free to draft.
            if copying is not None:
                stats.lookup_nodes += copying.add_to(tree, room)
                timer.lap("draft")
            # 5. Verify: one target forward over root + nodes; greedy or lossless rejection sampling.
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
            if on_step is not None:
                on_step(StepRecord(tree, logits, hidden, path, nxt, to_probs, context, drafted))
            if scored:  # what the next step's features know: the target's distribution here
                context = self._context(logits[path[-1]], to_probs, len(path) - 1)
            # 6. Commit: both caches keep prefix + accepted path; nxt becomes the next root.
            keep_tokens(cache, prefix, path)
            if search is not None:
                self.drafter.commit(tree, path, target_hidden=feats[path] if feats is not None else None)
            timer.lap("commit")
            # 7. Stop on EOS or at the limit (truncating what this step emits), then record.
            accepted = tree.tokens[path[1:]].tolist()
            emitted, stats.stop_reason = self._truncate(accepted + [nxt], stats.new_tokens, limit, at_limit)
            stats.record_step(tree, path, emitted, expected)
            if copying is not None:
                stats.lookup_accepted += min(len(path) - 1, len(emitted)) - min(policy_accepted, len(emitted))
                copying.observe(accepted, emitted)
            root = nxt
            timer.lap("other")
            yield emitted, stats
            timer.pause_until_resumed()

    # ------------------------------------------------------------------ steps of the loop
    def _draft(self, search: DraftTreeSearch | None, root: int, depth: int, generator, context, stats: GenerationStats,
               timer: PhaseTimer) -> DraftTree:
        """Steps 1-2: the drafted (and scored) tree under ``root``; a bare root when ``depth`` is 0."""
        if depth <= 0:
            tree = DraftTree.from_root(root)
            timer.lap("draft")
        else:
            scored_s = search.scorer.seconds if search.scorer is not None else 0.0
            tree = search.grow(self.drafter, root, depth, generator, context)
            stats.draft_forwards += search.levels_run
            timer.lap("draft")
            if search.scorer is not None:
                timer.move("draft", "score", search.scorer.seconds - scored_s)
        stats.nodes_drafted += tree.num_drafted
        return tree

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

    # ------------------------------------------------------------------ per-call parts
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

    def _sampler(self, cfg):
        """(generator, to_probs) for a sampling call: its own torch.Generator (the global RNG is untouched),
        seeded by ``decoding.seed`` or freshly; (None, None) when greedy."""
        if cfg.greedy:
            return None, None
        generator = torch.Generator(device=self.device)
        if cfg.seed is None:
            generator.seed()  # fresh, non-deterministic randomness per call (as HF generate)
        else:
            generator.manual_seed(cfg.seed)
        return generator, partial(logits_to_probs, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)

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

    def _pruner(self, search: DraftTreeSearch) -> TreePruner | None:
        """A fresh TreePruner per generate call (its adaptive state starts over, so a seeded call is
        reproducible); it also stops the search from drafting a level it would cut (or not pay for)."""
        p = self.config.pruning
        if p.strategy == "none":
            return None
        pruner = TreePruner(p, self.resources.cost_model(self) if p.strategy == "cost_aware" else None)
        search.stop_rule = lambda tree, frontier, widths: pruner.stop_drafting(
            tree, frontier, _draft_ms(pruner, widths), search.random_draws)
        return pruner

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


def _finite(logits: torch.Tensor, where: str) -> torch.Tensor:
    """The target's logits, refused when any is NaN or inf: greedy would pick an arbitrary token
    and sampling would fail somewhere less clear."""
    if not bool(torch.isfinite(logits).all()):
        bad = "NaN" if bool(torch.isnan(logits).any()) else "inf"
        raise NumericalError(f"the target's logits contain {bad} ({where}, dtype {logits.dtype}); usually an "
                             "overflow in reduced precision: try model.dtype=bfloat16 or float32")
    return logits


def _draft_ms(pruner: TreePruner, widths: list[int]) -> float:
    """What drafting levels of these frontier widths cost, by the pruner's cost model (0 without one)."""
    return pruner.cost.draft_total(widths) if pruner.cost is not None else 0.0


def _pick(logits: torch.Tensor, to_probs, generator) -> int:
    """The target's token from logits [V]: argmax when greedy, else a draw from the processed distribution."""
    if to_probs is None:
        return int(logits.argmax())
    return int(torch.multinomial(to_probs(logits), 1, generator=generator))
