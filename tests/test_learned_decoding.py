"""The learned core plugged into decoding stays lossless: an affine alignment and an acceptance
predictor (fitted on traces of the tiny pair and saved as checkpoints) change which nodes are drafted
and kept, never what the target emits. Wrong or missing checkpoints are refused with clear errors."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (
    ARCHS,
    P_MIN,
    N,
    Table,
    TableDrafter,
    V,
    exact_distribution,
    goodness_of_fit,
    memoized,
    noisy_copy,
    speculative_sample,
    tiny_model,
    tiny_tokenizer,
)

from models.checkpoint import fingerprint
from models.decoding.sampling import logits_to_probs
from models.decoding.tree_search import DraftTreeSearch, TreeShape
from models.errors import ConfigError, ModelLoadError
from models.learned.acceptance_predictor import (
    AcceptanceProbabilityPredictor,
    save_predictor,
)
from models.learned.affine_alignment import AffineAlignment, fit_ridge, save_alignment
from models.learned.node_features import (
    ALIGNED_FEATURES,
    COLUMN,
    FEATURE_NAMES,
    aligned_features,
)
from models.learned.node_scorer import NodeScorer
from speculative_decoder import SpeculativeDecoder, SpeculativeDecodingConfig
from training.learned.predictor import train_mlp
from training.learned.traces import TraceRecorder

# 3 + 9 + 9 + 9 nodes drafted, 10 kept: the ranking decides which (12 would keep depths 1-2 whatever the ranking)
# pruning=none: these tests are about what the learned core scores and drafts (test_tree_pruner.py
# covers pruning on top of it), and an unpruned tree keeps every scored node observable.
TREE = ["pruning=none", "decoding.method=tree", "tree_search=dynamic", "tree_search.max_depth=4", "tree_search.max_candidates=3",
        "tree_search.max_nodes=10"]
STATIC = ["pruning=none", "decoding.method=tree", "tree_search=static", "tree_search.max_depth=3", "tree_search.branching=[3,2,1]",
          "tree_search.max_nodes=16"]
ALIGNED_COLS = [COLUMN[n] for n in ALIGNED_FEATURES]
PROMPTS = [[5, 9, 17, 33], [40, 2, 71], [88, 13, 13, 60, 4, 21]]


def tiny_pair(arch: str):
    target = tiny_model(arch)
    target.generation_config.eos_token_id = None
    return target, noisy_copy(target, 0.3)


def learned_overrides(ckpt: dict, predictor: str = "predictor") -> list[str]:
    return [f"affine_alignment.alignment_checkpoint={ckpt['alignment']}",
            f"acceptance_predictor.checkpoint={ckpt[predictor]}"]


def fit_learned(target, draft, out_dir) -> dict:
    """Trace the pair, fit a ridge alignment on the pairs and an MLP on every feature (aligned
    columns filled from the fitted alignment), save both checkpoints for this pair."""
    decoder = SpeculativeDecoder.from_models(target, draft, None, SpeculativeDecodingConfig.from_overrides(TREE))
    recorder = TraceRecorder()
    for i, prompt in enumerate(PROMPTS[:2]):
        recorder.prompt = i
        decoder.generate(torch.tensor([prompt]), 24, on_step=recorder)
    t = recorder.tensors()
    x, y = t["h_draft"].float(), t["h_target"].float()
    cut = int(0.8 * len(x))
    alignment, _, _ = fit_ridge(x[:cut], y[:cut], x[cut:], y[cut:])
    with torch.no_grad():
        aligned = alignment.aligned_logits(x, target.get_output_embeddings().weight)  # [P, V]
    features = t["features"].clone()
    features[:, ALIGNED_COLS] = aligned_features(aligned, t["draft_next"], t["parent_pair"], t["token"])
    assert 0 < t["label"].mean() < 1 and features[:, ALIGNED_COLS].abs().sum() > 0
    predictor = train_mlp(features, t["label"], FEATURE_NAMES, hidden=(16,), epochs=4, batch_size=64, seed=0)
    torch.manual_seed(1)
    untrained = AcceptanceProbabilityPredictor(FEATURE_NAMES, hidden=(8,))  # ranks unlike the draft
    with torch.no_grad():
        untrained.net[-1].weight.mul_(10.0)  # spread its outputs over (0, 1)
    assert predictor.uses_alignment and untrained.uses_alignment
    meta = {"target_identity": fingerprint(target), "draft_identity": fingerprint(draft)}
    return {"alignment": save_alignment(alignment, out_dir / "alignment", target=target, draft=draft),
            "predictor": save_predictor(predictor, out_dir / "predictor", meta),
            "untrained": save_predictor(untrained, out_dir / "untrained", meta)}


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """arch -> (target, draft, {"alignment", "predictor", "untrained": checkpoint dirs}), built once per module."""
    made = {}

    def get(arch: str):
        if arch not in made:
            target, draft = tiny_pair(arch)
            made[arch] = target, draft, fit_learned(target, draft, tmp_path_factory.mktemp(arch))
        return made[arch]

    return get


def check_scored_tree(rec, alignment_lm_head=None, from_aligned: bool = False) -> None:
    """A verified tree carries P(accept | parent) in (0, 1] per policy node (root 1), path probabilities that
    are their products along each path, and computed aligned features."""
    tree = rec.tree
    if tree.num_drafted == 0:
        return
    assert tree.accept_prob is not None and tree.accept_prob.shape == (len(tree),)
    assert float(tree.accept_prob[0]) == 1.0
    # the prompt-lookup branch's new nodes (tree.fixed, added after pruning) are never scored: 0
    fixed = tree.fixed if tree.fixed is not None else torch.zeros(len(tree), dtype=torch.bool)
    scored = tree.accept_prob[~fixed]
    assert bool(((scored > 0) & (scored <= 1)).all())
    assert bool((tree.accept_prob[fixed] == 0).all())
    pp = tree.path_probs()
    parents = tree.parents[1:]
    assert bool((pp[1:] <= pp[parents] * (1 + 1e-6)).all())  # non-increasing along every path
    assert torch.allclose(pp[1:], pp[parents] * tree.accept_prob[1:])
    assert tree.features[1:, ALIGNED_COLS].abs().sum() > 0  # the aligned columns were computed
    if from_aligned:  # greedy children are the top tokens of the aligned distribution at the root
        alignment, lm_head = alignment_lm_head
        with torch.no_grad():
            aligned = alignment.aligned_logits(tree.expansions[0].hidden.unsqueeze(0), lm_head)[0]
        kids = [int(tree.tokens[c]) for c in tree.children(0) if not fixed[c]]  # drafted, not looked up
        assert kids and set(kids) <= set(torch.topk(aligned, 3).indices.tolist())


GREEDY_VARIANTS = {  # name: (overrides, which predictor checkpoint)
    "rank-predictor": (TREE + ["tree_search.rank_by=predictor"], "predictor"),
    "rank-untrained": (TREE + ["tree_search.rank_by=predictor"], "untrained"),
    "rank-draft": (TREE + ["tree_search.rank_by=draft"], "predictor"),
    "from-aligned": (TREE + ["tree_search.rank_by=predictor", "affine_alignment.draft_from_aligned=true"], "predictor"),
    "static-from-aligned": (STATIC + ["affine_alignment.draft_from_aligned=true"], "predictor"),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_lossless_with_learned_core(arch, learned):
    target, draft, ckpt = learned(arch)
    target_only = SpeculativeDecodingConfig.from_overrides(["decoding.method=target_only"])
    reference = SpeculativeDecoder.from_models(target, None, tiny_tokenizer(), target_only)
    want = [reference.generate(torch.tensor([p]), 20)[0][0].tolist() for p in PROMPTS]
    trees = {}
    for name, (overrides, predictor) in GREEDY_VARIANTS.items():
        overrides = overrides + learned_overrides(ckpt, predictor)
        decoder = SpeculativeDecoder.from_models(target, draft, tiny_tokenizer(),
                                                 SpeculativeDecodingConfig.from_overrides(overrides))
        assert decoder.predictor is not None and decoder.alignment is not None
        head = (decoder.alignment, target.get_output_embeddings().weight)
        trees[name] = []

        def observe(rec):
            check_scored_tree(rec, head, from_aligned="from-aligned" in name)
            trees[name].append((rec.tree.tokens.tolist(), rec.tree.parents.tolist()))

        for prompt, expected in zip(PROMPTS, want):
            got, stats = decoder.generate(torch.tensor([prompt]), 20, on_step=observe)
            assert got[0].tolist() == expected, (arch, name, prompt)
            assert stats.drafted_tokens > 0 and math.isfinite(stats.expected_accepted) and stats.expected_accepted > 0
            if name == "rank-predictor":  # without an observer (no trace features asked) too
                assert decoder.generate(torch.tensor([prompt]), 20)[0][0].tolist() == expected
    # The predictor really steers the search: its ranking verifies other trees than the draft's.
    assert trees["rank-untrained"] != trees["rank-draft"], arch
    assert trees["from-aligned"] != trees["rank-predictor"], arch


# ---------------------------------------------------------------------- sampling
class HiddenTableDrafter(TableDrafter):
    """The table drafter of the sampling tests (helpers.py) with hidden states (draft logits plus a constant),
    so an alignment and aligned features have something to read."""
    def propose(self, tree, nodes):
        logits = super().propose(tree, nodes)
        self.last_hidden = torch.cat([logits, torch.ones(len(nodes), 1)], dim=1)  # [F, V + 1]
        return logits


class MemoScorer(NodeScorer):
    """The real NodeScorer, memoised on its exact inputs (deterministic, so results are unchanged):
    20,000 samples would otherwise spend minutes re-scoring the same few thousand node groups."""
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.memo = {}

    @staticmethod
    def _key(args):
        return tuple(a.numpy().tobytes() + str(a.shape).encode() if isinstance(a, torch.Tensor) else repr(a)
                     for a in args)

    def aligned_logits(self, hidden):
        key = ("aligned",) + self._key([hidden])
        if key not in self.memo:
            self.memo[key] = super().aligned_logits(hidden)
        return self.memo[key]

    def score(self, *args):
        key = ("score",) + self._key(args)
        if key not in self.memo:
            self.memo[key] = super().score(*args)
        return self.memo[key]


class CachedSearch:
    """A deterministic search (top-k children) grows the same tree for the same context: grow once."""

    def __init__(self, search: DraftTreeSearch):
        self.search, self.shape, self.child_draw, self.trees = search, search.shape, search.child_draw, {}

    def grow(self, drafter, root, depth, generator=None):
        key = (drafter.context, root, depth)
        if key not in self.trees:
            self.trees[key] = self.search.grow(drafter, root, depth, generator)
        return self.trees[key]


def learned_parts(seed: int = 0):
    """(alignment Hd = V + 1 -> Ht = 4, target lm_head [V, 4], untrained predictor on every feature)."""
    g = torch.Generator().manual_seed(seed)
    lm_head = torch.randn(V, 4, generator=g)
    alignment = AffineAlignment.from_tensors(0.7 * torch.randn(4, V + 1, generator=g), torch.randn(4, generator=g))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        predictor = AcceptanceProbabilityPredictor(FEATURE_NAMES, hidden=(8,)).eval()
    return alignment, lm_head, predictor


SAMPLING_VARIANTS = {
    # name: (child_draw, draft_from_aligned, top_p); shapes as dynamic-topk / dynamic-iid of test_lossless_sampling.
    # Predictor ranking x topk, and predictor ranking + draft_from_aligned x iid (one variant covers both).
    "predictor-topk": ("topk", False, 0.9),
    "predictor-from_aligned-iid": ("iid", True, 1.0),
}


def sampling_search(child_draw, from_aligned, top_p, rank_by="predictor"):
    alignment, lm_head, predictor = learned_parts()
    to_probs = memoized(lambda logits: logits_to_probs(logits, 1.0, 0, top_p))
    scorer = MemoScorer(alignment, predictor, lm_head, from_aligned)
    shape = TreeShape("dynamic", 3, 2, 5, [2, 2, 2])
    return DraftTreeSearch(shape, to_probs, child_draw, scorer, rank_by), to_probs


@pytest.mark.parametrize("name", list(SAMPLING_VARIANTS))
def test_sampling_lossless_with_predictor_ranking(name):
    child_draw, from_aligned, top_p = SAMPLING_VARIANTS[name]
    table = Table(seed=11, noise=1.5)
    prompt, root = [3, 1, 4], 2
    # The predictor changes the trees: draft ranking grows others from the same context and draws.
    trees = {}
    for rank_by in ("draft", "predictor"):
        search, _ = sampling_search(child_draw, from_aligned, top_p, rank_by)
        trees[rank_by] = []
        for seed in range(8):
            drafter = HiddenTableDrafter(table)
            drafter.prefill(torch.tensor([prompt]))
            tree = search.grow(drafter, root, 3, torch.Generator().manual_seed(seed))
            assert tree.accept_prob is not None and tree.features[1:, ALIGNED_COLS].abs().sum() > 0
            trees[rank_by].append((tree.tokens.tolist(), tree.parents.tolist()))
            if child_draw != "topk":  # the budget allows one more sibling group: under the best-ranked child
                score = tree.logprobs if rank_by == "draft" else tree.accept_prob
                kids = tree.children(0)
                expanded = [k for k in kids if tree.children(k)]
                assert len(expanded) == 1 and score[expanded[0]] == score[kids].max()
    assert trees["draft"] != trees["predictor"]

    search, to_probs = sampling_search(child_draw, from_aligned, top_p)
    if child_draw == "topk":
        search = CachedSearch(search)
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():  # the same draws, less autograd bookkeeping per op
        samples = [speculative_sample(table, search, to_probs, prompt, root, generator, drafter_cls=HiddenTableDrafter)
                   for _ in range(N)]
    probs = exact_distribution(table, to_probs, tuple(prompt) + (root,))
    pvalue, tv, bound = goodness_of_fit(samples, probs)
    assert pvalue > P_MIN and tv < bound, f"{name}: chi2 p={pvalue:.2e} TV={tv:.4f} bound={bound:.4f}"


# ---------------------------------------------------------------------- refusals
def _predictor(features, out_dir, target, draft, target_identity=None) -> str:
    torch.manual_seed(0)
    model = AcceptanceProbabilityPredictor(features, hidden=(4,))
    meta = {"target_identity": fingerprint(target_identity or target), "draft_identity": fingerprint(draft)}
    return str(save_predictor(model, out_dir, meta))


def _build(target, draft, overrides):
    return SpeculativeDecoder.from_models(target, draft, tiny_tokenizer(),
                                          SpeculativeDecodingConfig.from_overrides(TREE + overrides))


def test_predictor_for_another_target_is_refused(tmp_path):
    target, draft = tiny_pair("llama")
    path = _predictor(["draft_logprob", "depth"], tmp_path / "p", target, draft, tiny_model("llama", seed=5))
    with pytest.raises(ModelLoadError, match="another target"):
        _build(target, draft, [f"acceptance_predictor.checkpoint={path}"])
    ok = _predictor(["draft_logprob", "depth"], tmp_path / "ok", target, draft)
    decoder = _build(target, draft, [f"acceptance_predictor.checkpoint={ok}", "tree_search.rank_by=predictor"])
    assert decoder.generate(torch.tensor([[5, 6, 7]]), 8)[1].new_tokens == 8


def test_alignment_for_another_draft_is_refused(tmp_path):
    target, draft = tiny_pair("llama")
    path = save_alignment(AffineAlignment.identity(32), tmp_path / "a", target=target, draft=tiny_model("llama", 9))
    with pytest.raises(ModelLoadError, match="another draft"):
        _build(target, draft, [f"affine_alignment.alignment_checkpoint={path}"])


def test_aligned_predictor_needs_an_alignment(tmp_path):
    target, draft = tiny_pair("llama")
    path = _predictor(["draft_logprob", "aligned_logprob"], tmp_path / "p", target, draft)
    with pytest.raises(ConfigError, match="aligned features"):
        _build(target, draft, [f"acceptance_predictor.checkpoint={path}"])


def test_rank_by_predictor_needs_a_predictor():
    with pytest.raises(ConfigError, match="rank_by"):
        SpeculativeDecodingConfig.from_overrides(TREE + ["tree_search.rank_by=predictor"])
    with pytest.raises(ConfigError, match="draft_from_aligned"):
        SpeculativeDecodingConfig.from_overrides(TREE + ["affine_alignment.draft_from_aligned=true"])
    target, draft = tiny_pair("llama")
    decoder = _build(target, draft, [])
    decoder.config.tree_search.rank_by = "predictor"  # an already-built config, changed in place
    with pytest.raises(ConfigError, match="rank_by"):
        decoder.generate(torch.tensor([[5, 6, 7]]), 8)


def test_learned_settings_changed_in_place(tmp_path):
    """The decoder follows checkpoints named in its config after it was built; a bad one is still refused."""
    target, draft = tiny_pair("llama")
    decoder = _build(target, draft, [])
    prompt = torch.tensor([[5, 6, 7]])
    want, _ = decoder.generate(prompt, 12)
    seen = []
    path = _predictor(["draft_logprob", "depth"], tmp_path / "p", target, draft)
    decoder.config.acceptance_predictor.checkpoint = path
    decoder.config.tree_search.rank_by = "predictor"
    got, _ = decoder.generate(prompt, 12, on_step=lambda rec: seen.append(rec.tree.accept_prob))
    assert torch.equal(got, want) and decoder.predictor is not None
    assert seen and all(a is not None for a in seen)
    decoder.config.affine_alignment.alignment_checkpoint = str(
        save_alignment(AffineAlignment.identity(32), tmp_path / "a", target=target, draft=draft))
    decoder.config.affine_alignment.draft_from_aligned = True
    assert torch.equal(decoder.generate(prompt, 12)[0], want) and decoder.alignment is not None
    decoder.config.acceptance_predictor.checkpoint = None  # rank_by=predictor left without a predictor
    with pytest.raises(ConfigError, match="rank_by"):
        decoder.generate(prompt, 12)
    decoder.config.tree_search.rank_by = "draft"
    decoder.config.acceptance_predictor.checkpoint = _predictor(["draft_logprob"], tmp_path / "other", target, draft,
                                                                tiny_model("llama", seed=5))
    with pytest.raises(ModelLoadError, match="another target"):
        decoder.generate(prompt, 12)


def test_invalid_value_set_after_building():
    target, draft = tiny_pair("llama")
    decoder = _build(target, draft, [])
    decoder.config.tree_search.max_depth = -1
    with pytest.raises(ConfigError, match="tree_search.max_depth"):
        decoder.generate(torch.tensor([[5, 6, 7]]), 8)


@pytest.mark.parametrize("group, kind", [("acceptance_predictor", "predictor"), ("affine_alignment", "alignment")])
def test_demo_checkpoint_needs_a_demo_draft(group, kind, tmp_path):
    target, draft = tiny_pair("llama")
    with pytest.raises(ConfigError, match=f"demo:{kind}"):
        _build(target, draft, [f"{group}=demo", f"model.draft_model_name={tmp_path}"])
