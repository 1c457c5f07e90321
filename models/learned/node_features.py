"""Per-node features known *before* verification: what the acceptance predictor reads.

One row per drafted node i (parent u). Everything comes from the draft's distribution at u, the
node's place in the tree, the step's context (what the previous verification said), and, when an
``AffineAlignment`` is loaded, the *aligned* distribution at u: the target's output head applied to
``W h_draft(u) + b``. The column order is the feature spec; ``FEATURE_SPEC_VERSION`` changes
whenever a definition does, and checkpoints record the version and the names they were trained on.

    draft_logprob        log q(x_i | u), q = the distribution the node was drawn from
    draft_rank           0-based position of i among its siblings (draw order = rank for top-k)
    draft_entropy        entropy of q at u (nats)
    draft_top1_prob      max q at u
    draft_top2_margin    q top-1 minus top-2 at u
    depth                depth of i (1 = child of the root)
    parent_path_logprob  sum of draft log-probs along root -> u
    num_siblings         children drawn at u
    target_entropy       entropy of the target's distribution at the last verified position
                         (the one that produced this step's root)
    target_top1_prob     max of that distribution
    prev_accepted        draft tokens accepted in the previous step
    aligned_logprob      log softmax(lm_head(W h_u + b))[x_i]            (needs an alignment)
    aligned_entropy      entropy of the aligned distribution at u        (needs an alignment)
    aligned_top1_prob    its max                                         (needs an alignment)
    aligned_agree        1 if argmax aligned == argmax draft at u        (needs an alignment)
    aligned_log_rank     log(1 + rank of x_i in the aligned distribution) (needs an alignment)
"""

from __future__ import annotations

import torch

from models.decoding.context import StepContext

FEATURE_SPEC_VERSION = 1
BASE_FEATURES = ("draft_logprob", "draft_rank", "draft_entropy", "draft_top1_prob", "draft_top2_margin", "depth",
                 "parent_path_logprob", "num_siblings")
CONTEXT_FEATURES = ("target_entropy", "target_top1_prob", "prev_accepted")
ALIGNED_FEATURES = ("aligned_logprob", "aligned_entropy", "aligned_top1_prob", "aligned_agree", "aligned_log_rank")
FEATURE_NAMES = BASE_FEATURES + CONTEXT_FEATURES + ALIGNED_FEATURES
NUM_FEATURES = len(FEATURE_NAMES)
COLUMN = {name: i for i, name in enumerate(FEATURE_NAMES)}
# C2T (arXiv 2502.13652)'s three features, built from ours: joint probability, entropy, depth.
C2T_FEATURES = ("joint_prob", "draft_entropy", "depth")


def distribution_stats(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(entropy [F], top-1 prob [F], top-1 minus top-2 [F]) of distributions ``probs`` [F, V]."""
    probs = probs.float()
    top2 = torch.topk(probs, min(2, probs.shape[-1]), dim=-1).values  # [F, 2]
    margin = top2[:, 0] - top2[:, 1] if top2.shape[1] > 1 else top2[:, 0]
    return torch.special.entr(probs).sum(-1), top2[:, 0], margin


def base_features(probs: torch.Tensor, slot: torch.Tensor, logq: torch.Tensor, rank: torch.Tensor,
                  siblings: torch.Tensor, depth: torch.Tensor, parent_path_lp: torch.Tensor,
                  context: StepContext) -> torch.Tensor:
    """Feature rows [M, NUM_FEATURES] for M new children (aligned columns left at 0).

    probs [F, V]: the distributions the children were drawn from, one per expanded frontier node;
    slot [M]: which of the F rows is each child's parent; logq, rank, siblings, depth,
    parent_path_lp [M]: per child.
    """

    ent, top1, margin = distribution_stats(probs)
    m = len(slot)
    out = torch.zeros(m, NUM_FEATURES)
    cols = {
        "draft_logprob": logq.float().clamp(min=-50.0), "draft_rank": rank.float(), "draft_entropy": ent[slot],
        "draft_top1_prob": top1[slot], "draft_top2_margin": margin[slot], "depth": depth.float(),
        "parent_path_logprob": parent_path_lp.float().clamp(min=-200.0), "num_siblings": siblings.float(),
        "target_entropy": torch.full((m,), context.target_entropy),
        "target_top1_prob": torch.full((m,), context.target_top1_prob),
        "prev_accepted": torch.full((m,), float(context.prev_accepted)),
    }
    for name, value in cols.items():
        out[:, COLUMN[name]] = value.cpu()
    return out


def aligned_features(aligned_logits: torch.Tensor, draft_argmax: torch.Tensor, slot: torch.Tensor,
                     tokens: torch.Tensor) -> torch.Tensor:
    """The aligned columns [M, len(ALIGNED_FEATURES)].

    aligned_logits [F, V]: the target head on the aligned draft states of the F expanded nodes;
    draft_argmax [F]: the draft's argmax there; slot [M]: each child's row; tokens [M]: its token.
    """
    logp = torch.log_softmax(aligned_logits.float(), dim=-1)  # [F, V]
    ent, top1, _ = distribution_stats(logp.exp())
    amax = logp.argmax(-1)  # [F]
    tok_lp = logp[slot, tokens]  # [M]
    rank = (logp[slot] > tok_lp.unsqueeze(1)).sum(-1).float()  # [M]
    return torch.stack([tok_lp.clamp(min=-50.0), ent[slot], top1[slot],
                        (amax[slot] == draft_argmax.to(amax.device)[slot]).float(), torch.log1p(rank)], dim=1).cpu()


def select_columns(features: torch.Tensor, names: list[str] | tuple[str, ...]) -> torch.Tensor:
    """Columns ``names`` of full feature rows [M, NUM_FEATURES]; ``joint_prob`` is derived (C2T)."""
    cols = []
    for name in names:
        if name == "joint_prob":
            cols.append((features[:, COLUMN["parent_path_logprob"]] + features[:, COLUMN["draft_logprob"]]).exp())
        elif name in COLUMN:
            cols.append(features[:, COLUMN[name]])
        else:
            raise KeyError(f"unknown node feature {name!r}; known: {list(FEATURE_NAMES) + ['joint_prob']}")
    return torch.stack(cols, dim=1)
