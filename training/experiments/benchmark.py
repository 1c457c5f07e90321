"""Side-by-side speed measurement: every method on the same prompts, in one process, after warm-up.

Methods (``benchmark.methods``):
  target_only   our incremental decoding with the target alone (the speedup baseline)
  hf_generate   Hugging Face ``generate`` with the target alone (a sanity check of the baseline)
  hf_assisted   Hugging Face assisted generation, ``generate(assistant_model=...)``: the draft when it
                is an HF causal LM, else ``assistant`` (an EAGLE-style head is not an HF model; the
                script passes ``benchmark.assistant_model_name``, the small-LM demo draft)
  hf_prompt_lookup  Hugging Face prompt lookup decoding, ``generate(prompt_lookup_num_tokens=N)`` with
                N = ``benchmark.prompt_lookup_num_tokens`` (the target alone, drafts copied from the prompt)
  llama_cpp     llama.cpp's ``llama-server`` on the same weights (a GGUF of the target), one column per
                ``benchmark.llama_cpp.spec_types`` entry: ``llama_cpp`` (``none``: no speculation) and
                ``llama_cpp[<type>]`` (``--spec-type <type>``, e.g. ``llama_cpp[ngram-simple]``); a
                subprocess on a loopback port, started once per column before the runs and stopped after
                them (``training.experiments.llama_server``); token ids in, token ids out (prompt processing
                in the timed span, as for every method). Skipped, with one line saying why, when no
                llama-server binary is found (``training.experiments.llama_cpp.build_llama_cpp`` builds it)
  chain, tree   treespec with ``decoding.method`` = chain / tree and ``config.tree_search``
  <variant>     a tree run with some config groups changed (``benchmark.variants``: name -> {group:
                {key: value}}, e.g. ``pred: {tree_search: {rank_by: predictor}}``), so tree shapes,
                rankings and the aligned proposal are compared in the same run
  <draft>       a tree run of another decoder (``run_benchmark(decoders={name: decoder})``): the same
                target with another draft (``benchmark.drafts``: name -> draft; the draft-design study
                compares its drafts this way too)
Prompts are interleaved (prompt 1 with every method, then prompt 2, ...) so that drifting machine
load hits all methods alike. Greedy runs also check that every method emitted exactly the
target-only tokens (``identical`` column).

Every timed (prompt, method) run is one record (``per_prompt``); the tables are aggregates of those
records (``aggregate``) over all prompts (``rows``) and per prompt category (``categories``, as
Spec-Bench reports them), so a category's numbers are exactly the sums over its prompts:
  tokens_per_s          new tokens / wall seconds, both summed over the prompts (prefill included)
  tau                   (new tokens - prompts) / verify steps: tokens emitted per target verify forward,
                        the target's own token counted (target_only: 1.0)
  acceptance_rate       accepted drafted tokens / drafted (verified) tokens
  acceptance_per_depth  [d - 1]: accepted_per_depth / reachable_per_depth at depth d, i.e. of the verify
                        steps whose accepted path reached depth d - 1 and had a verified child at depth d,
                        the share that accepted a token at depth d (a chain: P(token d right | 1..d-1
                        right)); verified_per_depth counts the steps whose verified tree reached depth d
  phase_time_s          the decoder's seconds per phase (prefill, draft, score, prune, verify, commit,
                        other) plus ``outside``: wall time of the call outside every phase (HF methods
                        have no phases: all their time is ``outside``, as are llama_cpp's, the HTTP request's
                        wall time); phase_ms_per_token per new token
  peak_memory_bytes     the largest per-run peak of the method (``PeakMemory`` says what is measured; for
                        llama_cpp it is the server process's peak RSS, VmHWM reset before each run)
  divergence_margins    greedy: for each output that differs from the first method's, the target's
                        top-2 logit margin at the first differing token (``first_divergence``; the
                        per-prompt records hold the index and tokens too)
  speedup_vs_<base>     tokens_per_s / the base method's tokens_per_s on the same prompts
"""

from __future__ import annotations

import dataclasses
import hashlib
import resource
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from models.errors import ConfigError
from models.kernels import fast_linear
from models.paths import cache_root
from speculative_decoder import (
    PHASES,
    GenerationStats,
    SpeculativeDecoder,
    load_draft,
    resolve_model_path,
)
from training.drafts.distill import ensure_named_draft
from training.experiments.llama_cpp import VERSION, convert_to_gguf
from training.experiments.llama_server import LlamaServer, LlamaServerError, peak_rss
from training.experiments.splits import split_rows
from training.jsonl import read_jsonl

TREESPEC_METHODS = ("target_only", "chain", "tree")
HF_METHODS = ("hf_generate", "hf_assisted", "hf_prompt_lookup")
LLAMA_CPP = "llama_cpp"  # llama_cpp (no speculation) and llama_cpp[<spec type>]
BASELINES = ("target_only", "hf_assisted")  # speedup_vs_<base> for each one that ran
OUTSIDE = "outside"  # wall time of a call outside the decoder's phases (all of an HF method's time)
PHASE_KEYS = tuple(PHASES) + (OUTSIDE,)
NO_CATEGORY = "uncategorized"  # prompt rows without a "category"


# ---------------------------------------------------------------------- prompts
def read_prompt_rows(path: Path) -> list[dict]:
    """The rows of a prompt JSONL (``id``, ``prompt``, optional ``category``); ``InputError`` naming the file
    and line when it is missing or malformed."""
    return read_jsonl(path, required=("id", "prompt"), hint="data_dir / benchmark.prompt_file")


def category_of(row: dict) -> str:
    return row.get("category") or NO_CATEGORY


def _by_category(rows: list[dict], categories=None) -> dict[str, list[dict]]:
    """Rows grouped by category in file order; only ``categories`` (all of them must exist) when given."""
    by_cat: dict[str, list[dict]] = {}
    for row in rows:
        by_cat.setdefault(category_of(row), []).append(row)
    if categories is None:
        return by_cat
    unknown = [c for c in categories if c not in by_cat]
    if unknown:
        raise ValueError(f"unknown prompt categor{'y' if len(unknown) == 1 else 'ies'} {unknown} in "
                         f"benchmark.categories; the prompt file has {list(by_cat)}")
    return {c: v for c, v in by_cat.items() if c in categories}


def _round_robin(queues: list[list[dict]], num: int | None = None) -> list[dict]:
    queues = [list(q) for q in queues]
    picked = []
    while (num is None or len(picked) < num) and any(queues):
        for q in queues:
            if q and (num is None or len(picked) < num):
                picked.append(q.pop(0))
    return picked


def load_prompts(path: Path, num: int, categories=None, split: str = "all") -> list[dict]:
    """``num`` rows of a prompt JSONL (of ``split``: ``training.experiments.splits``), taken round-robin over
    categories (all when ``categories`` is None)."""
    return _round_robin(list(_by_category(split_rows(read_prompt_rows(path), split), categories).values()), num)


def select_prompts(path: Path, num: int, warmup: int, categories=None, per_category: int | None = None,
                   log=print, split: str = "all") -> tuple[list[dict], int]:
    """``(prompts, n_warmup)``: the warm-up prompts first, then the timed ones (``run_benchmark``'s order),
    all from ``split`` (``tune`` / ``test``: the held-out protocol of ``training.experiments.splits``).

    ``per_category`` None: ``num + warmup`` prompts round-robin over the categories (the first
    ``warmup`` only warm up). ``per_category`` k: the first k prompts of every category (of
    ``categories`` when given), interleaved round-robin so that machine-load drift spreads over the
    categories; ``num`` is ignored. The warm-up prompts are then the next ones of the file, round-robin
    (timed prompts are reused for warm-up only when the file has no other).
    """
    if per_category is None:
        return load_prompts(path, num + warmup, categories, split), warmup
    if isinstance(per_category, bool) or not isinstance(per_category, int) or per_category < 1:
        raise ValueError(f"benchmark.prompts_per_category must be a positive integer or null, got {per_category!r}")
    by_cat = _by_category(split_rows(read_prompt_rows(path), split), categories)
    for cat, rows in by_cat.items():
        if len(rows) < per_category:
            log(f"category {cat!r} has only {len(rows)} prompts (benchmark.prompts_per_category={per_category})")
    timed = _round_robin([rows[:per_category] for rows in by_cat.values()])
    warm = _round_robin([rows[per_category:] for rows in by_cat.values()], warmup)
    warm += timed[:warmup - len(warm)]
    return warm + timed, len(warm)


# ---------------------------------------------------------------------- aggregation helpers
def _sum_lists(lists) -> list[int]:
    out: list[int] = []
    for values in lists:
        out.extend([0] * (len(values) - len(out)))
        for i, v in enumerate(values):
            out[i] += v
    return out


# ---------------------------------------------------------------------- memory
class PeakMemory:
    """The peak memory of one run, reset just before it (``reset``; ``peak`` in bytes after it).

    - CUDA: ``torch.cuda.max_memory_allocated`` (tensors held by torch's caching allocator on the device;
      weights included), reset with ``torch.cuda.reset_peak_memory_stats``;
    - CPU on Linux: the process's peak resident set size, ``VmHWM`` of /proc/self/status, reset by
      writing 5 to /proc/self/clear_refs (proc(5)); the high-water mark ``resource.getrusage`` reports as
      ``ru_maxrss``, made resettable (weights, Python and library memory included);
    - elsewhere: ``ru_maxrss`` of ``resource.getrusage(RUSAGE_SELF)``: the peak since the process
      started, which cannot be reset, so a run reports the running maximum (``per_run`` false).
    """

    DESCRIPTIONS = {
        "cuda_max_memory_allocated": "torch.cuda.max_memory_allocated on the device during each run (reset before "
                                     "it): tensors of torch's caching allocator, weights included",
        "linux_peak_rss_vmhwm": "peak resident set size of the process during each run: VmHWM of /proc/self/status, "
                                "reset before the run through /proc/self/clear_refs (weights included)",
        "ru_maxrss_since_process_start": "resource.getrusage(RUSAGE_SELF).ru_maxrss: the process's peak resident set "
                                         "size since it started (not resettable: a running maximum)",
    }

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        if self.device.type == "cuda":
            self.measure, self.per_run = "cuda_max_memory_allocated", True
        elif self._clear_refs():
            self.measure, self.per_run = "linux_peak_rss_vmhwm", True
        else:
            self.measure, self.per_run = "ru_maxrss_since_process_start", False

    def describe(self) -> dict:
        return {"measure": self.measure, "unit": "bytes", "per_run": self.per_run, "device": str(self.device),
                "description": self.DESCRIPTIONS[self.measure]}

    def reset(self) -> None:
        if self.measure == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.measure == "linux_peak_rss_vmhwm":
            self._clear_refs()

    def peak(self) -> int:
        if self.measure == "cuda_max_memory_allocated":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        if self.measure == "linux_peak_rss_vmhwm":
            hwm = self._vmhwm()
            if hwm is not None:
                return hwm
        return self.process_peak_rss()

    @staticmethod
    def process_peak_rss() -> int:
        """ru_maxrss in bytes (Linux reports KiB, macOS bytes)."""

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)

    @staticmethod
    def _clear_refs() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return PeakMemory._vmhwm() is not None
        except OSError:
            return False

    @staticmethod
    def _vmhwm() -> int | None:
        return peak_rss("self")


# ---------------------------------------------------------------------- exactness
def first_divergence(decoder: SpeculativeDecoder, ids: torch.Tensor, reference: list[int], new: list[int]) -> dict:
    """Where greedy output ``new`` first differs from ``reference`` (the first method's output, normally
    target-only) and the target's top-2 logit margin there, computed by one target forward over the
    prompt + the common prefix in the target's own dtype. A small margin means a near-tie that a
    different kernel (another number of tokens per forward, another dtype) can flip."""
    k = next((i for i, (a, b) in enumerate(zip(reference, new)) if a != b), min(len(reference), len(new)))
    out = dict(index=k, reference_token=reference[k] if k < len(reference) else None,
               token=new[k] if k < len(new) else None, margin=None)
    if k >= len(reference) or k >= len(new):  # one stopped (EOS / limit) where the other went on
        return out
    prefix = torch.cat([ids[0], torch.tensor(reference[:k], dtype=ids.dtype)]).unsqueeze(0).to(decoder.device)
    with torch.no_grad():
        logits = decoder.target_model(input_ids=prefix, logits_to_keep=1).logits[0, -1].float()
    top = torch.topk(logits, 2).values
    out["margin"] = float(top[0] - top[1])
    return out


# ---------------------------------------------------------------------- records and aggregates
def run_record(row: dict, method: str, new_tokens: int, seconds: float, stats: GenerationStats | None,
               peak_bytes: int | None, identical: bool | None) -> dict:
    """One timed (prompt, method) run; HF methods (``stats`` None) have no step statistics."""
    rec = dict(id=row["id"], category=category_of(row), method=method, new_tokens=new_tokens, time_s=seconds,
               tokens_per_s=new_tokens / seconds if seconds else 0.0, steps=None, tau=None, drafted_tokens=None,
               nodes_drafted=None, accepted_tokens=None, expected_accepted=None, accepted_per_depth=None,
               reachable_per_depth=None, verified_per_depth=None, lookup_nodes=None, phase_time_s={OUTSIDE: seconds},
               stop_reason=None, identical=identical, peak_memory_bytes=peak_bytes)
    if stats is not None:
        phases = {k: float(stats.time_s.get(k, 0.0)) for k in PHASES}
        phases[OUTSIDE] = seconds - sum(phases.values())
        rec.update(steps=stats.steps, tau=(new_tokens - 1) / stats.steps if stats.steps else None,
                   drafted_tokens=stats.drafted_tokens, nodes_drafted=stats.nodes_drafted, lookup_nodes=stats.lookup_nodes,
                   accepted_tokens=stats.accepted_tokens, expected_accepted=stats.expected_accepted,
                   accepted_per_depth=list(stats.accepted_per_depth), reachable_per_depth=list(stats.reachable_per_depth),
                   verified_per_depth=list(stats.verified_per_depth), phase_time_s=phases, stop_reason=stats.stop_reason)
    return rec


def aggregate(records: list[dict]) -> dict:
    """The table row of one method over ``records`` (its runs on some prompts); see the module doc."""
    if not records:
        raise ValueError("nothing to aggregate")
    if len({r["method"] for r in records}) != 1:
        raise ValueError("aggregate() takes the records of one method")
    n = len(records)
    new = sum(r["new_tokens"] for r in records)
    secs = sum(r["time_s"] for r in records)
    stepped = records[0]["steps"] is not None
    total = (lambda key: sum(r[key] for r in records)) if stepped else (lambda key: 0)  # noqa: E731
    steps, drafted, nodes, accepted = total("steps"), total("drafted_tokens"), total("nodes_drafted"), total("accepted_tokens")
    phases = {k: sum(r["phase_time_s"].get(k, 0.0) for r in records) for k in PHASE_KEYS}
    if not stepped:
        phases = {OUTSIDE: phases[OUTSIDE]}
    per_depth = {}
    for key in ("accepted", "reachable", "verified"):
        per_depth[key] = _sum_lists(r[f"{key}_per_depth"] for r in records) if stepped else None
    if stepped:
        reach = per_depth["reachable"]
        rate_by_depth = [a / r if r else None for a, r in zip(per_depth["accepted"] + [0] * len(reach), reach)]
    else:
        rate_by_depth = None
    identical = None if any(r["identical"] is None for r in records) else sum(bool(r["identical"]) for r in records)
    divergences = [r["divergence"] for r in records if r.get("divergence")]
    peaks = [r["peak_memory_bytes"] for r in records if r["peak_memory_bytes"] is not None]
    return dict(
        prompts=n, new_tokens=new, time_s=round(secs, 3), tokens_per_s=new / secs if secs else 0.0,
        tau=(new - n) / steps if steps else None,
        acceptance_rate=accepted / drafted if drafted else None,
        acceptance_per_depth=rate_by_depth,
        accepted_per_depth=per_depth["accepted"], reachable_per_depth=per_depth["reachable"],
        verified_per_depth=per_depth["verified"],
        steps=steps if stepped else None,
        nodes_per_step=drafted / steps if steps else None,
        drafted_per_step=nodes / steps if steps else None,
        pruned_fraction=1 - (drafted - sum(r.get("lookup_nodes") or 0 for r in records)) / nodes if nodes else None,
        accepted_tokens=accepted if steps else None,
        expected_accepted=round(sum(r["expected_accepted"] for r in records), 2) if steps else None,
        identical=identical,
        phase_time_s={k: round(v, 4) for k, v in phases.items()},
        phase_ms_per_token={k: 1000 * v / new if new else None for k, v in phases.items()},
        phase_share={k: round(v / secs, 3) for k, v in phases.items() if k != OUTSIDE} if stepped and secs else None,
        peak_memory_bytes=max(peaks) if peaks else None,
        divergence_margins=sorted(d["margin"] for d in divergences if d["margin"] is not None),
    )


def add_speedups(rows: dict) -> dict:
    """``speedup_vs_<base>`` in every row of {method: aggregate}, for each baseline method present."""
    for base in BASELINES:
        if base in rows:
            base_tps = rows[base]["tokens_per_s"]
            for r in rows.values():
                r[f"speedup_vs_{base}"] = r["tokens_per_s"] / base_tps if base_tps else None
    return rows


def summarize(records: list[dict], methods: list[str]) -> tuple[dict, dict]:
    """(overall {method: row}, {category: {method: row}}) from per-prompt records, speedups filled in."""
    overall = add_speedups({m: aggregate([r for r in records if r["method"] == m]) for m in methods
                            if any(r["method"] == m for r in records)})
    categories = {}
    for cat in dict.fromkeys(r["category"] for r in records):  # order of first appearance
        mine = [r for r in records if r["category"] == cat]
        categories[cat] = add_speedups({m: aggregate([r for r in mine if r["method"] == m]) for m in methods
                                        if any(r["method"] == m for r in mine)})
    return overall, categories


# ---------------------------------------------------------------------- llama.cpp
BUILD_HINT = ('build it once with: python -c "from training.experiments.llama_cpp import build_llama_cpp; '
              'build_llama_cpp()" (about 10 minutes on 2 cores), or set benchmark.llama_cpp.server')


def llama_cpp_method(spec_type: str) -> str:
    """The column name of a llama.cpp speculative mode: ``llama_cpp`` for none, else ``llama_cpp[<type>]``."""
    return LLAMA_CPP if spec_type == "none" else f"{LLAMA_CPP}[{spec_type}]"


def llama_cpp_spec_type(method: str) -> str | None:
    """The ``--spec-type`` of a llama_cpp column (``none`` for ``llama_cpp``); None for other methods."""
    if method == LLAMA_CPP:
        return "none"
    if method.startswith(f"{LLAMA_CPP}[") and method.endswith("]") and len(method) > len(LLAMA_CPP) + 2:
        return method[len(LLAMA_CPP) + 1:-1]
    return None


def is_peer(method: str) -> bool:
    """Another system's decoding (Hugging Face's, llama.cpp's), not a treespec run."""
    return method in HF_METHODS or llama_cpp_spec_type(method) is not None


def default_llama_server(cache_dir=None) -> Path:
    """Where ``build_llama_cpp`` puts llama-server: $TREESPEC_CACHE/llama.cpp-<version>/llama.cpp/build/bin."""
    return cache_root(cache_dir) / f"llama.cpp-{VERSION}" / "llama.cpp" / "build" / "bin" / "llama-server"


def target_gguf(target_dir: Path, cache_dir=None, outtype: str = "f32") -> Path:
    """A GGUF of the HF target directory, converted once with llama.cpp's own converter and cached under
    $TREESPEC_CACHE/gguf by a key of the directory (its path and its files' names, sizes and times)."""
    from filelock import FileLock


    target_dir = Path(target_dir).resolve()
    h = hashlib.sha1(str(target_dir).encode())
    for f in sorted(p for p in target_dir.iterdir() if p.is_file()):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    out = cache_root(cache_dir) / "gguf" / f"{target_dir.name}-{h.hexdigest()[:12]}-{outtype}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not out.is_file():
            partial = out.with_name(out.name + ".partial")
            convert_to_gguf(target_dir, partial, outtype, cache_dir=cache_dir)
            partial.rename(out)
    return out


def llama_cpp_servers(decoder: SpeculativeDecoder, names: list[str], settings: dict | None, ctx_size: int | None,
                      log=print) -> dict[str, LlamaServer]:
    """{column: LlamaServer (not started)} for the llama_cpp columns ``names`` that can run here, from
    ``benchmark.llama_cpp`` (``settings``); a column that cannot (no binary, no draft for a draft-based
    mode, no GGUF) is left out with one line saying why."""
    if not names:
        return {}
    settings = dict(settings or {})
    m = decoder.config.model
    server = settings.get("server")
    if server is None:
        server = default_llama_server(m.cache_dir)
        if not server.is_file():
            log(f"skip {', '.join(names)}: no llama-server binary (benchmark.llama_cpp.server is null and {server} "
                f"does not exist); {BUILD_HINT}")
            return {}
    elif isinstance(server, (str, Path)) and not Path(server).expanduser().is_file():
        log(f"skip {', '.join(names)}: benchmark.llama_cpp.server={server} is not a file; {BUILD_HINT}")
        return {}
    elif isinstance(server, (str, Path)):
        server = Path(server).expanduser()
    draft = settings.get("draft")
    if draft is not None and not Path(draft).expanduser().is_file():
        raise ConfigError(f"benchmark.llama_cpp.draft={draft} is not a file (a GGUF of the draft model, or null)")
    wanted = []
    for name in names:
        if llama_cpp_spec_type(name).startswith("draft-") and draft is None:
            log(f"skip {name}: a draft-based llama.cpp mode needs benchmark.llama_cpp.draft (a GGUF of the draft; "
                f"convert_to_gguf in training/experiments/llama_cpp.py converts treespec's EAGLE-3 drafts)")
        else:
            wanted.append(name)
    if not wanted:
        return {}
    model = settings.get("model")
    if model is not None:
        model = Path(model).expanduser()
        if not model.is_file():
            raise ConfigError(f"benchmark.llama_cpp.model={model} is not a file (a GGUF of the target, or null to "
                              f"convert the target once)")
    else:
        target_dir = resolve_model_path(m.target_model_name, m.cache_dir)
        try:
            model = target_gguf(target_dir, m.cache_dir)
        except Exception as e:  # noqa: BLE001  (no converter here: said and skipped, never silently)
            log(f"skip {', '.join(wanted)}: converting the target {target_dir} to GGUF failed "
                f"({type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}); "
                f"set benchmark.llama_cpp.model to a GGUF of the target")
            return {}
    threads = settings.get("threads") or torch.get_num_threads()
    return {name: LlamaServer(server, model, threads, spec_type=llama_cpp_spec_type(name),
                              draft=draft if llama_cpp_spec_type(name).startswith("draft-") else None,
                              port=settings.get("port") or 0, ctx_size=ctx_size,
                              extra_args=list(settings.get("extra_args") or []),
                              ready_timeout=settings.get("ready_timeout_s") or 120.0,
                              request_timeout=settings.get("request_timeout_s") or 600.0, log=log)
            for name in wanted}


def _expand_llama_cpp(methods: list[str], settings: dict | None) -> list[str]:
    """``llama_cpp`` in ``methods`` -> one column per ``benchmark.llama_cpp.spec_types`` entry."""
    spec_types = list((settings or {}).get("spec_types") or ["none"])
    out = []
    for method in methods:
        out.extend(llama_cpp_method(str(t)) for t in spec_types) if method == LLAMA_CPP else out.append(method)
    return list(dict.fromkeys(out))


# ---------------------------------------------------------------------- the run
def run_benchmark(decoder: SpeculativeDecoder, prompts: list[dict], methods: list[str], max_new_tokens: int,
                  max_prompt_tokens: int, warmup: int, decoding: dict, log=print, assistant=None,
                  variants: dict | None = None, decoders: dict | None = None,
                  prompt_lookup_num_tokens: int | None = None, llama_cpp: dict | None = None) -> dict:
    """Runs the first ``warmup`` prompts untimed (16 new tokens), then times every method on every
    other prompt, interleaved. Returns {"rows": {method: aggregate}, "categories": {category:
    {method: aggregate}}, "per_prompt": [record], "skipped": [ids], "warmup": [ids], "memory": {...}}
    with speedups filled in. ``prompt_lookup_num_tokens``: hf_prompt_lookup's N; ``llama_cpp``: the
    ``benchmark.llama_cpp`` settings (servers are started before the runs and always stopped after)."""
    variants, decoders = dict(variants or {}), dict(decoders or {})
    for name, spec in variants.items():
        run_as = dict(spec).get("method", "tree")
        if run_as not in TREESPEC_METHODS + HF_METHODS:
            raise ConfigError(f"benchmark.variants.{name}.method must be one of {TREESPEC_METHODS + HF_METHODS}, "
                              f"got {run_as!r}")
    methods = _expand_llama_cpp(list(methods), llama_cpp)
    methods = methods + [v for v in list(variants) + list(decoders) if v not in methods]
    unknown = {m for m in methods if llama_cpp_spec_type(m) is None} - set(TREESPEC_METHODS) - set(HF_METHODS) \
        - set(variants) - set(decoders)
    if unknown:
        raise ValueError(f"unknown benchmark method(s) {sorted(unknown)}; known: {TREESPEC_METHODS + HF_METHODS}, "
                         f"{LLAMA_CPP}, {LLAMA_CPP}[<spec type>] and the names in benchmark.variants")
    uses_lookup = "hf_prompt_lookup" in methods or any(dict(v).get("method") == "hf_prompt_lookup"
                                                        for v in variants.values())
    if uses_lookup and (isinstance(prompt_lookup_num_tokens, bool) or not isinstance(prompt_lookup_num_tokens, int)
                        or prompt_lookup_num_tokens < 1):
        raise ConfigError(f"benchmark.prompt_lookup_num_tokens must be a positive integer for hf_prompt_lookup, "
                          f"got {prompt_lookup_num_tokens!r}")
    assistant = assistant if assistant is not None else decoder.draft_model
    if "hf_assisted" in methods and assistant is None:
        log("skip hf_assisted: the draft is not a Hugging Face causal LM and no assistant model was given")
        methods = [m for m in methods if m != "hf_assisted"]
    encoded, skipped = [], []
    for row in prompts:
        ids = decoder.encode_prompt(row["prompt"])
        if ids.shape[1] > max_prompt_tokens or ids.shape[1] + max_new_tokens > decoder.context_limit:
            skipped.append(row["id"])
            log(f"skip {row['id']}: prompt of {ids.shape[1]} tokens exceeds benchmark.max_prompt_tokens={max_prompt_tokens}")
            continue
        encoded.append((row, ids))
    if not encoded:
        raise ValueError("no prompt left to benchmark")
    greedy = not decoding.get("do_sample") or decoding.get("temperature", 1.0) == 0
    timed = encoded[warmup:] if len(encoded) > warmup else encoded
    memory = PeakMemory(decoder.device)
    records: list[dict] = []
    llama_names = [m for m in methods if llama_cpp_spec_type(m) is not None]
    longest = max(ids.shape[1] for _, ids in encoded) + max_new_tokens + 64  # room for a speculative step
    with ExitStack() as stack:  # every started server is stopped however the runs end
        servers = {}
        for name, server in llama_cpp_servers(decoder, llama_names, llama_cpp, longest, log).items():
            try:
                servers[name] = stack.enter_context(server)
            except LlamaServerError as e:
                log(f"skip {name}: {e}")
        methods = [m for m in methods if m not in llama_names or m in servers]
        peers = {"prompt_lookup_num_tokens": prompt_lookup_num_tokens, "servers": servers,
                 "ignore_eos": not getattr(getattr(decoder.config, "decoding", None), "stop_on_eos", True)}
        for _, ids in encoded[:warmup]:  # warm-up: allocator, kernels, caches; not timed
            for m in methods:
                _run_one(decoder, m, ids, min(max_new_tokens, 16), decoding, seed=0, assistant=assistant,
                         variants=variants, decoders=decoders, **peers)
        for i, (row, ids) in enumerate(timed):
            _time_prompt(decoder, methods, row, ids, i, max_new_tokens, decoding, greedy, memory, records, log,
                         len(timed), assistant=assistant, variants=variants, decoders=decoders, **peers)
    rows, categories = summarize(records, methods)
    return {"rows": rows, "categories": categories, "per_prompt": records, "skipped": skipped,
            "warmup": [row["id"] for row, _ in encoded[:warmup]], "memory": memory.describe()}


def _time_prompt(decoder, methods, row, ids, i, max_new_tokens, decoding, greedy, memory, records, log, n_timed,
                 **run_kwargs) -> None:
    """Every method on one timed prompt, in order; appends one record per method."""
    servers = run_kwargs.get("servers") or {}
    reference = None
    for m in methods:
        server = servers.get(m)
        if server is None:
            memory.reset()
        else:
            server.reset_peak_memory()
        out, seconds, stats = _run_one(decoder, m, ids, max_new_tokens, decoding, seed=i, **run_kwargs)
        peak = memory.peak() if server is None else server.peak_memory()
        new = out[ids.shape[1]:]
        if greedy:
            reference = new if reference is None else reference
        records.append(run_record(row, m, len(new), seconds, stats, peak, (new == reference) if greedy else None))
        if greedy and new != reference:  # where and how narrowly it left the reference (untimed)
            records[-1]["divergence"] = first_divergence(decoder, ids, reference, new)
    log(f"[{i + 1}/{n_timed}] {row['id']} ({category_of(row)}): " + ", ".join(
        f"{m} {aggregate([r for r in records if r['method'] == m])['tokens_per_s']:.1f} tok/s" for m in methods))


def _run_one(decoder: SpeculativeDecoder, method: str, ids: torch.Tensor, max_new: int, decoding: dict, seed: int,
             assistant=None, variants: dict | None = None, decoders: dict | None = None,
             prompt_lookup_num_tokens: int | None = None, servers: dict | None = None, ignore_eos: bool = False):
    """(all token ids as a list, seconds, stats or None for HF methods and llama_cpp)."""
    if decoders and method in decoders:
        return _run_one(decoders[method], "tree", ids, max_new, decoding, seed)
    if variants and method in variants:
        changes = dict(variants[method])
        run_as = changes.pop("method", "tree")
        with variant_config(decoder, changes):
            return _run_one(decoder, run_as, ids, max_new, decoding, seed, assistant=assistant,
                            prompt_lookup_num_tokens=prompt_lookup_num_tokens)
    sample = bool(decoding.get("do_sample")) and decoding.get("temperature", 1.0) > 0
    if servers and method in servers:  # llama.cpp: the wall time of the HTTP request, prompt processing included
        prompt = ids[0].tolist()
        t0 = time.perf_counter()
        new, _ = servers[method].complete(prompt, max_new, temperature=decoding["temperature"] if sample else 0.0,
                                          top_k=decoding.get("top_k") or 0, top_p=decoding.get("top_p", 1.0),
                                          seed=seed, ignore_eos=ignore_eos)
        return prompt + new, time.perf_counter() - t0, None
    if method in TREESPEC_METHODS:
        t0 = time.perf_counter()
        out, stats = decoder.generate(ids, max_new, method=method, seed=seed, **decoding)
        return out[0].tolist(), time.perf_counter() - t0, stats
    kwargs = dict(max_new_tokens=max_new, do_sample=sample, attention_mask=torch.ones_like(ids),
                  pad_token_id=decoder.tokenizer.pad_token_id if decoder.tokenizer is not None else None)
    if sample:
        kwargs.update(temperature=decoding["temperature"], top_k=decoding.get("top_k") or None,
                      top_p=decoding.get("top_p", 1.0))
        torch.manual_seed(seed)  # HF generate samples from the global RNG
    if method == "hf_assisted":
        kwargs["assistant_model"] = assistant
    elif method == "hf_prompt_lookup":
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
    device = decoder.device
    t0 = time.perf_counter()
    with torch.no_grad():
        out = decoder.target_model.generate(ids.to(device), **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return out[0].tolist(), time.perf_counter() - t0, None


def draft_decoders(decoder: SpeculativeDecoder, drafts: dict | None, taken: list[str]) -> dict:
    """``benchmark.drafts`` (name -> draft) as decoders sharing ``decoder``'s target and config, so
    each draft's tree runs beside the others in one run."""
    out, m = {}, decoder.config.model
    for name, draft_name in (drafts or {}).items():
        if name in taken:
            raise ConfigError(f"benchmark.drafts name {name!r} is already a method or variant name; pick another")
        if not isinstance(draft_name, str) or not draft_name:
            raise ConfigError(f"benchmark.drafts.{name} must be a draft directory or a demo name, got {draft_name!r}")
        config = dataclasses.replace(decoder.config, model=dataclasses.replace(m, draft_model_name=draft_name))
        ensure_named_draft(draft_name, m.cache_dir, m.data_dir)  # demo:draft-lm is made once, on first use
        draft = load_draft(resolve_model_path(draft_name, m.cache_dir), decoder.target_model, m)
        out[name] = SpeculativeDecoder.from_models(decoder.target_model, draft, decoder.tokenizer, config)
    return out


@contextmanager
def variant_config(decoder: SpeculativeDecoder, changes: dict):
    """Temporarily replace fields of the decoder's config groups (validated at generate). In the
    ``model`` group only ``cpu_linear`` can change (the models are loaded once): the target's and the
    draft's linears are switched to that kernel and back afterwards."""
    saved, kernels = {}, []
    try:
        for group, values in changes.items():
            if not hasattr(decoder.config, group):
                raise ValueError(f"benchmark variant changes unknown config group {group!r}")
            values = dict(values)
            if group == "model":
                if set(values) - {"cpu_linear"}:
                    raise ConfigError(f"a benchmark variant can change only model.cpu_linear (the models are "
                                      f"loaded once), not {sorted(set(values) - {'cpu_linear'})}")
                mode = fast_linear.resolve_cpu_linear(values["cpu_linear"])
                for module in (decoder.target_model, getattr(decoder.drafter, "identity_module", None)):
                    if isinstance(module, torch.nn.Module):
                        kernels.append((module, fast_linear.linear_kernel(module) or "mkl"))
                        fast_linear.set_linear_kernel(module, mode)
            saved[group] = getattr(decoder.config, group)
            setattr(decoder.config, group, dataclasses.replace(saved[group], **values))
        yield
    finally:
        for group, old in saved.items():
            setattr(decoder.config, group, old)
        for module, mode in reversed(kernels):
            fast_linear.set_linear_kernel(module, mode)


def format_table(rows: dict) -> str:
    cols = ["method", "tok/s", "tau", "accept", "nodes/step", "expected/accepted", "x target", "x HF assisted",
            "identical"]
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    fmt = lambda v, p=2: "-" if v is None else f"{v:.{p}f}"  # noqa: E731
    for m, r in rows.items():
        ident = "-" if r["identical"] is None else f"{r['identical']}/{r['prompts']}"
        ratio = r["expected_accepted"] / r["accepted_tokens"] if r.get("accepted_tokens") else None
        lines.append(" | ".join([m, fmt(r["tokens_per_s"]), fmt(r["tau"]), fmt(r["acceptance_rate"], 3),
                                 fmt(r.get("nodes_per_step"), 1), fmt(ratio, 3),
                                 fmt(r.get("speedup_vs_target_only")), fmt(r.get("speedup_vs_hf_assisted")), ident]))
    return "\n".join(lines)
