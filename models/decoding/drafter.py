"""The draft side behind a narrow interface: propose logits for a frontier, commit the accepted path.

``DraftTreeSearch`` grows trees through ``Drafter.propose``; the decoder calls ``prefill`` once and
``commit`` after each verification. ``HFDrafter`` wraps any Hugging Face causal LM with its own KV
cache. A draft that reads the target's hidden states (EAGLE style) implements the same three verbs
and receives the target's states through the keyword arguments.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from models.decoding.kv_cache import (
    attention_layout,
    cache_length,
    keep_tokens,
    new_cache,
)
from models.decoding.tree import DraftTree, tree_attention_mask


class Drafter(ABC):
    """Draft model adapter. One sequence at a time.

    After each ``propose``, ``last_hidden`` [F, Hd] holds the draft's hidden state after each of
    the proposed nodes (the state its next-token logits come from), or None if the drafter has
    none; the affine alignment maps it into the target's space. ``identity_module`` is the module
    whose weights identify this draft in checkpoints made for it.
    """

    last_hidden: torch.Tensor | None = None

    @property
    def identity_module(self) -> torch.nn.Module | None:
        return None

    @abstractmethod
    def prefill(self, input_ids: torch.Tensor, target_hidden: torch.Tensor | None = None) -> None:
        """Encode the prompt ``input_ids`` [1, T]; forget any previous sequence."""

    @abstractmethod
    def propose(self, tree: DraftTree, nodes: list[int]) -> torch.Tensor:
        """Next-token logits after each of ``nodes`` [F, V].

        The first call of a step is ``nodes == [0]`` (the root); later calls pass nodes whose
        ancestors were all proposed before in this step.
        """

    @abstractmethod
    def commit(self, tree: DraftTree, path: list[int], target_hidden: torch.Tensor | None = None) -> None:
        """Keep the prefix plus ``path`` (node indices, root first); drop every other node."""


def target_features(drafter: Drafter | None, out) -> torch.Tensor | None:
    """The target features ``drafter`` reads, from a target forward's output (run with
    ``output_hidden_states=True``), as [T, F] for the first sequence; None when it reads none.

    A feature-conditioned drafter (``needs_target_hidden``) reads the final hidden state (the input
    of the target's lm_head, ``hidden_states[-1]``), or, when it names ``feature_layers``, the
    states ``hidden_states[l]`` of those layers concatenated (EAGLE-3 style)."""
    if drafter is None or not getattr(drafter, "needs_target_hidden", False):
        return None
    layers = getattr(drafter, "feature_layers", None)
    if not layers:
        return out.hidden_states[-1][0]
    return torch.cat([out.hidden_states[l][0] for l in layers], dim=-1)


class HFDrafter(Drafter):
    """Any HF causal LM sharing the target's vocabulary.

    Cache layout: ``[committed prefix | pending ... | tree nodes in the order proposed]``.
    *Pending* tokens are committed tokens the draft has not seen yet (an accepted leaf that was never
    fed, and the previous roots of steps that drafted nothing); they are fed in front of the next
    root, causally, so the prefix is never re-encoded. Sliding-window drafts keep full-length caches
    and get their windows from the tree masks (``models.decoding.kv_cache``), as the target does.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.layout = attention_layout(model)  # refuses attention we cannot draft trees with exactly
        self.cache = None
        self.pending: list[int] = []
        self.tree_base = 0  # cache length before the root of the current step
        self.cached_nodes: list[int] = []  # tree nodes in cache order (root first)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def identity_module(self) -> torch.nn.Module:
        return self.model

    def prefill(self, input_ids: torch.Tensor, target_hidden: torch.Tensor | None = None) -> None:
        self.cache = new_cache(self.model)
        self.pending, self.cached_nodes = [], []
        with torch.no_grad():
            self.model(input_ids=input_ids.to(self.device), past_key_values=self.cache, use_cache=True, logits_to_keep=1)

    def propose(self, tree: DraftTree, nodes: list[int]) -> torch.Tensor:
        if nodes == [0]:
            return self._propose_root(tree)
        keys = self.cached_nodes + nodes
        visible = tree.visibility(nodes, keys)  # [F, K]
        node_idx = torch.tensor(nodes, device=visible.device)
        ids = tree.tokens[node_idx].unsqueeze(0).to(self.device)  # [1, F]
        pos = (self.tree_base + tree.depth[node_idx]).unsqueeze(0).to(self.device)  # [1, F]
        mask = tree_attention_mask(visible.to(self.device), self.tree_base, self.model.dtype, self.layout.windows,
                                   tree.depth[node_idx], tree.depth[torch.tensor(keys, device=visible.device)])
        logits = self._forward(ids, pos, mask, keep=len(nodes))
        self.cached_nodes = keys
        return logits

    def _propose_root(self, tree: DraftTree) -> torch.Tensor:
        """Feed pending tokens + the root causally (a plain chain: HF builds the causal mask)."""
        start = cache_length(self.cache)
        chain = self.pending + [int(tree.tokens[0])]
        ids = torch.tensor([chain], device=self.device)  # [1, P+1]
        pos = torch.arange(start, start + len(chain), device=self.device).unsqueeze(0)
        logits = self._forward(ids, pos, None, keep=1)
        self.tree_base = start + len(self.pending)
        self.pending, self.cached_nodes = [], [0]
        return logits

    def _forward(self, ids, pos, mask, keep: int) -> torch.Tensor:
        with torch.no_grad():
            out = self.model(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=self.cache,
                             use_cache=True, logits_to_keep=keep, output_hidden_states=True)
        self.last_hidden = out.hidden_states[-1][0, -keep:]  # [keep, Hd] the input of the draft's lm_head
        return out.logits[0, -keep:]  # [keep, V]

    def commit(self, tree: DraftTree, path: list[int], target_hidden: torch.Tensor | None = None) -> None:
        if not self.cached_nodes:  # nothing drafted this step: the whole path is new to the draft
            self.pending += tree.tokens[path].tolist()
            return
        slot = {node: i for i, node in enumerate(self.cached_nodes)}
        seen = [n for n in tree.grown_index(path) if n in slot]  # closed under ancestors: a path prefix
        keep_tokens(self.cache, self.tree_base, [slot[n] for n in seen])
        self.pending = tree.tokens[path[len(seen):]].tolist()
        self.cached_nodes = []
