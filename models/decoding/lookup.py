"""Prompt lookup: a free extra branch for the draft tree, copied from the text so far.

Summaries, retrieval answers, code edits and multi-turn chats repeat spans of their prompt (and of
their own output) verbatim, where a small draft is often unsure. ``PromptLookup`` finds the most
recent earlier occurrence of the context's last n tokens (the longest n in
``[min_ngram, max_ngram]`` that occurs) and proposes the tokens that followed it (prompt lookup
decoding, Saxena 2023; the n-gram source of REST / Lookahead decoding). ``add_lookup_branch`` merges
that chain into the draft tree after the tree policy has pruned it: where the chain agrees with
drafted nodes it walks down them, the rest becomes new nodes. Costs: no model forward, a dictionary
lookup per step, and up to ``lookup_tokens`` more nodes in the one verify forward. Copy mode
(``next_lookup_span``, ``tree_search.lookup_max_tokens``) doubles the span after each copy accepted
whole, up to ``lookup_max_tokens``, and drops back to ``lookup_tokens`` at the first miss: long
verbatim copies pay for long chains, and other steps do not.

Lossless: verification is unchanged. The added nodes are deterministic proposals (they depend on the
context only), flagged in ``DraftTree.fixed``; greedy verification treats every node alike, and
sampling verification tries them after the drawn siblings as point-mass proposals (accept x with the
residual probability p(x), else zero it and renormalize), which keeps the target distribution.

The index is incremental: each appended token registers the n-grams ending just before it, so one
step costs O(new tokens x n-gram sizes), not a scan of the context.
"""

from __future__ import annotations

import torch

from models.decoding.tree import DraftTree


class PromptLookup:
    """Token history of one sequence with an index n-gram -> where its latest continuation starts."""

    def __init__(self, tokens: list[int], max_ngram: int, min_ngram: int):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"prompt lookup needs 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.tokens: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}
        self.extend(tokens)

    def extend(self, tokens: list[int]) -> None:
        for t in tokens:
            i = len(self.tokens)  # position of t: the n-grams ending at i - 1 now have a continuation
            for n in range(self.min_ngram, self.max_ngram + 1):
                if i - n >= 0:
                    self._index[tuple(self.tokens[i - n:i])] = i
            self.tokens.append(int(t))

    def propose(self, max_tokens: int) -> list[int]:
        """Up to ``max_tokens`` tokens that followed the latest earlier occurrence of the longest
        matching suffix n-gram; [] when none occurs (or ``max_tokens`` < 1)."""
        if max_tokens < 1:
            return []
        for n in range(min(self.max_ngram, len(self.tokens)), self.min_ngram - 1, -1):
            start = self._index.get(tuple(self.tokens[-n:]))
            if start is not None:
                return self.tokens[start:start + max_tokens]
        return []


def next_lookup_span(span: int, copy: list[int], accepted: list[int], base: int, max_span: int) -> int:
    """Copy mode: the next step's lookup span. A copy accepted whole (every proposed token on the
    accepted path) doubles the span up to ``max_span`` (a long verbatim span is being copied: summaries
    quoting their article, answers repeating a retrieved passage); a copy cut short falls back to
    ``base``; no copy (no match) keeps it. ``max_span`` <= ``base`` keeps the span fixed."""
    if max_span <= base:
        return base
    if not copy:
        return span
    if accepted[:len(copy)] == copy:
        return min(2 * span, max_span) if len(copy) == span else span  # shorter: the text ran out, not the copy
    return base


class CopyBranch:
    """The prompt-lookup branch of one ``generate`` call: the n-gram index over the text so far and the
    copy-mode span (``tree_search.lookup_tokens`` .. ``lookup_max_tokens``).

        branch = CopyBranch(prompt_tokens, config.tree_search)
        added = branch.add_to(tree, room)      # after pruning: merge the copied chain, return new nodes
        branch.observe(accepted, emitted)      # after verification: grow the index, adapt the span
    """

    def __init__(self, tokens: list[int], tree_search):
        self.lookup = PromptLookup(tokens, tree_search.lookup_max_ngram, tree_search.lookup_min_ngram)
        self.base, self.max_span = tree_search.lookup_tokens, tree_search.lookup_max_tokens
        self.span = self.base
        self.copy: list[int] = []  # the last proposed chain

    def add_to(self, tree: DraftTree, room: int) -> int:
        """Merge a copied chain of at most ``min(span, room)`` tokens into ``tree``; the new node count."""
        self.copy = self.lookup.propose(min(self.span, room)) if room > 0 else []
        return add_lookup_branch(tree, self.copy)

    def observe(self, accepted: list[int], emitted: list[int]) -> None:
        """``accepted``: the drafted tokens the target kept this step; ``emitted``: every token committed."""
        self.lookup.extend(emitted)
        self.span = next_lookup_span(self.span, self.copy, accepted, self.base, self.max_span)
        self.copy = []


def add_lookup_branch(tree: DraftTree, chain: list[int]) -> int:
    """Merge ``chain`` (tokens after the root) into ``tree`` in place; returns the number of new nodes.

    Walks down the drafted children that carry the chain's tokens; the first token no child carries
    and everything after it become new nodes, a chain hanging there, flagged ``fixed`` (deterministic
    proposals). Node features / predicted acceptance, when the tree has them, are zero for the new
    nodes: they were not scored (and their draft log-prob is 0: the draft did not propose them).
    """

    node, k = 0, 0
    tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
    while k < len(chain):
        nxt = next((c for c in range(node + 1, len(tokens)) if parents[c] == node and tokens[c] == chain[k]), None)
        if nxt is None:
            break
        node, k = nxt, k + 1
    rest = chain[k:]
    if not rest:
        return 0
    n0 = len(tree)
    if tree.origin is None:  # new nodes map to no node the draft grew (drafters look them up by origin)
        tree.origin = torch.arange(n0, device=tree.tokens.device)
    if tree.fixed is None:
        tree.fixed = torch.zeros(n0, dtype=torch.bool)
    for j, tok in enumerate(rest):
        parent = node if j == 0 else n0 + j - 1
        feats = None if tree.features is None else torch.zeros(1, tree.features.shape[1])
        accept = None if tree.accept_prob is None else torch.zeros(1)
        tree.add_children(torch.tensor([parent]), torch.tensor([tok]), torch.zeros(1), feats, accept)
    tree.origin = torch.cat([tree.origin, torch.full((len(rest),), -1, dtype=torch.long, device=tree.origin.device)])
    tree.fixed = torch.cat([tree.fixed, torch.ones(len(rest), dtype=torch.bool)])
    return len(rest)
