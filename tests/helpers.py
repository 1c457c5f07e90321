"""Helpers shared by the test modules (collected here so that no test module imports another):
tiny random Hugging Face models and tokenizers, the greedy reference, the decoder configs of the
searches, the exact-distribution machinery of the sampling tests, EAGLE heads, teacher shards, the
example tree of the tree-attention tests, and the runner of ``scripts/*.py``. ``conftest.py``
re-exports every public name, so tests write ``from conftest import ...``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import itertools
import logging
import math
import os
import runpy
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from scipy.stats import chisquare

ROOT = Path(__file__).resolve().parents[1]  # the checkout
sys.path.insert(0, str(ROOT))

from transformers import (  # noqa: E402
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from models.decoding.drafter import Drafter  # noqa: E402
from models.decoding.lookup import PromptLookup, add_lookup_branch, next_lookup_span  # noqa: E402
from models.decoding.verification import verify_sampling  # noqa: E402

# Tiny models gain nothing from threads, and oversubscribed threads on a busy 2-core box are slow.
torch.set_num_threads(1)

VOCAB = 96
ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox", "opt")
# Sliding-window attention (``window`` keys): in every layer (mistral, phi3), alternating with full
# layers from a sliding one (gemma2, gemma3), or after the first, full, layer (qwen2_sw: Qwen2 with
# use_sliding_window and max_window_layers=1).
SLIDING_ARCHS = ("mistral", "phi3", "gemma2", "gemma3", "qwen2_sw")


def tiny_model(arch: str = "llama", seed: int = 0, vocab: int = VOCAB, layers: int = 2, context: int = 256,
               attn: str = "sdpa", window: int = 8, head_dim: int | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=context, **common)
    if arch == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=context, head_dim=head_dim, **common)
        cls = LlamaForCausalLM
    elif arch == "qwen2":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=context, **common)
        cls = Qwen2ForCausalLM
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=context, **common)
        cls = GPT2LMHeadModel
    elif arch == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                            max_position_embeddings=context, **common)
        cls = GPTNeoXForCausalLM
    elif arch == "mistral":
        cfg, cls = MistralConfig(sliding_window=window, **small), MistralForCausalLM
    elif arch == "phi3":
        cfg, cls = Phi3Config(sliding_window=window, **small), Phi3ForCausalLM
    elif arch == "qwen2_sw":
        cfg = Qwen2Config(use_sliding_window=True, sliding_window=window, max_window_layers=1, **small)
        cls = Qwen2ForCausalLM
    elif arch in ("gemma2", "gemma3"):
        # sliding, full, sliding, ...; final_logit_softcapping off: tanh-saturated logits would make
        # near-ties of the sharpened head
        kinds = ["full_attention" if i % 2 else "sliding_attention" for i in range(layers)]
        gemma = dict(head_dim=8, sliding_window=window, layer_types=kinds, final_logit_softcapping=None, **small)
        if arch == "gemma2":
            cfg, cls = Gemma2Config(**gemma), Gemma2ForCausalLM
            attn = "eager"  # transformers has no sdpa path for Gemma 2 (attention logit softcapping)
        else:
            cfg, cls = Gemma3TextConfig(**gemma), Gemma3ForCausalLM
    elif arch == "opt":
        cfg = OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=layers, num_attention_heads=4,
                        max_position_embeddings=context, word_embed_proj_dim=32, **common)
        cls = OPTForCausalLM
    else:
        raise ValueError(arch)
    cfg._attn_implementation = attn
    model = cls(cfg)
    # Random init gives nearly flat logits; sharpen them so greedy paths are far from ties.
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def noisy_copy(model: torch.nn.Module, scale: float, seed: int = 1) -> torch.nn.Module:
    """A draft that agrees with ``model`` often but not always."""
    torch.manual_seed(seed)
    draft = copy.deepcopy(model)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn_like(p) * scale * (p.std() if p.numel() > 1 else 1.0))
    return draft.eval()


def tiny_tokenizer(vocab: int = VOCAB):
    """Word-level tokenizer: token i is the word 'w{i}' (ids 0/1 are <s> and </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<s>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="</s>")


# ---------------------------------------------------------------------- greedy decoding (test_lossless_greedy)
SEARCHES = {
    "chain": dict(method="chain", tree_search=dict(max_depth=4)),
    "static": dict(method="tree", tree_search=dict(mode="static", max_depth=3, branching=[3, 2, 1], max_nodes=16)),
    "dynamic": dict(method="tree", tree_search=dict(mode="dynamic", max_depth=4, max_candidates=3, max_nodes=10)),
    # + the prompt-lookup branch (models/decoding/lookup.py): nodes the draft never proposed
    "dynamic-lookup": dict(method="tree", tree_search=dict(mode="dynamic", max_depth=3, max_candidates=2, max_nodes=6,
                                                           lookup_tokens=6)),
}


def make_config(base, search: str, **decoding):
    """``base`` (a SpeculativeDecodingConfig) with the greedy method and tree search of ``SEARCHES[search]``."""
    spec = SEARCHES[search]
    return dataclasses.replace(
        base,
        decoding=dataclasses.replace(base.decoding, method=spec["method"], do_sample=False, **decoding),
        tree_search=dataclasses.replace(base.tree_search, **spec["tree_search"]),
    )


def hf_greedy(model, prompt, max_new, eos=None):
    """Reference: plain sequential greedy decoding with Hugging Face generate."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                             pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0].tolist()


def prompts(n, seed, vocab=96):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


# ---------------------------------------------------------------------- exact-distribution machinery (sampling tests)
# A synthetic pair whose logits are a fixed function of the context (a seeded table, so the exact
# target distribution of the next HORIZON tokens can be enumerated), the real tree search and the
# real verification; see test_lossless_sampling.py for the method and the thresholds.
V = 5  # vocabulary: 5^3 = 125 joint outcomes
N = 20_000  # samples per variant
HORIZON = 3  # tokens whose joint distribution is compared
P_MIN = 1e-3


class Table:
    """Logits as a deterministic function of the context; the draft is a perturbed target."""

    def __init__(self, seed: int, noise: float):
        self.seed, self.noise, self.cache = seed, noise, {}

    def __call__(self, context: tuple[int, ...]) -> torch.Tensor:
        if context not in self.cache:
            g = torch.Generator().manual_seed(hash((self.seed,) + context) % (2**31))
            target = 1.5 * torch.randn(V, generator=g)
            draft = target + self.noise * torch.randn(V, generator=g)
            self.cache[context] = torch.stack([target, draft])  # [2, V]
        return self.cache[context]

    def node_logits(self, context: tuple[int, ...], tree, which: int) -> torch.Tensor:
        """[N, V]: row i = the table's logits (``which`` 0: target, 1: draft) after ``context`` + the
        tokens of the path root -> node i (root included). One pass over the tree (parents come before
        children): the same rows as looking up ``context + tokens[path_to(i)]`` node by node."""
        tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
        contexts = [context + (tokens[0],)]
        for i in range(1, len(tokens)):
            contexts.append(contexts[parents[i]] + (tokens[i],))
        return torch.stack([self(c)[which] for c in contexts])


class TableDrafter(Drafter):
    """The draft side of a Table, as the decoder's drafter protocol."""

    def __init__(self, table: Table):
        self.table, self.context = table, ()

    def prefill(self, input_ids, target_hidden=None):
        self.context = tuple(input_ids[0].tolist())

    def propose(self, tree, nodes):
        tokens, parents = tree.tokens.tolist(), tree.parents.tolist()
        rows = []
        for n in nodes:
            path = []
            while n > 0:  # up to the root, whose token comes first
                path.append(tokens[n])
                n = parents[n]
            rows.append(self.table(self.context + (tokens[0],) + tuple(reversed(path)))[1])
        return torch.stack(rows)

    def commit(self, tree, path, target_hidden=None):
        self.context += tuple(tree.tokens[path].tolist())


def speculative_sample(table, search, to_probs, prompt, root, generator, lookup: int = 0, lookup_max: int = 0,
                       drafter_cls=None, verify=None, memo: dict | None = None) -> tuple[int, ...]:
    """The decoder's loop (steps 1, 4, 5) without KV caches: the first HORIZON tokens after root.
    ``lookup`` > 0 adds the prompt-lookup branch of that many tokens to every tree (as the decoder does);
    ``lookup_max`` > ``lookup``: copy mode, the span follows ``next_lookup_span`` as in the decoder.
    ``drafter_cls`` (default TableDrafter) and ``verify`` (default the decoder's ``verify_sampling``)
    let a test swap in a drafter with hidden states or a deliberately wrong verification.
    ``memo`` caches (tree, target logits) per context: only for top-k children without the lookup branch,
    where the search draws nothing and both are deterministic functions of the context (the generator
    is consumed by the verification alone, so the samples are the same with and without it)."""
    drafter = (drafter_cls or TableDrafter)(table)
    verify = verify or verify_sampling
    drafter.prefill(torch.tensor([prompt]))
    history = PromptLookup(prompt + [root], max_ngram=2, min_ngram=1)
    out = []
    span = lookup
    assert memo is None or (search.child_draw == "topk" and not lookup), "memo: deterministic trees only"
    while len(out) < HORIZON:
        key = drafter.context + (root,)
        if memo is not None and key in memo:
            tree, logits = memo[key]
        else:
            tree = search.grow(drafter, root, search.shape.max_depth, generator)
            copy = history.propose(span) if lookup else []
            if lookup:
                add_lookup_branch(tree, copy)
            logits = table.node_logits(drafter.context, tree, 0)
            if memo is not None:
                memo[key] = tree, logits
        path, nxt = verify(tree, logits, to_probs, search.child_draw, generator)
        drafter.commit(tree, path)
        accepted = tree.tokens[path[1:]].tolist()
        out += accepted + [nxt]
        history.extend(accepted + [nxt])
        if lookup:
            span = next_lookup_span(span, copy, accepted, lookup, lookup_max)
        root = nxt
    return tuple(out[:HORIZON])


def exact_distribution(table, to_probs, context) -> dict:
    probs = {}
    for seq in itertools.product(range(V), repeat=HORIZON):
        p = 1.0
        for i in range(HORIZON):
            p *= float(to_probs(table(context + seq[:i])[0])[seq[i]])
        probs[seq] = p
    return probs


def tv_bound(probs: dict, n: int) -> float:
    """E[TV] <= 1/2 sum_i sqrt(p_i (1 - p_i) / n), plus the McDiarmid margin for a P_MIN false-alarm rate."""
    expected = 0.5 * sum(math.sqrt(p * (1 - p) / n) for p in probs.values())
    return expected + math.sqrt(math.log(1 / P_MIN) / (2 * n))


def goodness_of_fit(samples: list, probs: dict) -> tuple[float, float, float]:
    """(chi-square p-value, total variation, TV bound)."""
    n = len(samples)
    counts = dict.fromkeys(probs, 0)
    for s in samples:
        counts[s] += 1
    impossible = sum(counts[k] for k in probs if probs[k] == 0)
    if impossible:  # a token the target can never emit (top-k / top-p): loss, no statistics needed
        return 0.0, 1.0, tv_bound(probs, n)
    big = [k for k in probs if probs[k] * n >= 5]
    small = [k for k in probs if 0 < probs[k] * n < 5]
    obs = [counts[k] for k in big] + ([sum(counts[k] for k in small)] if small else [])
    exp = [probs[k] * n for k in big] + ([sum(probs[k] for k in small) * n] if small else [])
    scale = sum(obs) / sum(exp)  # guard against float rounding of the total
    pvalue = chisquare(obs, [e * scale for e in exp]).pvalue
    tv = 0.5 * sum(abs(counts[k] / n - probs[k]) for k in probs)
    return float(pvalue), tv, tv_bound(probs, n)


def memoized(to_probs):
    """The same processing, cached per logits row (the table repeats contexts; keeps the test fast)."""
    cache = {}

    def row(logits):
        key = logits.numpy().tobytes()
        if key not in cache:
            cache[key] = to_probs(logits)
        return cache[key]

    return lambda logits: row(logits) if logits.dim() == 1 else torch.stack([row(r) for r in logits])


# ---------------------------------------------------------------------- EAGLE heads, teacher shards (draft training)
def make_head(target, vocab=None, seed=0, scale=1.0):
    from models.drafters.eagle import EagleConfig, EagleHead

    torch.manual_seed(seed)
    full = target.get_output_embeddings().weight.shape[0]
    cfg = EagleConfig.from_target(target, vocab if vocab is not None else list(range(full)))
    head = EagleHead(cfg, target.get_input_embeddings().weight, target.get_output_embeddings().weight)
    with torch.no_grad():
        for p in head.parameters():
            p.mul_(scale)
    return head.eval()


TEACHER = SimpleNamespace(shard_prompts=4, batch_size=3, max_new_tokens=10, max_prompt_tokens=40, top_k=3)


def make_prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"id": f"p{i}", "prompt": " ".join(f"w{int(t)}" for t in torch.randint(2, 96, (int(torch.randint(2, 9, (1,), generator=g)),), generator=g))}
            for i in range(n)]


def teacher_shards(tmp_path_factory, teacher, layers: int = 2, meta=None):
    """(tiny target with EOS 1, its teacher shards for 24 prompts under ``teacher``)."""
    from training.drafts import teacher_data

    torch.set_num_threads(1)
    target = tiny_model("llama", seed=0, layers=layers)
    target.generation_config.eos_token_id = 1
    out = tmp_path_factory.mktemp("teacher")
    return target, teacher_data.build_shards(target, tiny_tokenizer(), make_prompts(24), out, teacher, meta or {"t": 1},
                                             progress=False)


def train_cfg(**kw):
    from omegaconf import OmegaConf

    base = OmegaConf.load(ROOT / "configs/draft/eagle.yaml")
    base.merge_with(dict(vocab_size=48, max_seq_len=64, batch_tokens=96, epochs=15, warmup_steps=3, eval_sequences=4,
                         eval_every=10, save_every=5, lr=3e-3, bf16=False, feature_noise=0.05, unroll=2))
    base.merge_with(kw)
    return base


# ---------------------------------------------------------------------- tree attention
def example_tree(vocab: int):
    from models.decoding.tree import DraftTree

    g = torch.Generator().manual_seed(3)
    tree = DraftTree.from_root(5)
    # root -> a, b, c ; a -> d, e ; b -> f ; d -> g ; f -> h
    parents = [0, 0, 0, 1, 1, 2, 4, 6]
    for p in parents:
        tree.add_children(torch.tensor([p]), torch.randint(2, vocab, (1,), generator=g), torch.tensor([-1.0]))
    return tree


def sequential_logits(model, prefix_ids, path_tokens):
    with torch.no_grad():
        out = model(input_ids=torch.tensor([prefix_ids + path_tokens]))
    return out.logits[0, len(prefix_ids) - 1 + len(path_tokens)]


# ---------------------------------------------------------------------- scripts/*.py, the CLI users run
def script_result(script: str, *overrides: str, cwd: Path = ROOT, in_process: bool = True) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``python scripts/<script> <overrides>``.

    ``in_process`` (the default) runs the script's ``__main__`` block in this interpreter with
    ``sys.argv`` set: the same ``@hydra.main`` entry, command-line parsing, multirun and launcher,
    output directories and error reporting (Hydra prints the error and exits 1), without paying for
    a fresh interpreter and its imports (seconds per call). What a script may change of the process
    (cwd, environment, logging, torch threads and RNG, warnings, sys.path) is restored afterwards.
    ``in_process=False`` spawns the real subprocess (the CLI smoke test keeps one)."""
    if not in_process:
        proc = subprocess.run([sys.executable, f"scripts/{script}", *overrides], cwd=cwd, capture_output=True,
                              text=True, timeout=300)
        return proc.returncode, proc.stdout, proc.stderr
    from hydra.core.global_hydra import GlobalHydra

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_path, saved_cwd, saved_env = sys.argv, list(sys.path), os.getcwd(), dict(os.environ)
    root = logging.getLogger()
    saved_logging = (list(root.handlers), root.level, logging.root.manager.disable,
                     {name: (lg.level, lg.propagate, list(lg.handlers), lg.disabled)
                      for name, lg in logging.root.manager.loggerDict.items() if isinstance(lg, logging.Logger)})
    saved_threads, saved_rng = torch.get_num_threads(), torch.random.get_rng_state()
    code = 0
    try:
        os.chdir(cwd)
        sys.argv = [f"scripts/{script}", *overrides]
        with warnings.catch_warnings(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(str(ROOT / "scripts" / script), run_name="__main__")
            except SystemExit as exit_:  # Hydra reports an error and exits 1; argparse exits 2
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
                if not isinstance(exit_.code, (int, type(None))):
                    print(exit_.code, file=sys.stderr)
            except Exception as error:  # noqa: BLE001  (an uncaught error: a traceback and status 1, as python would)
                import traceback

                traceback.print_exception(error, file=sys.stderr)
                code = 1
    finally:
        os.chdir(saved_cwd)
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.environ.clear()
        os.environ.update(saved_env)
        for handler in root.handlers:
            if handler not in saved_logging[0]:
                handler.close()
        root.handlers[:] = saved_logging[0]
        root.setLevel(saved_logging[1])
        logging.disable(saved_logging[2])
        for name, lg in logging.root.manager.loggerDict.items():
            if isinstance(lg, logging.Logger):
                level, propagate, handlers, disabled = saved_logging[3].get(name, (logging.NOTSET, True, [], False))
                for handler in lg.handlers:
                    if handler not in handlers:
                        handler.close()
                lg.setLevel(level)
                lg.propagate, lg.handlers[:], lg.disabled = propagate, handlers, disabled
        torch.set_num_threads(saved_threads)
        torch.random.set_rng_state(saved_rng)
        GlobalHydra.instance().clear()
    return code, out.getvalue(), err.getvalue()


def run_script(script: str, *overrides: str, cwd: Path = ROOT, in_process: bool = True) -> str:
    """stdout of ``python scripts/<script> <overrides>``, which must succeed (see ``script_result``)."""
    code, out, err = script_result(script, *overrides, cwd=cwd, in_process=in_process)
    assert code == 0, err[-3000:]
    return out
