"""The draft-design study: equal-size drafts of different depth and width, trained alike, measured alike.

    python scripts/draft_study.py experiment=draft_study
    python scripts/draft_study.py experiment=draft_study draft_study.steps=60 draft_study.prompts_per_category=1

Trains every ``draft_study.shapes`` entry on the same teacher shards (``draft.teacher``; resumable,
finished drafts are reused), then measures each on Spec-Bench: draft latency (1 token, a 3-node
frontier), top-1 agreement and the drafted chain's expected tokens (``eval_draft`` settings), and tau
and tokens/s of the default tree decoding, every draft interleaved with the target alone on every
prompt in one run (outputs checked identical to the target's). Prints the table and the verdict on
the seed claim (arXiv 2402.01528); writes ${output_dir}/draft_study-<time>.json and .png (tau vs
throughput; draft latency vs agreement). Returns the best speedup vs the target alone.
"""

import json
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from models.errors import ConfigError
from models.paths import cache_root, repo_path
from speculative_decoder import (
    SpeculativeDecoder,
    SpeculativeDecodingConfig,
    load_draft,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from training.drafts import study, teacher_data
from training.drafts.distill import ensure_config_drafts
from training.drafts.evaluate import chain_agreement, eval_continuations, latency
from training.drafts.train import ensure_teacher, teacher_dir
from training.experiments.benchmark import run_benchmark, select_prompts
from training.experiments.tracking import start_run
from training.provenance import provenance


def _check(s) -> None:
    for key in ("teacher_shards", "steps", "batch_size", "max_seq_len", "save_every", "prompts_per_category",
                "max_new_tokens"):
        v = s.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"draft_study.{key} must be a positive integer, got {v!r}")
    if not isinstance(s.get("warmup_prompts"), int) or s.warmup_prompts < 0:
        raise ConfigError(f"draft_study.warmup_prompts must be an integer >= 0, got {s.get('warmup_prompts')!r}")
    for key in ("lr", "param_tolerance"):
        if not isinstance(s.get(key), (int, float)) or s.get(key) <= 0:
            raise ConfigError(f"draft_study.{key} must be a positive number, got {s.get(key)!r}")


def run(cfg: DictConfig) -> dict:
    if "draft_study" not in cfg:
        raise ConfigError("no draft_study settings: run `python scripts/draft_study.py experiment=draft_study`")
    ensure_config_drafts(cfg, cfg.draft_study.get("reference"))  # demo:draft-lm is made once, on first use
    if "teacher" not in cfg.draft:
        raise ConfigError(f"draft={cfg.draft.get('tag')} has no teacher recipe to learn from; the preset uses "
                          "draft=eagle_more (any draft config with a `teacher` block works)")
    s = cfg.draft_study
    _check(s)
    shapes = study.read_shapes(s.shapes)
    config = SpeculativeDecodingConfig.from_hydra(cfg)
    m = config.model
    cache = cache_root(m.cache_dir)
    target_dir = resolve_model_path(m.target_model_name, m.cache_dir)
    target = load_model(target_dir, m.device, m.dtype, m.attn_implementation, m.cpu_linear)
    tokenizer = load_tokenizer(target_dir)
    counts = study.check_equal_budget(target, shapes, float(s.param_tolerance))

    # Training: the first ``teacher_shards`` shards of the teacher recipe, the same batches for all.
    tcfg = OmegaConf.merge(cfg.draft.teacher, {"num_prompts": s.teacher_shards * cfg.draft.teacher.shard_prompts})
    shards = ensure_teacher(target_dir, m.target_model_name, tcfg, repo_path(cfg.data_dir), cache, m.device,
                            cpu_linear=m.cpu_linear)
    data = teacher_data.load_shards(shards)
    recipe = study.recipe_of(s)
    root = study.study_dir(cache, m.target_model_name, recipe, teacher_dir(cache, m.target_model_name, tcfg).name)
    meta = dict(target=m.target_model_name, teacher_dir=shards[0].parent.name, teacher_shards=len(shards),
                teacher_answer_tokens=sum(x["answer_tokens"] for x in data["meta"]), recipe=recipe)
    print(f"training {len(shapes)} drafts in {root} on {len(shards)} teacher shards "
          f"({meta['teacher_answer_tokens']} answer tokens)", flush=True)
    trained = study.train_all(target, tokenizer, data, shapes, s, root, meta)

    # Measurement: one decoder per draft, sharing the target.
    drafts = {name: load_draft(path, target, m) for name, (path, _) in trained.items()}
    if s.get("reference"):
        drafts["reference"] = load_draft(resolve_model_path(s.reference, m.cache_dir), target, m)
    decoders = {name: SpeculativeDecoder.from_models(target, d, tokenizer, config) for name, d in drafts.items()}
    evalsets = {}  # the continuations, with the target states each draft reads (feature_layers)
    e = cfg.eval_draft
    measured = {}
    for name, dec in decoders.items():
        t0 = time.time()
        layers = tuple(getattr(dec.drafter, "feature_layers", None) or ())
        if layers not in evalsets:
            evalsets[layers] = eval_continuations(cfg, list(layers) or None)
        evaldata, groups = evalsets[layers]
        agree = chain_agreement(dec.drafter, evaldata, e.chain_depth, dec.device, groups)
        lat = latency(target, dec.drafter, e.latency_context, e.latency_repeats,
                      target.get_output_embeddings().weight.shape[0], e.seed)
        measured[name] = (agree, lat)
        print(f"{name}: top-1 {agree['top1']:.3f}, chain E[tokens] {agree['chain_expected_tokens']:.2f}, "
              f"draft {lat['draft_ms']:.2f} ms ({lat['draft_over_target']:.3f}x target) [{time.time() - t0:.0f} s]",
              flush=True)
    prompts, n_warm = select_prompts(repo_path(cfg.data_dir) / cfg.benchmark.prompt_file, 0, s.warmup_prompts,
                                     per_category=s.prompts_per_category, split=cfg.benchmark.split)
    first = next(iter(decoders.values()))
    speed = run_benchmark(first, prompts, ["target_only"], s.max_new_tokens, cfg.benchmark.max_prompt_tokens, n_warm,
                          dict(do_sample=False), decoders=decoders)

    rows = []
    for name in decoders:
        agree, lat = measured[name]
        sp = speed["rows"][name]
        rec = trained[name][1] if name in trained else {}
        d = drafts[name]
        shape = rec.get("shape") or dict(layers=d.config.num_hidden_layers, heads=d.config.num_attention_heads,
                                         intermediate_size=d.config.intermediate_size)
        rows.append(dict(name=name, layers=shape["layers"], heads=shape["heads"],
                         intermediate_size=shape["intermediate_size"], equal_recipe=name in trained,
                         layer_params=sum(p.numel() for p in d.base_model.layers.parameters()),
                         kl_last10=rec.get("kl_last10"), draft_ms=lat["draft_ms"],
                         draft_frontier3_ms=lat["draft_frontier3_ms"], draft_over_target=lat["draft_over_target"],
                         target_ms=lat["target_ms"], top1=agree["top1"], top4=agree["top4"],
                         chain_expected_tokens=agree["chain_expected_tokens"],
                         chain_conditional=agree["chain_conditional"], tau=sp["tau"],
                         tokens_per_s=sp["tokens_per_s"], speedup_vs_target_only=sp["speedup_vs_target_only"],
                         target_tokens_per_s=speed["rows"]["target_only"]["tokens_per_s"],
                         identical=sp["identical"], prompts=sp["prompts"], nodes_per_step=sp["nodes_per_step"],
                         phase_ms_per_token=sp["phase_ms_per_token"], top1_by_group=agree["top1_by_group"],
                         kl_curve=rec.get("kl_curve")))
    verdict = study.verdict([r for r in rows if r["equal_recipe"]])
    print()
    print(study.format_rows(rows))
    print(f"\ntarget alone: {speed['rows']['target_only']['tokens_per_s']:.2f} tok/s; decoder-layer parameters "
          f"{counts}\n{verdict['summary']}; Spearman(depth, x) over the equal-recipe drafts: "
          + ", ".join(f"{k} {v:+.2f}" if v is not None else f"{k} -" for k, v in verdict["spearman_depth_vs"].items()))
    out_dir = repo_path(cfg.output_dir)
    stem = out_dir / f"draft_study-{time.strftime('%Y%m%d-%H%M%S')}"
    png = study.plot_study(rows, stem.with_suffix(".png"),
                           f"draft-design study: {len(shapes)} equal-size drafts, {speed['rows']['target_only']['prompts']} "
                           f"Spec-Bench prompts x {s.max_new_tokens} tokens, {m.dtype}")
    result = dict(rows=rows, verdict=verdict, layer_params=counts, study_dir=str(root),
                  speed={k: v for k, v in speed.items() if k != "per_prompt"}, per_prompt=speed["per_prompt"],
                  provenance=provenance(cfg, device=first.device))
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
    with start_run(cfg, job="draft_study") as tracker:
        cols = ["name", "layers", "heads", "intermediate_size", "layer_params", "draft_ms", "top1",
                "chain_expected_tokens", "tau", "tokens_per_s", "speedup_vs_target_only"]
        tracker.log_table("draft_study", cols, [[r[c] for c in cols] for r in rows])
        tracker.log({f"{r['name']}/{k}": r[k] for r in rows for k in cols[4:]})
        tracker.log({"claim_holds": int(verdict["claim_holds"])})
        tracker.log_image("draft_study_plot", png)
    print(f"\nwrote {stem.with_suffix('.json')} and {png}")
    return result


@hydra.main(version_base="1.3", config_path="../configs", config_name="config")
def main(cfg: DictConfig) -> float:
    rows = run(cfg)["rows"]
    return max(r["speedup_vs_target_only"] for r in rows)


if __name__ == "__main__":
    main()
