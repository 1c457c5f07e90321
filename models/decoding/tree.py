"""DraftTree: the one typed object a draft tree travels as between modules.

Layout. Node 0 is the *root*: the last committed token, which is in neither model's KV cache yet.
Nodes 1..N-1 are drafted tokens in topological order (``parents[i] < i``), so any prefix
``0..k`` of the nodes is itself a tree. A path root -> node is a candidate continuation.

    tokens      [N] long    token id of each node
    parents     [N] long    parent index (-1 for the root)
    depth       [N] long    0 for the root, parent depth + 1 otherwise
    logprobs    [N] float   draft log q(token | parent's path); 0 for the root
    draft_probs {node: [V]} the exact (processed) draft distribution the children of ``node`` were
                            drawn from; filled in sampling mode only, for lossless verification
    origin      [N] long    index of each node in the tree as the draft grew it, or None when this
                            is that tree; ``select`` keeps it, so the drafter can map paths back
    features    [N, F]      node features known before verification (``models.learned.node_features``;
                            root row 0), when the search scores nodes; else None
    accept_prob [N] float   predicted P(node accepted | parent accepted) (root 1), with a predictor
    expansions  {node: Expansion} the draft's hidden state and argmax at each expanded node (what
                            its children were drafted from; the alignment's training pairs)
    fixed       [N] bool    nodes that are deterministic proposals, not draws from the draft (the
                            prompt-lookup branch, ``models.decoding.lookup``); None when there are none

Tree attention: the verify pass feeds all N nodes at once with ``position_ids = prefix_len +
depth`` and a 4-D mask in which the cached prefix is fully visible and each node sees its
ancestors and itself. In sliding-window layers a node at position p sees, of those, only the keys
at positions > p - window: what it would see decoded sequentially (``tree_attention_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Expansion:
    """What the draft computed at a node it expanded: the state its children were drafted from."""

    hidden: torch.Tensor | None  # [Hd] the draft's hidden state (None if the drafter exposes none)
    argmax: int  # the draft's most likely next token there


@dataclass
class DraftTree:
    tokens: torch.Tensor  # [N] long
    parents: torch.Tensor  # [N] long
    depth: torch.Tensor  # [N] long
    logprobs: torch.Tensor  # [N] float32
    draft_probs: dict[int, torch.Tensor] = field(default_factory=dict)
    origin: torch.Tensor | None = None
    features: torch.Tensor | None = None  # [N, F]
    accept_prob: torch.Tensor | None = None  # [N]
    expansions: dict[int, Expansion] = field(default_factory=dict)
    fixed: torch.Tensor | None = None  # [N] bool
    _anc: torch.Tensor | None = field(default=None, repr=False, compare=False)  # ancestor_matrix cache

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_root(cls, root_token: int, device: torch.device | str = "cpu") -> "DraftTree":
        long = dict(dtype=torch.long, device=device)
        return cls(
            tokens=torch.tensor([root_token], **long),
            parents=torch.tensor([-1], **long),
            depth=torch.tensor([0], **long),
            logprobs=torch.zeros(1, dtype=torch.float32, device=device),
        )

    def add_children(self, parents: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor,
                     features: torch.Tensor | None = None, accept_prob: torch.Tensor | None = None) -> torch.Tensor:
        """Append children (``parents[j]`` must already be nodes); returns their new indices [M].

        ``features`` [M, F] and ``accept_prob`` [M] are given for every level or for none.
        """
        start = len(self)
        if features is not None:
            if self.features is None:
                self.features = torch.zeros(start, features.shape[1])
            self.features = torch.cat([self.features, features.float().cpu()])
        if accept_prob is not None:
            if self.accept_prob is None:
                self.accept_prob = torch.ones(start)
            self.accept_prob = torch.cat([self.accept_prob, accept_prob.float().cpu()])
        parents = parents.to(self.parents.device, torch.long)
        if self._anc is not None and self._anc.shape[0] == start:  # extend the cached ancestor matrix
            m = len(parents)
            rows = torch.cat([self._anc[parents], torch.eye(m, dtype=torch.bool, device=parents.device)], dim=1)
            self._anc = torch.cat([torch.nn.functional.pad(self._anc, (0, m)), rows], dim=0)
        self.tokens = torch.cat([self.tokens, tokens.to(self.tokens.device, torch.long)])
        self.parents = torch.cat([self.parents, parents])
        self.depth = torch.cat([self.depth, self.depth[parents] + 1])
        self.logprobs = torch.cat([self.logprobs, logprobs.to(self.logprobs.device, torch.float32)])
        return torch.arange(start, len(self), device=self.tokens.device)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_drafted(self) -> int:
        """Drafted nodes, the root excluded."""
        return len(self) - 1

    @property
    def max_depth(self) -> int:
        return int(self.depth.max())

    def path_logprobs(self) -> torch.Tensor:
        """Cumulative draft log-prob of the path root -> node, [N]."""
        return self._along_paths(self.logprobs, torch.Tensor.add_)

    def path_probs(self) -> torch.Tensor:
        """Probability that each node is accepted, [N]: the product along its path of the predicted
        conditional acceptance ``accept_prob`` when a predictor scored the tree, else of the draft's
        own probabilities (exp of the cumulative draft log-prob). Root = 1. The expected number of
        accepted draft tokens of a tree is the sum over its drafted nodes."""
        if self.accept_prob is None:
            return self.path_logprobs().exp()
        return self._along_paths(self.accept_prob, torch.Tensor.mul_)

    def _along_paths(self, values: torch.Tensor, combine) -> torch.Tensor:
        """[N]: ``values`` folded with ``combine`` (in place) from the root down each path."""
        cum = values.clone()
        parents = self.parents.tolist()
        for i in range(1, len(self)):  # topological order: the parent's entry is final
            combine(cum[i], cum[parents[i]])
        return cum

    def children(self, node: int) -> list[int]:
        """Children of ``node`` in draft order (the order they were drawn)."""
        return (self.parents == node).nonzero().flatten().tolist()

    def children_lists(self) -> dict[int, list[int]]:
        """{node: its children in draft order} for every node that has children."""
        children: dict[int, list[int]] = {}
        for i, p in enumerate(self.parents.tolist()[1:], start=1):
            children.setdefault(p, []).append(i)
        return children

    def path_to(self, node: int) -> list[int]:
        """Node indices root -> ``node`` inclusive."""
        path, parents = [], self.parents.tolist()
        while node != -1:
            path.append(node)
            node = parents[node]
        return path[::-1]

    def paths(self) -> list[list[int]]:
        """Every root -> leaf path (node indices), leaves in index order."""
        has_child = torch.zeros(len(self), dtype=torch.bool)
        has_child[self.parents[1:].cpu()] = True
        return [self.path_to(i) for i in range(len(self)) if not has_child[i]]

    def ancestor_matrix(self) -> torch.Tensor:
        """anc[i, j] = True iff j is an ancestor of i or j == i. [N, N] bool."""
        n = len(self)
        if self._anc is not None and self._anc.shape[0] == n:
            return self._anc
        anc = torch.eye(n, dtype=torch.bool, device=self.tokens.device)
        parents = self.parents.tolist()
        for i in range(1, n):  # topological order: the parent's row is final
            anc[i] |= anc[parents[i]]
        self._anc = anc
        return anc

    def visibility(self, queries: list[int], keys: list[int]) -> torch.Tensor:
        """[Q, K] bool: query node i sees key node j iff j is an ancestor of i or i itself."""
        anc = self.ancestor_matrix()
        return anc[torch.tensor(queries, device=anc.device)][:, torch.tensor(keys, device=anc.device)]

    # ------------------------------------------------------------------ tree attention
    def position_ids(self, prefix_len: int) -> torch.Tensor:
        """[1, N]: the root sits right after the cached prefix, each node at its depth beyond it."""
        return (prefix_len + self.depth).unsqueeze(0)

    def attention_mask(self, prefix_len: int, dtype: torch.dtype = torch.float32,
                       windows: dict[str, int | None] | None = None,
                       device: torch.device | str | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
        """Additive 4-D mask [1, 1, N, prefix_len + N]: 0 where visible, dtype-min where not.

        ``windows`` (``AttentionLayout.windows`` of the model) adds sliding windows; then one mask per
        layer type, see ``tree_attention_mask``. Built on ``device`` (default: the tree's).
        """
        device = self.tokens.device if device is None else device
        depth = self.depth.to(device)
        return tree_attention_mask(self.ancestor_matrix().to(device), prefix_len, dtype, windows, depth, depth)

    # ------------------------------------------------------------------ pruning
    def select(self, keep: torch.Tensor | list[int]) -> tuple["DraftTree", torch.Tensor]:
        """Sub-tree of the nodes in ``keep`` plus all their ancestors (the root always stays).

        Returns the new tree and ``old_index`` [N'] mapping new node index -> old node index.
        Relative order is preserved, so the result is still topologically ordered.
        """
        mask = torch.zeros(len(self), dtype=torch.bool, device=self.tokens.device)
        mask[torch.as_tensor(keep, dtype=torch.long, device=self.tokens.device)] = True
        mask[0] = True
        mask = (self.ancestor_matrix() & mask.unsqueeze(1)).any(0)  # close under ancestors
        old_index = mask.nonzero().flatten()
        new_of_old = torch.full((len(self),), -1, dtype=torch.long, device=self.tokens.device)
        new_of_old[old_index] = torch.arange(len(old_index), device=self.tokens.device)
        parents = self.parents[old_index]
        parents = torch.where(parents >= 0, new_of_old[parents.clamp(min=0)], parents)
        probs = {int(new_of_old[k]): v for k, v in self.draft_probs.items() if mask[k]}
        expansions = {int(new_of_old[k]): v for k, v in self.expansions.items() if mask[k]}
        origin = old_index if self.origin is None else self.origin[old_index]
        cpu = old_index.cpu()
        tree = DraftTree(self.tokens[old_index], parents, self.depth[old_index], self.logprobs[old_index], probs, origin,
                         features=None if self.features is None else self.features[cpu],
                         accept_prob=None if self.accept_prob is None else self.accept_prob[cpu],
                         expansions=expansions, fixed=None if self.fixed is None else self.fixed[cpu])
        return tree, old_index

    def grown_index(self, nodes: list[int]) -> list[int]:
        """Indices of ``nodes`` in the tree as the draft grew it (before any ``select``)."""
        return nodes if self.origin is None else self.origin[nodes].tolist()


def tree_attention_mask(visible: torch.Tensor, prefix_len: int, dtype: torch.dtype,
                        windows: dict[str, int | None] | None = None, query_depth: torch.Tensor | None = None,
                        key_depth: torch.Tensor | None = None) -> torch.Tensor | dict[str, torch.Tensor]:
    """Additive mask [1, 1, Q, prefix_len + K] from ``visible`` [Q, K] bool (query sees key).

    The ``prefix_len`` cached positions before the keys are visible to every query.

    ``windows`` maps layer types to sliding windows (None: full attention), as in
    ``models.decoding.kv_cache.AttentionLayout``. For a layer type with a window, a query additionally sees
    only keys at positions > its position - window (transformers' rule, ``sliding_window_overlay``):
    cached key j sits at position j (caches are kept full length, slot = position), query i at
    ``prefix_len + query_depth[i]`` and tree key k at ``prefix_len + key_depth[k]`` [Q] / [K]. One
    layer type gives one tensor; several give ``{layer type: mask}``, how transformers' hybrid
    models take prepared masks.
    """

    q = visible.shape[0]
    full = torch.ones(q, prefix_len, dtype=torch.bool, device=visible.device)
    allowed = torch.cat([full, visible], dim=1)  # [Q, prefix_len + K]
    if not windows or all(w is None for w in windows.values()):
        return _additive(allowed, dtype)
    query_pos = prefix_len + query_depth.to(visible.device)  # [Q]
    key_pos = torch.cat([torch.arange(prefix_len, device=visible.device),
                         prefix_len + key_depth.to(visible.device)])  # [prefix_len + K]
    masks = {}
    for kind, window in windows.items():
        in_window = allowed if window is None else allowed & (key_pos[None, :] > query_pos[:, None] - window)
        masks[kind] = _additive(in_window, dtype)
    return next(iter(masks.values())) if len(masks) == 1 else masks


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[1, 1, Q, K]: 0 where ``allowed`` [Q, K], dtype-min elsewhere."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]
