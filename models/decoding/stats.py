"""What one ``generate`` call did (``GenerationStats``), what one verification saw (``StepRecord``),
and the phase clock that fills ``stats.time_s`` (``PhaseTimer``). Metrics as docs/design.md section 7."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from models.decoding.context import StepContext
from models.decoding.tree import DraftTree

PHASES = ("prefill", "draft", "score", "prune", "verify", "commit", "other")


@dataclass
class GenerationStats:
    """What one ``generate`` call did. ``as_dict()`` adds the derived metrics."""

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

    def record_step(self, tree: DraftTree, path: list[int], emitted: list[int], expected: float) -> None:
        """Count one verification: ``tree`` verified, ``path`` accepted, ``emitted`` kept (after any
        stop), ``expected`` the tree policy's expectation of accepted drafts."""
        self.steps += 1
        self.target_forwards += 1
        self.new_tokens += len(emitted)
        self.drafted_tokens += tree.num_drafted
        self.expected_accepted += expected
        accepted = min(len(path) - 1, len(emitted))
        self.accepted_tokens += accepted
        reachable = accepted
        if accepted == len(path) - 1 and bool((tree.parents == path[-1]).any()):
            reachable += 1  # the target rejected every verified child of the last accepted node
        for counts, depth in ((self.accepted_per_depth, accepted), (self.reachable_per_depth, reachable),
                              (self.verified_per_depth, tree.max_depth)):
            counts.extend([0] * (depth - len(counts)))
            for d in range(depth):
                counts[d] += 1

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


class PhaseTimer:
    """Accumulates wall time per phase into ``stats.time_s``; synchronises CUDA so that GPU time lands
    in its phase."""

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
